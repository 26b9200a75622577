import json
import shutil

import pytest

from marbench.datasets.aapm import AAPMCTMARDataModule
from marbench.evaluation.evaluator import evaluate
from marbench.evaluation.records import read_record
from marbench.leaderboard import build_leaderboards, check_leaderboards, paper_table_markdown
from marbench.method import PaperTable
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


def _copy(board, tmp_path):
    shutil.copytree(board / "results", tmp_path / "results")
    return tmp_path


def _edit(path, change):
    r = json.loads(path.read_text())
    change(r)
    path.write_text(json.dumps(r))


def test_records_hold_slices_aggregates_specs_and_a_manifest(board):
    r = read_record(board / "results" / "tiny__li__aapm-hu__seed0.json")
    assert r.dataset["slices"] == len(r.slices) > 0
    assert r.dataset["split_sha256"] and len(r.dataset["data_manifest_sha256"]) == 64
    assert set(r.metrics["overall"]) == {"rmse_hu", "psnr", "ssim", "seconds"}
    assert [(m["name"], m["unit"], m["digits"]) for m in r.metric_specs] == [("rmse_hu", "HU", 2), ("psnr", "dB", 2),
                                                                              ("ssim", "", 4)]
    m = r.manifest
    assert m["packages"]["torch"] and m["world_size"] == 1 and m["device"] == "cpu" and "git_sha" in m
    assert {"evaluation_s", "method_s", "protocol_s"} <= set(m["timings"])
    mean = sum(s["rmse_hu"] for s in r.slices) / len(r.slices)
    assert r.metrics["overall"]["rmse_hu"]["mean"] == pytest.approx(mean)


def test_tables_mark_the_best_with_the_declared_digits(board):
    build_leaderboards(board)
    md = (board / "tiny__aapm-hu.md").read_text()
    assert "rmse_hu ↓" in md and "psnr ↑" in md
    li_row = next(line for line in md.splitlines() if line.startswith("| li "))
    assert li_row.count("**") == 6  # li beats the uncorrected input on all three metrics
    assert li_row.count("[") == 3  # a bootstrap interval per metric
    ssim_cell = li_row.split("|")[4]
    assert len(ssim_cell.split("±")[0].strip(" *").split(".")[1]) == 4  # SSIM declares 4 digits
    assert "Paired Wilcoxon" in md
    csv = (board / "tiny__aapm-hu.csv").read_text().splitlines()[0]
    assert "rmse_hu_ci_low" in csv and "rmse_hu_p_vs_best" in csv and "rmse_hu_seed_std" in csv
    assert (board / "figures" / "tiny__aapm-hu.png").is_file() and (board / "figures" / "tiny__panel.png").is_file()
    assert (board / "index.html").read_text().startswith("<!doctype html>")


def test_training_seeds_are_averaged_and_best_needs_every_seed(board, tmp_path):
    root = _copy(board, tmp_path)
    results = root / "results"
    for seed, shift in ((1, 1.0), (2, 2.0)):  # two more seeds of li, each a little worse on every slice
        path = results / f"tiny__li__aapm-hu__seed{seed}.json"
        shutil.copy(results / "tiny__li__aapm-hu__seed0.json", path)

        def worse(r, seed=seed, shift=shift):
            r["seed"] = seed
            for s in r["slices"]:
                s["rmse_hu"] += shift
        _edit(path, worse)
    build_leaderboards(root, figures=False)
    line = next(x for x in (root / "tiny__aapm-hu.md").read_text().splitlines() if x.startswith("| li "))
    single = read_record(results / "tiny__li__aapm-hu__seed0.json").metrics["overall"]["rmse_hu"]["mean"]
    assert f"{single + 1.0:.2f}" in line and "seeds ± 0.82" in line  # mean of +0, +1, +2; std of 0, 1, 2
    assert line.split("|")[-3].strip() == "3"  # the seeds column
    # a seed of li as bad as the uncorrected input: li is no longer best across seeds, nothing is bold
    unc = read_record(results / "tiny__uncorrected__aapm-hu__seed0.json")
    bad = {s["slice_id"]: s["rmse_hu"] for s in unc.slices}

    def as_bad(r):
        for s in r["slices"]:
            s["rmse_hu"] = bad[s["slice_id"]] + 1
    _edit(results / "tiny__li__aapm-hu__seed2.json", as_bad)
    build_leaderboards(root, figures=False)
    rows = [x for x in (root / "tiny__aapm-hu.md").read_text().split("Paired")[0].splitlines() if x.startswith("| ")]
    assert all("**" not in x.split("|")[2] for x in rows)  # rmse_hu column: no bold


