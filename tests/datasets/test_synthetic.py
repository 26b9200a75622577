import collections
import csv
import json
import shutil

import numpy as np
import pytest
import torch

from marbench.datasets.aapm import AAPMCTMARDataModule
from marbench.datasets.aapm_format import AAPMCase, case_files, read_raw
from marbench.datasets.splits import read_split
from marbench.datasets.synthetic import PRESETS, generate
from marbench.datasets.synthetic.anatomy import ANATOMY_OF, CATEGORIES, render, sample_case
from marbench.datasets.synthetic.tissues import TISSUES
from marbench.physics import Projector, hu_to_mu, preset


def test_manifest_lists_every_file_with_its_sha256(tiny_benchmark):
    out, manifest = tiny_benchmark
    assert manifest["preset"] == "tiny" and manifest["seed"] == 0 and manifest["generator_version"]
    assert manifest["geometry_presets"] == {"body": "aapm_body_128", "head": "aapm_head_128"}
    on_disk = {str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()} - {"manifest.json",
                                                                                 ".generation.json"}
    assert set(manifest["files"]) == on_disk
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_release_layout_and_file_sizes(tiny_benchmark):
    out, _ = tiny_benchmark
    g = preset("aapm_body_128")
    files = case_files(out, AAPMCase("body1", "body", 1), g)
    assert files["gt_image"].name == "training_body_nometal_img1_128x128x1.raw"
    assert files["ma_sinogram"].name == "training_body_metalart_sino1_225x248.raw"
    assert files["gt_image"].parent.name == "Target" and files["ma_image"].parent.name == "Baseline"
    assert files["metal_only_image"].parent.name == "Mask"
    assert files["gt_sinogram"].stat().st_size == 248 * 225 * 4


def test_categories_are_balanced_and_split(tiny_benchmark):
    out, manifest = tiny_benchmark
    split = read_split(out / "split.txt")
    per_category = collections.Counter(cat for rows in split.cases.values() for _, cat in rows)
    assert set(per_category) == set(CATEGORIES)
    assert set(per_category.values()) == {PRESETS["tiny"].cases_per_category}
    assert manifest["cases"]["main"] == len(CATEGORIES) * PRESETS["tiny"].cases_per_category


