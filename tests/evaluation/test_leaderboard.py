import json

import pytest

from marbench.datasets.aapm import AAPMCTMARDataModule
from marbench.evaluation.evaluator import evaluate
from marbench.evaluation.records import read_record
from marbench.leaderboard import build_leaderboards
from marbench.methods.classic import LinearInterpolation, Uncorrected


@pytest.fixture(scope="module")
def board(tiny_benchmark, tmp_path_factory):
    out, _ = tiny_benchmark
    root = tmp_path_factory.mktemp("leaderboards")
    for method in (Uncorrected(), LinearInterpolation()):
        dm = AAPMCTMARDataModule(out, anatomy=("body",), split=str(out / "split.txt"), batch_size=3,
                                 keys=("ma_image", "gt_image", "metal_mask", "li_image"))
        evaluate(method, dm, ["aapm-hu", "editmar"], "tiny", out_dir=str(root / "results"))
    return root


def test_records_hold_slices_aggregates_and_a_manifest(board):
    r = read_record(board / "results" / "tiny__li__aapm-hu__seed0.json")
    assert r["dataset"]["slices"] == len(r["slices"]) > 0
    assert r["dataset"]["split_sha256"] and len(r["dataset"]["data_manifest_sha256"]) == 64
    assert set(r["metrics"]["overall"]) == {"rmse_hu", "psnr", "ssim", "seconds"}
    m = r["manifest"]
    assert m["packages"]["torch"] and m["world_size"] == 1 and m["device"] == "cpu" and "git_sha" in m
    mean = sum(s["rmse_hu"] for s in r["slices"]) / len(r["slices"])
    assert r["metrics"]["overall"]["rmse_hu"]["mean"] == pytest.approx(mean)


def test_tables_mark_the_best_and_directions(board):
    build_leaderboards(board)
    md = (board / "tiny__aapm-hu.md").read_text()
    assert "rmse_hu ↓" in md and "psnr ↑" in md
    li_row = next(line for line in md.splitlines() if line.startswith("| li "))
    assert li_row.count("**") == 6  # li beats the uncorrected input on all three metrics
    assert li_row.count("[") == 3  # a bootstrap interval per metric
    assert "Paired Wilcoxon" in md
    csv = (board / "tiny__aapm-hu.csv").read_text().splitlines()[0]
    assert "rmse_hu_ci_low" in csv and "rmse_hu_p_vs_best" in csv
    assert (board / "tiny__editmar.csv").is_file() and (board / "figures" / "tiny__panel.png").is_file()
    assert (board / "index.html").read_text().startswith("<!doctype html>")


def test_refuses_to_merge_different_splits(board, tmp_path):
    import shutil

    shutil.copytree(board / "results", tmp_path / "results")
    path = tmp_path / "results" / "tiny__li__aapm-hu__seed0.json"
    r = json.loads(path.read_text())
    r["dataset"]["split_sha256"] = "0" * 64
    path.write_text(json.dumps(r))
    with pytest.raises(ValueError, match="split sha256"):
        build_leaderboards(tmp_path, figures=False)


def test_a_record_with_a_missing_field_is_named(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "x.json").write_text(json.dumps({"record_version": "1", "method": {}}))
    with pytest.raises(ValueError, match=r"x.json: result record misses fields \['dataset'"):
        build_leaderboards(tmp_path)


def test_check_finds_a_stale_table(board):
    from marbench.leaderboard import check_leaderboards

    build_leaderboards(board, figures=False)
    assert check_leaderboards(board) == []
    table = board / "tiny__editmar.md"
    table.write_text(table.read_text().replace("li", "lj"))
    assert any("tiny__editmar.md: differs" in p for p in check_leaderboards(board))


def test_ablation_table_puts_the_paper_beside_ours_and_checks_its_order(board):
    from marbench.leaderboard import ABLATIONS, Ablation

    records = {n: read_record(board / "results" / f"tiny__{n}__aapm-hu__seed0.json") for n in ("uncorrected", "li")}
    paper = {"A": {"rmse_hu": 50.0, "ssim": 0.9}, "B": {"rmse_hu": 40.0, "ssim": 0.95}}
    ablation = Ablation("toy", "a paper, Table 9", "aapm-hu", (("uncorrected", "A"), ("li", "B")), paper, "rmse_hu")
    md = ablation.markdown("tiny", records)
    assert "| A | uncorrected |" in md and "| 40.00 |" in md and "(rmse_hu: A > B) **holds**" in md
    swapped = Ablation("toy", "", "aapm-hu", (("li", "A"), ("uncorrected", "B")), paper, "rmse_hu")
    assert "**does not hold**" in swapped.markdown("tiny", records)
    assert ablation.markdown("tiny", {}) is None
    assert [row for row, _ in ABLATIONS[0].rows] == ["sscd-sinonet", "sscd-sinonet-fbpcons", "sscd-joint",
                                                    "sscd-joint-mtr"]
