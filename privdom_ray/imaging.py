"""Decode radiographs at full bit depth and preprocess them to square uint8 arrays.

Decoders are looked up by file extension. Every decoder returns a 2-D array in the file's own
value range (uint8, uint16 or wider), MONOCHROME1 already inverted, so no bits are lost before
the per-image min-max scaling (cv2's default flags silently shift 16-bit PNGs to 8-bit).
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


@decoder(".dcm", ".dicom")
def decode_dicom(path: Path) -> np.ndarray:
    """DICOM via pydicom; MONOCHROME1 (bright = air) is inverted within BitsStored.

    Unsigned data becomes ``2**BitsStored - 1 - x`` (values are clipped to the stored range
    first, so stray high bits cannot go negative); signed data becomes ``-1 - x``, which maps
    the signed range onto itself. No modality/VOI LUT is applied (privacydomain's recipe); the
    per-image min-max in ``preprocess`` makes a positive linear rescale irrelevant anyway.
    """
    import pydicom  # imported here: only DICOM domains pay for it

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if arr.ndim == 3:  # multi-frame or colour: first frame / channel
        arr = arr[0] if int(ds.get("SamplesPerPixel", 1) or 1) == 1 else arr[..., 0]
    arr = arr.astype(np.int64)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper() == "MONOCHROME1":
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
        if int(ds.get("PixelRepresentation", 0) or 0) == 1:
            arr = -1 - arr
        else:
            top = 2**bits - 1
            arr = top - np.clip(arr, 0, top)
    return arr


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
