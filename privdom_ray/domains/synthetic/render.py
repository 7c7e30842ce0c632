"""One radiograph: a density map in body coordinates (soft tissue, lungs, heart and
mediastinum, bones, devices), each finding drawn where its label says, seen through the image's
acquisition and the site's detector.

Separate from the population: pure image synthesis from decided findings (the longest part, and
the only one that knows pixels).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from privdom_ray.domains.synthetic.profiles import SiteProfile


class _Grid:
    """Pixel-centre coordinates in [-1, 1] and per-size helpers, shared by every image."""

    def __init__(self, size: int) -> None:
        self.size = size
        c = ((np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
        self.y, self.x = np.meshgrid(c, c, indexing="ij")
        self.px = 2.0 / size  # one pixel in coordinate units
        self.scale = size / 128.0  # blur sigmas are given at 128 px


def _soft(signed: np.ndarray, edge: float) -> np.ndarray:
    """Signed distance (negative inside) -> soft mask in [0, 1] with an edge of width ``edge``."""
    return np.clip(0.5 - signed / edge, 0.0, 1.0)


def _ellipse_sd(x, y, cx, cy, a, b):
    """Approximate signed distance to an ellipse (exact for circles)."""
    return (np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2) - 1.0) * min(a, b)


def _segment_distance(x, y, x0, y0, x1, y1):
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-12), 0.0, 1.0)
    return np.hypot(x - (x0 + t * dx), y - (y0 + t * dy))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Unit-variance-ish smooth random field: a coarse Gaussian grid upsampled bicubically."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding (plain numpy, deterministic)."""
    if sigma < 0.3:
        return img
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    n = img.shape[0]
    pad = np.pad(img, ((r, r), (0, 0)), mode="edge")
    out = sum(w * pad[i : i + n, :] for i, w in enumerate(k))
    pad = np.pad(out, ((0, 0), (r, r)), mode="edge")
    return sum(w * pad[:, i : i + n] for i, w in enumerate(k))


