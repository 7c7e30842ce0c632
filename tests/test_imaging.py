"""Decoders at full bit depth and the preprocessing recipes, on real files written to disk."""

from __future__ import annotations

from pathlib import Path

import cxr_fixtures as fx
import dicom_fixtures as dfx
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_decoder

from privdom_ray.imaging import (
    DicomDecodeError,
    Preprocessing,
    decode,
    equalize_hist,
    load,
    preprocess,
)


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


# ------------------------------------------------------------------ DICOM transfer syntaxes

# What pydicom's wheel ships (no download needed) and what its own test suite asserts about the
# files that have no uncompressed twin in the wheel (pydicom tests/pixels/pixels_reference.py).
WHEEL_LOSSLESS = [  # (file, its transfer syntax, uncompressed or independently decoded twin)
    ("MR_small_implicit.dcm", uid.ImplicitVRLittleEndian, "MR_small.dcm"),
    ("MR_small_bigendian.dcm", uid.ExplicitVRBigEndian, "MR_small.dcm"),
    ("MR_small_RLE.dcm", uid.RLELossless, "MR_small.dcm"),
    ("MR_small_jpeg_ls_lossless.dcm", uid.JPEGLSLossless, "MR_small.dcm"),
    ("MR_small_jp2klossless.dcm", uid.JPEG2000Lossless, "MR_small.dcm"),
    # GDCM-encoded process 14 SV1 (colour: channel 0) against the same image stored as RLE
    ("SC_rgb_jpeg_gdcm.dcm", uid.JPEGLosslessSV1, "SC_rgb_rle.dcm"),
]
WHEEL_SPOT_VALUES = {  # file -> (transfer syntax, [(index, expected values)])
    "JPGExtended.dcm": (uid.JPEGExtended12Bit, [((420, 140), 244), ((230, 120), 95)]),
    "image_dfl.dcm": (
        uid.DeflatedExplicitVRLittleEndian,
        [((300, slice(255, 263)), [138, 65, 65, 65, 65, 35, 35, 35])],
    ),
    # J2K codestream unsigned, dataset signed: pydicom must re-sign the values
    "J2K_pixelrep_mismatch.dcm": (
        uid.JPEG2000Lossless,
        [((0, 0), -2000), ((slice(47, 52), 279), [621, 412, 138, -193, -520])],
    ),
}


def wheel_file(name: str) -> Path:
    return Path(get_testdata_file(name))


