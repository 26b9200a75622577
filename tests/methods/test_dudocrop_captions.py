"""DuDoCLIP's captions (Sec. III.B.1, Fig. 5): QSPD of the metal mask, content of the tissue labels, the direct
(w/o prompt engineering) variant, caption files, batches, and CLIP's 77-token context."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from marbench.datasets.synthetic.tissues import TISSUES
from marbench.methods.dudocrop.captions import (
    MEDIUM_MM2,
    SMALL_MM2,
    CaptionFile,
    batch_captions,
    body_region,
    content_caption,
    direct_captions,
    metal_caption,
    metal_components,
    qspd_tuple,
)

L = {name: t.label for name, t in TISSUES.items()}


def _disk(n: int, row: float, col: float, radius_px: float) -> np.ndarray:
    rr, cc = np.mgrid[:n, :n]
    return (rr - row) ** 2 + (cc - col) ** 2 <= radius_px**2


def _two_disks(n: int = 128) -> np.ndarray:
    # 6 mm disk on the patient's right (low columns), 4 mm disk on the left, both on the centre row (0.5 mm pixels)
    return _disk(n, 63.5, 30, 12) | _disk(n, 63.5, 100, 8)


# -- Q, S, P ----------------------------------------------------------------------------------------------------------
def test_two_disks_quantity_areas_positions_largest_first():
    comps = metal_components(torch.from_numpy(_two_disks())[None], pixel_mm=0.5)
    assert len(comps) == 2
    big, small = comps
    assert big.area_mm2 == pytest.approx(math.pi * 6.0**2, rel=0.03)
    assert small.area_mm2 == pytest.approx(math.pi * 4.0**2, rel=0.03)
    assert big.centroid_rc == pytest.approx((63.5, 30.0), abs=1e-9)
    assert small.centroid_rc == pytest.approx((63.5, 100.0), abs=1e-9)
    # radiological convention: column 0 is the patient's right; on the centre row neither anterior nor posterior
    assert (big.position, small.position) == ("right", "left")
    assert (big.size, small.size) == ("large", "medium")  # 113 mm^2 >= 100, 50 mm^2 in [20, 100)


def test_eight_connectivity_joins_diagonal_neighbours():
    m = np.zeros((16, 16), bool)
    m[4, 4] = m[5, 5] = True  # touching at a corner only: one implant under 8-connectivity
    assert len(metal_components(m, 1.0)) == 1
    m[5, 5], m[6, 6] = False, True  # a one-pixel gap: two implants
    assert len(metal_components(m, 1.0)) == 2


def test_positions_relative_to_the_body_centre():
    n = 128
    body = _disk(n, 63.5, 90, 30)  # the body lies right of the image centre
    m = np.zeros((n, n), bool)
    m[62:66, 62:66] = True  # image centre, but well on the patient's right of this body
    m[36:39, 89:92] = True  # above the body centre: anterior
    m[88:91, 89:92] = True  # below: posterior
    m[63:65, 90:92] = True  # at the body centre
    by_centre = {c.centroid_rc: c.position for c in metal_components(m, 1.0, body_mask=body)}
    assert by_centre[(63.5, 63.5)] == "right"
    assert by_centre[(37.0, 90.0)] == "anterior"
    assert by_centre[(89.0, 90.0)] == "posterior"
    assert by_centre[(63.5, 90.5)] == "central"
    # without a body the image is the body: the first implant is central
    assert any(c.position == "central" and c.centroid_rc == (63.5, 63.5) for c in metal_components(m, 1.0))
    m2 = np.zeros((n, n), bool)
    m2[5:8, 120:123] = True
    assert metal_components(m2, 1.0)[0].position == "left anterior"


@pytest.mark.parametrize("pixels,word", [(SMALL_MM2 - 1, "small"), (SMALL_MM2, "medium"),
                                         (MEDIUM_MM2 - 1, "medium"), (MEDIUM_MM2, "large")])
def test_size_thresholds(pixels, word):
    m = np.zeros((32, 32), bool)
    m.flat[: int(pixels)] = True  # the first rows: one connected implant of `pixels` mm^2 at 1 mm pixels
    (comp,) = metal_components(m, 1.0)
    assert comp.area_mm2 == pixels and comp.size == word


def test_body_region_fills_holes_and_drops_detached_objects():
    hu = np.full((64, 64), -1000.0)
    hu[_disk(64, 30, 30, 20)] = 40.0
    hu[_disk(64, 30, 24, 5)] = -850.0  # a lung inside the outline
    hu[60:63, 5:60] = 100.0  # the table below the patient
    body = body_region(image_hu=hu)
    assert body[30, 24] and not body[61, 30]
    labels = np.zeros((64, 64), np.int64)
    labels[_disk(64, 30, 30, 20)] = L["muscle"]
    assert np.array_equal(body_region(tissue_labels=labels), _disk(64, 30, 30, 20))
    with pytest.raises(ValueError, match="image_hu or tissue_labels"):
        body_region()


def test_qspd_tuple_and_metal_caption_carry_count_and_rounded_areas():
    m, pixel = _two_disks(), 0.5
    areas = [c.area_mm2 for c in metal_components(m, pixel)]
    t = qspd_tuple(m, pixel)
    assert t["quantity"] == 2
    rounded = [str(math.floor(a + 0.5)) for a in areas]
    assert t["size"] == [f"large {rounded[0]}", f"medium {rounded[1]}"]
    assert t["position"] == ["right", "left"]
    assert "dark bands between the implants" in t["description"]
    text = metal_caption(m, pixel)
    assert text.startswith("2 metal implants; ")
    assert f"size mm2: large {rounded[0]}, medium {rounded[1]}; position: right, left; " in text
    # one small implant, then none
    one = np.zeros((128, 128), bool)
    one[10:13, 10:13] = True
    assert metal_caption(one, 0.5).endswith("mild streaks around a small implant")
    assert qspd_tuple(np.zeros((8, 8), bool), 1.0) == {
        "quantity": 0, "size": [], "position": [], "description": "no metal implant and no metal artifacts"}


def test_many_implants_are_capped_with_a_count_of_the_rest():
    m = np.zeros((64, 64), bool)
    for k in range(8):
        m[4 + 7 * k, 2:2 + k + 1] = True  # 8 separate bars of 1..8 pixels
    t = qspd_tuple(m, 1.0)
    assert t["quantity"] == 8
    assert t["size"][:4] == ["small 8", "small 7", "small 6", "small 5"] and t["size"][4] == "+4 more"
    assert len(t["position"]) == 5 and t["position"][4] == "+4 more"
    assert "size mm2: small 8, 7, 6, 5, +4 more; position: " in metal_caption(m, 1.0)
    assert metal_caption(m, 1.0).count("more") == 1  # the tuple's "+4 more" is written once, after the sizes


def test_mask_validation():
    with pytest.raises(ValueError, match="bool"):
        metal_components(np.zeros((8, 8), np.uint8), 1.0)
    with pytest.raises(ValueError, match="shape"):
        metal_components(np.zeros((2, 8, 8), bool), 1.0)
    with pytest.raises(ValueError, match="pixel_mm"):
        metal_components(np.zeros((8, 8), bool), 0.0)
    with pytest.raises(ValueError, match="body_mask"):
        metal_components(np.zeros((8, 8), bool), 1.0, body_mask=np.ones((9, 9), bool))
    with pytest.raises(ValueError, match="domain"):
        metal_caption(np.zeros((8, 8), bool), 1.0, domain="residual")


# -- sinogram domain, direct variant ---------------------------------------------------------------------------------
def test_sinogram_captions_name_the_trace_and_the_shape():
    m = _two_disks()
    trace = np.zeros((40, 60), bool)
    trace[:, 10:20] = True
    trace[7, 10:33] = True  # the widest view: 23 detector channels
    t2 = metal_caption(m, 0.5, domain="sinogram", metal_trace=torch.from_numpy(trace)[None])
    assert t2.startswith("2 metal traces; ")
    # 113 + 49 mm^2 of metal in all: "large" severity, a broad trace
    assert t2.endswith("; broad bright sinusoidal traces across the views, up to 23 detector channels wide")
    assert "detector channels" not in metal_caption(m, 0.5, domain="sinogram")  # no trace given
    assert metal_caption(m, 0.5, domain="sinogram") != metal_caption(m, 0.5)
    labels = np.full((16, 16), L["muscle"], np.int64)
    t1 = content_caption(labels, "body", "pelvis", domain="sinogram", sinogram_shape=(1, 1, 40, 60))
    assert t1 == "a CT sinogram of a slice of the pelvis (40 views x 60 detector channels) through muscle"
    with pytest.raises(ValueError, match="sinogram_shape"):
        content_caption(labels, "body", "pelvis", domain="sinogram")
    with pytest.raises(ValueError, match="metal_trace"):
        metal_caption(m, 0.5, domain="sinogram", metal_trace=trace.astype(np.float32))


def test_direct_captions_differ_from_prompt_engineered_ones():
    labels = np.full((128, 128), L["muscle"], np.int64)
    for domain in ("image", "sinogram"):
        d1, d2 = direct_captions("head", domain)
        q1 = content_caption(labels, "head", "head", domain, sinogram_shape=(40, 60))
        q2 = metal_caption(_two_disks(), 0.5, domain=domain)
        assert d1 != q1 and d2 != q2 and "head" in d1
    assert direct_captions("body") == ("a CT image of the body with metal artifacts", "metal artifacts")
    assert direct_captions("body", "sinogram") == ("a CT sinogram of the body with a metal trace", "metal trace")
    with pytest.raises(ValueError, match="domain"):
        direct_captions("body", "k-space")


# -- content (T1) -----------------------------------------------------------------------------------------------------
def test_content_lists_present_tissues_largest_first():
    labels = np.zeros(10_000 + 5_000, np.int64)  # 5000 air pixels outside the body
    fractions = {"muscle": 0.40, "fat": 0.30, "cancellous_bone": 0.18, "organ": 0.11, "cortical_bone": 0.005}
    start = 0
    for name, f in fractions.items():
        labels[start:start + int(f * 10_000)] = L[name]
        start += int(f * 10_000)
    labels[start:10_000] = L["lung"]  # the remaining 0.5 %: also below the 1 % threshold
    t1 = content_caption(labels.reshape(150, 100), "body", "pelvis")
    assert t1 == ("a CT slice of the pelvis showing muscle (grey), fat (dark grey), cancellous bone (white), "
                  "organs (grey)")
    for absent in ("cortical", "lung", "brain", "CSF", "air"):
        assert absent not in t1
    # a category that is no anatomical region leaves the anatomy as the region
    assert content_caption(labels.reshape(150, 100), "body", "scoring").startswith("a CT slice of the body showing")
    with pytest.raises(ValueError, match="unknown label ids"):
        content_caption(np.full((4, 4), 42, np.int64), "body", "pelvis")
    with pytest.raises(ValueError, match="integer"):
        content_caption(np.zeros((4, 4), np.float32), "body", "pelvis")


def test_content_from_hu_without_labels_leaves_metal_out():
    hu = np.full((64, 64), -1000.0)
    hu[_disk(64, 32, 32, 25)] = -100.0  # fat
    hu[_disk(64, 32, 32, 15)] = 50.0  # soft tissue, less than the fat ring around it
    metal = _disk(64, 32, 32, 6)
    hu[metal] = 3000.0
    t1 = content_caption(None, "body", "body", image_hu=hu, metal_mask=metal)
    assert t1 == "a CT slice of the body showing fat (dark grey), soft tissue (grey)"
    assert "bone" in content_caption(None, "body", "body", image_hu=hu)  # metal counted as bone-bright
    with pytest.raises(ValueError, match="tissue_labels or image_hu"):
        content_caption(None, "body", "body")


# -- caption files ----------------------------------------------------------------------------------------------------
def _write(tmp_path, data, name="captions.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_caption_file_both_formats(tmp_path):
    path = _write(tmp_path, {
        "body1/body1": {"image": {"content": "c-img", "metal": "m-img"}, "sinogram": {"content": "c-sin",
                                                                                       "metal": "m-sin"}},
        "body1/body2": {"content": "c-both", "metal": "m-both"},
        "body1/body3": {"image": {"content": "c3", "metal": "m3"}},
    })
    f = CaptionFile(path)
    assert len(f) == 3
    assert f.captions("body1/body1", "image") == ("c-img", "m-img")
    assert f.captions("body1/body1", "sinogram") == ("c-sin", "m-sin")
    assert f.captions("body1/body2", "sinogram") == f.captions("body1/body2", "image") == ("c-both", "m-both")
    with pytest.raises(ValueError, match=r"'body1/body3' has no 'sinogram' captions"):
        f.captions("body1/body3", "sinogram")
    with pytest.raises(ValueError) as e:
        f.captions("body9/body9", "image")
    assert "body9/body9" in str(e.value) and str(path) in str(e.value) and "3 slices" in str(e.value)


def test_caption_file_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CaptionFile(missing)
    with pytest.raises(ValueError, match="bad.json.*not a valid JSON"):
        CaptionFile(_write(tmp_path, "{not json", "bad.json"))
    with pytest.raises(ValueError, match="non-empty JSON object"):
        CaptionFile(_write(tmp_path, [], "list.json"))
    for entry in ({"content": "c"}, {"content": "c", "metal": ""}, {"content": "c", "metals": "m"},
                  {"image": {"content": "c", "metal": 3}}, {"image": "c"}, "just text", {}):
        path = _write(tmp_path, {"ok": {"content": "c", "metal": "m"}, "body1/body7": entry}, "entry.json")
        with pytest.raises(ValueError) as e:
            CaptionFile(path)
        msg = str(e.value)
        assert str(path) in msg and "'body1/body7'" in msg and '"content"' in msg and '"metal"' in msg, msg


# -- batches ----------------------------------------------------------------------------------------------------------
def _batch(n: int = 64, with_labels: bool = True) -> dict:
    labels = np.zeros((2, n, n), np.int64)
    for i in range(2):
        labels[i][_disk(n, 31.5, 31.5, 28)] = L["fat"]
        labels[i][_disk(n, 31.5, 31.5, 22)] = L["muscle"]
        labels[i][_disk(n, 45, 31.5, 6)] = L["cancellous_bone"]
    masks = np.zeros((2, n, n), bool)
    masks[0] = _disk(n, 31.5, 15, 3) | _disk(n, 31.5, 48, 2)
    masks[1] = _disk(n, 20, 31.5, 4)
    hu = np.select([labels == L["fat"], labels == L["muscle"], labels == L["cancellous_bone"]],
                   [-100.0, 45.0, 280.0], -1000.0)
    trace = np.zeros((2, 1, 24, 40), bool)
    trace[0, 0, :, 5:12] = True
    trace[1, 0, :, 18:22] = True
    batch = {
        "metal_mask": torch.from_numpy(masks)[:, None],
        "gt_image": torch.from_numpy(hu.astype(np.float32))[:, None],
        "ma_image": torch.from_numpy(np.where(masks, 3000.0, hu).astype(np.float32))[:, None],
        "ma_sinogram": torch.zeros(2, 1, 24, 40),
        "metal_trace": torch.from_numpy(trace),
        "fov_mm": torch.tensor([64.0, 32.0], dtype=torch.float64),
        "slice_id": ["body1/body1", "body1/body2"],
        "category": ["pelvis", "body"],
        "anatomy": ["body", "body"],
    }
    if with_labels:
        batch["tissue_labels"] = torch.from_numpy(labels)[:, None]
    return batch


def test_batch_captions_qspd_match_the_per_slice_functions():
    b = _batch()
    t1, t2 = batch_captions(b, "image")
    assert t1[0] == "a CT slice of the pelvis showing muscle (grey), fat (dark grey), cancellous bone (white)"
    assert t1[1].startswith("a CT slice of the body showing muscle")
    for i, pixel in enumerate((1.0, 0.5)):  # fov_mm / N
        body = body_region(tissue_labels=b["tissue_labels"][i])
        assert t2[i] == metal_caption(b["metal_mask"][i], pixel, body)
    assert t2[0].startswith("2 metal implants; ") and "position: right, left" in t2[0]
    assert t2[1].startswith("1 metal implant; ") and "position: anterior" in t2[1]
    s1, s2 = batch_captions(b, "sinogram")
    assert all("(24 views x 40 detector channels)" in t for t in s1)
    assert "up to 7 detector channels wide" in s2[0] and "up to 4 detector channels wide" in s2[1]
    # without tissue labels: content and body from the clean image's HU
    h1, h2 = batch_captions(_batch(with_labels=False), "image")
    assert h1[0] == "a CT slice of the pelvis showing soft tissue (grey), fat (dark grey), bone (white)"
    assert h2 == t2
    del b["tissue_labels"], b["gt_image"]  # only the metal-affected image: the metal stays out of "bone"
    m1, _ = batch_captions(b, "image")
    assert m1 == h1


def test_batch_captions_direct_and_caption_file(tmp_path):
    b = _batch()
    assert batch_captions(b, "image", mode="direct") == (
        ["a CT image of the body with metal artifacts"] * 2, ["metal artifacts"] * 2)
    path = _write(tmp_path, {"body1/body1": {"content": "a1", "metal": "b1"},
                             "body1/body2": {"image": {"content": "a2", "metal": "b2"},
                                             "sinogram": {"content": "s2", "metal": "t2"}}})
    f = CaptionFile(path)
    assert batch_captions(b, "image", caption_file=f) == (["a1", "a2"], ["b1", "b2"])
    assert batch_captions(b, "sinogram", mode="direct", caption_file=f) == (["a1", "s2"], ["b1", "t2"])
    b["slice_id"] = ["body1/body1", "body1/body5"]
    with pytest.raises(ValueError, match=r"captions.json: no captions for slice 'body1/body5' \(the file has 2"):
        batch_captions(b, "image", caption_file=f)


def test_batch_captions_errors():
    b = _batch()
    with pytest.raises(ValueError, match="mode"):
        batch_captions(b, "image", mode="llava")
    with pytest.raises(ValueError, match="domain"):
        batch_captions(b, "residual")
    for key in ("fov_mm", "category"):
        broken = dict(b)
        del broken[key]
        with pytest.raises(ValueError, match=key):
            batch_captions(broken, "image")
    no_sino = {k: v for k, v in b.items() if k not in ("ma_sinogram", "metal_trace")}
    with pytest.raises(ValueError, match="ma_sinogram"):
        batch_captions(no_sino, "sinogram")
    with pytest.raises(ValueError, match="bool"):
        batch_captions(dict(b, metal_mask=b["metal_mask"].float()), "image")


# -- CLIP's context ---------------------------------------------------------------------------------------------------
def test_template_captions_fit_clips_77_tokens():
    open_clip = pytest.importorskip("open_clip")
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    eot = tokenizer.eot_token_id
    n = 512
    # worst case for 5 implants: 4-digit areas (0.9 mm pixels), two-word positions, a 4-digit trace width
    five = np.zeros((n, n), bool)
    for r, c, rad in [(60, 60, 40), (60, 450, 30), (450, 60, 25), (450, 450, 23), (110, 360, 20)]:
        five |= _disk(n, r, c, rad)
    many = np.zeros((n, n), bool)  # 4 implants of 4-digit areas in the corners and 19 more: "+19 more"
    for r, c in [(60, 60), (60, 450), (450, 60), (450, 450)]:
        many |= _disk(n, r, c, 35)
    for k in range(19):
        many[150 + 10 * k:153 + 10 * k, 200:210] = True
    trace = np.zeros((1000, 2000), bool)
    trace[:, 100:1737] = True
    all_tissues = np.arange(n * n, dtype=np.int64).reshape(n, n) % len(TISSUES)
    assert [c.position for c in metal_components(five, 0.9)] == [
        "right anterior", "left anterior", "right posterior", "left posterior", "left anterior"]
    texts = [metal_caption(five, 0.9, None, d, trace) for d in ("image", "sinogram")]
    texts += [metal_caption(many, 0.9, None, d, trace) for d in ("image", "sinogram")]
    texts += [content_caption(all_tissues, "body", "upper_abdomen", d, (1000, 2000)) for d in ("image", "sinogram")]
    texts += [t for d in ("image", "sinogram") for t in direct_captions("body", d)]
    texts += batch_captions(_batch(), "sinogram")[0] + batch_captions(_batch(), "sinogram")[1]
    assert "5 metal implants" in texts[0] and "1637 detector channels" in texts[1] and "+19 more" in texts[2]
    tokens = tokenizer(texts, context_length=200)  # long enough never to truncate
    for text, row in zip(texts, tokens, strict=True):
        length = int((row != 0).sum())
        assert length <= 77 and int(row[length - 1]) == eot, (length, text)
