"""Decoders at full bit depth and the preprocessing recipes, on real files written to disk."""

from __future__ import annotations

import cxr_fixtures as fx
import numpy as np
import pytest
from PIL import Image, ImageFile

from privdom_ray.imaging import Preprocessing, decode, equalize_hist, load, preprocess


def ramp(h: int, w: int, maxval: int) -> np.ndarray:
    return np.linspace(0, maxval, h * w).round().astype(np.int64).reshape(h, w)


@pytest.mark.parametrize("maxval", [4095, 65535])
def test_16bit_png_keeps_its_range(tmp_path, maxval):
    path = tmp_path / "x.png"
    arr = ramp(40, 48, maxval)
    fx.save_png16(path, arr)
    assert Image.open(path).mode == "I;16"
    out = decode(path)
    assert out.dtype == np.uint16 and out.max() == maxval  # not >> 8 (4095 would become 15)
    assert np.array_equal(out, arr)
    # all those levels survive into the 8-bit model input (cv2's default would keep 16)
    img = preprocess(out, Preprocessing(image_size=40, geometry="center_crop", equalize=False))
    assert len(np.unique(img)) > 200


def test_8bit_png_jpeg_and_colour_files(tmp_path):
    arr = ramp(30, 20, 255)
    fx.save_png8(tmp_path / "a.png", arr)
    assert decode(tmp_path / "a.png").dtype == np.uint8
    assert np.array_equal(decode(tmp_path / "a.png"), arr)
    fx.save_jpeg(tmp_path / "a.jpg", arr)
    jpg = decode(tmp_path / "a.jpg")
    assert (
        jpg.dtype == np.uint8 and jpg.shape == (30, 20) and np.abs(jpg.astype(int) - arr).max() < 12
    )
    rgb = np.stack([arr, 255 - arr, np.zeros_like(arr)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(decode(tmp_path / "rgb.png"), arr)  # channel 0
    Image.fromarray(np.dstack([arr, np.full_like(arr, 255)]).astype(np.uint8), mode="LA").save(
        tmp_path / "la.png"
    )
    assert np.array_equal(decode(tmp_path / "la.png"), arr)


@pytest.mark.parametrize("ext", [".dcm", ".dicom"])
def test_dicom_monochrome_and_bits_stored(tmp_path, ext):
    arr = ramp(24, 32, 4095)
    fx.save_dicom(tmp_path / f"m2{ext}", arr, photometric="MONOCHROME2")
    fx.save_dicom(tmp_path / f"m1{ext}", arr, photometric="MONOCHROME1")  # stored as 4095 - arr
    m2, m1 = decode(tmp_path / f"m2{ext}"), decode(tmp_path / f"m1{ext}")
    assert np.array_equal(m2, arr)
    # inverted within BitsStored=12 (4095 - x), not the 16-bit container (65535 - x)
    assert np.array_equal(m1, arr)
    assert m1.max() == 4095 and m1.min() == 0
    fx.save_dicom(
        tmp_path / f"b10{ext}", ramp(8, 8, 1023), photometric="MONOCHROME1", bits_stored=10
    )
    assert np.array_equal(decode(tmp_path / f"b10{ext}"), ramp(8, 8, 1023))
    # after preprocessing, MONOCHROME1 looks like MONOCHROME2: bright = dense
    prep = Preprocessing(image_size=16, equalize=False)
    assert np.array_equal(load(tmp_path / f"m1{ext}", prep), load(tmp_path / f"m2{ext}", prep))


def test_preprocess_geometries():
    wide = np.zeros((40, 80), dtype=np.uint16)
    wide[:, :20] = 4000  # bright band on the left quarter: outside the centre square
    wide[:, 20:60] = ramp(40, 40, 1000)
    stretch = preprocess(wide, Preprocessing(image_size=32, geometry="stretch", equalize=False))
    crop = preprocess(wide, Preprocessing(image_size=32, geometry="center_crop", equalize=False))
    assert stretch.shape == crop.shape == (32, 32) and stretch.dtype == crop.dtype == np.uint8
    assert stretch[:, :4].min() == 255  # the band is squeezed into the stretched image
    expected = preprocess(
        wide[:, 20:60], Preprocessing(image_size=32, geometry="stretch", equalize=False)
    )
    assert np.array_equal(crop, expected)  # centre square of the long side only
    tall = preprocess(wide.T, Preprocessing(image_size=24, geometry="center_crop", equalize=False))
    assert tall.shape == (24, 24)
    assert crop.min() == 0 and crop.max() == 255  # per-image min-max
    flat = preprocess(np.full((10, 12), 7, dtype=np.uint16), Preprocessing(image_size=8))
    assert flat.shape == (8, 8) and (flat == 0).all()  # constant image: no division by zero
    with pytest.raises(ValueError, match="geometry"):
        preprocess(wide, Preprocessing(geometry="fit"))


def test_equalize_gives_a_near_uniform_histogram():
    rng = np.random.default_rng(0)
    skewed = (rng.exponential(0.1, size=(128, 128)).clip(0, 1) * 255).astype(np.uint8)
    assert (skewed < 64).mean() > 0.8  # dark-heavy input
    out = equalize_hist(skewed)
    quarters = [
        (out < 64).mean(),
        ((out >= 64) & (out < 128)).mean(),
        ((out >= 128) & (out < 192)).mean(),
        (out >= 192).mean(),
    ]
    assert np.allclose(quarters, 0.25, atol=0.06), quarters
    assert out.max() == 255 and out.min() == 0
    # equalize=True in preprocess applies the same LUT after min-max
    raw = skewed.astype(np.uint16) * 16
    eq = preprocess(raw, Preprocessing(image_size=128, equalize=True))
    assert np.array_equal(
        eq, equalize_hist(preprocess(raw, Preprocessing(image_size=128, equalize=False)))
    )


def test_broken_files_raise_so_the_cache_can_skip_them(tmp_path):
    good = tmp_path / "good.png"
    fx.save_png16(good, ramp(40, 40, 4095))
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(OSError):
        decode(bad)
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # even when someone switched PIL to lenient mode
    try:
        with pytest.raises(OSError):
            decode(bad)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # and the global is restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    fx.save_dicom(tmp_path / "x.dicom", ramp(20, 20, 4095))
    data = (tmp_path / "x.dicom").read_bytes()
    (tmp_path / "cut.dicom").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception):  # noqa: B017 - pydicom raises ValueError or OSError
        decode(tmp_path / "cut.dicom")
    with pytest.raises(FileNotFoundError):
        decode(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="no decoder"):
        decode(tmp_path / "x.tif")


def test_broken_fixture_has_exactly_the_advertised_bad_files(tmp_path):
    root = fx.write_csv_site(tmp_path / "site", broken=True)
    paths = sorted(p for p in (root / "images").iterdir())
    failures = 0
    for path in paths:
        try:
            decode(path)
        except Exception:  # noqa: BLE001
            failures += 1
    listed = (root / "labels.csv").read_text().count("\n") - 1
    assert failures == fx.BROKEN_TRUNCATED and listed - len(paths) == fx.BROKEN_MISSING
