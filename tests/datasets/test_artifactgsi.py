"""ArtifactGSI reader and calibration on tiny NIfTI trees built here (layout of ``marbench.datasets.artifactgsi``)."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.arrayproxy import ArrayProxy
from scipy import ndimage

from marbench.datasets.artifactgsi import (
    IMPLANT_TYPES,
    METAL_THRESHOLD_HU,
    UNLABELLED,
    ArtifactGSIDataModule,
    ArtifactGSIDataset,
    Patient,
    calibrate,
    calibrate_volume,
    match_slices,
    scan_patients,
    split_patients,
)

SHAPE = (32, 32, 6)  # (X, Y, Z) as nibabel gives it
IMPLANTS = {"p0": "hip_prosthesis", "p1": "fracture_internal_fixation", "p2": "spinal_internal_fixation",
            "p3": "hip_prosthesis", "c0": "none"}


def _save(path, array):
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), np.eye(4)), path)


def _volume(rng, shape=SHAPE):
    """Smooth random HU content, every slice different, no value above 1000 HU."""
    v = ndimage.gaussian_filter(rng.standard_normal(shape), (1.5, 1.5, 0))
    return (v / v.std() * 150).clip(-900, 900).astype(np.float32)


def _root(tmp_path):
    """Four implant patients (p0 labelled, with metal in slice 2) and one clean patient; returns root, volumes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "artifactgsi"
    volumes = {}
    for pid, implant in IMPLANTS.items():
        folder = root / pid
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"implant": implant, "region": "hip joint"}))
        if implant == "none":
            volumes[pid, "clean"] = _volume(rng)
            _save(folder / "clean.nii.gz", volumes[pid, "clean"])
            continue
        ordinary = _volume(rng)
        if pid == "p0":
            ordinary[10:14, 20:22, 2] = 3000.0  # metal
            ordinary[2:4, 2:4, 2] = METAL_THRESHOLD_HU - 100  # dense, not metal
            labels = np.zeros(SHAPE, np.float32)
            labels[10:14, 20:22, :] = 1
            labels[0:5, 0:3, :] = 4
            volumes[pid, "labels"] = labels
            _save(folder / "labels.nii.gz", labels)
        volumes[pid, "ordinary"], volumes[pid, "gsi"] = ordinary, 0.9 * ordinary + 10
        _save(folder / "ordinary.nii.gz", ordinary)
        _save(folder / "gsi.nii.gz", volumes[pid, "gsi"])
    return root, volumes


@pytest.fixture()
def tree(tmp_path):
    return _root(tmp_path)


def _item(dataset, slice_id):
    return dataset[[f"{p.id}/{z}" for p, z in dataset.index].index(slice_id)]


def test_scan_reads_meta_and_headers(tree):
    root, _ = tree
    patients = scan_patients(root)
    assert [p.id for p in patients] == ["c0", "p0", "p1", "p2", "p3"]
    by_id = {p.id: p for p in patients}
    assert {p.id: p.implant for p in patients} == IMPLANTS
    assert by_id["p0"].shape == SHAPE and by_id["p0"].n_slices == 6 and by_id["p0"].has_labels
    assert not by_id["p1"].has_labels and by_id["p1"].region == "hip joint"
    assert by_id["c0"].clean and set(by_id["c0"].paths) == {"clean"}
    assert set(by_id["p2"].paths) == {"ordinary", "gsi"}


def test_seeded_split_is_by_patient_80_20_and_deterministic():
    patients = [Patient(f"p{i:02d}", "hip_prosthesis", {}, 3, (4, 4, 3)) for i in range(10)]
    first = split_patients(patients, seed=0)
    assert (len(first["train"]), len(first["test"])) == (8, 2)
    train, test = {p.id for p in first["train"]}, {p.id for p in first["test"]}
    assert not train & test and train | test == {p.id for p in patients}
    again = split_patients(list(reversed(patients)), seed=0)  # the order given does not matter, only the seed
    assert [p.id for p in again["test"]] == [p.id for p in first["test"]]
    draws = {tuple(p.id for p in split_patients(patients, seed=s)["test"]) for s in range(6)}
    assert len(draws) > 1  # the seed is used
    tiny = split_patients(patients[:2])
    assert (len(tiny["train"]), len(tiny["test"])) == (1, 1)