def test_all_rows_tied_bold_nothing(board, tmp_path):
    root = _copy(board, tmp_path)
    results = root / "results"
    shutil.copy(results / "tiny__li__editmar__seed0.json", results / "tiny__uncorrected__editmar__seed0.json")
    _edit(root / "results" / "tiny__uncorrected__editmar__seed0.json",
          lambda r: r["method"].update(name="uncorrected"))
    build_leaderboards(root, figures=False)
    table = (root / "tiny__editmar.md").read_text().split("Paired")[0]
    assert "**" not in "".join(x for x in table.splitlines() if x.startswith("| "))


def test_a_metric_undefined_in_the_split_gets_no_column(board, tmp_path):
    root = _copy(board, tmp_path)
    for path in (root / "results").glob("*__aapm-hu__*.json"):
        def undefined(r):
            for s in r["slices"]:
                s["ssim"] = None
        _edit(path, undefined)
    build_leaderboards(root, figures=False)
    assert "ssim" not in (root / "tiny__aapm-hu.md").read_text().split("Paired")[0]


def test_refuses_to_merge_different_splits(board, tmp_path):
    root = _copy(board, tmp_path)
    _edit(root / "results" / "tiny__li__aapm-hu__seed0.json", lambda r: r["dataset"].update(split_sha256="0" * 64))
    with pytest.raises(ValueError, match="split sha256"):
        build_leaderboards(root, figures=False)


def test_a_record_with_a_missing_field_or_old_version_is_named(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "x.json").write_text(json.dumps({"record_version": "2", "method": {}}))
    with pytest.raises(ValueError, match=r"x.json: result record misses fields \['dataset'"):
        build_leaderboards(tmp_path)
    (tmp_path / "results" / "x.json").write_text(json.dumps({"record_version": "1"}))
    with pytest.raises(ValueError, match="x.json: record_version '1', expected '2'"):
        build_leaderboards(tmp_path)


def test_check_finds_a_stale_table(board):
    build_leaderboards(board, figures=False)
    assert check_leaderboards(board) == []
    table = board / "tiny__editmar.md"
    table.write_text(table.read_text().replace("li", "lj"))
    assert any("tiny__editmar.md: differs" in p for p in check_leaderboards(board))


def test_paper_table_puts_the_paper_beside_ours_and_checks_its_order(board):
    records = [read_record(board / "results" / f"tiny__{n}__aapm-hu__seed0.json") for n in ("uncorrected", "li")]
    values = {"A": {"rmse_hu": 50.0, "ssim": 0.9}, "B": {"rmse_hu": 40.0, "ssim": 0.95}}
    table = PaperTable("toy", "a paper, Table 9", "aapm-hu", (("uncorrected", "A"), ("li", "B")), values, "rmse_hu",
                       note="paper: real data")
    md = paper_table_markdown(table, "tiny", records)
    assert "| A | uncorrected | 1 |" in md and "| 40.00 |" in md and "paper: real data" in md
    assert "paper B < A; ours B < A" in md and "**holds**" in md
    swapped = PaperTable("toy", "", "aapm-hu", (("li", "A"), ("uncorrected", "B")), values, "rmse_hu")
    assert "**does not hold**" in paper_table_markdown(swapped, "tiny", records)
    absent = PaperTable("toy", "", "aapm-hu", (("no-such-row", "A"),), {"A": values["A"]}, "rmse_hu")
    assert paper_table_markdown(absent, "tiny", records) is None
