"""DP releases on the source's validation split: a candidate's score, the best epoch, thresholds.

Each mechanism is a pure numpy function: a noiseless statistic with a stated sensitivity
(``*_statistic``), and a release that adds noise drawn from OS entropy (an injected generator
only in tests). Neighbours add or remove one unit, where the unit is the patient: each image is
first mapped to its patient's ``units`` code, and every statistic bounds one patient's total
contribution. That covers both privacy units (docs/grid.md, ``privacy_unit``) at once: removing one *image*
changes only its patient's contribution, and by no more than the stated sensitivity (the
patient's mean loss stays in [0, B]; its histogram mass moves by at most sqrt(2)/m <= 1 in L2
per label, m >= 2 being its image count; with m = 1 removing the image removes the patient).

Why the clipped loss (not a noisy AUC) as the score: its sensitivity is a constant B for every
dataset, whereas an AUC moves by about (images of a patient)/min(n_pos, n_neg), which depends
on private counts per label. The binary cross-entropy is a proper scoring rule, so the score
rewards both ranking and calibration, and summing (not averaging) keeps the size of V, which the
mechanism does not protect, out of the sensitivity.

Costs (RDP curves) come from ``rdp.py``; ``tuning.ValidationNoise`` composes the three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from privdom_ray.selection.runs import secret_generator

#: Default clipping bound B of a unit's validation loss (mean binary cross-entropy over its
#: images and known labels). A constant 0.5 prediction scores log 2 = 0.69; B = 1.0 sits above
#: it, so clipping only touches units a model gets badly wrong, while the noise (std
#: proportional to B) stays small.
LOSS_BOUND = 1.0
#: Default histogram bins on [0, 1] for threshold releases (public: fixed before any data).
#: Few on purpose: the noise of a cumulative count grows with sqrt(bins); in the simulation of
#: docs/tuning-design.md 20 bins lost less Youden J than 50 (0.045 vs 0.062 at 1,500
#: validation patients and the noise of a total epsilon of 1).
HISTOGRAM_BINS = 20


def per_image_loss(
    probs: np.ndarray, labels: np.ndarray, pos_weight: np.ndarray | None = None
) -> np.ndarray:
    """Binary cross-entropy per image, averaged over its known labels (NaN labels are skipped;
    an image with none gets NaN). ``pos_weight`` must be public or already released (e.g. the
    DP label counts' weights): a weight computed from V's labels would leak them."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, dtype=np.float64)
    if p.shape != y.shape or p.ndim != 2:
        raise ValueError(f"probs {p.shape} and labels {y.shape} must be equal 2-D shapes")
    w = np.ones(p.shape[1]) if pos_weight is None else np.asarray(pos_weight, dtype=np.float64)
    known = ~np.isnan(y)
    yk = np.where(known, y, 0.0)
    loss = -(w * yk * np.log(p) + (1 - yk) * np.log1p(-p))
    n = known.sum(axis=1)
    with np.errstate(invalid="ignore"):
        return np.where(n > 0, np.where(known, loss, 0.0).sum(axis=1) / np.maximum(n, 1), np.nan)


def unit_values(values: np.ndarray, units: np.ndarray, n_units: int | None = None) -> np.ndarray:
    """Per-unit means of per-image values (rows of a 2-D array are images, columns e.g. epochs;
    NaN values are skipped). A unit with no valid value gets 0 in that column: every
    candidate sees the same masks, so this never changes a ranking. ``units`` are integer codes
    0..n_units-1 (the opaque patient groups of the predictions, never the ids)."""
    v = np.asarray(values, dtype=np.float64)
    one_d = v.ndim == 1
    v = v[:, None] if one_d else v
    codes = np.asarray(units, dtype=np.int64)
    if codes.shape != (v.shape[0],) or (codes < 0).any():
        raise ValueError("units must be one non-negative integer code per image")
    n = int(codes.max()) + 1 if n_units is None and codes.size else int(n_units or 0)
    ok = ~np.isnan(v)
    sums = np.zeros((n, v.shape[1]))
    counts = np.zeros((n, v.shape[1]))
    np.add.at(sums, codes, np.where(ok, v, 0.0))
    np.add.at(counts, codes, ok)
    out = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return out[:, 0] if one_d else out


# ----------------------------------------------------------------------------- (a) the score


@dataclass(frozen=True)
class ScoreRelease:
    """A candidate's released validation score: the clipped loss sum plus Gaussian noise of
    std ``noise_multiplier`` x ``bound``. Lower is better. Cost: rdp.gaussian_rdp(sigma)."""

    noisy_sum: float
    n_units: int  # treated as public, like N_train: only used to show a per-unit mean
    bound: float
    noise_multiplier: float

    @property
    def mean(self) -> float:
        return self.noisy_sum / self.n_units if self.n_units else math.nan


def loss_statistic(values: np.ndarray, bound: float = LOSS_BOUND) -> float:
    """Sum over units of the unit's loss clipped to [0, B]. Sensitivity (add/remove one unit,
    or change one unit's images): B, since one unit's term lies in [0, B]. A NaN loss (a
    diverged model) counts as the worst, B: the term stays in [0, B] and a broken candidate
    can never look best."""
    if bound <= 0:
        raise ValueError(f"the bound must be > 0, got {bound}")
    v = np.asarray(values, dtype=np.float64)
    return float(np.clip(np.where(np.isnan(v), bound, v), 0.0, bound).sum())


def release_score(
    values: np.ndarray,
    noise_multiplier: float,
    bound: float = LOSS_BOUND,
    rng: np.random.Generator | None = None,
) -> ScoreRelease:
    """The Gaussian release of :func:`loss_statistic` (``values``: one loss per unit)."""
    if noise_multiplier <= 0:
        raise ValueError("a DP score release needs noise_multiplier > 0")
    v = np.asarray(values, dtype=np.float64)
    noise = secret_generator(rng).normal(0.0, noise_multiplier * bound)
    return ScoreRelease(
        loss_statistic(v, bound) + float(noise), int(v.size), bound, noise_multiplier
    )


def best_candidate(scores: list[ScoreRelease]) -> int:
    """The index of the lowest released score (the first on ties): post-processing. A NaN
    score loses (numpy's argmin would pick it)."""
    if not scores:
        raise ValueError("no candidates to choose from")
    sums = np.array([s.noisy_sum for s in scores], dtype=np.float64)
    return int(np.argmin(np.where(np.isnan(sums), np.inf, sums)))


# --------------------------------------------------------------- (b) the checkpoint (epoch)


def epoch_utilities(values: np.ndarray, bound: float = LOSS_BOUND) -> np.ndarray:
    """Utility of each epoch's checkpoint: minus the sum of clipped unit losses (``values``:
    units x epochs). Sensitivity: B in every coordinate (one unit's row is in [0, B]^E)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError("values must be units x epochs")
    return -np.clip(v, 0.0, bound).sum(axis=0)


@dataclass(frozen=True)
class CheckpointRelease:
    """The chosen epoch (0-based index into the candidates) and the mechanism's parameters.
    Cost: rdp.exponential_rdp(epsilon)."""

    index: int
    epsilon: float
    bound: float
    n_candidates: int


def select_checkpoint(
    values: np.ndarray,
    epsilon: float,
    bound: float = LOSS_BOUND,
    rng: np.random.Generator | None = None,
) -> CheckpointRelease:
    """Report-noisy-max with Gumbel noise, i.e. the exponential mechanism: epoch e is chosen
    with probability proportional to exp(epsilon u_e / (2 B)).

    Why this and not permute-and-flip or noisy Gaussian scores: the exponential mechanism is
    epsilon-bounded-range (the log-likelihood ratio of two neighbours varies over the outputs
    by at most 2 * epsilon/(2B) * B = epsilon), which makes it epsilon^2/8-zCDP
    (``rdp.exponential_rdp``), a quarter of what pure epsilon-DP would give under RDP
    composition; releasing every epoch's Gaussian score instead would pay E releases.
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    u = epoch_utilities(values, bound)
    gumbel = secret_generator(rng).gumbel(size=u.size)
    index = int(np.argmax(epsilon * u / (2 * bound) + gumbel))
    return CheckpointRelease(index, float(epsilon), float(bound), int(u.size))


# -------------------------------------------------------------------------- (c) thresholds


def histogram_edges(bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Equal-width bin edges on [0, 1]; bin k holds k/bins <= s < (k+1)/bins (1 in the last)."""
    return np.linspace(0.0, 1.0, int(bins) + 1)


def histogram_statistic(
    probs: np.ndarray, labels: np.ndarray, units: np.ndarray, bins: int = HISTOGRAM_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """Per-label weighted histograms (labels x bins) of positive and of negative images'
    scores, each image weighted 1/m where m is the number of its unit's images with that
    label known. A unit thus adds at most mass 1 per label (L1 <= 1, so L2 <= 1), and the L2
    sensitivity of the whole release is sqrt(labels)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    codes = np.asarray(units, dtype=np.int64)
    if p.shape != y.shape or p.ndim != 2 or codes.shape != (p.shape[0],):
        raise ValueError("probs and labels must be images x labels, units one code per image")
    known = ~np.isnan(y)
    if np.isnan(p[known]).any():
        raise ValueError("scores must not be NaN where the label is known")
    n_units = int(codes.max()) + 1 if codes.size else 0
    per_unit = np.zeros((n_units, p.shape[1]))
    np.add.at(per_unit, codes, known)
    weight = np.where(known, 1.0 / np.maximum(per_unit[codes], 1.0), 0.0)
    idx = np.clip(
        np.searchsorted(histogram_edges(bins)[1:-1], np.nan_to_num(p), "right"), 0, bins - 1
    )
    pos = np.zeros((p.shape[1], bins))
    neg = np.zeros((p.shape[1], bins))
    for j in range(p.shape[1]):
        pos[j] = np.bincount(idx[:, j], weights=weight[:, j] * (y[:, j] == 1), minlength=bins)
        neg[j] = np.bincount(idx[:, j], weights=weight[:, j] * (y[:, j] == 0), minlength=bins)
    return pos, neg


@dataclass(frozen=True)
class ThresholdRelease:
    """Noisy per-label histograms and the Youden thresholds computed from them (NaN where a
    class's released mass is not positive). Cost: rdp.gaussian_rdp(noise_multiplier)."""

    thresholds: np.ndarray  # (labels,)
    hist_pos: np.ndarray  # (labels, bins), noised
    hist_neg: np.ndarray
    noise_multiplier: float  # noise std = noise_multiplier * sqrt(labels)


def release_thresholds(
    probs: np.ndarray,
    labels: np.ndarray,
    units: np.ndarray,
    noise_multiplier: float,
    bins: int = HISTOGRAM_BINS,
    rng: np.random.Generator | None = None,
) -> ThresholdRelease:
    """Gaussian release of :func:`histogram_statistic` (std = sigma x sqrt(labels) on every
    bin), then Youden thresholds from the noisy histograms (post-processing)."""
    if noise_multiplier <= 0:
        raise ValueError("a DP threshold release needs noise_multiplier > 0")
    pos, neg = histogram_statistic(probs, labels, units, bins)
    std = noise_multiplier * math.sqrt(pos.shape[0])
    g = secret_generator(rng)
    pos = pos + g.normal(0.0, std, pos.shape)
    neg = neg + g.normal(0.0, std, neg.shape)
    return ThresholdRelease(youden_from_histograms(pos, neg), pos, neg, float(noise_multiplier))


def youden_from_histograms(hist_pos: np.ndarray, hist_neg: np.ndarray) -> np.ndarray:
    """Per label, the bin edge maximising TPR - FPR (predict positive when score >= it), from
    histograms on :func:`histogram_edges`; inf wins when no cut beats chance, as in
    ``stats.thresholds.youden_threshold``. Negative (noisy) counts are clipped to 0 first."""
    pos = np.clip(np.asarray(hist_pos, dtype=np.float64), 0.0, None)
    neg = np.clip(np.asarray(hist_neg, dtype=np.float64), 0.0, None)
    if pos.shape != neg.shape or pos.ndim != 2:
        raise ValueError(f"histograms differ in shape: {pos.shape} vs {neg.shape}")
    bins = pos.shape[1]
    cut = np.r_[np.inf, histogram_edges(bins)[bins - 1 :: -1]]
    out = np.full(pos.shape[0], np.nan)
    for j in range(pos.shape[0]):
        n_pos, n_neg = pos[j].sum(), neg[j].sum()
        if n_pos > 0 and n_neg > 0:
            tpr = np.r_[0.0, np.cumsum(pos[j][::-1])] / n_pos
            fpr = np.r_[0.0, np.cumsum(neg[j][::-1])] / n_neg
            out[j] = cut[int(np.argmax(tpr - fpr))]
    return out