def syntax_of(path: Path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID


@pytest.mark.parametrize(
    "syntax",
    [
        uid.JPEGBaseline8Bit,
        uid.JPEGExtended12Bit,
        uid.JPEGLossless,
        uid.JPEGLosslessSV1,
        uid.JPEGLSLossless,
        uid.JPEGLSNearLossless,
        uid.JPEG2000Lossless,
        uid.JPEG2000,
        uid.RLELossless,
    ],
    ids=lambda s: s.name,
)
def test_pydicom_finds_a_decoder_plugin_for_each_compressed_syntax(syntax):
    """pylibjpeg (libjpeg / openjpeg / rle) serves them all; a failure names what is missing."""
    decoder = get_decoder(syntax)
    assert "pylibjpeg" in decoder.available_plugins, decoder.missing_dependencies


@pytest.mark.parametrize("name, syntax, twin", WHEEL_LOSSLESS, ids=[w[0] for w in WHEEL_LOSSLESS])
def test_wheel_lossless_files_equal_their_twin(name, syntax, twin):
    path = wheel_file(name)
    assert syntax_of(path) == syntax
    reference = pydicom.dcmread(wheel_file(twin)).pixel_array
    reference = reference[..., 0] if reference.ndim == 3 else reference
    out = decode(path)
    assert out.dtype == np.int64 and np.array_equal(out, reference)


@pytest.mark.parametrize("name", sorted(WHEEL_SPOT_VALUES))
def test_wheel_files_without_a_twin_match_pydicoms_reference_values(name):
    syntax, spots = WHEEL_SPOT_VALUES[name]
    path = wheel_file(name)
    assert syntax_of(path) == syntax
    out = decode(path)
    for index, expected in spots:
        assert np.array_equal(out[index], expected), (index, out[index])


def test_12bit_jpeg_extended_keeps_12_bits():
    out = decode(wheel_file("JPGExtended.dcm"))
    assert out.shape == (1024, 256) and 255 < out.max() <= 4095  # not squeezed into 8 bits


LOSSLESS = 0
GENERATED = [  # (transfer syntax, pixel layout, encoder options, allowed error)
    (uid.ExplicitVRLittleEndian, dfx.PixelSpec(16), {}, LOSSLESS),
    (uid.ImplicitVRLittleEndian, dfx.PixelSpec(12), {}, LOSSLESS),
    (uid.DeflatedExplicitVRLittleEndian, dfx.PixelSpec(12), {}, LOSSLESS),
    (uid.ExplicitVRBigEndian, dfx.PixelSpec(16, signed=True), {}, LOSSLESS),
    (uid.ExplicitVRBigEndian, dfx.PixelSpec(12, photometric="MONOCHROME1"), {}, LOSSLESS),
    (uid.RLELossless, dfx.PixelSpec(12), {}, LOSSLESS),
    (uid.RLELossless, dfx.PixelSpec(16, signed=True, photometric="MONOCHROME1"), {}, LOSSLESS),
    (uid.JPEGLosslessSV1, dfx.PixelSpec(12, photometric="MONOCHROME1"), {}, LOSSLESS),
    (uid.JPEGLosslessSV1, dfx.PixelSpec(16, signed=True), {}, LOSSLESS),
    (uid.JPEGLosslessSV1, dfx.PixelSpec(8), {}, LOSSLESS),
    *[(uid.JPEGLossless, dfx.PixelSpec(16), {"predictor": p}, LOSSLESS) for p in range(1, 8)],
    (uid.JPEGLossless, dfx.PixelSpec(12, signed=True), {"predictor": 6}, LOSSLESS),
    (uid.JPEGLSLossless, dfx.PixelSpec(12, photometric="MONOCHROME1"), {}, LOSSLESS),
    (uid.JPEGLSLossless, dfx.PixelSpec(16, signed=True), {}, LOSSLESS),
    (uid.JPEGLSNearLossless, dfx.PixelSpec(12), {"jls_error": 2}, 2),
    (uid.JPEGLSNearLossless, dfx.PixelSpec(16, signed=True), {"jls_error": 3}, 3),
    (uid.JPEG2000Lossless, dfx.PixelSpec(12, photometric="MONOCHROME1"), {}, LOSSLESS),
    (uid.JPEG2000Lossless, dfx.PixelSpec(16, signed=True), {}, LOSSLESS),
    # lossy JPEG 2000 / baseline: no hard bound per pixel, so a generous one plus a PSNR floor
    (uid.JPEG2000, dfx.PixelSpec(12), {"j2k_psnr": [60]}, 4095 // 100),
    (uid.JPEG2000, dfx.PixelSpec(16, True, "MONOCHROME1"), {"j2k_psnr": [60]}, 65535 // 100),
    (uid.JPEGBaseline8Bit, dfx.PixelSpec(8), {"quality": 95}, 16),
    (uid.JPEGBaseline8Bit, dfx.PixelSpec(8, photometric="MONOCHROME1"), {"quality": 90}, 24),
]


def _case_id(case) -> str:
    syntax, spec, options, _ = case
    sign = "s" if spec.signed else "u"
    extra = "".join(f"-{k}={v}" for k, v in options.items())
    return f"{syntax.name}-{spec.bits_stored}{sign}-{spec.photometric}{extra}"


@pytest.mark.parametrize(
    "syntax, spec, options, tolerance", GENERATED, ids=map(_case_id, GENERATED)
)
def test_generated_files_of_each_syntax_decode_to_what_was_encoded(
    tmp_path, syntax, spec, options, tolerance
):
    margin = tolerance if syntax == uid.JPEGLSNearLossless else 0  # see dfx.radiograph
    display = dfx.radiograph(spec, margin=margin)
    path = dfx.write(tmp_path / "x.dcm", display, spec, syntax, **options)
    assert syntax_of(path) == syntax
    out = decode(path)
    error = np.abs(out - display)
    if tolerance == LOSSLESS:
        assert out.dtype == np.int64 and np.array_equal(out, display)
    else:
        assert 0 < error.max() <= tolerance  # lossy, but within the bound
        lo, hi = spec.limits
        psnr = 20 * np.log10((hi - lo) / np.sqrt(np.mean(error.astype(float) ** 2)))
        assert psnr > 35, psnr
    # whatever the syntax, MONOCHROME1 ends up like MONOCHROME2 after preprocessing
    prep = Preprocessing(image_size=16, equalize=False)
    model_input = load(path, prep).astype(int) - preprocess(display, prep)
    assert np.abs(model_input).mean() <= (0 if tolerance == LOSSLESS else 2)


def test_generated_native_fixtures_are_really_deflated_or_big_endian(tmp_path):
    spec = dfx.PixelSpec(16)
    display = dfx.radiograph(spec)
    little = display.astype("<u2").tobytes()
    deflated = dfx.write(tmp_path / "d.dcm", display, spec, uid.DeflatedExplicitVRLittleEndian)
    big = dfx.write(tmp_path / "b.dcm", display, spec, uid.ExplicitVRBigEndian)
    assert little not in deflated.read_bytes()
    assert display.astype(">u2").tobytes() in big.read_bytes() and little not in big.read_bytes()


@pytest.mark.parametrize("bits", [8, 10, 12, 14, 16])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_monochrome1_is_mirrored_within_bits_stored(tmp_path, bits, signed):
    """Stored ``lo + hi - x`` reads back as ``x``: 2**bits-1-x unsigned, -1-x signed."""
    display = dfx.radiograph(dfx.PixelSpec(bits, signed))
    m1 = dfx.write(
        tmp_path / "m1.dcm",
        display,
        dfx.PixelSpec(bits, signed, "MONOCHROME1"),
        uid.ExplicitVRLittleEndian,
    )
    m2 = dfx.write(
        tmp_path / "m2.dcm", display, dfx.PixelSpec(bits, signed), uid.ExplicitVRLittleEndian
    )
    assert np.array_equal(decode(m1), display) and np.array_equal(decode(m2), display)
    stored = pydicom.dcmread(m1).pixel_array.astype(np.int64)
    lo, hi = dfx.PixelSpec(bits, signed).limits
    assert np.array_equal(stored, lo + hi - display)  # the fixture really is mirrored
    prep = Preprocessing(image_size=16, equalize=False)
    assert np.array_equal(load(m1, prep), load(m2, prep))


def _with_tags(path: Path, **tags) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize(
    "slope, intercept", [(1, -1024), (2, -1000), (0.5, 10), (-1, 4095)], ids=str
)
def test_rescale_slope_and_intercept_are_applied(tmp_path, photometric, slope, intercept):
    """Modality values = slope * x + intercept of the displayed x, also for MONOCHROME1.

    For MONOCHROME1 the mirror is taken in the rescaled range; with a linear rescale that is
    the same as rescaling the mirrored stored value.
    """
    spec = dfx.PixelSpec(12, photometric=photometric)
    display = dfx.radiograph(spec)
    path = dfx.write(tmp_path / "r.dcm", display, spec, uid.ExplicitVRLittleEndian)
    _with_tags(path, RescaleSlope=slope, RescaleIntercept=intercept, RescaleType="US")
    out = decode(path)
    assert np.allclose(out, slope * display + intercept)
    if float(slope).is_integer() and float(intercept).is_integer():
        assert out.dtype == np.int64
    if slope < 0:  # a negative slope flips the model input too
        prep = Preprocessing(image_size=16, equalize=False)
        assert np.array_equal(load(path, prep), preprocess(-display, prep))


def test_empty_rescale_values_mean_identity(tmp_path):
    spec = dfx.PixelSpec(12)
    display = dfx.radiograph(spec)
    path = dfx.write(tmp_path / "e.dcm", display, spec, uid.ExplicitVRLittleEndian)
    _with_tags(path, RescaleSlope=None, RescaleIntercept=None)
    assert "RescaleSlope" in pydicom.dcmread(path)
    assert np.array_equal(decode(path), display)


def _add_modality_lut(path: Path, first: int, table: np.ndarray, bits: int, vr: str) -> None:
    ds = pydicom.dcmread(path)
    item = pydicom.Dataset()
    item.add_new(0x00283002, "US", [len(table), first % 2**16, bits])  # LUTDescriptor
    data = table.astype("<u2").tobytes() if vr == "OW" else [int(v) for v in table]
    item.add_new(0x00283006, vr, data)  # LUTData
    item.ModalityLUTType = "OD"
    ds.ModalityLUTSequence = [item]
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(
    "signed, bits, vr",
    [(False, 12, "US"), (False, 16, "OW"), (True, 12, "US")],
    ids=["12-bit-entries-US", "16-bit-entries-OW", "signed-first-mapped-negative"],
)
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_modality_lut_sequence_is_applied(tmp_path, signed, bits, vr, photometric):
    """A non-linear LUT; stored values before its first entry or past its last are clamped."""
    spec = dfx.PixelSpec(12, signed, photometric)
    path = dfx.write(tmp_path / "lut.dcm", dfx.radiograph(spec), spec, uid.ExplicitVRLittleEndian)
    stored = pydicom.dcmread(path).pixel_array.astype(np.int64)
    first, last = (int(v) for v in np.percentile(stored, [10, 90]))  # both clamps exercised
    assert first < 0 if signed else first > 0  # negative first value mapped, written as US
    n = last - first + 1
    table = np.rint(4095 * np.sqrt(np.arange(n) / (n - 1))).astype(np.int64)
    _add_modality_lut(path, first, table, bits, vr)
    looked_up = np.where(stored < first, table[0], table[np.minimum(stored - first, n - 1)])
    assert (looked_up == table[0]).mean() > 0.05 and (looked_up == table[-1]).mean() > 0.05
    expected = looked_up if photometric == "MONOCHROME2" else table.max() + table.min() - looked_up
    assert np.array_equal(decode(path), expected)


def _jpeg_lossless_with_broken_codestream(tmp_path: Path) -> Path:
    """A real JPEG Lossless SV1 file whose SOF3 marker was turned into SOF7 (differential)."""
    spec = dfx.PixelSpec(12)
    path = dfx.write(tmp_path / "ll.dcm", dfx.radiograph(spec), spec, uid.JPEGLosslessSV1)
    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame.replace(b"\xff\xc3", b"\xff\xc7", 1)])
    ds.save_as(path, enforce_file_format=True)
    return path


def _mpeg2(tmp_path: Path) -> Path:
    """A syntax pydicom knows but has no decoder for (video)."""
    spec = dfx.PixelSpec(8)
    path = dfx.write(tmp_path / "v.dcm", dfx.radiograph(spec), spec, uid.JPEGBaseline8Bit)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
    ds.save_as(path, enforce_file_format=True)
    return path


UNDECODABLE = {  # case -> (file maker, transfer syntax, a fragment of the plugin's reason)
    # pydicom's wheel file: a non-conformant codestream (spectral selection end 0, not 63)
    "jpeg-extended-bad-scan": (
        lambda tmp: wheel_file("JPEG-lossy.dcm"),
        uid.JPEGExtended12Bit,
        "pylibjpeg: libjpeg error",
    ),
    "jpeg-lossless-broken": (
        _jpeg_lossless_with_broken_codestream,
        uid.JPEGLosslessSV1,
        "pylibjpeg:",
    ),
    "no-decoder": (_mpeg2, uid.MPEG2MPML, "is not supported"),
}


@pytest.mark.parametrize("case", sorted(UNDECODABLE))
def test_undecodable_dicom_error_names_the_transfer_syntax(tmp_path, case):
    make, syntax, reason = UNDECODABLE[case]
    path = make(tmp_path)
    with pytest.raises(DicomDecodeError) as info:
        load(path, Preprocessing(image_size=16))
    message = str(info.value)
    assert message.startswith(f"cannot decode {syntax.name} ({syntax}): ")
    assert reason in message and "\n" not in message


def test_undecodable_dicom_reaches_skipped_csv_with_its_transfer_syntax(tmp_path):
    """ray_decode's Ray Data batch function records ``Type: message`` (cut to 300 characters)."""
    from privdom_ray.ray_decode import decode_batch

    good = tmp_path / "good.dcm"
    spec = dfx.PixelSpec(12)
    dfx.write(good, dfx.radiograph(spec), spec, uid.JPEGLSLossless)
    paths = [str(good), str(wheel_file("JPEG-lossy.dcm"))]
    batch = {"row": np.arange(2), "path": np.array(paths, dtype=object)}
    status = decode_batch(batch, {"image_size": 16, "geometry": "stretch", "equalize": True})
    assert status["ok"].tolist() == [True, False]
    assert status["image"].shape == (2, 16, 16) and status["image"][0].any()
    assert status["error"][1].startswith(
        "DicomDecodeError: cannot decode JPEG Extended (Process 2 and 4) (1.2.840.10008.1.2.4.51): "
    )
