"""The AAPM CT-MAR challenge's clinical scoring (marbench.evaluation.clinical, protocol ``aapm-clinical``): each
metric against a hand-computed value on small constructed cases, the score axes, the restricted unpickler, both
sources of ROIs."""
import io
import pickle
import time

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import structural_similarity

from marbench.evaluation import clinical
from marbench.evaluation.protocols import AAPMClinical, get_protocol
from marbench.evaluation.safe_pickle import load_restricted, load_restricted_file

N = 24


def _case(**kw):
    """A 24 x 24 case: reference 40 HU, everything inside the patient, one metal pixel at (12, 12)."""
    metal = np.zeros((N, N), bool)
    metal[12, 12] = True
    empty = np.zeros((N, N), bool)
    base = dict(reference=np.full((N, N), 40.0), external=~metal, metal=metal, metal_region=np.ones((N, N), bool),
                metal_threshold_hu=2000.0, noise_roi=empty, edge_rois=(), streak_roi=empty, target=empty, voxel_mm=1.0,
                beam_angles=(0.0,), quarter_turns=False)
    base.update(kw)
    return clinical.ClinicalCase(**base)


# --- score axes ---------------------------------------------------------------------------------------------------

def test_score_axes_interpolate_linearly_and_clamp():
    ax = clinical.CASE_AXES["02"]["rmse_hu"]  # utils.scoring_axes: [0, 0, 30, 60, 90, 120, 99999]
    assert [clinical.score_from_axis(v, ax) for v in (0, 15, 60, 105, 120, 5e5)] == [0, 0.5, 2, 3.5, 4, 4]
    ssim = clinical.CASE_AXES["01"]["ssim"]  # [20, 1, .99, .98, .97, .96, -20]: decreasing axes are sorted
    assert clinical.score_from_axis(1.0, ssim) == 0 and clinical.score_from_axis(0.975, ssim) == pytest.approx(2.5)
    assert clinical.score_from_axis(0.5, ssim) == 4
    # case 23's noise row [0, 48, 45, 64, ...] is sorted as interp1d sorts it: 45 -> 1, 48 -> 0
    noise = clinical.CASE_AXES["23"]["noise_hu"]
    assert clinical.score_from_axis(45, noise) == 1 and clinical.score_from_axis(48, noise) == 0
    assert clinical.score_from_axis(56, noise) == pytest.approx(1.0)
    assert np.isnan(clinical.score_from_axis(float("nan"), ax))


def test_sharpness_and_range_thresholds_of_the_challenge():
    s = clinical.SHARPNESS_AXIS  # ratios after blurs of sigma 0.4, 0.5, 0.75, 1 on the challenge's cases
    assert [clinical.score_from_axis(r, s) for r in (1.3, 1.0, 0.94, 0.85, 0.67, 0.56, 0.2)] == [0, 0, 1, 2, 3, 4, 4]
    r = clinical.RANGE_AXIS  # 0 .. 2 % linear
    assert [clinical.score_from_axis(v, r) for v in (0, 0.005, 0.0125, 0.02, 0.1)] == [0, 1, 2.5, 4, 4]


# --- each metric, by hand -----------------------------------------------------------------------------------------

def test_ct_number_rmse_excludes_the_metal_dilated_twice():
    case = _case()
    img = case.reference + 10.0
    img[12, 12] = 5000.0  # the metal
    img[12, 14] = 1000.0  # 2 px from the metal (inside the 3 x 3-cross dilation twice): excluded
    img[14, 14] = 40.0 + 10.0 + 30.0  # a diagonal distance of 2 + 2: counted
    keep = N * N - 13  # the diamond of radius 2 has 13 pixels
    expected = np.sqrt(((keep - 1) * 10.0**2 + 40.0**2) / keep)
    assert clinical.measure(img, case)["rmse_hu"] == pytest.approx(expected)


def test_noise_is_the_population_std_in_the_roi():
    roi = np.zeros((N, N), bool)
    roi[2:4, 2:4] = True
    img = np.full((N, N), 40.0)
    img[2:4, 2:4] = [[30.0, 50.0], [30.0, 50.0]]
    assert clinical.measure(img, _case(noise_roi=roi))["noise_hu"] == pytest.approx(10.0)


