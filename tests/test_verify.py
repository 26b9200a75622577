"""``marbench verify``: a record that the code reproduces passes, a tampered one fails with the value named, and a
record of other data is refused before anything runs."""
import json
import shutil

import pytest

from marbench.evaluation.records import read_record
from marbench.grid import load_grid, run_grid
from marbench.verify import (
    EXIT_DISAGREE,
    EXIT_REFUSED,
    Tolerance,
    VerifyRefused,
    compare_records,
    format_table,
    main,
    tolerance_for,
    verify_records,
)
from tests.conftest import LI_ROW, write_tiny_grid


@pytest.fixture(scope="module")
def li_records(tiny_benchmark, tmp_path_factory):
    """A LI row of the tiny benchmark run by the grid runner (aapm-hu and editmar records)."""
    out, _ = tiny_benchmark
    folder = tmp_path_factory.mktemp("verify-grid")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        run_grid(load_grid(write_tiny_grid(folder, out, {"li": LI_ROW})), leaderboard=False)
    return sorted((folder / "board" / "results").glob("tiny__li__*.json"))


def _copy(records, tmp_path):
    folder = tmp_path / "committed"
    folder.mkdir()
    return [shutil.copy(p, folder / p.name) for p in records]


def test_an_untouched_record_passes(li_records, tmp_path, capsys):
    assert [p.name for p in li_records] == ["tiny__li__aapm-hu__seed0.json", "tiny__li__editmar__seed0.json"]
    rows, ok = verify_records(li_records, workdir=tmp_path)
    assert ok and rows and all(r.ok for r in rows)
    rmse = next(r for r in rows if r.record == li_records[0].name and r.metric == "rmse_hu" and r.scope == "mean")
    assert rmse.committed == read_record(li_records[0]).metrics["overall"]["rmse_hu"]["mean"]
    assert rmse.difference == 0.0  # a deterministic row reproduces bit for bit
    # every slice and category value was compared, the timings were not
    assert {r.scope for r in rows if r.metric == "psnr"} == {"mean", "std", "n", "per category", "per slice"}
    assert next(r for r in rows if r.metric == "seconds").tolerance == "not compared (wall time)"
    assert main(li_records, workdir=tmp_path / "again") == 0
    assert "tiny__li__editmar__seed0.json: agrees" in capsys.readouterr().out


def test_a_tampered_metric_fails_and_the_table_names_it(li_records, tmp_path, capsys):
    aapm, editmar = _copy(li_records, tmp_path)
    data = json.loads(aapm.read_text())
    victim = data["slices"][2]
    victim["rmse_hu"] += 0.5
    aapm.write_text(json.dumps(data))
    assert main([aapm, editmar], workdir=tmp_path / "work", only_failures=True) == EXIT_DISAGREE
    out = capsys.readouterr().out
    assert "tiny__li__aapm-hu__seed0.json: 1 of" in out and "tiny__li__editmar__seed0.json: agrees" in out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("| rmse_hu")]
    assert f"per slice ({victim['slice_id']})" in line and "| -0.5 |" in line and line.endswith("| NO |")


def test_a_tampered_aggregate_fails(li_records, tmp_path):
    (aapm,) = _copy(li_records[:1], tmp_path)
    data = json.loads(aapm.read_text())
    data["metrics"]["overall"]["ssim"]["mean"] *= 1 + 1e-7  # beyond float64 round-off, far below display digits
    aapm.write_text(json.dumps(data))
    rows, ok = verify_records([aapm], workdir=tmp_path / "work")
    assert not ok
    assert [(r.metric, r.scope) for r in rows if not r.ok] == [("ssim", "mean")]
    assert "| ssim | mean |" in format_table(rows, only_failures=True)


def test_other_data_is_refused_before_running(li_records, tmp_path, capsys):
    (aapm,) = _copy(li_records[:1], tmp_path)
    data = json.loads(aapm.read_text())
    data["dataset"]["data_manifest_sha256"] = "0" * 64
    aapm.write_text(json.dumps(data))
    with pytest.raises(VerifyRefused, match="data differ: the record's data manifest sha256 is 0000"):
        verify_records([aapm], workdir=tmp_path / "work")
    assert not (tmp_path / "work" / "row0").exists()  # nothing ran
    assert main([aapm], workdir=tmp_path / "work2") == EXIT_REFUSED
    assert "refused: " in capsys.readouterr().err


def test_another_split_or_weights_are_refused(li_records, tmp_path):
    (aapm,) = _copy(li_records[:1], tmp_path)
    original = aapm.read_text()
    data = json.loads(original)
    data["dataset"]["split_sha256"] = "f" * 64
    aapm.write_text(json.dumps(data))
    with pytest.raises(VerifyRefused, match="split differs: the record's split sha256 is ffff"):
        verify_records([aapm], workdir=tmp_path / "a")
    data = json.loads(original)
    data["method"]["weights"] = {"backbone": "ab" * 32}
    aapm.write_text(json.dumps(data))
    with pytest.raises(VerifyRefused, match="method weights differ"):
        verify_records([aapm], workdir=tmp_path / "b")


