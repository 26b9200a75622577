"""The simulated ArtifactGSI analogue (``marbench.datasets.gsi_analogue``): layout served by the ArtifactGSI reader,
labels, the GSI image's streak error between the ordinary and the metal-free image, determinism, resumption,
provenance and the ``simulate-gsi`` command. ``gsi-tiny`` (4 patients x 3 slices at 128 px) is generated once."""
import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from marbench.datasets.artifactgsi import IMPLANT_TYPES, ArtifactGSIDataModule, scan_patients
from marbench.datasets.gsi_analogue import (
    PRESETS,
    expected_fingerprint,
    generate_gsi_analogue,
    mars_analogue,
    plan_patients,
    simulate_patient,
    split_text,
    streak_rmse,
)
from marbench.files import sha256_file
from marbench.physics import Projector, preset
from marbench.physics.dual_energy import DualEnergyConfig, simulate_gsi
from marbench.physics.inpainting import nmar_correction
from marbench.physics.metal_masks import _ellipse
from marbench.physics.spectrum import MATERIALS

KEYS = ("ma_image", "gt_image", "metal_mask", "labels", "ma_stack")


@pytest.fixture(scope="module")
def tiny(gsi_tiny):
    return gsi_tiny


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """``gsi-tiny`` again into another folder, interrupted after one patient (and a half-written one), resumed."""
    out = tmp_path_factory.mktemp("gsi-tiny-resumed")
    first = generate_gsi_analogue(out, "gsi-tiny", seed=0, limit=1, progress=False)
    state = {"first": first, "patients": sorted(p.name for p in out.iterdir() if p.is_dir()),
             "files": sorted(p.name for p in out.iterdir() if p.is_file())}
    half = out / ".fracture_internal_fixation_000.tmp"  # what a run killed mid-patient leaves
    half.mkdir()
    (half / "ordinary.nii.gz").write_bytes(b"truncated")
    state["manifest"] = generate_gsi_analogue(out, "gsi-tiny", seed=0, progress=False)
    return out, state


def _columns(mask: np.ndarray) -> np.ndarray:
    return np.nonzero(mask)[-1]


def test_reader_serves_the_analogue(tiny):
    out, manifest = tiny
    assert manifest["patients"] == {"none": 1, "hip_prosthesis": 1, "fracture_internal_fixation": 1,
                                    "spinal_internal_fixation": 1}
    patients = {p.id: p for p in scan_patients(out)}
    assert sorted(patients) == sorted(q.id for q in plan_patients(PRESETS["gsi-tiny"]))
    assert {p.region for p in patients.values()} == {"hip joint", "pelvis", "lumbar spine"}
    assert all(p.has_labels and p.shape == (128, 128, 3) and p.pixel_mm == pytest.approx(400 / 128)
               for p in patients.values())

    dm = ArtifactGSIDataModule(out, k=3, keys=KEYS)
    dm.setup()
    assert set(dm.parts) == {"train", "test"}  # the split file names both parts even for one patient per type
    items = [it for name in dm.datasets for it in dm.datasets[name]]
    assert {it["implant"] for it in items} == set(IMPLANT_TYPES) - {"none"}
    assert len(items) == 3 * 3
    for it in items:
        assert it["ma_image"].shape == it["gt_image"].shape == it["metal_mask"].shape == (1, 128, 128)
        assert it["ma_stack"].shape == (3, 128, 128)
        metal = it["metal_mask"][0].numpy()
        labels = it["labels"][0].numpy()
        assert metal.any(), it["slice_id"]  # every implant patient has metal on every slice
        # the label's metal lies inside the reader's thresholded metal (which blooms past it in the ordinary image)
        assert (labels == 1).any() and metal[labels == 1].all(), it["slice_id"]
        assert labels.min() >= 0 and labels.max() <= 5
        centre = (128 - 1) / 2
        for left, right in ((2, 3), (4, 5)):  # the patient's left is the image right: x > 0 mm
            assert (_columns(labels == left) > centre).all() and (_columns(labels == right) < centre).all()
    hip = [it for it in items if it["implant"] == "hip_prosthesis"]
    assert set(np.unique(np.concatenate([it["labels"].numpy().ravel() for it in hip]))) == {0, 1, 2, 3, 4, 5}
    spine = [it for it in items if it["implant"] == "spinal_internal_fixation"]
    assert set(np.unique(np.concatenate([it["labels"].numpy().ravel() for it in spine]))) == {0, 1}

    clean = dm.dataset("train", clean=True)
    assert len(clean) == 3
    for it in clean:
        assert it["implant"] == "none" and not it["metal_mask"].any()
        assert (it["ma_image"] == it["gt_image"]).all()
        assert not (it["labels"] == 1).any()