def test_sharpness_is_the_p90_sobel_ratio_and_a_blur_of_sigma_half_scores_2():
    ref = np.zeros((N, N))
    ref[:, N // 2:] = 100.0  # a vertical edge
    roi = np.zeros((N, N), bool)
    roi[:, N // 2 - 2: N // 2 + 2] = True
    assert clinical.sharpness_ratio(ref, ref, [roi]) == 1.0
    assert clinical.sharpness_ratio(ref, 0.5 * ref, [roi, roi]) == pytest.approx(0.5)  # the Sobel filter is linear
    # Sobel of the step: |(1, 2, 1) x (-1, 0, 1)| = 4 x 100 on both columns beside the edge, 0 elsewhere in the ROI
    assert clinical.sobel_magnitude(ref)[5, N // 2 - 1] == 400.0


def test_streak_amplitude_averages_the_top_and_bottom_five_percent():
    roi = np.zeros((N, N), bool)
    roi[0, :20] = roi[1, :20] = True  # 40 pixels -> 2 at each end
    img = np.full((N, N), 40.0)
    img[0, :20] += np.arange(20)
    img[1, :20] -= np.arange(20)
    # differences -19..19 (0 twice): the mean of (19, 18) minus the mean of (-19, -18)
    assert clinical.measure(img, _case(streak_roi=roi))["streak_hu"] == pytest.approx(37.0)


def test_ssim_is_skimage_full_map_with_the_metal_set_to_100_averaged_in_the_patient():
    rng = np.random.default_rng(0)
    ref = rng.normal(40, 30, (N, N))
    img = ref + rng.normal(0, 80, (N, N))
    case = _case(reference=ref)
    dil = ndimage.binary_dilation(case.metal, iterations=2)
    a, b = ref.copy(), img.copy()
    a[dil], b[dil] = 100.0, 100.0
    _, full = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                    data_range=5000, full=True)
    assert clinical.measure(img, case)["ssim"] == pytest.approx(full[~dil].mean(), abs=1e-12)
    assert clinical.measure(ref, case)["ssim"] == pytest.approx(1.0)


def test_bone_and_metal_integrity_volume_change_and_dice():
    ref = np.full((N, N), 40.0)
    ref[2:4, 2:6] = 300.0  # 8 bone pixels
    img = ref.copy()
    img[3, 2:6] = 149.0  # 4 remain (150 HU is the lower bound, inclusive)
    img[6, 6] = 150.0  # one new bone pixel
    img[12, 12] = 2000.0  # the metal at the threshold: not metal (> bonetrs + 250)
    v = clinical.measure(img, _case(reference=ref))
    assert v["bone_volume_change"] == pytest.approx(abs(1 - 5 / 8)) and v["bone_dice"] == pytest.approx(8 / 13)
    assert v["metal_volume_change"] == 1.0 and v["metal_dice"] == 0.0
    img[12, 12], img[12, 13] = 2001.0, 2001.0  # the metal and one pixel more
    v = clinical.measure(img, _case(reference=ref))
    assert v["metal_volume_change"] == 1.0 and v["metal_dice"] == pytest.approx(2 / 3)
    s = clinical.scores(v, _case(reference=ref, axes=clinical.CASE_AXES["01"]))
    # case 01 metal: volume change axis (.35, .7, 1.05, 1.4) -> 1.0 is 2 + 0.3 / 0.35; Dice (.85, .7, .55, .4) -> 2/3
    vol = 2 + (1.0 - 0.7) / 0.35
    dice = 2 + (0.7 - 2 / 3) / 0.15
    assert s["score_metal"] == pytest.approx((vol + dice) / 2)


def test_proton_range_integrates_spr_to_the_distal_edge_of_each_target_row_but_the_last():
    target = np.zeros((N, N), bool)
    target[2:5, 3:6] = True  # rows 2, 3 used (score.py leaves out the last row), distal column 5
    ref = np.zeros((N, N))  # 0 HU: SPR 1.003 + 20/70 x 0.035 = 1.013
    img = ref.copy()
    img[3, 1] = 50.0  # SPR 1.038 on row 3's path
    img[4, 1] = 3000.0  # row 4 is not integrated
    img[2, 5] = 3000.0  # the distal pixel itself is not integrated
    assert clinical.hu_to_spr(np.array([0.0, -1001.0, 50.0]))[[0, 1, 2]] == pytest.approx([1.013, 0.0, 1.038])
    shift = clinical.range_shift(ref, img, target, np.ones((N, N), bool), 0.8)
    assert shift == pytest.approx((1.038 - 1.013) / (5 * 1.013))
    # four quarter-turned beams take the worst; the beam from the right (180 degrees) sees nothing on row 3's left
    assert clinical.range_shift(ref, img, target, np.ones((N, N), bool), 0.8, (0, 90, 180, 270), True) >= shift


# --- the restricted unpickler -------------------------------------------------------------------------------------

def test_restricted_unpickler_refuses_a_pickle_that_would_import_os():
    evil = b"cos\nsystem\n(S'echo pwned'\ntR."  # GLOBAL os.system, then call it
    with pytest.raises(pickle.UnpicklingError, match="refused to load the global os.system"):
        load_restricted(io.BytesIO(evil))

    class Evil:
        def __reduce__(self):
            import os
            return os.system, ("echo pwned",)

    with pytest.raises(pickle.UnpicklingError, match=r"refused to load the global (os|posix|nt)\.system"):
        load_restricted(io.BytesIO(pickle.dumps({"01": Evil()})))
    with pytest.raises(pickle.UnpicklingError, match="numeric numpy array"):
        load_restricted(io.BytesIO(pickle.dumps(np.array([1, "a"], dtype=object))))


def test_restricted_unpickler_reads_arrays_dicts_lists_and_scalars(tmp_path):
    data = {"01": {"metal": np.eye(3, dtype=bool), "img": np.arange(4, dtype=np.float32).reshape(2, 2),
                   "voxelsize": [0.97, 0.97, 1.25], "bonetrs": np.float64(1600.0), "beamangle": -135}}
    for protocol in (2, 4, 5):
        (tmp_path / "p.pkl").write_bytes(pickle.dumps(data, protocol=protocol))
        back = load_restricted_file(tmp_path / "p.pkl")
        assert back["01"]["bonetrs"] == 1600.0 and back["01"]["voxelsize"] == [0.97, 0.97, 1.25]
        assert np.array_equal(back["01"]["img"], data["01"]["img"]) and back["01"]["metal"].dtype == bool


# --- the two sources of ROIs through the protocol -----------------------------------------------------------------

def _reference_dir(tmp_path, n=32):
    rng = np.random.default_rng(1)
    ref = rng.normal(40, 3, (n, n))  # noise below case 01's score-0 level (8 HU)
    ref[8:12, 4:28] = 400.0  # bone
    yy, xx = np.mgrid[:n, :n]
    metal = (yy - 20) ** 2 + (xx - 16) ** 2 <= 4
    disk = lambda y, x, r: ((yy - y) ** 2 + (xx - x) ** 2 <= r * r)  # noqa: E731
    edge = (np.abs(yy - 10) <= 3).astype(np.uint8)
    structures = {"01": {"external": np.ones((n, n), bool), "metal": metal, "metalregion": disk(20, 16, 6),
                         "noise": disk(26, 6, 3).astype(np.uint8), "sobel_bone": edge, "sobel_soft": edge,
                         "roi_amplitude": disk(20, 16, 6) & ~disk(20, 16, 3), "tumor": disk(16, 16, 4)}}
    folder = tmp_path / "1_data_dicts"
    folder.mkdir()
    (folder / "base.pkl").write_bytes(pickle.dumps({"01": ref.astype(np.float32)}))
    (folder / "structures.pkl").write_bytes(pickle.dumps(structures))
    (folder / "parameters.pkl").write_bytes(pickle.dumps({"01": {"voxelsize": [0.8, 0.8, 1.0], "bonetrs": 400,
                                                                  "beamangle": 0}}))
    return ref.astype(np.float32), metal


def test_reference_dir_scores_the_scoring_cases_and_names_a_missing_one(tmp_path):
    ref, metal = _reference_dir(tmp_path)
    p = AAPMClinical(reference_dir=str(tmp_path))
    pred = torch.tensor(np.where(metal, 3000.0, ref), dtype=torch.float32)[None, None]
    batch = {"slice_id": ["01"], "ma_image": pred}
    p.check_batch(batch)  # no gt_image needed: the reference comes from base.pkl
    out = p.score(pred, batch)
    assert set(out) == {m.name for m in p.metrics if m.level == "slice"}
    assert float(out["rmse_hu"]) == 0.0 and float(out["score_ct_number"]) == 0.0
    assert float(out["metal_dice"]) == 1.0 and float(out["score"]) == pytest.approx(0.0, abs=1e-6)
    d = p.to_dict()
    assert d["reference_dir"] == str(tmp_path) and set(d["reference_sha256"]) == {"base.pkl", "structures.pkl",
                                                                                     "parameters.pkl"}
    with pytest.raises(KeyError, match=r"case '30' is not in .*base.pkl \(cases there: \['01'\]\)"):
        p.score(pred, {"slice_id": ["scoring/30"]})


def _synthetic_batch(n=256, fov=400.0):
    """A body of muscle with a fat layer, a bone, two metal rods; the uncorrected image has a dark streak between
    the rods and noise."""
    yy, xx = np.mgrid[:n, :n] * (fov / n)
    c = fov / 2
    r = np.hypot(yy - c, xx - c)
    labels = np.where(r < 150, 3, 0)
    labels[(r >= 140) & (r < 150)] = 2  # fat
    labels[np.hypot(yy - c, xx - c - 60) < 20] = 6  # bone
    labels[np.hypot(yy - c - 60, xx - c + 40) < 25] = 4  # organ
    hu = np.array([-1000, -850, -100, 45, 55, 280, 1300, 35, 8], float)[labels]
    metal = (np.hypot(yy - c + 50, xx - c + 30) < 6) | (np.hypot(yy - c + 50, xx - c - 30) < 6)
    rng = np.random.default_rng(0)
    gt = hu + rng.normal(0, 5, hu.shape)
    ma = gt + rng.normal(0, 60, hu.shape)
    ma[(np.abs(yy - c + 50) < 4) & (np.abs(xx - c) < 30)] -= 300.0  # the streak between the rods
    ma[metal] = 8000.0
    t = lambda a, dt=torch.float32: torch.tensor(a, dtype=dt)[None, None]  # noqa: E731
    return {"gt_image": t(gt), "ma_image": t(ma), "metal_mask": t(metal, torch.bool),
            "tissue_labels": t(labels, torch.int64), "fov_mm": torch.tensor([fov], dtype=torch.float64),
            "slice_id": ["body1/body1"], "category": ["test"], "anatomy": ["body"]}


def test_synthetic_rois_give_every_score_and_rank_the_target_above_the_uncorrected_image():
    batch = _synthetic_batch()
    p = get_protocol("aapm-clinical")
    p.check_batch(batch)
    (case,) = p.cases(batch)
    assert case.noise_roi.sum() > 50 and all(r.sum() > 50 for r in case.edge_rois) and case.streak_roi.sum() > 20
    assert not (case.noise_roi & ndimage.binary_dilation(case.metal, iterations=20)).any()  # far from the metal
    assert case.target.any() and case.metal_threshold_hu == pytest.approx(case.reference[case.metal_region
                                                                                       & ~case.metal].max() + 250)
    perfect = torch.where(batch["metal_mask"], batch["ma_image"], batch["gt_image"])  # metal put back
    t0 = time.perf_counter()
    good, bad = p.score(perfect, batch), p.score(batch["ma_image"], batch)
    assert (time.perf_counter() - t0) / 2 < 1.0  # per 256 x 256 slice on CPU
    for name in clinical.SCORES + ("score",):
        assert np.isfinite(float(good[name])) and np.isfinite(float(bad[name])), name
    assert float(good["score"]) < 0.05 and float(bad["score"]) > 2.0
    # calibrated axes: the uncorrected image scores 4 on its RMSE, streaks, SSIM
    assert float(bad["score_ct_number"]) == pytest.approx(4.0) and float(bad["score_streak"]) == pytest.approx(4.0)
    assert float(bad["score_noise"]) == 4.0  # five times the reference's noise


def test_synthetic_sharpness_scores_a_blur_of_sigma_half_as_2():
    batch = _synthetic_batch()
    p = get_protocol("aapm-clinical")
    gt = batch["gt_image"][0, 0].numpy().astype(np.float64)
    for sigma, expected in ((0.4, 1.0), (0.5, 2.0), (0.75, 3.0), (1.0, 4.0)):
        blurred = torch.tensor(ndimage.gaussian_filter(gt, sigma))[None, None]
        assert float(p.score(blurred, batch)["score_sharpness"]) == pytest.approx(expected, abs=1e-9)


def test_challenge_score_combines_as_score_py():
    import pandas as pd
    frame = pd.DataFrame({s: [k, k + 2.0] for k, s in enumerate(clinical.SCORES)})  # metric k: mean k + 1
    assert get_protocol("aapm-clinical").set_metrics(frame, {}, {}) == {"challenge_score": pytest.approx(4.5)}


def test_synthetic_cases_are_built_once_per_slice_and_rebuilt_for_changed_reference_data(monkeypatch):
    built = []
    real = clinical.synthetic_case
    monkeypatch.setattr(clinical, "synthetic_case", lambda *a: built.append(a) or real(*a))
    batch = _synthetic_batch()
    batch["gt_image"] = batch["gt_image"] + 0.125  # a slice no other test scored in this process
    p = get_protocol("aapm-clinical")
    first = {k: float(v) for k, v in p.score(batch["ma_image"], batch).items()}
    (case,) = p.cases(batch)
    assert len(built) == 1
    fresh = real(*built[0])
    assert all(np.array_equal(getattr(case, f), getattr(fresh, f)) for f in ("reference", "external", "noise_roi",
                                                                             "streak_roi", "target"))
    assert {k: float(v) for k, v in p.score(batch["ma_image"], batch).items()} == first and len(built) == 1
    for key, change in (("metal_mask", lambda m: m.roll(3, -1)), ("fov_mm", lambda f: f * 2),
                        ("tissue_labels", lambda t: torch.where(t == 4, 3, t))):
        p.cases({**batch, key: change(batch[key])})
    assert len(built) == 4  # each a new case
    assert float(p.cases({**batch, "fov_mm": batch["fov_mm"] * 2})[0].voxel_mm) == pytest.approx(2 * case.voxel_mm)
