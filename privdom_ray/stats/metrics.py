"""Evaluation metrics: input checks, AUC, label support, membership inference.

The patient resamples (jackknife, bootstrap) are in :mod:`privdom_ray.stats.resampling`,
thresholds and calibration in :mod:`privdom_ray.stats.thresholds`; one
test set's metric rows (:func:`~privdom_ray.stats.evaluation.evaluate`), subgroups and paired
tests in :mod:`privdom_ray.stats.evaluation`.

Conventions used throughout:

* ``labels`` are float arrays of shape ``(n, L)`` with values 0.0 / 1.0 and NaN meaning
  "unknown for this label"; a NaN excludes that image for that label only.
* ``scores`` are float arrays ``(n, L)``: sigmoid probabilities (AUC is rank based, so logits
  work for it too; calibration needs probabilities and is null otherwise).
* A thresholded prediction is positive when ``score >= threshold``.
* ``clusters`` (optional, ``(n,)`` integers) is each image's patient: the jackknife leaves
  out (and the bootstrap draws) PATIENTS with all their images, because images of one
  patient are not independent (treating images as units gives too-narrow CIs and too-small
  p-values). ``None`` means every image is its own patient (``resampling_unit = "image"``).
* Anything undefined (too few positives or negatives, empty subgroup) is ``None`` in the row
  objects so that it becomes a null in parquet, never a fake 0.5, and the row says why.

CIs (evaluation protocol 4) are leave-one-patient-out jackknife t intervals: every AUC is
recomputed without each patient exactly in O(n log n)
(:func:`~privdom_ray.stats.resampling.jackknife_auc`: the Mann-Whitney sum loses the patient's
row and column sums and regains its within-patient pairs), rates and Brier scores are ratios of
per-patient sums (:func:`~privdom_ray.stats.resampling.jackknife_ratio`), and a macro is the
mean of its labels' leave-one-out values; :mod:`privdom_ray.stats.inference` turns them into a t
interval on the logit scale with Satterthwaite degrees of freedom over the rarer class's
effective patients. A "macro" value is the mean over a FIXED label set: the labels with at least
``min_positives`` positive and ``min_negatives`` negative patients (for a subgroup: valid in
every subgroup of its family, :func:`shared_label_sets`).

The vectorised patient bootstrap (:func:`~privdom_ray.stats.resampling.bootstrap_stats`: a
patient count matrix per chunk of resamples, AUCs as exact integer rank statistics, linear
statistics as one matrix product) is the method before protocol 4, kept for the simulations that
compare the two (``benchmarks/sim_intervals.py``) and ``benchmarks/bench_bootstrap.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CALIBRATION_BINS",
    "MIN_NEGATIVES",
    "MIN_POSITIVES",
    "LabelSupport",
    "auc",
    "cluster_codes",
    "label_support",
    "macro_over",
]


# The grid's defaults of evaluation.min_positives / min_negatives (tests check they agree):
# below 10 cases of a class an AUC's bootstrap CI spans most of [0, 1] and many patient
# resamples lack the class; the demo's ~190-image test splits have ~30-45 positives per label.
# The functions below default to 1 ("both classes present", the rule before these options) so
# that a caller that does not pass the grid's values keeps its old behaviour.
MIN_POSITIVES = 10
MIN_NEGATIVES = 10
CALIBRATION_BINS = 10  # equal-width probability bins of the expected calibration error


# --------------------------------------------------------------------------- validation


def _check_labels(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels, dtype=np.float64)
    known = y[~np.isnan(y)]
    if known.size and not np.all((known == 0.0) | (known == 1.0)):
        raise ValueError("labels must be 0.0, 1.0 or NaN")
    return y


def _check_pair_2d(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = _check_labels(labels)
    if s.ndim == 1:
        s = s[:, None]
    if y.ndim == 1:
        y = y[:, None]
    if s.ndim != 2 or s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must both be (n, L)")
    if np.isnan(s[~np.isnan(y)]).any():
        raise ValueError("scores must not be NaN where the label is known")
    return s, y


def _check_idx(idx: np.ndarray, n: int) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError("idx must be an integer array of shape (n_boot, m)")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"idx values must lie in [0, {n})")
    return idx


def cluster_codes(clusters: np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    """(codes 0..P-1 per row, P): the rows' patients renumbered densely; identity for None."""
    if clusters is None:
        return np.arange(n, dtype=np.intp), n
    c = np.asarray(clusters)
    if c.shape != (n,):
        raise ValueError(f"clusters must have shape ({n},), got {c.shape}")
    if n and not np.issubdtype(c.dtype, np.integer):
        raise ValueError("clusters must be integers (an opaque patient index per row)")
    uniq, codes = np.unique(c, return_inverse=True)
    return codes.astype(np.intp).reshape(n), int(uniq.size)