def test_reads_back_through_the_aapm_datamodule(tiny_benchmark):
    out, _ = tiny_benchmark
    dm = AAPMCTMARDataModule(out, anatomy=("body",), split=str(out / "split.txt"), batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    g = preset("aapm_body_128")
    assert batch["gt_image"].shape == (2, 1, 128, 128) and batch["gt_image"].dtype == torch.float32
    assert batch["ma_sinogram"].shape == (2, 1, *g.sinogram_shape)
    assert batch["metal_mask"].dtype == torch.bool and batch["metal_trace"].dtype == torch.bool
    assert batch["metal_mask"].any() and batch["metal_trace"].any()
    assert batch["li_image"].shape == batch["gt_image"].shape
    assert all(c in CATEGORIES for c in batch["category"])
    air = batch["gt_image"][:, :, :4, :4]
    assert float(air.mean()) == pytest.approx(-1000, abs=60)  # HU: air in the image corner
    assert dm.split_sha256 and len(dm.split_sha256) == 64


def test_stored_sinogram_is_the_projection_of_the_stored_image(tiny_benchmark):
    """Pins the sinogram orientation and geometry: fp(mu(gt_image)) matches gt_sinogram, flips do not."""
    out, _ = tiny_benchmark
    g = preset("aapm_body_128")
    p = Projector(g)
    errs, flipped = [], []
    for i in range(1, 5):
        f = case_files(out, AAPMCase("body1", "body", i), g)
        img = torch.from_numpy(read_raw(f["gt_image"], g.image_shape))[None, None]
        sino = torch.from_numpy(read_raw(f["gt_sinogram"], g.sinogram_shape))[None, None]
        reproj = p.fp(hu_to_mu(img, g.mu_water_per_mm).clamp(min=0))
        errs.append(float((reproj - sino).norm() / sino.norm()))
        flipped.append(min(float((reproj.flip(-1) - sino).norm() / sino.norm()),
                           float((reproj.flip(-2) - sino).norm() / sino.norm())))
    assert max(errs) < 0.05
    assert min(flipped) > 3 * max(errs)


def test_the_same_seed_gives_the_same_bytes_and_resumes(tiny_benchmark, tmp_path):
    _, reference = tiny_benchmark
    partial = tmp_path / "resumed"
    assert generate(partial, "tiny", seed=0, limit=8, progress=False) is None  # interrupted after 2 batches
    done = list(partial.rglob("*metalinfo*.json"))
    assert 0 < len(done) < 32
    stray = partial / "body1" / "Target" / "training_body_nometal_img9_128x128x1.raw.abc.tmp"
    stray.write_bytes(b"half a file")  # what a kill during a write leaves
    resumed = generate(partial, "tiny", seed=0, progress=False)
    assert not stray.exists()
    assert resumed["files"] == reference["files"]


def test_another_seed_or_preset_is_refused_in_the_same_folder(tiny_benchmark, tmp_path):
    out = tmp_path / "b"
    generate(out, "tiny", seed=0, limit=0, progress=False)
    with pytest.raises(ValueError, match="holds a benchmark generated with"):
        generate(out, "tiny", seed=1, limit=0, progress=False)
    with pytest.raises(ValueError, match="unknown synthetic preset"):
        generate(out, "huge")


def test_sweeps_grow_in_quantity_and_size(tiny_benchmark):
    out, _ = tiny_benchmark
    g = preset("aapm_body_128")
    for sweep, column in (("quantity", "n_objects"), ("size", "diameter_mm")):
        rows = list(csv.DictReader(open(out / "sweeps" / sweep / "sweep.csv")))
        assert len(rows) == (5 if sweep == "quantity" else 4)
        pixels = []
        for row in rows:
            part, name = row["case_id"].split("/")
            case = AAPMCase(part, "body", int(name[4:]))
            info = json.loads(case_files(out / "sweeps" / sweep, case, g)["metal_info"].read_text())
            assert len(info["objects"]) == (int(row["n_objects"]))
            pixels.append(sum(o["pixels"] for o in info["objects"]))
        assert pixels == sorted(pixels) and pixels[0] < pixels[-1], column
        gts = [read_raw(case_files(out / "sweeps" / sweep, AAPMCase("body1", "body", int(r["case_id"][10:])), g)
                        ["gt_image"], g.image_shape) for r in rows]
        assert all(np.array_equal(gts[0], x) for x in gts)  # one clean slice, only the metal changes


def test_stacks_are_adjacent_slices_of_one_phantom(tiny_benchmark):
    out, _ = tiny_benchmark
    rows = list(csv.DictReader(open(out / "stacks" / "stacks.csv")))
    assert [float(r["z_mm"]) for r in rows] == [-1.0, 0.0, 1.0]
    anatomy = ANATOMY_OF[rows[0]["category"]]
    g = preset(PRESETS["tiny"].geometry_presets[anatomy])
    imgs, metals = [], []
    for r in rows:
        part, name = r["case_id"].split("/")
        f = case_files(out / "stacks", AAPMCase(part, anatomy, int(name[len(anatomy):])), g)
        imgs.append(read_raw(f["gt_image"], g.image_shape))
        metals.append(read_raw(f["metal_only_image"], g.image_shape) > 0)
    assert not np.array_equal(imgs[0], imgs[1])
    assert np.corrcoef(imgs[0].ravel(), imgs[1].ravel())[0, 1] > 0.95
    assert np.array_equal(metals[0], metals[2])


@pytest.mark.parametrize("category", CATEGORIES)
def test_phantoms_have_realistic_tissues(category):
    g = preset(f"aapm_{ANATOMY_OF[category]}_256")
    hu, labels = render(sample_case(category, np.random.default_rng(0)), g)
    present = {int(v) for v in np.unique(labels)}
    assert 0 in present and len(present) >= 4
    for name in ("fat", "muscle", "cortical_bone", "brain"):
        t = TISSUES[name]
        if t.label in present:
            assert abs(float(np.median(hu[labels == t.label])) - t.hu) < 3 * t.texture_hu + 60


def test_cli_simulate(tmp_path, capsys):
    from marbench.cli import main

    assert main(["simulate", "--preset", "tiny", "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    assert "manifest.json written" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "cli")


def test_committed_smoke_split_is_the_generators():
    from importlib.resources import files

    from marbench.datasets.synthetic.generator import split_text

    committed = files("marbench.datasets").joinpath("splits/synthetic_smoke.txt").read_text()
    assert committed == split_text("smoke", seed=0)


def test_texture_equals_the_sum_of_plane_waves():
    from marbench.datasets.synthetic.anatomy import texture

    g = preset("aapm_body_128")
    x, y = g.pixel_centres_mm()
    spec = sample_case("thorax", np.random.default_rng(0))
    brute = sum(a * np.cos(kx * x + ky * y + kz * 1.5 + ph) for kx, ky, kz, ph, a in spec.waves)
    np.testing.assert_allclose(texture(spec, x, y, 1.5), brute, atol=1e-10)
    assert 0.7 < texture(spec, x, y, 0.0).std() < 1.3  # unit variance by construction


def test_the_folder_carries_the_expected_fingerprint(tiny_benchmark):
    from marbench.datasets.synthetic import expected_fingerprint, folder_fingerprint

    out, manifest = tiny_benchmark
    fp = expected_fingerprint("tiny", 0)
    assert set(fp["parts"]) == {"generator_version", "preset", "geometries", "seed", "code", "libraries"}
    assert folder_fingerprint(out) == fp and len(fp["sha256"]) == 64
    assert manifest["fingerprint"]["sha256"] == fp["sha256"] and manifest["fingerprint"]["parts"] == fp["parts"]
    assert "marbench/physics/geometry.py" in manifest["fingerprint"]["code_files"]
    assert "marbench/datasets/aapm_format.py" in manifest["fingerprint"]["code_files"]
    assert expected_fingerprint("tiny", 1)["sha256"] != fp["sha256"]
    assert expected_fingerprint("smoke", 0)["parts"]["preset"] != fp["parts"]["preset"]


def test_an_identical_rerun_is_a_no_op(tiny_benchmark):
    out, manifest = tiny_benchmark
    written = {f: f.stat().st_mtime_ns for f in out.rglob("*.raw")}
    assert generate(out, "tiny", seed=0, progress=False) == manifest
    assert all(f.stat().st_mtime_ns == t for f, t in written.items())


def test_other_code_or_settings_are_refused_and_force_rebuilds(tmp_path, monkeypatch):
    import dataclasses

    from marbench.datasets.synthetic import folder_fingerprint
    from marbench.datasets.synthetic import generator as gen

    out = tmp_path / "b"
    assert generate(out, "tiny", seed=0, limit=4, progress=False) is None  # one batch on disk
    assert len(list(out.rglob("*metalinfo*.json"))) == 4
    real_preset = gen.preset
    changes = {
        "generator_version": lambda m: m.setattr(gen, "GENERATOR_VERSION", "9.9"),
        "preset": lambda m: m.setitem(gen.PRESETS, "tiny", dataclasses.replace(
            PRESETS["tiny"], simulation=dataclasses.replace(PRESETS["tiny"].simulation, photons_per_ray=1e6))),
        "geometries": lambda m: m.setattr(gen, "preset", lambda n: dataclasses.replace(real_preset(n),
                                                                                      view_start_rad=0.5)),
        "code": lambda m: m.setattr(gen, "code_digest", lambda: {"marbench/physics/fbp.py": "0" * 64}),
    }
    for part, change in changes.items():
        with monkeypatch.context() as m:
            change(m)
            with pytest.raises(ValueError, match=rf"{out}: holds a benchmark generated with other code or settings "
                                                 rf"\(fingerprint [0-9a-f]{{16}}.*expected fingerprint [0-9a-f]{{16}}"
                                                 rf".*parts that differ: {part}\. .*--force"):
                generate(out, "tiny", seed=0, limit=0, progress=False)
    assert len(list(out.rglob("*metalinfo*.json"))) == 4  # refused: nothing touched
    with monkeypatch.context() as m:
        changes["code"](m)
        assert generate(out, "tiny", seed=0, limit=0, progress=False, force=True) is None
        assert not list(out.rglob("*metalinfo*.json"))  # the stale cases are gone
        assert folder_fingerprint(out) == gen.expected_fingerprint("tiny", 0)
    with pytest.raises(ValueError, match="parts that differ: code"):  # back to this code: refused again
        generate(out, "tiny", seed=0, limit=0, progress=False)


def test_a_folder_without_fingerprint_is_refused(tmp_path):
    out = tmp_path / "old"
    (out / "body1").mkdir(parents=True)
    (out / ".generation.json").write_text('{"generator_version": "1.1", "preset": "tiny", "seed": 0}')
    with pytest.raises(ValueError, match=r"no fingerprint .*made as \{'generator_version': '1\.1'.*--force"):
        generate(out, "tiny", seed=0, limit=0, progress=False)
    generate(out, "tiny", seed=0, limit=0, progress=False, force=True)
    assert not (out / "body1").exists()


def test_the_same_bytes_across_thread_counts(tiny_benchmark, tmp_path):
    from marbench.files import sha256_file

    _, reference = tiny_benchmark
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        generate(tmp_path / "t", "tiny", seed=0, limit=4, progress=False)
    finally:
        torch.set_num_threads(threads)
    written = {str(f.relative_to(tmp_path / "t")): sha256_file(f) for f in (tmp_path / "t").rglob("*.raw")}
    assert len(written) == 4 * 6  # six raw files per case
    assert {k: reference["files"][k] for k in written} == written