def test_hip_gsi_reduces_streaks_but_keeps_some(tiny):
    out, _ = tiny
    p = PRESETS["gsi-tiny"]
    hip = next(q for q in plan_patients(p) if q.implant == "hip_prosthesis")
    sim = simulate_patient(hip, p, seed=0)
    # the arrays are what the generator wrote (orientation image[r, c] = volume[c, r, z])
    for name, key in (("gsi", "ma_mono_image"), ("ordinary", "ordinary_ma_image"), ("labels", "labels")):
        volume = np.asarray(nib.load(out / hip.id / f"{name}.nii.gz").dataobj)
        np.testing.assert_array_equal(np.transpose(volume, (2, 1, 0)), sim[key])
    metal = sim["metal_mask"]
    np.testing.assert_array_equal(sim["labels"] == 1, metal)  # label 1 is the union of the metal masks
    body = sim["tissue_labels"] != 0
    gsi = streak_rmse(sim["ma_mono_image"], sim["gt_mono_image"], metal, body)
    ordinary = streak_rmse(sim["ordinary_ma_image"], sim["ordinary_gt_image"], metal, body)
    clean = streak_rmse(sim["gt_mono_image"], sim["gt_mono_image"], metal, body)
    assert clean < gsi < 0.5 * ordinary, (gsi, ordinary)
    assert gsi > 20.0  # NMAR's secondary artifacts stay: the GSI image is no metal-free image
    meta = json.loads((out / hip.id / "meta.json").read_text())
    assert meta["noise_seeds"] == sim["noise_seeds"] and len(meta["starved_rays"]) == p.slices
    assert meta["energy_kev"] == 70.0 and meta["material"] in ("cobalt_chrome", "titanium")


def test_mars_analogue_reinserts_the_metal_in_the_image():
    """NMAR in the trace, the metal at its 70 keV HU in the image; the physics' LI with the metal added to the
    sinogram leaves streaks outside the metal that this removes (noise-free water body, two steel rods)."""
    g = preset("aapm_body_128")
    p = Projector(g)
    xs, ys = g.pixel_centres_mm()
    body = np.hypot(xs / 1.3, ys) < 140
    hu = torch.tensor(np.where(body, 0.0, -1000.0), dtype=torch.float32)[None, None]
    metal = torch.tensor(_ellipse(g, (-50.0, 0.0), (8.0, 8.0)) | _ellipse(g, (50.0, 0.0), (8.0, 8.0)))[None, None]
    masks = {"stainless_steel": metal}
    cfg = DualEnergyConfig(noise=False, energy_kev=70.0, ordinary=None)
    scan = simulate_gsi(p, hu, masks, cfg)
    image = mars_analogue(p, scan, masks)

    def mu(material):
        return float(MATERIALS[material].mu_per_mm(np.array([70.0]))[0])

    steel_hu = 1000.0 * (mu("stainless_steel") / mu("water") - 1.0)
    torch.testing.assert_close(image[metal], torch.full_like(image[metal], steel_hu))
    _, nmar = nmar_correction(p, scan.ma_mono_sinogram, scan.metal_trace)
    torch.testing.assert_close(image[~metal], 1000.0 * (nmar[~metal] / mu("water") - 1.0))
    added = simulate_gsi(p, hu, masks, DualEnergyConfig(noise=False, energy_kev=70.0, ordinary=None,
                                                        metal_inpainting=True)).ma_mono_image
    reference, metal_np, body_np = scan.gt_mono_image[0, 0].numpy(), metal[0, 0].numpy(), body
    ours = streak_rmse(image[0, 0].numpy(), reference, metal_np, body_np)
    # in a water body NMAR's prior is the object itself: the metal-free VMI comes back (Meyer et al., Sec. II.B)
    assert ours < 1.0 < 0.1 * streak_rmse(added[0, 0].numpy(), reference, metal_np, body_np)