def test_a_data_file_that_differs_from_the_manifest_is_refused(li_records, tiny_benchmark, tmp_path):
    out, manifest = tiny_benchmark
    copy = tmp_path / "data"
    shutil.copytree(out, copy)
    rel = sorted(manifest["files"])[0]
    with open(copy / rel, "r+b") as f:
        f.write(b"\0\0\0\1")
    with pytest.raises(VerifyRefused, match=f"lists {rel} with sha256 {manifest['files'][rel]}"):
        verify_records(li_records[:1], data_root=str(copy), workdir=tmp_path / "work")


def test_an_unreadable_record_is_refused(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"record_version": "1"}))
    with pytest.raises(VerifyRefused, match="record_version '1', expected"):
        verify_records([bad])


def test_tolerances():
    assert str(tolerance_for("perceptual", "fid")) == "rel 1e-06"
    assert str(tolerance_for("editmar", "fid")) == "rel 1e-09"  # by protocol/metric first
    t = Tolerance(rtol=1e-9)
    assert t.allows(None, None) and t.allows(float("nan"), float("nan"))
    assert not t.allows(None, 1.0) and not t.allows(2.0, float("nan"))
    assert Tolerance().allows(3, 3.0) and not Tolerance().allows(3.0, 3.0 + 1e-15)
    assert Tolerance(atol=0.1).allows(0.0, -0.1) and not Tolerance(atol=0.1).allows(0.0, 0.11)


def test_compare_records_names_missing_slices(li_records):
    a = read_record(li_records[1])
    b = read_record(li_records[1])
    b.slices = b.slices[1:]
    rows = compare_records(a, b)
    (bad,) = [r for r in rows if not r.ok]
    assert (bad.metric, bad.scope, bad.committed, bad.rerun) == ("slice_id", "slices", 7, 6)
    assert a.slices[0]["slice_id"] in bad.where


def test_a_trained_row_is_retrained_with_its_seed_and_reproduces(tiny_grid, tmp_path, capsys):
    unet = """
model:
  class_path: marbench.methods.unet.ResidualUNet
  init_args: {base: 4, depth: 2, lr: 0.01}
data:
  init_args: {keys: [ma_image, li_image, gt_image, metal_mask]}
trainer: {max_epochs: 1, limit_val_batches: 0}
"""
    run_grid(load_grid(tiny_grid({"unet": unet}, protocols="[editmar]", seeds={"unet": "[1]"})), leaderboard=False)
    record = tmp_path / "board" / "results" / "tiny__unet__editmar__seed1.json"
    rows, ok = verify_records([record], workdir=tmp_path / "work")
    assert ok, format_table(rows, only_failures=True)
    psnr = next(r for r in rows if r.metric == "psnr" and r.scope == "mean")
    assert psnr.difference == 0.0
    assert "re-running unet (seed 1) for editmar" in capsys.readouterr().out
    # a trainable method's weights may be built by fit from the data (a cached pre-training): not checked before
    # the run; a difference after it is reported, and the metrics decide
    (tampered,) = _copy([record], tmp_path)
    data = json.loads(tampered.read_text())
    data["method"]["weights"] = {"pre-training": "ab" * 32}
    tampered.write_text(json.dumps(data))
    notes = []
    rows, ok = verify_records([tampered], workdir=tmp_path / "work2", log=notes.append)
    assert ok and rows and all(r.ok for r in rows)
    assert any("method weights differ from the record's: {'pre-training': 'abab" in n for n in notes), notes


def test_a_record_of_an_older_protocol_version_is_rerun_under_that_version(tiny_grid, tmp_path):
    v1 = "{class_path: marbench.evaluation.protocols.AAPMHU, init_args: {version: '1', scale_max: 20000.0}}"
    run_grid(load_grid(tiny_grid({"li": LI_ROW}, protocols=f"[{v1}]")), leaderboard=False)
    record = tmp_path / "board" / "results" / "tiny__li__aapm-hu__seed0.json"
    data = json.loads(record.read_text())
    assert data["protocol"]["version"] == "1" and data["protocol"]["scale_max"] == 20000.0
    assert verify_records([record], workdir=tmp_path / "a")[1]  # configured by class_path
    # as if made when v1 was the current version: the configuration names the protocol only
    evaluator = data["manifest"]["config"]["trainer"]["callbacks"][0]["init_args"]
    evaluator["protocols"] = ["aapm-hu"]
    record.write_text(json.dumps(data))
    rows, ok = verify_records([record], workdir=tmp_path / "b")
    assert ok and next(r for r in rows if r.metric == "psnr" and r.scope == "mean").difference == 0.0
    data["protocol"]["version"] = "0"
    record.write_text(json.dumps(data))
    with pytest.raises(VerifyRefused, match="protocol 'aapm-hu' version '0': .*no version '0'.*regenerate"):
        verify_records([record], workdir=tmp_path / "c")
    data["protocol"].update(version="1", metal_dilation_px=3)  # a convention changed without a new version
    record.write_text(json.dumps(data))
    with pytest.raises(VerifyRefused, match=r"conventions differ from the record's in \['metal_dilation_px'\]"):
        verify_records([record], workdir=tmp_path / "d")
