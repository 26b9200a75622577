"""A benchmark simulated on clean CT: a real DICOM slice that pydicom ships (CT_small.dcm) and
a NIfTI volume written here go through the whole chain; malformed inputs fail with the file named."""
import json
import math

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from marbench.datasets.aapm import AAPMCTMARDataModule  # noqa: E402
from marbench.datasets.splits import read_split  # noqa: E402
from marbench.datasets.synthetic import folder_fingerprint, generate_from_clean_images  # noqa: E402
from marbench.datasets.synthetic.clean_ct import (  # noqa: E402
    clean_implants,
    read_categories,
    read_clean_images,
    resample_to_geometry,
    tissue_fractions,
    tissue_labels,
)
from marbench.datasets.synthetic.tissues import TISSUES  # noqa: E402
from marbench.physics import CTPhysics, preset  # noqa: E402


def _ct_small():
    from pydicom.data import get_testdata_file

    return get_testdata_file("CT_small.dcm")


def _dicom_hu(path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _nifti_from_dicom(path, out, slices=2):
    """A RAS NIfTI volume whose every axial slice is the DICOM slice (LPS -> RAS affine built from the header),
    the second one 40 HU brighter."""
    ds = pydicom.dcmread(path)
    hu = _dicom_hu(path)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    # array index (i, j, k) = (column, row, slice); LPS position of (col, row) = IPP + col*dc*x + row*dr*y
    affine = np.diag([-dc, -dr, 2.0, 1.0])  # LPS -> RAS flips x and y
    affine[:3, 3] = [-float(ds.ImagePositionPatient[0]), -float(ds.ImagePositionPatient[1]), 0.0]
    data = np.stack([hu.T + 40.0 * k for k in range(slices)], axis=-1).astype(np.float32)
    nib.save(nib.Nifti1Image(data, affine), out)


@pytest.fixture(scope="module")
def clean_benchmark(tmp_path_factory):
    """CT_small.dcm and a 2-slice NIfTI volume, simulated at the ``tiny`` preset through the CLI."""
    from marbench.cli import main

    src = tmp_path_factory.mktemp("clean-src")
    (src / "dicom").mkdir()
    (src / "dicom" / "CT_small.dcm").write_bytes(open(_ct_small(), "rb").read())
    _nifti_from_dicom(_ct_small(), src / "volume.nii.gz")
    (src / "README.txt").write_text("not an image")
    out = tmp_path_factory.mktemp("clean-out")
    assert main(["simulate", "--clean-images", str(src), "--preset", "tiny", "--out", str(out), "--quiet"]) == 0
    return src, out, json.loads((out / "manifest.json").read_text())


def test_readers_agree_on_orientation_and_hu():
    images, inputs = read_clean_images(_ct_small())
    assert len(images) == 1 and images[0].kind == "dicom"
    np.testing.assert_array_equal(images[0].hu, _dicom_hu(_ct_small()).astype(np.float32))
    assert images[0].spacing_mm == pytest.approx((0.661468, 0.661468))
    assert list(inputs["files"]) == ["CT_small.dcm"]


def test_nifti_slices_match_the_dicom_slice(tmp_path):
    _nifti_from_dicom(_ct_small(), tmp_path / "v.nii.gz", slices=3)
    images, _ = read_clean_images(tmp_path / "v.nii.gz")
    ref = _dicom_hu(_ct_small())
    assert [im.index for im in images] == [0, 1, 2]
    for k, im in enumerate(images):  # RAS storage turned back to the display convention, no flip
        np.testing.assert_allclose(im.hu, ref + 40.0 * k, atol=1e-3)
        assert im.spacing_mm == pytest.approx((0.661468, 0.661468))


def test_whole_chain_reads_back_and_li_restores_it(clean_benchmark):
    src, out, manifest = clean_benchmark
    assert manifest["cases"] == {"main": 3, "quantity_sweep": 5, "size_sweep": 4}
    assert manifest["clean_images"]["ignored_files"] == 1 and manifest["clean_images"]["sources"] == 2
    assert folder_fingerprint(out)["sha256"] == manifest["fingerprint"]["sha256"]
    split = read_split(out / "split.txt")
    parts = {cid: name for name, rows in split.cases.items() for cid, _ in rows}
    assert sorted(parts) == ["body1/body1", "body1/body2", "body1/body3"]
    assert set(parts.values()) == {"train", "test"}  # two sources: one test, one train, never split by slice
    infos = {cid: json.loads((out / "body1" / "Mask" / f"training_body_metalinfo{cid[-1]}.json").read_text())
             for cid in parts}
    nifti = [cid for cid, info in infos.items() if info["source"] == "volume.nii.gz"]
    assert len(nifti) == 2 and parts[nifti[0]] == parts[nifti[1]]

    dm = AAPMCTMARDataModule(out, anatomy=("body",), split=str(out / "split.txt"), batch_size=4)
    dm.setup("test")
    dicom_part = parts[next(c for c, i in infos.items() if i["source"] == "dicom/CT_small.dcm")]
    ds = dm.dataset(dicom_part, ("gt_image", "ma_image", "li_image", "metal_mask"))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    g = preset("aapm_body_128")
    assert batch["gt_image"].shape[1:] == (1, 128, 128)
    # the simulated clean image is the resampled DICOM slice (within noise and FBP blur)
    expected, _ = resample_to_geometry(_dicom_hu(_ct_small()), (0.661468, 0.661468), g, "CT_small.dcm")
    i = list(batch["slice_id"]).index(next(c for c, inf in infos.items()
                                                       if inf["source"] == "dicom/CT_small.dcm"))
    gt = batch["gt_image"][i, 0].numpy()
    body = expected > -500
    assert 20 < body.sum() < 1500  # an 85 mm square at 3.125 mm: about 27 x 27 pixels
    assert float(np.median(np.abs(gt[body] - expected[body]))) < 80.0
    assert float(np.abs(gt[:10, :10] + 1000).mean()) < 60.0  # air in the corner
    metal = batch["metal_mask"][i, 0]
    assert metal.any() and metal.numpy()[~body].sum() == 0  # metal inside the body only

    from marbench.methods.classic import LinearInterpolation

    li = LinearInterpolation().eval()
    restored = li.restore(batch, CTPhysics())
    assert torch.isfinite(restored).all()
    keep = torch.from_numpy(body)[None, None].expand_as(restored) & ~batch["metal_mask"]
    err_li = (restored - batch["gt_image"])[keep].pow(2).mean().sqrt()
    err_ma = (batch["ma_image"] - batch["gt_image"])[keep].pow(2).mean().sqrt()
    assert float(err_li) < float(err_ma)  # LI removes part of the artifact in the body


def test_rerun_is_a_no_op_and_other_inputs_are_refused(clean_benchmark, tmp_path):
    src, out, manifest = clean_benchmark
    files = {f: f.stat().st_mtime_ns for f in out.rglob("*.raw")}
    again = generate_from_clean_images(out, src, "tiny", progress=False)
    assert again == manifest and all(f.stat().st_mtime_ns == t for f, t in files.items())
    with pytest.raises(ValueError, match=r"parts that differ: inputs.*--force"):
        generate_from_clean_images(out, src, "tiny", crop_to_fov=True, progress=False)
    changed = tmp_path / "changed"
    changed.mkdir()
    _nifti_from_dicom(_ct_small(), changed / "volume.nii.gz", slices=1)
    with pytest.raises(ValueError, match=rf"{out}: holds a benchmark generated with other code or settings"):
        generate_from_clean_images(out, changed, "tiny", progress=False)


def test_resampling_keeps_size_and_centres_the_body():
    g = preset("aapm_body_128")  # 3.125 mm pixels
    n, s = 400, 0.5
    yy, xx = np.mgrid[:n, :n] * s
    hu = np.where(np.hypot(xx - 60.0, yy - 80.0) <= 40.0, 50.0, -2048.0)  # a 80 mm disk off-centre, -2048 padding
    image, info = resample_to_geometry(hu, (s, s), g, "disk.raw")
    x, y = g.pixel_centres_mm()
    inside = image > -500
    area = inside.sum() * g.pixel_size_mm**2
    assert area == pytest.approx(math.pi * 40.0**2, rel=0.05)
    assert abs(x[inside].mean()) < 1.0 and abs(y[inside].mean()) < 1.0
    assert image.min() >= -1000.0 and info["cropped_body_pixels"] == 0
    assert float(np.median(image[np.hypot(x, y) < 30])) == pytest.approx(50.0, abs=1.0)


def test_a_body_larger_than_the_fov_is_refused_or_cropped_on_request():
    g = preset("aapm_head_128")  # 220.16 mm FOV
    hu = np.full((300, 300), 40.0)  # 300 mm of soft tissue at 1 mm
    with pytest.raises(ValueError, match=r"big\.dcm: the body \(300\.0 x 300\.0 mm.*does not fit the FOV "
                                         r"\(220\.16 mm.*--crop-to-fov"):
        resample_to_geometry(hu, (1.0, 1.0), g, "big.dcm")
    image, info = resample_to_geometry(hu, (1.0, 1.0), g, "big.dcm", crop_to_fov=True)
    x, y = g.pixel_centres_mm()
    assert info["cropped_body_pixels"] > 0
    assert (image[np.hypot(x, y) > 110.08] == -1000).all() and (image[np.hypot(x, y) < 100] > 0).all()


def test_tissue_labels_and_fractions_follow_the_stated_thresholds():
    hu = np.array([-1000, -700, -100, 0, 60, 149, 150, 800, 1500, 3000], dtype=float)
    labels = tissue_labels(hu)
    air, fat, soft, bone = (TISSUES[n].label for n in ("air", "fat", "muscle", "cortical_bone"))
    assert labels.tolist() == [air, air, fat, soft, soft, soft, bone, bone, bone, bone]
    water, bone_f = tissue_fractions(hu)
    np.testing.assert_allclose(bone_f, [0, 0, 0, 0, 0, 49 / 1400, 50 / 1400, 700 / 1400, 1, 1])
    np.testing.assert_allclose(water + bone_f, 1.0)


def test_categories_place_the_category_implant(tmp_path):
    g = preset("aapm_body_128")
    x, y = g.pixel_centres_mm()
    hu = np.where(np.hypot(x / 150, y / 100) <= 1, 40.0, -1000.0)
    for cx in (-90.0, 90.0):  # two femoral heads
        hu[np.hypot(x - cx, y) <= 25] = 700.0
    objects = clean_implants("bilateral_hip", g, hu, tissue_labels(hu), np.random.default_rng(0), "hip.dcm")
    assert [o.kind for o in objects] == ["hip_prosthesis"]
    mask = objects[0].mask
    assert mask[:, :64].any() and mask[:, 64:].any()  # one per side
    assert (hu[mask] > 0).mean() > 0.8  # on the bone
    with pytest.raises(ValueError, match=r"flat\.dcm: category lumbar_spine needs a vertebra"):
        soft = np.where(np.hypot(x, y) < 100, 40.0, -1000.0)
        clean_implants("lumbar_spine", g, soft, tissue_labels(soft), np.random.default_rng(0), "flat.dcm")

    images, _ = read_clean_images(_ct_small())
    csv = tmp_path / "cat.csv"
    csv.write_text("file_or_slice,category\nCT_small.dcm,head\n")
    assert read_categories(csv, images) == {"CT_small.dcm:0": "head"}
    csv.write_text("other.dcm,head\n")
    with pytest.raises(ValueError, match=r"cat\.csv:1: 'other\.dcm' names no input slice"):
        read_categories(csv, images)
    csv.write_text("CT_small.dcm,elbow\n")
    with pytest.raises(ValueError, match=r"cat\.csv:1: unknown category 'elbow'"):
        read_categories(csv, images)


def _write_dicom(tmp_path, name, edit):
    ds = pydicom.dcmread(_ct_small())
    edit(ds)
    path = tmp_path / name
    ds.save_as(path)
    return path


@pytest.mark.parametrize("name, edit, message", [
    ("nopixels.dcm", lambda ds: delattr(ds, "PixelData"), r"nopixels\.dcm: no pixel data"),
    ("sagittal.dcm", lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]),
     r"sagittal\.dcm: not an axial slice: ImageOrientationPatient \[0\.0, 1\.0, 0\.0, 0\.0, 0\.0, -1\.0\] "
     r"\(expected about \[1, 0, 0, 0, 1, 0\]"),
    ("nospacing.dcm", lambda ds: delattr(ds, "PixelSpacing"), r"nospacing\.dcm: missing PixelSpacing"),
])
def test_bad_dicom_is_named(tmp_path, name, edit, message):
    path = _write_dicom(tmp_path, name, edit)
    with pytest.raises(ValueError, match=message):
        read_clean_images(path)