def _lowpass(img: np.ndarray, factor: int) -> np.ndarray:
    """A cheap large-radius low-pass: box-downsample by ``factor``, bilinear upsample back."""
    n = img.shape[0]
    small = Image.fromarray(img.astype(np.float32), mode="F").resize(
        (max(1, n // factor),) * 2, Image.BOX
    )
    return np.asarray(small.resize((n, n), Image.BILINEAR), dtype=np.float32)


def _render(rng: np.random.Generator, g: _Grid, site: SiteProfile, p: dict, f: dict) -> np.ndarray:
    """Draw one radiograph: density map in body coordinates, then the site's detector.

    The steps run in this fixed order because they share ``rng``: drawing in another order would
    change every image, and with it the manifest hash that finished trials are keyed by.
    """
    X, Y, edge = _body_coordinates(rng, g, site, p)
    atel = f["atelectasis"]
    atel_side, loss, shift_med = _volume_loss(rng, atel)
    density = _soft_tissue(X, Y)
    top = -0.68 * p["lung_height"]
    diaphragms = _diaphragm_levels(p, f, atel_side, loss)
    lungs, air, bases = _lung_fields(X, Y, edge, top, p["dome"], diaphragms)
    lung = _aerated_lung(g, site, p, X, Y, air)
    if f["pneumonia"]:
        lung = _add_pneumonia(rng, g, site, f["pneumonia"], X, Y, lungs, bases, lung)
    if f["nodule"]:
        lung = _add_nodule(rng, f["nodule"], X, Y, bases, lung)
    density = density * (1 - lungs) + lung * lungs
    if f["effusion"]:
        density = _add_effusion(f, X, Y, top, bases, density)
    if atel:
        density = _add_atelectasis(rng, atel, p["dome"], X, Y, bases[atel_side], density)
    density = _add_heart_and_mediastinum(f, X, Y, edge, top, shift_med, density)
    density = _add_bones_and_soft_tissue(p, f, X, Y, shift_med, density)
    if f["devices"]:
        density = _add_devices(rng, X, Y, density)
    return _detect(rng, g, site, density)


def _body_coordinates(
    rng: np.random.Generator, g: _Grid, site: SiteProfile, p: dict
) -> tuple[np.ndarray, np.ndarray, float]:
    """Image coords -> body coords (units of the patient's thorax) and the soft-edge width.

    Why: each film is taken with its own zoom, shift and rotation around the site's habits, so
    the same anatomy lands differently on the detector.
    """
    zoom = site.zoom * math.exp(rng.normal(0.0, 0.04)) * p["size"]
    sx = site.shift[0] + rng.normal(0.0, 0.03)
    sy = site.shift[1] + rng.normal(0.0, 0.03)
    th = math.radians(rng.normal(0.0, site.rotation_sd))
    ct, st = math.cos(th), math.sin(th)
    x0, y0 = g.x - np.float32(sx), g.y - np.float32(sy)
    X = x0 * np.float32(ct / zoom) + y0 * np.float32(st / zoom)
    Y = y0 * np.float32(ct / zoom) - x0 * np.float32(st / zoom)
    return X, Y, 1.5 * g.px / zoom


def _volume_loss(rng: np.random.Generator, atel: float) -> tuple[int, float, float]:
    """Side of the atelectasis, its volume loss and the mediastinal shift toward it.

    Why: marked atelectasis shrinks its lung, raising that hemidiaphragm and pulling the
    mediastinum over; the side is drawn for every image (sick or not) to keep the stream fixed.
    """
    atel_side = int(rng.integers(0, 2))
    loss = 0.1 * max(0.0, atel - 0.3) / 0.7
    shift_med = (-1 if atel_side == 0 else 1) * 0.5 * loss
    return atel_side, loss, shift_med


def _soft_tissue(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Soft-tissue density: thickest mid-body, denser below the diaphragm.

    Why: real films have smooth thickness gradients (a path length through a rounded body), so
    a model cannot key on flat backgrounds.
    """
    tx, ty = np.square(X / 0.95), np.square((Y - 0.2) / 1.3)
    torso = np.sqrt(np.sqrt(tx * tx + ty * ty)) - 1.0
    thick = np.sqrt(np.clip(1.0 - np.square(X / 0.97), 0.0, 1.0))
    density = (0.3 + 0.3 * thick + 0.04 * Y) * _soft(torso * 0.95, 0.06)
    density += 0.06 * _soft(0.35 - Y, 0.15)  # upper abdomen / liver
    return density


def _diaphragm_levels(p: dict, f: dict, atel_side: int, loss: float) -> tuple[float, float]:
    """Height of each hemidiaphragm (0 right = image left, 1 left).

    Why: the right one sits a little higher over the liver; supine films and atelectatic volume
    loss raise them, which shows on the film and the findings are drawn relative to it.
    """
    levels = []
    for side in (0, 1):
        dia = (0.27 if side == 0 else 0.30) + (p["asym"] if side else -p["asym"])
        if f["supine"]:
            dia -= 0.04
        if f["atelectasis"] and side == atel_side:
            dia -= loss
        levels.append(dia)
    return levels[0], levels[1]


def _lung_fields(
    X: np.ndarray,
    Y: np.ndarray,
    edge: float,
    top: float,
    dome: float,
    diaphragms: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float, np.ndarray]]]:
    """Both lungs: union mask, aeration map and per side ``(centre x, diaphragm, mask)``.

    Why: the findings are placed in and masked by a particular lung, and aerated lung is
    darkest where it is thickest (mid-lung, away from the chest wall).
    """
    lungs = np.zeros_like(X)
    air = np.zeros_like(X)
    bases: list[tuple[float, float, np.ndarray]] = []
    for cx, dia in zip((-0.34, 0.34), diaphragms, strict=True):
        grow = np.clip((Y - top) / 0.55, 0.0, 1.0)
        half = 0.25 * np.sqrt(1.0 - np.square(1.0 - grow))
        d_dia = Y - (dia + dome * np.square((X - cx) / 0.25) - dome)
        sd = np.maximum(np.maximum(np.abs(X - cx) - half, d_dia), top - Y)
        mask = _soft(sd, edge + 0.015)
        lungs = np.maximum(lungs, mask)
        air = np.maximum(air, mask * np.sqrt(np.clip(1.0 - np.square((X - cx) / 0.27), 0.0, 1.0)))
        bases.append((cx, dia, mask))
    return lungs, air, bases


def _aerated_lung(
    g: _Grid, site: SiteProfile, p: dict, X: np.ndarray, Y: np.ndarray, air: np.ndarray
) -> np.ndarray:
    """Density of the healthy lung: air, ribs and the patient's own parenchymal texture.

    Why: the texture comes from the patient's ``texture_seed`` (not ``rng``) so that follow-up
    films share it; ribs vary in contrast between sites.
    """
    phase = (Y + 0.45 * np.square(np.abs(X) - 0.25)) / 0.14
    ribs = np.clip(1.0 - np.square((phase - np.floor(phase) - 0.5) * 4.0), 0.0, 1.0)
    texture = _smooth_noise(np.random.default_rng(p["texture_seed"]), g.size, 10)
    lung = 0.3 - 0.16 * air + 0.04 * np.clip(Y / 0.3, 0.0, 1.0)
    return lung + 0.035 * site.rib_contrast * ribs + 0.02 * texture


def _opacify(lung: np.ndarray, target: float, amount: np.ndarray) -> np.ndarray:
    """Pull the aerated lung toward a soft-tissue density by ``amount`` (clipped to [0, 1]).

    Why: lung findings replace air with fluid or tissue, so they brighten toward ``target``
    rather than adding on top of what is there.
    """
    return lung + (target - lung) * np.clip(amount, 0.0, 1.0)


def _add_pneumonia(
    rng: np.random.Generator,
    g: _Grid,
    site: SiteProfile,
    sev: float,
    X: np.ndarray,
    Y: np.ndarray,
    lungs: np.ndarray,
    bases: list[tuple[float, float, np.ndarray]],
    lung: np.ndarray,
) -> np.ndarray:
    """Patchy consolidation: one zone (lobar) or several small foci in both lungs (multifocal).

    Why: the two patterns differ by site (multifocal is common in intensive care), so a model
    must recognise consolidation, not one blob shape.
    """
    multifocal = rng.random() < site.multifocal
    blobs = np.zeros_like(X)
    for _ in range(int(rng.integers(3, 5)) if multifocal else 1):
        side = int(rng.integers(0, 2))
        cx = bases[side][0] + rng.normal(0.0, 0.05)
        cy = (-0.35, -0.1, 0.1)[int(rng.integers(0, 3))] + rng.normal(0.0, 0.05)
        for _ in range(int(rng.integers(2, 4) if multifocal else rng.integers(3, 7))):
            bx, by = cx + rng.normal(0.0, 0.08), cy + rng.normal(0.0, 0.1)
            r = rng.uniform(0.07, 0.12) if multifocal else rng.uniform(0.09, 0.16)
            blobs = blobs + np.exp(-(np.square(X - bx) + np.square(Y - by)) / (2 * r * r))
    patch = np.clip(0.9 + 0.25 * _smooth_noise(rng, g.size, 24), 0.0, 1.0)
    amount = (0.65 + 0.35 * sev) * np.minimum(2.0 * blobs, 1.0) * patch * lungs
    return _opacify(lung, 0.6, amount)


def _add_nodule(
    rng: np.random.Generator,
    size: float,
    X: np.ndarray,
    Y: np.ndarray,
    bases: list[tuple[float, float, np.ndarray]],
    lung: np.ndarray,
) -> np.ndarray:
    """The "other finding": a round nodule or mass in one lung.

    Why: it makes ``healthy`` 0 without any of the four labels, like real "No Finding".
    """
    cx, dia, mask = bases[int(rng.integers(0, 2))]
    nx, ny = cx + rng.normal(0.0, 0.08), rng.uniform(-0.45, dia - 0.2)
    r = 0.035 + 0.045 * size
    return _opacify(lung, 0.6, 0.9 * _soft(_ellipse_sd(X, Y, nx, ny, r, r), 0.02) * mask)


def _add_effusion(
    f: dict,
    X: np.ndarray,
    Y: np.ndarray,
    top: float,
    bases: list[tuple[float, float, np.ndarray]],
    density: np.ndarray,
) -> np.ndarray:
    """Pleural fluid on one or both sides: a meniscus upright, a basal haze supine.

    Why: fluid layers by gravity, so the finding looks different on supine (ICU) films.
    """
    sev = f["effusion"]
    sides = (0, 1) if f["effusion_side"] == 2 else (f["effusion_side"],)
    for side in sides:
        cx, dia, mask = bases[side]
        if f["supine"]:
            density = _supine_effusion(sev, Y, top, dia, mask, density)
        else:
            density = _upright_effusion(sev, side, X, Y, cx, dia, density)
    return density


def _supine_effusion(
    sev: float, Y: np.ndarray, top: float, dia: float, mask: np.ndarray, density: np.ndarray
) -> np.ndarray:
    """Fluid layered behind a supine lung: a haze growing toward the base.

    Why: lying down, the fluid spreads over the back of the lung instead of filling the base.
    """
    grade = np.clip((Y - top) / (dia - top), 0.0, 1.0)
    level = 0.85 - 0.45 * sev  # where the haze is half dense, as a fraction of height
    haze = np.clip(0.5 + (grade - level) / 0.3, 0.0, 0.95) + 0.15 * sev * grade
    haze = np.minimum(haze, 1.0) * mask
    return density + (0.55 - density) * haze


def _upright_effusion(
    sev: float, side: int, X: np.ndarray, Y: np.ndarray, cx: float, dia: float, density: np.ndarray
) -> np.ndarray:
    """Fluid filling an upright lung base, its meniscus rising to the lateral wall.

    Why: this blunts the costophrenic angle and hides the diaphragm, the classic sign.
    """
    out = -1.0 if side == 0 else 1.0  # toward the lateral wall
    t = np.clip((X - cx) * out / 0.25 * 0.5 + 0.5, 0.0, 1.0)  # 0 medial .. 1 lateral
    level = dia - 0.06 - 0.5 * sev  # fluid top at the lateral wall
    line = level + 0.14 * (1 - t) ** 1.5
    pleura = _soft(np.abs(X - cx) - 0.27, 0.03) * _soft(Y - dia - 0.12, 0.04)
    fluid = pleura * _soft(line - Y, 0.04)
    return density * (1 - fluid) + 0.6 * fluid


def _add_atelectasis(
    rng: np.random.Generator,
    atel: float,
    dome: float,
    X: np.ndarray,
    Y: np.ndarray,
    base: tuple[float, float, np.ndarray],
    density: np.ndarray,
) -> np.ndarray:
    """One or two plate-like bands in a lower lung.

    Why: drawn after the effusion and dense enough to show through fluid, as the two often
    occur together.
    """
    cx, dia, mask = base
    for _ in range(1 + int(rng.random() < 0.4)):
        ang = math.radians(rng.normal(0.0, 12.0))
        length = rng.uniform(0.18, 0.28)
        bx, by = cx + rng.normal(0.0, 0.04), dia - dome - rng.uniform(0.05, 0.3)
        dx, dy = length * math.cos(ang), length * math.sin(ang)
        d = _segment_distance(X, Y, bx - dx, by - dy, bx + dx, by + dy)
        band = _soft(d - (0.03 + 0.03 * atel), 0.03) * mask
        density = density + (0.22 + 0.18 * atel) * band
    return density


def _add_heart_and_mediastinum(
    f: dict,
    X: np.ndarray,
    Y: np.ndarray,
    edge: float,
    top: float,
    shift_med: float,
    density: np.ndarray,
) -> np.ndarray:
    """Mediastinum and heart (image right = patient's left), drawn over the lungs.

    Why: the heart's width is the image's cardiothoracic ratio (magnified on supine AP films),
    which is what the cardiomegaly label is defined by.
    """
    med = _soft(np.abs(X - shift_med) - 0.085, 0.03) * _soft(top - 0.1 - Y, 0.05)
    heart_half = 0.59 * f["ctr"] * (1.12 if f["supine"] else 1.0)  # AP magnification
    heart_height = 0.21 * (f["ctr"] / 0.45) ** 0.6
    heart_sd = _ellipse_sd(X, Y, 0.07 + shift_med, 0.38 - heart_height, heart_half, heart_height)
    solid = np.maximum(med, _soft(heart_sd, edge + 0.02))
    return density * (1 - solid) + 0.72 * solid


def _add_bones_and_soft_tissue(
    p: dict, f: dict, X: np.ndarray, Y: np.ndarray, shift_med: float, density: np.ndarray
) -> np.ndarray:
    """Spine, clavicles, scapulae and, for women, breast shadows, on top of everything.

    Why: these overlap the lungs and heart on real films and are nuisance that changes no label.
    ``density`` is updated in place and returned.
    """
    density += 0.05 * _soft(np.abs(X - shift_med) - 0.05, 0.02)  # spine
    for s in (-1, 1):  # clavicles
        d = _segment_distance(X, Y, s * 0.08, -0.6 * p["lung_height"], s * 0.6, -0.74)
        density += 0.08 * _soft(d - 0.025, 0.02)
    # scapulae: rotated out of the lung fields on upright PA films, over them on supine AP films
    for s in (-1, 1):
        scapula_x = s * (0.5 if f["supine"] else 0.7)
        density += 0.07 * _soft(_ellipse_sd(X, Y, scapula_x, -0.4, 0.11, 0.3), 0.04)
    if p["female"]:
        for cx in (-0.42, 0.42):
            density += p["breast"] * _soft(_ellipse_sd(X, Y, cx, 0.3, 0.3, 0.22), 0.2)
    return density


def _add_devices(
    rng: np.random.Generator, X: np.ndarray, Y: np.ndarray, density: np.ndarray
) -> np.ndarray:
    """ECG electrodes and, half the time, a central line.

    Why: devices come with sicker patients, a shortcut a model could learn; they set no label.
    ``density`` is updated in place and returned.
    """
    for _ in range(int(rng.integers(2, 5))):
        ex, ey = rng.uniform(-0.7, 0.7), rng.uniform(-0.7, 0.5)
        ring = np.abs(np.hypot(X - ex, Y - ey) - 0.03)
        density += 0.5 * _soft(ring - 0.008, 0.01)
    if rng.random() < 0.5:
        ax, ay = (-0.35, 0.35)[int(rng.integers(0, 2))], -0.95
        bx, by = rng.normal(0.0, 0.03), rng.uniform(-0.1, 0.05)
        d = _segment_distance(X, Y, ax, ay, bx, by)
        density += 0.45 * _soft(d - 0.008, 0.01)
    return density


def _detect(
    rng: np.random.Generator, g: _Grid, site: SiteProfile, density: np.ndarray
) -> np.ndarray:
    """The site's detector: curve, heel effect, processing, blur, noise, collimation, 8-bit.

    Why: these acquisition differences are what make a model trained at one site worse at
    another, even for the same patients.
    """
    signal = site.offset + site.contrast * np.clip(density, 0.0, 1.5) ** np.float32(site.gamma)
    signal = signal * (1.0 + site.heel * g.x)
    if site.processing:  # vendor "multi-frequency" processing: large-radius unsharp masking
        signal = signal + site.processing * (signal - _lowpass(signal, 8))
    signal = _blur(signal, site.blur * g.scale)
    signal = signal + site.noise * rng.standard_normal(signal.shape, dtype=np.float32)
    if site.collimation:
        m = site.collimation
        inside = (np.abs(g.x) < 1 - m * rng.uniform(0.5, 1.5)) & (np.abs(g.y) < 1 - m)
        signal = np.where(inside, signal, 0.92)
    return np.clip(np.rint(signal * 255.0), 0, 255).astype(np.uint8)