def test_dataset_parts_share_no_patient(tree):
    root, _ = tree
    train, test = ArtifactGSIDataset(root, "train"), ArtifactGSIDataset(root, "test")
    train_ids = {train[i]["slice_id"].split("/")[0] for i in range(len(train))}
    test_ids = {test[i]["slice_id"].split("/")[0] for i in range(len(test))}
    assert not train_ids & test_ids
    # one of the five patients is held out; the clean patient's slices are served only with clean=True
    assert train_ids | test_ids == {"p0", "p1", "p2", "p3"}
    assert len(train) + len(test) == 6 * 4


def test_split_file_is_read_and_checked(tree):
    root, _ = tree
    (root / "split.txt").write_text("# fixed split\ntrain p0\ntrain p1\ntest p2\nval p3\n")
    assert {ArtifactGSIDataset(root, "test")[i]["slice_id"].split("/")[0] for i in range(6)} == {"p2"}
    assert len(ArtifactGSIDataset(root, "val")) == 6
    (root / "split.txt").write_text("train p0\ntest p9\n")
    with pytest.raises(ValueError, match=r"split.txt:2: unknown patient 'p9'"):
        ArtifactGSIDataset(root, "train")
    (root / "split.txt").write_text("train p0\nholdout p1\n")
    with pytest.raises(ValueError, match=r"split.txt:2: expected '<train\|val\|test> <patient_id>'"):
        ArtifactGSIDataset(root, "train")


def test_item_contents_shapes_and_dtypes(tree):
    root, volumes = tree
    ds = ArtifactGSIDataset(root, patients=scan_patients(root), k=3, keys=("ma_image", "gt_image", "metal_mask",
                                                                            "labels", "ma_stack", "gt_stack"))
    item = ds[2]  # p0, slice 2
    assert item["slice_id"] == "p0/2" and item["implant"] == "hip_prosthesis" == item["category"]
    assert int(item["implant_index"]) == IMPLANT_TYPES.index("hip_prosthesis")
    assert item["implant_index"].dtype == torch.int64 and item["anatomy"] == "body"
    assert item["region"] == "hip joint" and item["fov_mm"] == pytest.approx(32.0)
    for key in ("ma_image", "gt_image"):
        assert item[key].shape == (1, 32, 32) and item[key].dtype == torch.float32
    for key in ("ma_stack", "gt_stack"):
        assert item[key].shape == (3, 32, 32) and item[key].dtype == torch.float32
    assert item["metal_mask"].dtype == torch.bool and item["labels"].dtype == torch.int64
    np.testing.assert_allclose(item["ma_image"][0].numpy(), volumes["p0", "ordinary"][:, :, 2].T)
    np.testing.assert_allclose(item["gt_image"][0].numpy(), volumes["p0", "gsi"][:, :, 2].T, rtol=1e-6)
    np.testing.assert_array_equal(item["labels"][0].numpy(), volumes["p0", "labels"][:, :, 2].T)
    unlabelled = _item(ds, "p1/0")
    assert (unlabelled["labels"] == UNLABELLED).all() and unlabelled["labels"].shape == (1, 32, 32)


def test_slices_are_transposed_to_row_y_column_x(tmp_path):
    folder = tmp_path / "r" / "a"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text('{"implant": "spinal_internal_fixation"}')
    volume = np.zeros((8, 5, 3), np.float32)  # X = 8, Y = 5: even the slice shape is asymmetric
    volume[6, 1, 1] = 100.0  # x = 6, y = 1
    _save(folder / "ordinary.nii.gz", volume)
    _save(folder / "gsi.nii.gz", volume)
    image = ArtifactGSIDataset(tmp_path / "r", patients=scan_patients(tmp_path / "r"))[1]["ma_image"][0]
    assert image.shape == (5, 8)
    assert image[1, 6] == 100.0 and image.sum() == 100.0  # row = y, column = x


