"""Small DICOM files in every common transfer syntax, built at test time from synthetic pixels.

pydicom's wheel ships only some transfer syntaxes as grey-scale samples (the rest are downloaded
on demand, which our machines cannot do), so the tests also write their own: native syntaxes
through pydicom's writer, RLE / JPEG-LS / JPEG 2000 through ``Dataset.compress`` (pydicom's RLE
encoder, pyjpegls, pylibjpeg-openjpeg), JPEG baseline through Pillow, and JPEG lossless
(process 14, any predictor) through the minimal encoder below, since no installed package
writes it. The decoders that read them back are independent libraries (libjpeg, CharLS,
OpenJPEG), so an exact round trip checks both sides.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cxr_fixtures as fx
import numpy as np
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate


@dataclass(frozen=True)
class PixelSpec:
    """How the stored values are laid out: BitsStored, PixelRepresentation, photometric."""

    bits_stored: int = 12
    signed: bool = False
    photometric: str = "MONOCHROME2"

    @property
    def bits_allocated(self) -> int:
        return 8 if self.bits_stored <= 8 else 16

    @property
    def limits(self) -> tuple[int, int]:
        if self.signed:
            return -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1
        return 0, 2**self.bits_stored - 1

    @property
    def dtype(self) -> str:
        return f"{'<i' if self.signed else '<u'}{self.bits_allocated // 8}"


def radiograph(spec: PixelSpec, h: int = 48, w: int = 40, *, margin: int = 0, seed: int = 0):
    """Radiograph-like values as displayed (bright = dense) spanning the stored range.

    ``margin`` keeps values that far from the limits (lossy JPEG-LS of signed data can wrap
    a value next to a limit to the other end: the codec does not know about signs).
    """
    lo, hi = spec.limits
    span = hi - lo - 2 * margin
    img = fx.pixels(np.random.default_rng(seed), h, w, signal=True, maxval=span)
    return img + lo + margin


def stored_values(display: np.ndarray, spec: PixelSpec) -> np.ndarray:
    """The values a file stores to show ``display``: MONOCHROME1 mirrors them in its range."""
    if spec.photometric != "MONOCHROME1":
        return display
    lo, hi = spec.limits
    return lo + hi - display


def dataset(stored: np.ndarray, spec: PixelSpec) -> Dataset:
    """A native (Explicit VR Little Endian) secondary-capture dataset holding ``stored``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = spec.photometric
    ds.BitsAllocated = spec.bits_allocated
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = int(spec.signed)
    ds.PixelData = stored.astype(spec.dtype).tobytes()
    return ds


Encode = Callable[[Dataset, uid.UID, dict], None]


def _native(ds: Dataset, syntax: uid.UID, options: dict) -> None:
    """Implicit / deflated / big endian: pydicom writes the elements, we order the bytes."""
    if syntax == uid.ExplicitVRBigEndian:
        values = ds.pixel_array
        ds.PixelData = values.astype(values.dtype.newbyteorder(">")).tobytes()
    ds.file_meta.TransferSyntaxUID = syntax


def _pydicom_compress(ds: Dataset, syntax: uid.UID, options: dict) -> None:
    ds.compress(syntax, ds.pixel_array, **options)


def _encapsulated(codestream: bytes, ds: Dataset, syntax: uid.UID) -> None:
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax


def _pillow_baseline(ds: Dataset, syntax: uid.UID, options: dict) -> None:
    buf = io.BytesIO()
    Image.fromarray(ds.pixel_array.astype(np.uint8)).save(buf, format="JPEG", **options)
    _encapsulated(buf.getvalue(), ds, syntax)
    ds.LossyImageCompression = "01"


def _lossless_jpeg(ds: Dataset, syntax: uid.UID, options: dict) -> None:
    mask = (1 << int(ds.BitsStored)) - 1  # two's complement within BitsStored for signed data
    samples = ds.pixel_array.astype(np.int64) & mask
    _encapsulated(encode_lossless_jpeg(samples, int(ds.BitsStored), **options), ds, syntax)


