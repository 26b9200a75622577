"""Evaluation under Lightning DDP (gloo on CPU): 1 and 2 processes give the same records' metrics."""
import json

import pytest

from marbench.datasets.aapm import AAPMCTMARDataModule
from marbench.evaluation.evaluator import evaluate
from marbench.methods.classic import LinearInterpolation

KEYS = ("ma_image", "gt_image", "metal_mask", "li_image")


def _run(out, results, **trainer):
    dm = AAPMCTMARDataModule(out, anatomy=("body",), split=str(out / "split.txt"), batch_size=2, keys=KEYS)
    evaluate(LinearInterpolation(), dm, ["aapm-hu", "editmar"], "tiny", out_dir=str(results), save_example=False,
             **trainer)
    return {p: json.loads((results / f"tiny__li__{p}__seed0.json").read_text()) for p in ("aapm-hu", "editmar")}


def test_two_processes_match_one(tiny_benchmark, tmp_path):
    out, _ = tiny_benchmark
    single = _run(out, tmp_path / "one")
    double = _run(out, tmp_path / "two", devices=2, strategy="ddp_spawn")
    for protocol in single:
        a, b = single[protocol], double[protocol]
        assert b["manifest"]["world_size"] == 2 and a["manifest"]["world_size"] == 1
        # an odd number of test slices: the distributed sampler pads one repeat, which must not count
        assert len(a["slices"]) % 2 == 1
        assert [s["slice_id"] for s in a["slices"]] == [s["slice_id"] for s in b["slices"]]
        for name, stats in a["metrics"]["overall"].items():
            if name != "seconds":
                assert b["metrics"]["overall"][name]["mean"] == pytest.approx(stats["mean"], abs=1e-6)
                assert b["metrics"]["overall"][name]["n"] == stats["n"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