def test_ma_stack_holds_neighbours_and_replicates_the_edges(tree):
    root, volumes = tree
    ds = ArtifactGSIDataset(root, patients=scan_patients(root), k=3)
    v = volumes["p1", "ordinary"]
    middle = _item(ds, "p1/3")
    torch.testing.assert_close(middle["ma_stack"][1], middle["ma_image"][0])
    np.testing.assert_array_equal(middle["ma_stack"][0].numpy(), v[:, :, 2].T)
    np.testing.assert_array_equal(middle["ma_stack"][2].numpy(), v[:, :, 4].T)
    first, last = _item(ds, "p1/0"), _item(ds, "p1/5")
    torch.testing.assert_close(first["ma_stack"][0], first["ma_stack"][1])
    np.testing.assert_array_equal(first["ma_stack"][2].numpy(), v[:, :, 1].T)
    torch.testing.assert_close(last["ma_stack"][2], last["ma_stack"][1])
    np.testing.assert_array_equal(last["ma_stack"][0].numpy(), v[:, :, 4].T)
    with pytest.raises(ValueError, match="odd"):
        ArtifactGSIDataset(root, k=2)


def test_metal_mask_thresholds_the_ordinary_slice(tree):
    root, _ = tree
    ds = ArtifactGSIDataset(root, patients=scan_patients(root))
    mask = _item(ds, "p0/2")["metal_mask"][0]
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[20:22, 10:14] = True  # voxels x 10:14, y 20:22; the 2400 HU patch stays out
    assert torch.equal(mask, expected)
    assert not _item(ds, "p0/1")["metal_mask"].any()


def test_clean_patients_are_their_own_reference(tree):
    root, volumes = tree
    ds = ArtifactGSIDataset(root, patients=scan_patients(root), clean=True)
    assert len(ds) == 6 and {ds[i]["implant"] for i in range(6)} == {"none"}
    item = ds[4]
    assert item["slice_id"] == "c0/4" and int(item["implant_index"]) == 0
    np.testing.assert_array_equal(item["gt_image"][0].numpy(), volumes["c0", "clean"][:, :, 4].T)
    torch.testing.assert_close(item["ma_image"], item["gt_image"])


def test_datamodule_batches_follow_the_convention(tree):
    root, _ = tree
    dm = ArtifactGSIDataModule(root, k=3, batch_size=4)
    dm.setup("fit")
    assert set(dm.datasets) == {"train", "test"}
    batch = next(iter(dm.train_dataloader()))
    assert batch["ma_image"].shape == (4, 1, 32, 32) and batch["gt_image"].shape == (4, 1, 32, 32)
    assert batch["ma_stack"].shape == (4, 3, 32, 32) and batch["metal_mask"].dtype == torch.bool
    assert batch["implant_index"].shape == (4,) and batch["implant_index"].dtype == torch.int64
    assert batch["fov_mm"].shape == (4,)
    for key in ("slice_id", "category", "anatomy", "implant", "region"):
        assert isinstance(batch[key], list) and len(batch[key]) == 4
    has_labels = any(p.has_labels for p in dm.parts["train"] if not p.clean)
    assert ("labels" in batch) == has_labels
    clean = dm.dataset("train", clean=True) if any(p.clean for p in dm.parts["train"]) else dm.dataset(
        "test", clean=True)
    assert len(clean) == 6


def test_reading_an_item_slices_the_proxy_and_never_loads_a_volume(tree, monkeypatch):
    root, _ = tree
    ds = ArtifactGSIDataset(root, patients=scan_patients(root), k=3, keys=("ma_image", "gt_image", "ma_stack"))
    requests = []
    original = ArrayProxy.__getitem__

    def record(self, slicer):
        requests.append(slicer)
        return original(self, slicer)

    def refuse(*args, **kwargs):
        raise AssertionError("a whole volume was loaded")

    monkeypatch.setattr(ArrayProxy, "__getitem__", record)
    monkeypatch.setattr(ArrayProxy, "__array__", refuse)
    monkeypatch.setattr(nib.Nifti1Image, "get_fdata", refuse)
    item = _item(ds, "p2/3")
    assert item["ma_stack"].shape == (3, 32, 32)
    p2 = next(p for p in ds.patients if p.id == "p2")
    assert isinstance(ds._images[p2.paths["ordinary"]].dataobj, ArrayProxy)
    # the ordinary stack reads slices 2..4, the GSI (no gt_stack asked) slice 3 alone
    assert [s[2] for s in requests] == [slice(2, 5), slice(3, 4)]


