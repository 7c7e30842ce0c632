"""Decode radiographs at full bit depth and preprocess them to square uint8 arrays.

Decoders are looked up by file extension. Every decoder returns a 2-D array in the file's own
value range (uint8, uint16 or wider; DICOM: modality values after its Modality LUT), with
MONOCHROME1 already inverted, so no bits are lost before the per-image min-max scaling (cv2's
default flags silently shift 16-bit PNGs to 8-bit). Compressed DICOM transfer syntaxes are
decoded by pydicom's plugins (pylibjpeg-libjpeg, -openjpeg, -rle, pyjpegls); a file none of
them can read raises ``DicomDecodeError`` naming its transfer syntax.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

Decoder = Callable[[Path], np.ndarray]
DECODERS: dict[str, Decoder] = {}


def decoder(*extensions: str) -> Callable[[Decoder], Decoder]:
    def wrap(fn: Decoder) -> Decoder:
        for ext in extensions:
            DECODERS[ext] = fn
        return fn

    return wrap


@decoder(".png", ".jpg", ".jpeg")
def decode_pil(path: Path) -> np.ndarray:
    """PNG/JPEG via PIL: 8-bit stays uint8, 16-bit (mode I;16 / I) stays uint16; colour -> channel 0.

    A truncated or corrupt file raises (``OSError``/``SyntaxError``) even if some other code
    set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``, so the cache can skip and count it instead of
    training on a half-grey image.
    """
    with Image.open(path) as im:
        if ImageFile.LOAD_TRUNCATED_IMAGES:  # a global someone else may have set
            with _strict_truncation():
                im.load()
        else:
            im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            arr = np.asarray(im)
            if arr.size and arr.min() >= 0 and arr.max() <= 65535:
                return arr.astype(np.uint16)
            return arr.astype(np.int64)
        if im.mode in ("L", "P", "1"):
            return np.asarray(im.convert("L"))
        if im.mode in ("LA", "La", "PA"):
            return np.asarray(im.convert("LA"))[:, :, 0]
        return np.asarray(im.convert("RGB"))[:, :, 0]


_truncation_lock = threading.Lock()


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    with _truncation_lock:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


class DicomDecodeError(ValueError):
    """Pixel data that no installed pydicom plugin could decode.

    The message starts with the transfer syntax (name and UID), so the ``error`` column of a
    domain's ``skipped.csv`` says which compression a site exported and which plugin failed.
    """


@decoder(".dcm", ".dicom")
def decode_dicom(path: Path) -> np.ndarray:
    """DICOM via pydicom's decoder plugins, as modality values with bright = dense.

    The order is DICOM's display pipeline: stored values (first frame; colour: channel 0) ->
    modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence, e.g. to optical density or
    HU) -> MONOCHROME1 mirrored within the modality output range, so it reads like MONOCHROME2.
    Without a rescale or LUT this is ``2**BitsStored - 1 - x`` (unsigned) or ``-1 - x``
    (signed), as before. No VOI LUT/windowing (privacydomain's recipe): the per-image min-max in
    ``preprocess`` takes its place. Integers stay int64; a fractional rescale gives float64.
    """
    import pydicom  # imported here: only DICOM domains pay for it

    ds = pydicom.dcmread(path)
    stored = first_frame(ds).astype(np.int64)
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    to_display = PHOTOMETRIC.get(photometric, _as_is)
    return to_display(stored, modality_lut(ds), stored_range(ds))


def first_frame(ds) -> np.ndarray:
    """The first frame's stored values (channel 0 of colour data), decoding only that frame.

    Any plugin failure becomes a ``DicomDecodeError`` naming the transfer syntax, on one line.
    """
    from pydicom.pixels import pixel_array

    try:
        frame = pixel_array(ds, index=0)
    except Exception as exc:
        message = " ".join(str(exc).split())
        raise DicomDecodeError(f"cannot decode {transfer_syntax(ds)}: {message}") from exc
    return frame[..., 0] if frame.ndim == 3 else frame


def transfer_syntax(ds) -> str:
    """``"<name> (<UID>)"`` of the dataset's transfer syntax, for error messages."""
    uid = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if uid is None:
        return "a file without a (0002,0010) Transfer Syntax UID"
    name = uid.name if uid.name != str(uid) else "unknown transfer syntax"
    return f"{name} ({uid})"


def stored_range(ds) -> tuple[int, int]:
    """Smallest and largest value BitsStored can hold, signed or not (PixelRepresentation)."""
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


ModalityLut = Callable[[np.ndarray], np.ndarray]


def modality_lut(ds) -> ModalityLut:
    """Stored values -> modality values: the Modality LUT Sequence if present, else the rescale.

    Ours rather than ``pydicom.pixels.apply_modality_lut``: that one fails on LUT Descriptors
    with 9..15 bits per entry (``uint12`` is no numpy dtype) and on empty rescale values.
    """
    if ds.get("ModalityLUTSequence"):
        return _lut_table(ds, ds.ModalityLUTSequence[0])
    slope = _number(ds.get("RescaleSlope"), 1.0)
    intercept = _number(ds.get("RescaleIntercept"), 0.0)
    if slope.is_integer() and intercept.is_integer():  # keep integer data integer
        slope, intercept = int(slope), int(intercept)
    if (slope, intercept) == (1, 0):
        return _identity
    return lambda stored: stored * slope + intercept


def _identity(values: np.ndarray) -> np.ndarray:
    return values


def _number(value, default: float) -> float:
    """A DS value as float; missing or empty (seen in real exports) means the default."""
    return default if value is None or str(value).strip() == "" else float(value)


def _lut_table(ds, item) -> ModalityLut:
    """LUT Descriptor (entries, first stored value mapped, bits) + LUT Data -> a lookup.

    Values below the first mapped one take the first entry, values past the end the last.
    """
    entries, first, _bits = (int(v) for v in item.LUTDescriptor)
    if int(ds.get("PixelRepresentation") or 0) == 1 and first >= 2**15:
        first -= 2**16  # first value mapped is SS for signed data, sometimes written as US
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16-bit words in the dataset's byte order
        little = ds.original_encoding[1] is not False
        table = np.frombuffer(data, dtype="<u2" if little else ">u2")
    else:  # US: already a value or a list of values
        table = np.atleast_1d(np.asarray(data))
    table = table[: entries or 2**16].astype(np.int64)
    return lambda stored: table[np.clip(stored - first, 0, len(table) - 1)]


PhotometricFix = Callable[[np.ndarray, ModalityLut, tuple[int, int]], np.ndarray]


def _as_is(stored: np.ndarray, lut: ModalityLut, _range: tuple[int, int]) -> np.ndarray:
    return lut(stored)


def _mirrored(stored: np.ndarray, lut: ModalityLut, valid: tuple[int, int]) -> np.ndarray:
    """MONOCHROME1 (low = white): mirror the modality values within their possible range.

    The range is the LUT's image of every storable value (clipped first, so stray values
    cannot leave it); mirroring after the LUT is right for non-linear LUTs and negative slopes.
    """
    lo, hi = valid
    storable = np.arange(lo, hi + 1) if hi - lo < 2**17 else np.array([lo, hi])
    image = lut(storable)
    return (image.min() + image.max()) - lut(np.clip(stored, lo, hi))


PHOTOMETRIC: dict[str, PhotometricFix] = {"MONOCHROME1": _mirrored}  # others: as stored


def decode(path: str | Path) -> np.ndarray:
    """Decode one image file; raises ``ValueError`` for an unknown extension."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in DECODERS:
        raise ValueError(f"{path.name}: no decoder for {ext!r}; known: {sorted(DECODERS)}")
    arr = DECODERS[ext](path)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{path.name}: decoded to shape {arr.shape}, expected a 2-D image")
    return arr


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model inputs; part of the cache key and of every trial key.

    ``geometry``: ``stretch`` (the paper's square resize, aspect not kept) or ``center_crop``
    (square crop on the long side, then resize). ``equalize``: global histogram equalisation
    after min-max to uint8, as in the paper's recipe.
    """

    image_size: int = 64
    geometry: str = "stretch"
    equalize: bool = True


GEOMETRIES = ("stretch", "center_crop")


def preprocess(raw: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Raw decoded image -> (size, size) uint8: geometry, per-image min-max, optional hist-eq."""
    if raw.ndim != 2 or raw.size == 0:
        raise ValueError(f"expected a non-empty 2-D image, got shape {raw.shape}")
    img = raw.astype(np.float32)
    if prep.geometry == "center_crop":
        h, w = img.shape
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        img = img[top : top + s, left : left + s]
    elif prep.geometry != "stretch":
        raise ValueError(f"unknown geometry {prep.geometry!r}; allowed {GEOMETRIES}")
    size = prep.image_size
    if img.shape != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
    lo, hi = float(img.min()), float(img.max())
    scaled = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    out = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
    return equalize_hist(out) if prep.equalize else out


def equalize_hist(img: np.ndarray) -> np.ndarray:
    """Global histogram equalisation of a uint8 image (the same LUT rule as cv2.equalizeHist)."""
    hist = np.bincount(img.ravel(), minlength=256)
    cdf = hist.cumsum()
    nonzero = cdf[hist > 0]
    cdf_min = int(nonzero[0]) if nonzero.size else 0
    total = int(cdf[-1])
    if total == cdf_min:  # constant image
        return img.copy()
    lut = np.clip(np.rint((cdf - cdf_min) * 255.0 / (total - cdf_min)), 0, 255).astype(np.uint8)
    return lut[img]


def load(path: str | Path, prep: Preprocessing) -> np.ndarray:
    return preprocess(decode(path), prep)
