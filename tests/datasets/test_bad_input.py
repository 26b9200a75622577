"""A malformed-input corpus built by the tests: every case must fail with the file, the expected and the found."""
import shutil

import h5py
import numpy as np
import pytest

from marbench.datasets.aapm import AAPMCTMARDataModule, AAPMCTMARDataset
from marbench.datasets.aapm_format import AAPMCase, case_files, read_raw, write_raw
from marbench.datasets.splits import read_split
from marbench.datasets.syndeeplesion import read_h5
from marbench.physics import preset


@pytest.fixture()
def corrupted_copy(tiny_benchmark, tmp_path):
    out, _ = tiny_benchmark
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    return copy


def _files(root, index=1):
    return case_files(root, AAPMCase("body1", "body", index), preset("aapm_body_128"))


def test_truncated_raw_file(corrupted_copy):
    f = _files(corrupted_copy)["ma_sinogram"]
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(ValueError, match=rf"{f.name}: expected 223200 bytes \(float32 \(248, 225\)\), "
                                         r"found 223193 bytes"):
        read_raw(f, (248, 225))


def test_raw_file_of_another_geometry(corrupted_copy):
    f = _files(corrupted_copy)["gt_image"]
    write_raw(f, np.zeros((256, 256), np.float32))
    ds = AAPMCTMARDataset(corrupted_copy, [AAPMCase("body1", "body", 1)], keys=("gt_image",))
    with pytest.raises(ValueError, match="expected 65536 bytes.*found 262144 bytes"):
        ds[0]


def test_nan_in_an_image(corrupted_copy):
    f = _files(corrupted_copy)["ma_image"]
    a = read_raw(f, (128, 128))
    a[3, 4] = np.nan
    write_raw(f, a)
    with pytest.raises(ValueError, match=rf"{f.name}: expected finite values, found 1 NaN/Inf"):
        read_raw(f, (128, 128))


def test_missing_metal_mask(corrupted_copy):
    f = _files(corrupted_copy)["metal_only_image"]
    f.unlink()
    ds = AAPMCTMARDataset(corrupted_copy, [AAPMCase("body1", "body", 1)], keys=("metal_mask",))
    with pytest.raises(FileNotFoundError, match=f"{f.name}: file not found"):
        ds[0]


def test_split_naming_a_missing_case(corrupted_copy):
    split = corrupted_copy / "split.txt"
    split.write_text(split.read_text() + "test body1/body999 knee\n")
    dm = AAPMCTMARDataModule(corrupted_copy, split=str(split))
    with pytest.raises(ValueError, match=r"split.txt: names 1 case\(s\) not found.*body1/body999"):
        dm.setup("test")


@pytest.mark.parametrize("text, match", [
    ("train body1/body1\ntrain body1/body1\n", r"split.txt:2: case body1/body1 already listed on line 1"),
    ("train body1\n", r"split.txt:1: expected '<split> <part>/<anatomy><index> \[<category>\]', found 'train body1'"),
])
def test_malformed_split_file(tmp_path, text, match):
    f = tmp_path / "split.txt"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_split(f)


def test_unknown_keys_and_anatomy(tiny_benchmark):
    out, _ = tiny_benchmark
    with pytest.raises(ValueError, match="unknown batch keys"):
        AAPMCTMARDataset(out, [], keys=("gt_imag",))
    with pytest.raises(ValueError, match="unknown anatomy 'leg'"):
        AAPMCTMARDataModule(out, anatomy=("leg",))


def test_h5_without_a_key(tmp_path):
    f = tmp_path / "0.h5"
    with h5py.File(f, "w") as h:
        h["ma_CT"] = np.zeros((416, 416), np.float32)
    with pytest.raises(ValueError, match=r"0.h5: expected dataset 'LI_CT', found keys \['ma_CT'\]"):
        read_h5(f, "LI_CT", (416, 416))
    with pytest.raises(ValueError, match=r"expected shape \(640, 641\), found \(416, 416\)"):
        read_h5(f, "ma_CT", (640, 641))