# --------------------------------------------------------------------------- AUC


def _two_u(pos: np.ndarray, neg_sorted: np.ndarray) -> int:
    """Twice the Mann-Whitney U (integer): ties count 1/2 via left+right searchsorted."""
    left = np.searchsorted(neg_sorted, pos, side="left")
    right = np.searchsorted(neg_sorted, pos, side="right")
    return int(left.sum(dtype=np.int64) + right.sum(dtype=np.int64))


def _known_1d(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-D scores and labels restricted to images whose label is known (checked)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = _check_labels(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    known = ~np.isnan(y)
    s, y = s[known], y[known]
    if np.isnan(s).any():
        raise ValueError("scores must not be NaN where the label is known")
    return s, y


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of 1-D scores vs 0/1/NaN labels (Mann-Whitney with mid-ranks for ties).

    Rank based, so logits and probabilities give the same value; equals
    ``sklearn.metrics.roc_auc_score`` on the known labels. NaN when a class is missing.
    """
    s, y = _known_1d(scores, labels)
    pos = s[y == 1.0]
    neg = np.sort(s[y == 0.0])
    n_pos, n_neg = pos.size, neg.size
    if n_pos == 0 or n_neg == 0:
        return math.nan
    return float(np.int64(_two_u(pos, neg)) / np.int64(2 * n_pos * n_neg))


# --------------------------------------------------------------------------- label support


@dataclass(frozen=True)
class LabelSupport:
    """Which labels have enough positives and negatives for metrics (the macro's fixed set)."""

    n_known: np.ndarray
    n_pos: np.ndarray
    ok: np.ndarray  # (L,) bool
    reasons: tuple[str | None, ...]  # why a label is not ok (None when it is)
    units_pos: np.ndarray | None = None  # (L,) units (patients) with a positive image
    units_neg: np.ndarray | None = None  # (L,) units with a negative image


def label_support(
    labels: np.ndarray,
    min_positives: int = 1,
    min_negatives: int = 1,
    units: np.ndarray | None = None,
) -> LabelSupport:
    """Labels with >= ``min_positives`` positive and >= ``min_negatives`` negative units.

    ``units`` (the patient of each row) makes the unit the patient: a patient counts once as
    positive if any of its images is (and once as negative if any is negative). Counting images
    let a chronic finding of 3 patients with 8 images each pass a minimum of 10 and publish
    CIs that covered 78% of the time (statistics red team); the resampling unit is the unit
    that counts. ``n_pos`` stays the number of positive images.
    """
    if min_positives < 1 or min_negatives < 1:
        raise ValueError("min_positives and min_negatives must be >= 1")
    y = _check_labels(labels)
    y = y[:, None] if y.ndim == 1 else y
    n_known = (~np.isnan(y)).sum(axis=0)
    n_pos = (y == 1.0).sum(axis=0)
    unit = "image" if units is None else "patient"
    if units is None:
        u_pos, u_neg = n_pos, n_known - n_pos
    else:
        codes = np.asarray(units).ravel()
        if codes.size != y.shape[0]:
            raise ValueError(f"units has {codes.size} entries for {y.shape[0]} rows")
        u_pos = np.array([np.unique(codes[y[:, j] == 1.0]).size for j in range(y.shape[1])])
        u_neg = np.array([np.unique(codes[y[:, j] == 0.0]).size for j in range(y.shape[1])])
    reasons: list[str | None] = []
    for k, p, q in zip(n_known, u_pos, u_neg, strict=True):
        if k == 0:
            reasons.append("no image with a known label")
        elif p < min_positives:
            reasons.append(f"{p} positive {unit}(s), fewer than min_positives = {min_positives}")
        elif q < min_negatives:
            reasons.append(f"{q} negative {unit}(s), fewer than min_negatives = {min_negatives}")
        else:
            reasons.append(None)
    ok = np.array([r is None for r in reasons], dtype=bool)
    return LabelSupport(n_known, n_pos, ok, tuple(reasons), np.asarray(u_pos), np.asarray(u_neg))


def subgroup_family(name: str) -> str:
    """The comparison a subgroup belongs to: "sex=F" -> "sex", "age=[0,40)" -> "age"."""
    return name.split("=", 1)[0]


def shared_label_sets(ok: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The macro label set of each subgroup: the labels valid (``ok[name]``) in EVERY
    subgroup of its family (:func:`subgroup_family`) that has a valid label at all.

    Macros shown side by side must average the same labels: site_c's "sex=M" averaging 3
    labels next to "age=[0,40)" averaging 2 compared different things (statistics red team).
    "all" is a family of its own (its own labels); a subgroup without any valid label keeps
    none and does not shrink its family's set.
    """
    shared: dict[str, np.ndarray] = {}
    for name, mask in ok.items():
        fam = subgroup_family(name)
        if mask.any():
            shared[fam] = shared.get(fam, np.ones_like(mask)) & mask
    return {name: shared.get(subgroup_family(name), mask) & mask if mask.any() else mask
            for name, mask in ok.items()}  # fmt: skip


def macro_over(
    point: np.ndarray, boot: np.ndarray, valid: np.ndarray, ok: np.ndarray
) -> tuple[float, np.ndarray]:
    """Macro (mean over the FIXED label set ``ok``) of a point (L,) and resamples (B, L).

    A resample is invalid (NaN) when one label of the set lacks a class in it; the point is
    NaN when the set is empty or a label of the set has no value.
    """
    if not ok.any():
        return math.nan, np.full(boot.shape[0], np.nan)
    p = float(point[ok].mean())
    b = boot[:, ok].mean(axis=1)
    return p, np.where(valid[:, ok].all(axis=1), b, np.nan)


# ------------------------------------------------------------------ membership inference


def per_image_bce(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean binary cross-entropy over each image's known labels (NaN labels ignored)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, dtype=np.float64)
    known = ~np.isnan(y)
    loss = -(np.nan_to_num(y) * np.log(p) + (1 - np.nan_to_num(y)) * np.log(1 - p))
    counts = known.sum(axis=1)
    return np.where(counts > 0, (loss * known).sum(axis=1) / np.maximum(counts, 1), np.nan)


def membership_inference(
    member_loss: np.ndarray, nonmember_loss: np.ndarray, *, max_fpr: float = 0.01
) -> tuple[float | None, float | None]:
    """Loss-threshold membership attack (Yeom et al. 2018): a lower loss means "member".

    Returns the attack's AUC and its TPR at ``max_fpr`` (the largest TPR whose threshold lets
    at most ``max_fpr`` of the non-members through). An empirical leakage measure that should
    fall towards 0.5 / ``max_fpr`` as epsilon falls; it is a lower bound on leakage, not a proof.
    """
    m = np.asarray(member_loss, dtype=np.float64)
    k = np.asarray(nonmember_loss, dtype=np.float64)
    m, k = m[~np.isnan(m)], k[~np.isnan(k)]
    if len(m) == 0 or len(k) == 0:
        return None, None
    scores = -np.concatenate([m, k])
    labels = np.concatenate([np.ones(len(m)), np.zeros(len(k))])
    attack_auc = auc(scores, labels)
    allowed = int(np.floor(max_fpr * len(k)))  # false positives the threshold may admit
    threshold = np.sort(-k)[::-1][allowed]  # members must score strictly above it
    tpr = float(np.mean(-m > threshold))
    return (None if np.isnan(attack_auc) else float(attack_auc)), tpr