def test_same_seed_same_bytes(tiny, resumed):
    (out_a, manifest_a), (out_b, state) = tiny, resumed
    manifest_b = state["manifest"]
    assert manifest_b["fingerprint"]["sha256"] == manifest_a["fingerprint"]["sha256"]
    assert manifest_a["files"] == manifest_b["files"]
    assert len(manifest_a["files"]) == 3 * 4 + 3 + 1  # implant: 4 files each, clean: 3, split.txt
    for rel, digest in manifest_b["files"].items():  # the manifests say what is on disk
        assert sha256_file(out_a / rel) == sha256_file(out_b / rel) == digest


def test_resumption(tiny, resumed):
    out, state = resumed
    assert state["first"] is None
    assert state["patients"] == ["hip_prosthesis_000"]  # limit=1: one patient, complete, nothing half-written
    assert state["files"] == [".generation.json"]  # no split or manifest before the last patient
    assert state["manifest"] is not None
    assert not list(out.glob(".*.tmp")) and not list(out.rglob("*.tmp"))


def test_other_fingerprint_refused_then_forced(tiny, tmp_path):
    src, _ = tiny
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    found = json.loads((out / ".generation.json").read_text())["fingerprint"]["sha256"]
    expected = expected_fingerprint("gsi-tiny", seed=1)["sha256"]
    with pytest.raises(ValueError) as err:
        generate_gsi_analogue(out, "gsi-tiny", seed=1, progress=False)
    assert str(out) in str(err.value) and found in str(err.value) and expected in str(err.value)
    assert "seed" in str(err.value)  # the part that differs
    assert generate_gsi_analogue(out, "gsi-tiny", seed=1, limit=1, force=True, progress=False) is None
    assert sorted(p.name for p in out.iterdir()) == [".generation.json", "hip_prosthesis_000"]
    assert json.loads((out / ".generation.json").read_text())["fingerprint"]["sha256"] == expected
    assert json.loads((out / "hip_prosthesis_000" / "meta.json").read_text())["seed"] == 1


def test_foreign_folders_and_bad_arguments(tmp_path):
    (tmp_path / "patient_17").mkdir()
    with pytest.raises(ValueError, match="patient_17"):
        generate_gsi_analogue(tmp_path, "gsi-tiny", progress=False)
    with pytest.raises(ValueError, match="unknown GSI analogue preset"):
        generate_gsi_analogue(tmp_path / "x", "smoke", progress=False)
    with pytest.raises(ValueError, match="limit"):
        generate_gsi_analogue(tmp_path / "x", "gsi-tiny", limit=-1, progress=False)


def test_plan_and_split():
    for name, counts in (("gsi-smoke", (6, 5, 5, 6)), ("gsi", (24, 20, 20, 16))):
        plan = plan_patients(PRESETS[name])
        implants = [q.implant for q in plan]
        assert [implants.count(t) for t in ("hip_prosthesis", "fracture_internal_fixation",
                                            "spinal_internal_fixation", "none")] == list(counts)
        assert len({q.id for q in plan}) == len(plan)
        text = split_text(PRESETS[name], seed=0)
        assert text == split_text(PRESETS[name], seed=0) and text != split_text(PRESETS[name], seed=1)
        parts = {pid: part for part, pid in re.findall(r"^(train|test) (\S+)$", text, re.M)}
        assert set(parts) == {q.id for q in plan}
        for implant in ("hip_prosthesis", "fracture_internal_fixation", "spinal_internal_fixation"):
            ids = [q.id for q in plan if q.implant == implant]
            n_test = sum(parts[i] == "test" for i in ids)
            assert n_test == round(0.2 * len(ids)) or n_test == 1
        assert all(parts[q.id] == "train" for q in plan if q.clean)
    assert [q.category for q in plan_patients(PRESETS["gsi-smoke"]) if q.clean] == [
        "bilateral_hip", "pelvis", "lumbar_spine"] * 2


def test_cli(tiny, tmp_path, capsys):
    from marbench.cli import main

    src, manifest = tiny
    out = tmp_path / "cli"
    shutil.copytree(src, out)  # complete: the command only re-checks and rewrites split and manifest
    assert main(["simulate-gsi", "--preset", "gsi-tiny", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "manifest.json").read_text())["files"] == manifest["files"]
    assert "manifest.json written" in capsys.readouterr().out
    assert main(["simulate-gsi", "--preset", "gsi-tiny", "--out", str(out), "--seed", "1", "--quiet"]) == 2
    assert "generated with other code or settings" in capsys.readouterr().err
    assert main(["simulate-gsi", "--preset", "gsi-tiny", "--out", str(tmp_path / "new"), "--limit", "0",
                 "--quiet"]) == 0
    assert "resume" in capsys.readouterr().out