def test_bad_nifti_is_named(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3, 2), np.float32), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(ValueError, match=r"4d\.nii\.gz: expected a 3D volume .* found shape \(8, 8, 3, 2\)"):
        read_clean_images(tmp_path / "4d.nii.gz")
    sagittal = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)  # slices along x
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), sagittal), tmp_path / "sag.nii")
    with pytest.raises(ValueError, match=r"sag\.nii: not axial slices"):
        read_clean_images(tmp_path / "sag.nii")
    img = nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), None)
    img.header["pixdim"][1:4] = [0.0, 1.0, 1.0]
    nib.save(img, tmp_path / "nospacing.nii")
    with pytest.raises(ValueError, match=r"nospacing\.nii: missing voxel spacing"):
        read_clean_images(tmp_path / "nospacing.nii")
    with pytest.raises(FileNotFoundError, match="no DICOM, NIfTI"):
        (tmp_path / "empty").mkdir()
        read_clean_images(tmp_path / "empty")


def test_aapm_raw_slices_take_the_body_fov_unless_told(tmp_path):
    from marbench.datasets.aapm_format import write_raw

    hu = np.full((64, 64), -1000.0, np.float32)
    hu[20:40, 24:44] = 40.0
    write_raw(tmp_path / "training_body_nometal_img7_64x64x1.raw", hu)
    (images, _), (told, _) = read_clean_images(tmp_path), read_clean_images(tmp_path, pixel_mm=0.5)
    assert images[0].spacing_mm == (400 / 64, 400 / 64) and told[0].spacing_mm == (0.5, 0.5)
    np.testing.assert_array_equal(images[0].hu, hu)


def test_cli_refuses_another_folder_with_a_clear_message(clean_benchmark, capsys):
    from marbench.cli import main

    src, out, _ = clean_benchmark
    assert main(["simulate", "--clean-images", str(src), "--preset", "tiny", "--out", str(out), "--quiet",
                 "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "parts that differ: seed" in err and "--force" in err
