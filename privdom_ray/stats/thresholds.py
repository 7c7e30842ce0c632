"""Youden thresholds, thresholded metrics (accuracy, sensitivity, specificity) and calibration.

Conventions as in :mod:`privdom_ray.stats.metrics`: a thresholded prediction is positive when
``score >= threshold``; calibration (Brier score, binned ECE, reliability bins) needs
probabilities and is null otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from privdom_ray.stats.metrics import CALIBRATION_BINS, _check_pair_2d, _known_1d
from privdom_ray.stats.resampling import (
    _from_linear,
    _linear_columns,
    _resampler_from_idx,
    are_probabilities,
    bootstrap_stats,
)

__all__ = [
    "ThresholdMetrics",
    "calibration",
    "reliability_bins",
    "threshold_metrics",
    "youden_threshold",
]


# --------------------------------------------------------------------------- thresholds


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Threshold maximising TPR - FPR (Youden's J), predicting positive when score >= it.

    Reproduces ``thresholds[argmax(tpr - fpr)]`` of ``sklearn.metrics.roc_curve``
    (default ``drop_intermediate=True``), including its leading ``inf`` threshold, which
    wins when no cut beats chance (J <= 0). NaN when a class is missing.
    """
    s, y = _known_1d(scores, labels)
    n_pos = int((y == 1.0).sum())
    if n_pos == 0 or n_pos == y.size:
        return math.nan
    # same construction as sklearn's _binary_clf_curve / roc_curve, so float ties agree
    order = np.argsort(s, kind="mergesort")[::-1]
    s, y = s[order], y[order]
    distinct = np.flatnonzero(np.diff(s))
    thr_idx = np.r_[distinct, y.size - 1]
    tps = np.cumsum(y)[thr_idx]
    fps = 1 + thr_idx - tps
    thr = s[thr_idx]
    if fps.size > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps, thr = fps[keep], tps[keep], thr[keep]
    tps = np.r_[0.0, tps]
    fps = np.r_[0.0, fps]
    thr = np.r_[np.inf, thr]
    j = tps / tps[-1] - fps / fps[-1]
    return float(thr[int(np.argmax(j))])


@dataclass(frozen=True)
class ThresholdMetrics:
    """Accuracy / sensitivity / specificity per label at fixed thresholds.

    Point values have shape (L,); ``boot_*`` have shape (B, L) or are None without idx.
    NaN marks undefined values (no known labels, no positives, no negatives, NaN threshold).
    """

    accuracy: np.ndarray
    sensitivity: np.ndarray
    specificity: np.ndarray
    boot_accuracy: np.ndarray | None = None
    boot_sensitivity: np.ndarray | None = None
    boot_specificity: np.ndarray | None = None


def _rates(
    known: np.ndarray, pos: np.ndarray, tp: np.ndarray, tn: np.ndarray, thr_ok: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(acc, sens, spec) from known / positive / TP / TN counts; NaN where undefined."""
    neg = known - pos

    def div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = np.full(np.broadcast(a, b).shape, np.nan)
        np.divide(a, b, out=out, where=(b > 0) & thr_ok)
        return out

    return div(tp + tn, known), div(tp, pos), div(tn, neg)


def _point_counts(y: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, ...]:
    pos = y == 1.0
    return (
        (~np.isnan(y)).sum(axis=0).astype(np.float64),
        pos.sum(axis=0).astype(np.float64),
        (pos & pred).sum(axis=0).astype(np.float64),
        ((y == 0.0) & ~pred).sum(axis=0).astype(np.float64),
    )


def threshold_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    thresholds: np.ndarray | Sequence[float],
    idx: np.ndarray | None = None,
    *,
    clusters: np.ndarray | None = None,
) -> ThresholdMetrics:
    """Accuracy, sensitivity and specificity per label at given thresholds (score >= thr).

    With ``idx`` (drawn images, or patients with ``clusters``) the per-resample values come
    from one matrix product of the resample counts with TP/TN indicators (no loop).
    """
    s, y = _check_pair_2d(scores, labels)
    thr = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if thr.size != s.shape[1]:
        raise ValueError(f"need {s.shape[1]} thresholds, got {thr.size}")
    thr_ok = ~np.isnan(thr)
    pred = s >= thr[None, :]
    acc, sens, spec = _rates(*_point_counts(y, pred), thr_ok)
    if idx is None:
        return ThresholdMetrics(acc, sens, spec)
    rs = _resampler_from_idx(idx, s.shape[0], clusters)
    bs = bootstrap_stats(s, y, rs, pred=pred, want_auc=False)
    b_acc, b_sens, b_spec = _rates(bs.known, bs.pos, bs.tp, bs.tn, thr_ok)
    return ThresholdMetrics(acc, sens, spec, b_acc, b_sens, b_spec)


# --------------------------------------------------------------------------- calibration


def calibration(
    scores: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """(Brier score, expected calibration error) per label, shape (L,) each.

    ECE = sum over ``bins`` equal-width probability bins of (bin share) x |observed rate -
    mean predicted probability|. NaN where no label is known or a score is outside [0, 1].
    """
    s, y = _check_pair_2d(scores, labels)
    if not are_probabilities(s, y):
        nan = np.full(s.shape[1], np.nan)
        return nan, nan.copy()
    cols, names = _linear_columns(s, y, None, bins)
    out = _from_linear(cols.sum(axis=0, keepdims=True), names, s.shape[1], bins)
    return out["brier"][0], out["ece"][0]


def reliability_bins(
    scores: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label and bin: (images, summed probability, positives), each (L, bins).

    Aggregates only (no per-image values); the reliability diagram plots positives / images
    against summed probability / images. Scores outside [0, 1] raise.
    """
    s, y = _check_pair_2d(scores, labels)
    if not are_probabilities(s, y):
        raise ValueError("reliability bins need probabilities in [0, 1]")
    known = ~np.isnan(y)
    which = np.clip(np.floor(np.where(known, s, 0.0) * bins), 0, bins - 1).astype(np.intp)
    n_lab = s.shape[1]
    out = np.zeros((3, n_lab, bins))
    for j in range(n_lab):
        k = known[:, j]
        b = which[k, j]
        out[0, j] = np.bincount(b, minlength=bins)
        out[1, j] = np.bincount(b, weights=s[k, j], minlength=bins)
        out[2, j] = np.bincount(b, weights=y[k, j], minlength=bins)
    return out[0], out[1], out[2]
