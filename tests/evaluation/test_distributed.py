"""Evaluation under Lightning DDP (gloo on CPU): 1 and 2 processes give the same records' metrics."""
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from marbench.datasets.aapm import AAPMCTMARDataModule
from marbench.evaluation.evaluator import evaluate
from marbench.methods.classic import LinearInterpolation

KEYS = ("ma_image", "gt_image", "metal_mask", "li_image")


class _SpawnDestroyingGloo(DDPStrategy):
    """``ddp_spawn`` whose workers destroy their gloo process group when the strategy tears down. Lightning destroys
    an NCCL group at exit (``atexit``) but leaves a gloo one to the interpreter's finalisation, where rank 1 aborted
    in 2 of 20 runs of this test ("terminate called without an active exception", SIGABRT) after the records were
    written; with the group destroyed, 0 of 30 (2026-12-07). ``evaluate`` itself does not do this yet (README,
    "Multi-GPU")."""

    def teardown(self) -> None:
        super().teardown()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(out, results, **trainer):
    dm = AAPMCTMARDataModule(out, anatomy=("body",), split=str(out / "split.txt"), batch_size=2, keys=KEYS)
    evaluate(LinearInterpolation(), dm, ["aapm-hu", "editmar"], "tiny", out_dir=str(results), save_example=False,
             **trainer)
    return {p: json.loads((results / f"tiny__li__{p}__seed0.json").read_text()) for p in ("aapm-hu", "editmar")}


def test_two_processes_match_one(tiny_benchmark, tmp_path, monkeypatch):
    out, _ = tiny_benchmark
    # the spawned workers unpickle the strategy by its module's name: put the repository root on their path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    single = _run(out, tmp_path / "one")
    double = _run(out, tmp_path / "two", devices=2, strategy=_SpawnDestroyingGloo(start_method="spawn"))
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