ENCODERS: dict[str, Encode] = {
    uid.ExplicitVRLittleEndian: _native,
    uid.ImplicitVRLittleEndian: _native,
    uid.DeflatedExplicitVRLittleEndian: _native,
    uid.ExplicitVRBigEndian: _native,
    uid.RLELossless: _pydicom_compress,
    uid.JPEGLSLossless: _pydicom_compress,
    uid.JPEGLSNearLossless: _pydicom_compress,
    uid.JPEG2000Lossless: _pydicom_compress,
    uid.JPEG2000: _pydicom_compress,
    uid.JPEGBaseline8Bit: _pillow_baseline,
    uid.JPEGLosslessSV1: _lossless_jpeg,
    uid.JPEGLossless: _lossless_jpeg,
}


def write(path: Path, display: np.ndarray, spec: PixelSpec, syntax: str, **options) -> Path:
    """Write ``display`` (as it should look) in ``syntax``; options go to the encoder."""
    ds = dataset(stored_values(display, spec), spec)
    ENCODERS[syntax](ds, uid.UID(syntax), options)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------- JPEG lossless (ITU T.81 H)

_PREDICTORS: dict[int, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    1: lambda ra, rb, rc: ra,
    2: lambda ra, rb, rc: rb,
    3: lambda ra, rb, rc: rc,
    4: lambda ra, rb, rc: ra + rb - rc,
    5: lambda ra, rb, rc: ra + ((rb - rc) >> 1),
    6: lambda ra, rb, rc: rb + ((ra - rc) >> 1),
    7: lambda ra, rb, rc: (ra + rb) >> 1,
}


def _predictions(x: np.ndarray, predictor: int, precision: int) -> np.ndarray:
    """T.81 H.1.2.1 with point transform 0: first row Ra, first column Rb, corner 2**(P-1)."""
    ra, rb, rc = (np.zeros_like(x) for _ in range(3))
    ra[:, 1:], rb[1:, :], rc[1:, 1:] = x[:, :-1], x[:-1, :], x[:-1, :-1]
    pred = _PREDICTORS[predictor](ra, rb, rc)
    pred[0, :] = ra[0, :]
    pred[1:, 0] = rb[1:, 0]
    pred[0, 0] = 1 << (precision - 1)
    return pred


def encode_lossless_jpeg(samples: np.ndarray, precision: int, predictor: int = 1) -> bytes:
    """One-component process-14 JPEG (SOF3), one scan, no restarts, point transform 0.

    The Huffman table gives each difference category 0..16 a 5-bit code (simple, not small);
    differences are taken modulo 2**16 as the standard says.
    """
    h, w = samples.shape
    diff = (
        samples.astype(np.int64) - _predictions(samples.astype(np.int64), predictor, precision)
    ) % 65536
    diff = np.where(diff > 32768, diff - 65536, diff)
    bits: list[str] = []
    for d in diff.ravel().tolist():
        size = abs(d).bit_length()
        bits.append(format(size, "05b"))
        if 0 < size < 16:  # category 16 (difference 32768) has no extra bits
            bits.append(format(d if d > 0 else d + (1 << size) - 1, f"0{size}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    scan = bytearray()
    for i in range(0, len(stream), 8):
        scan.append(int(stream[i : i + 8], 2))
        if scan[-1] == 0xFF:
            scan.append(0)  # byte stuffing
    sof3 = bytes([0xFF, 0xC3, 0, 11, precision, h >> 8, h & 255, w >> 8, w & 255, 1, 1, 0x11, 0])
    dht = bytes([0xFF, 0xC4, 0, 36, 0x00, 0, 0, 0, 0, 17, *[0] * 11, *range(17)])
    sos = bytes([0xFF, 0xDA, 0, 8, 1, 1, 0x00, predictor, 0, 0])
    return b"\xff\xd8" + sof3 + dht + sos + bytes(scan) + b"\xff\xd9"