@pytest.mark.parametrize("case", ["missing_gsi", "shape", "implant", "labels_shape", "empty"])
def test_bad_input_names_files_and_values(tree, case):
    root, _ = tree
    folder = root / "p1"
    if case == "missing_gsi":
        (folder / "gsi.nii.gz").unlink()
        error, pattern = FileNotFoundError, rf"{folder}: implant 'fracture_internal_fixation' requires gsi.nii.gz"
    elif case == "shape":
        _save(folder / "gsi.nii.gz", np.zeros((32, 32, 5)))
        error, pattern = ValueError, r"ordinary.nii.gz has \(32, 32, 6\), .*gsi.nii.gz has \(32, 32, 5\)"
    elif case == "implant":
        (folder / "meta.json").write_text('{"implant": "knee"}')
        error, pattern = ValueError, r"p1/meta.json: unknown implant type 'knee'; expected one of \('none'"
    elif case == "labels_shape":
        _save(folder / "labels.nii.gz", np.zeros((16, 32, 6)))
        error, pattern = ValueError, r"labels.nii.gz has \(16, 32, 6\)"
    else:
        root = root / "empty"
        root.mkdir()
        error, pattern = FileNotFoundError, rf"{root}: no patient folders found"
    with pytest.raises(error, match=pattern):
        scan_patients(root)


def _smooth(rng, shape):
    image = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    return image / image.std()


def test_calibration_recovers_slice_offset_and_intensity_map():
    rng = np.random.default_rng(1)
    ordinary = np.stack([200 * _smooth(rng, (32, 32)) + 40 for _ in range(8)], axis=-1)
    ordinary[12:16, 12:16, 4] = 3500.0  # metal: left out of the fit
    shifted = ordinary[:, :, np.minimum(np.arange(8) + 2, 7)]  # gsi[z] = ordinary[z + 2], last slice repeated
    gsi = 1.1 * shifted - 30
    gsi[12:16, 12:16, 2] = 1800.0  # the GSI shows the metal differently
    matches = match_slices(ordinary, gsi)
    np.testing.assert_array_equal(matches[2:], np.arange(8)[2:] - 2)
    corrected, matches, params = calibrate_volume(ordinary, gsi)
    for i in range(2, 8):
        assert params[i]["scale"] == pytest.approx(1.1, rel=0.01)
        assert params[i]["offset"] == pytest.approx(-30, rel=0.01)
        assert np.allclose(params[i]["shift"], 0, atol=0.05)
        clear = gsi[:, :, matches[i]] < METAL_THRESHOLD_HU
        clear &= ordinary[:, :, i] < METAL_THRESHOLD_HU
        np.testing.assert_allclose(corrected[:, :, i][clear], gsi[:, :, matches[i]][clear], atol=0.1)


def test_calibrate_recovers_a_translation():
    rng = np.random.default_rng(2)
    ordinary = 300 * _smooth(rng, (48, 48))
    gsi = 1.1 * np.roll(ordinary, (3, -2), axis=(0, 1)) - 30
    corrected, params = calibrate(ordinary, gsi)
    np.testing.assert_allclose(params["shift"], (3, -2), atol=0.1)
    assert params["scale"] == pytest.approx(1.1, rel=0.01) and params["offset"] == pytest.approx(-30, rel=0.01)
    np.testing.assert_allclose(corrected[4:-4, 4:-4], gsi[4:-4, 4:-4], atol=0.1)
    _, unshifted = calibrate(ordinary, gsi, translation=False)
    assert unshifted["shift"] == (0.0, 0.0) and abs(unshifted["scale"] - 1.1) > 0.05  # misaligned fit is wrong


def test_raw_product_of_eq1_favours_a_bright_slice_ncc_does_not():
    rng = np.random.default_rng(3)
    ordinary = np.stack([100 + 50 * _smooth(rng, (32, 32)) for _ in range(6)], axis=-1)
    gsi = ordinary.copy()
    gsi[:, :, 0] = 2000 + 50 * _smooth(rng, (32, 32))  # a bright, unrelated slice
    np.testing.assert_array_equal(match_slices(ordinary, gsi)[1:], np.arange(1, 6))
    assert (match_slices(ordinary, gsi, similarity="product") == 0).all()
    with pytest.raises(ValueError, match="unknown similarity"):
        match_slices(ordinary, gsi, similarity="mse")
