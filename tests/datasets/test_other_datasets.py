
import h5py
import numpy as np
import pytest
import torch

from marbench.datasets.aapm_format import write_raw
from marbench.datasets.scoring import AAPMScoringDataModule
from marbench.datasets.splits import make_editmar_split, read_category_csv, read_split
from marbench.datasets.syndeeplesion import SynDeepLesionDataModule
from marbench.physics import preset


def _syndeeplesion_root(root, n_slices=2, n_masks=3):
    """A SynDeepLesion tree in the InDuDoNet+ layout with small random content."""
    rng = np.random.default_rng(0)
    masks = np.zeros((512, 512, n_masks), np.uint8)
    for j in range(n_masks):
        masks[200 + 10 * j: 230 + 10 * j, 240:260, j] = 1
    for split in ("train", "test"):
        np.save(root / f"{split}mask.npy", masks)
        lines = []
        for s in range(n_slices):
            folder = root / f"{split}_640geo" / f"patient{s}" / "slice"
            folder.mkdir(parents=True)
            with h5py.File(folder / "gt.h5", "w") as h:
                h["image"] = np.full((416, 416), 0.192, np.float32)
            for j in range(n_masks):
                with h5py.File(folder / f"{j}.h5", "w") as h:
                    for k in ("ma_CT", "LI_CT"):
                        h[k] = rng.random((416, 416), dtype=np.float32) * 0.4
                    for k in ("ma_sinogram", "LI_sinogram"):
                        h[k] = rng.random((640, 641), dtype=np.float32)
                    h["metal_trace"] = (rng.random((640, 641)) > 0.9).astype(np.uint8)
            lines.append(f"patient{s}/slice/gt.h5")
        (root / f"{split}_640geo_dir.txt").write_text("\n".join(lines) + "\n")
    return root


def test_syndeeplesion_maps_onto_the_batch_convention(tmp_path):
    dm = SynDeepLesionDataModule(_syndeeplesion_root(tmp_path), batch_size=3, test_masks=[0, 1, 2])
    dm.setup("test")
    assert len(dm.datasets["test"]) == 6
    batch = next(iter(dm.test_dataloader()))
    assert batch["gt_image"].shape == (3, 1, 416, 416)
    torch.testing.assert_close(batch["gt_image"], torch.zeros(3, 1, 416, 416))  # 0.192 is water: 0 HU
    assert batch["ma_sinogram"].shape == (3, 1, 640, 641) and batch["metal_trace"].dtype == torch.bool
    assert batch["metal_mask"].shape == (3, 1, 416, 416) and batch["metal_mask"].dtype == torch.bool
    # the 30 x 20 mask pixels at 512 become about (30 x 20) * (416/512)^2 pixels at 416
    assert abs(int(batch["metal_mask"][0].sum()) - 600 * (416 / 512) ** 2) < 40
    g = preset("syndeeplesion")
    # the longest chord through the water square is its diagonal
    assert float(batch["gt_sinogram"].max()) == pytest.approx(0.0192 * g.fov_mm * 2**0.5, rel=0.02)
    assert batch["slice_id"][1] == "slice/1"


def test_syndeeplesion_refuses_too_few_masks(tmp_path):
    dm = SynDeepLesionDataModule(_syndeeplesion_root(tmp_path), test_masks=range(10))
    with pytest.raises(ValueError, match=r"testmask.npy: expected at least 10 masks, found 3"):
        dm.setup("test")


def test_scoring_set_uses_each_case_fov(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "sinograms").mkdir()
    (tmp_path / "fov.csv").write_text("case,fov_mm\n1,500\n2,360\n")
    for case in ("01", "02"):
        img = np.full((512, 512), -1000.0, np.float32)
        img[250:254, 250:254] = 3000.0
        write_raw(tmp_path / "images" / f"{case}.raw", img)
        write_raw(tmp_path / "sinograms" / f"{case}.raw", np.zeros((1000, 1, 900), np.float32))
    dm = AAPMScoringDataModule(tmp_path)
    dm.setup("predict")
    assert [c for c, _ in dm.dataset.cases] == ["01", "02"]
    assert dm.dataset.geometry(360.0).pixel_size_mm == pytest.approx(360 / 512)
    assert dm.dataset.geometry(500.0).sid_mm == 550.0


def test_scoring_set_reports_a_malformed_fov_table(tmp_path):
    (tmp_path / "fov.csv").write_text("case,fov_mm\n1,wide\n")
    dm = AAPMScoringDataModule(tmp_path)
    with pytest.raises(ValueError, match=r"fov.csv:2: expected 'case,fov_mm'"):
        dm.setup("predict")


def test_editmar_split_follows_the_protocol(tmp_path):
    rows = [f"body1/body{i},{cat},p{i // 4}" for cat in "abcdefghij" for i in range(40 * ord(cat), 40 * ord(cat) + 40)]
    csv = tmp_path / "categories.csv"
    csv.write_text("case_id,category,patient\n" + "\n".join(rows) + "\n")
    test, train, pools = make_editmar_split(read_category_csv(csv), test_size=100, train_sizes=(16, 32), seed=3)
    assert len(test) == 100 and all(sum(1 for _, c in test if c == cat) == 10 for cat in "abcdefghij")
    test_ids = {cid for cid, _ in test}
    assert len(train[16]) == 16 and len(train[32]) == 32 and not test_ids & {cid for cid, _ in train[32]}
    assert set(train[16]) < set(train[32])  # nested subsets
    patient = {r.split(",")[0]: r.split(",")[2] for r in rows}
    category = {r.split(",")[0]: r.split(",")[1] for r in rows}
    for cid, refs in pools.items():
        assert len(refs) == 5 and not set(refs) & test_ids
        assert all(category[r] == category[cid] and patient[r] != patient[cid] for r in refs)
    assert make_editmar_split(read_category_csv(csv), test_size=100, train_sizes=(16, 32), seed=3)[1] == train


def test_cli_writes_the_editmar_splits(tmp_path):
    from marbench.cli import main

    rows = [f"body1/body{i},{'ab'[i % 2]}" for i in range(60)]
    (tmp_path / "c.csv").write_text("case_id,category\n" + "\n".join(rows) + "\n")
    assert main(["splits", "editmar", "--categories", str(tmp_path / "c.csv"), "--out", str(tmp_path),
                 "--test-size", "10", "--train-sizes", "16", "32"]) == 0
    for n in (16, 32):
        split = read_split(tmp_path / f"editmar_n{n}.txt")
        assert {k: len(v) for k, v in split.cases.items()} == {"train": n, "test": 10}
    refs = (tmp_path / "editmar_references.txt").read_text().splitlines()[1:]
    assert len(refs) == 10 and all(len(r.split()) == 6 for r in refs)
