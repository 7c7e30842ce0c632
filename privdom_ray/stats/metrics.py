"""Evaluation metrics: AUC, Youden thresholds, calibration, patient-level jackknife CIs.

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
recomputed without each patient exactly in O(n log n) (:func:`jackknife_auc`: the
Mann-Whitney sum loses the patient's row and column sums and regains its within-patient
pairs), rates and Brier scores are ratios of per-patient sums (:func:`jackknife_ratio`), and a
macro is the mean of its labels' leave-one-out values; :mod:`privdom_ray.stats.inference` turns them
into a t interval on the logit scale with Satterthwaite degrees of freedom over the rarer
class's effective patients. A "macro" value is the mean over a FIXED label set: the labels
with at least ``min_positives`` positive and ``min_negatives`` negative patients (for a
subgroup: valid in every subgroup of its family, :func:`shared_label_sets`).

The vectorised patient bootstrap below (:func:`bootstrap_stats`: a patient count matrix per
chunk of resamples, AUCs as exact integer rank statistics, linear statistics as one matrix
product) is the method before protocol 4, kept for the simulations that compare the two
(``benchmarks/sim_intervals.py``) and ``benchmarks/bench_bootstrap.py``.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import sparse

from privdom_ray.stats.inference import (
    RELIABLE_UNITS,
    infer_t,
    jackknife_variance,
    level_interval,
    opt,
    t_two_sided_p,
)

__all__ = [
    "CALIBRATION_BINS",
    "MIN_NEGATIVES",
    "MIN_POSITIVES",
    "BootStats",
    "LabelSupport",
    "MetricRow",
    "PairedResult",
    "Resampler",
    "ThresholdMetrics",
    "are_probabilities",
    "auc",
    "bootstrap_auc",
    "bootstrap_indices",
    "bootstrap_stats",
    "calibration",
    "cluster_codes",
    "evaluate",
    "label_support",
    "macro_over",
    "make_resampler",
    "paired_auc_difference",
    "paired_t_test",
    "reliability_bins",
    "subgroup_masks",
    "subgroup_seed",
    "threshold_metrics",
    "youden_threshold",
]

# The grid's defaults of evaluation.min_positives / min_negatives (tests check they agree):
# below 10 cases of a class an AUC's bootstrap CI spans most of [0, 1] and many patient
# resamples lack the class; the demo's ~190-image test splits have ~30-45 positives per label.
# The functions below default to 1 ("both classes present", the rule before these options) so
# that a caller that does not pass the grid's values keeps its old behaviour.
MIN_POSITIVES = 10
MIN_NEGATIVES = 10
CALIBRATION_BINS = 10  # equal-width probability bins of the expected calibration error

# Target number of (resample, row) cells per chunk of resamples: the sparse and dense products
# per chunk need tens of resamples to run at speed, while a chunk's counts (8 MiB here) should
# stay near the cache; 2**19-2**20 was fastest on a busy 2-core box (35 resamples at n = 30,000).
_CHUNK_CELLS = 1 << 20


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


# --------------------------------------------------------------------------- resamples


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Units (images, or patients) drawn with replacement, shape (n_boot, n), int32.

    Deterministic in ``seed``. Generate once and share between the models of a paired
    comparison so that their resamples coincide.
    """
    if n < 0 or n_boot < 0:
        raise ValueError("n and n_boot must be >= 0")
    if n >= 2**31:
        raise ValueError("n too large for int32 indices")
    rng = np.random.default_rng(seed)
    if n == 0:
        return np.zeros((n_boot, 0), dtype=np.int32)
    return rng.integers(0, n, size=(n_boot, n), dtype=np.int32)


def subgroup_seed(seed: int, name: str) -> int:
    """Seed of a subgroup's resamples: ``seed`` for "all", else ``seed + crc32(name)``.

    "all" keeps the plain seed so ``make_resampler(n, n_boot, seed, clusters)`` reproduces
    the resamples ``evaluate`` used on the full set (the comparisons rely on it).
    """
    if name == "all":
        return int(seed)
    return int(seed) + zlib.crc32(name.encode("utf-8"))


@dataclass(frozen=True)
class Resampler:
    """Bootstrap resamples of a test set drawn by patient.

    ``draws[b]`` are the P patients drawn with replacement for resample b and ``codes[i]`` is
    the patient (0..P-1) of row i. :meth:`subset` keeps the same draws for a subset of rows, so
    several subgroups of one resample are resampled jointly (what a between-subgroup gap needs).
    """

    codes: np.ndarray  # (n,) intp
    draws: np.ndarray  # (B, P) int32

    @property
    def n_boot(self) -> int:
        return int(self.draws.shape[0])

    @property
    def n_clusters(self) -> int:
        return int(self.draws.shape[1])

    @property
    def n_rows(self) -> int:
        return int(self.codes.size)

    @property
    def identity(self) -> bool:
        """Every row is its own cluster, in order (an image-level bootstrap)."""
        n = self.n_rows
        return self.n_clusters == n and np.array_equal(self.codes, np.arange(n))

    @cached_property
    def count_dtype(self) -> type:
        """float32 while every sum of counts is an exact float32 integer: a resample holds at
        most P x (largest patient's images) images, kept below 2**24. It halves the memory
        traffic of the products; float64 beyond."""
        if self.n_rows == 0:
            return np.float64
        largest = int(np.bincount(self.codes).max())
        return np.float32 if self.n_clusters * largest < (1 << 24) else np.float64

    def subset(self, mask: np.ndarray) -> Resampler:
        return Resampler(self.codes[np.asarray(mask, dtype=bool)], self.draws)

    def cluster_counts(self, cells: int = _CHUNK_CELLS) -> Iterator[tuple[int, np.ndarray]]:
        """(first resample b0, counts (P, bc)): ``counts[p, b]`` = how often patient p was
        drawn in resample b0 + b, for chunks of about ``cells`` (resample, row) cells.

        Transposed so that a chunk's counts of one patient are contiguous: the sparse
        products and row gathers of the AUC and the linear statistics read them in order.
        """
        n_boot, p = self.draws.shape
        if n_boot == 0 or p == 0 or self.n_rows == 0:
            return
        chunk = max(1, min(n_boot, cells // max(p, self.n_rows)))
        for b0 in range(0, n_boot, chunk):
            ic = self.draws[b0 : b0 + chunk]
            bc = ic.shape[0]
            keys = ic.astype(np.int64) * bc + np.arange(bc, dtype=np.int64)[:, None]
            counts = np.bincount(keys.ravel(), minlength=bc * p).reshape(p, bc)
            yield b0, counts.astype(self.count_dtype)


def make_resampler(n: int, n_boot: int, seed: int, clusters: np.ndarray | None = None) -> Resampler:
    """Patient-level resamples of n rows (image level when ``clusters`` is None).

    Without clusters the draws equal ``bootstrap_indices(n, n_boot, seed)`` (image indices).
    """
    codes, p = cluster_codes(clusters, n)
    return Resampler(codes, bootstrap_indices(p, n_boot, seed))


def _resampler_from_idx(idx: np.ndarray, n: int, clusters: np.ndarray | None) -> Resampler:
    codes, p = cluster_codes(clusters, n)
    return Resampler(codes, _check_idx(idx, p))


# --------------------------------------------------------------------------- bootstrap core


@dataclass
class _AucPlan:
    """Per-label precomputation for the vectorised bootstrap AUC.

    The larger class, sorted by score, is cut into segments at the ranks where items of the
    smaller class fall (``k_lt`` / ``k_le``). ``seg`` (segments x patients, sparse) counts each
    patient's larger-class images per segment, so one sparse product turns a chunk of patient
    counts into segment sums, whose cumulative sum gives the counts below every smaller-class
    item: O(images) per resample without expanding counts to images.
    """

    seg: sparse.csr_array  # (n_seg, P)
    small: np.ndarray  # patient of each smaller-class image
    at_lt: np.ndarray  # per small item: segment boundary = #big items with score < its score
    at_le: np.ndarray  # per small item: boundary = #big items with score <= its score


def _auc_plan(s: np.ndarray, y: np.ndarray, codes: np.ndarray, p: int) -> _AucPlan | None:
    pos = np.flatnonzero(y == 1.0)
    neg = np.flatnonzero(y == 0.0)
    if pos.size == 0 or neg.size == 0:
        return None
    # AUC(s, y) == AUC(-s, 1 - y) with the same integer U, so let the segments run over the
    # larger class and gather at the (fewer) items of the smaller class.
    if pos.size > neg.size:
        pos, neg, s = neg, pos, -s
    big = neg[np.argsort(s[neg], kind="stable")]
    sv, sp = s[big], s[pos]
    k_lt = np.searchsorted(sv, sp, side="left")
    k_le = np.searchsorted(sv, sp, side="right")
    bounds = np.unique(np.concatenate([[0, big.size], k_lt, k_le]))
    which = np.searchsorted(bounds, np.arange(big.size), side="right") - 1
    seg = sparse.csr_array(
        (np.ones(big.size, dtype=np.float32), (which, codes[big])), shape=(bounds.size - 1, p)
    )  # duplicates (a patient twice in a segment) are summed
    return _AucPlan(
        seg=seg,
        small=codes[pos],
        at_lt=np.searchsorted(bounds, k_lt),
        at_le=np.searchsorted(bounds, k_le),
    )


def _chunk_auc(pc_t: np.ndarray, plan: _AucPlan) -> np.ndarray:
    """AUC of each resample of a chunk from its (P, bc) patient counts (transposed).

    Exact: counts and their cumulative sums are integers exact in the counts' dtype (see
    ``Resampler.count_dtype``); the U statistic is summed in float64 (exact below 2**53).
    NaN where a class is missing."""
    bc = pc_t.shape[1]
    cum = np.zeros((plan.seg.shape[0] + 1, bc), dtype=pc_t.dtype)
    np.cumsum(plan.seg @ pc_t, axis=0, out=cum[1:])
    c_small = np.take(pc_t, plan.small, axis=0).astype(np.float64)
    below = np.take(cum, plan.at_lt, axis=0).astype(np.float64)
    below += np.take(cum, plan.at_le, axis=0)
    two_u = np.einsum("ib,ib->b", c_small, below)
    denom = 2.0 * c_small.sum(axis=0) * cum[-1].astype(np.float64)
    col = np.full(bc, np.nan)
    np.divide(two_u, denom, out=col, where=denom > 0)
    return col


def are_probabilities(s: np.ndarray, y: np.ndarray) -> bool:
    """Calibration needs probabilities: every score with a known label lies in [0, 1]."""
    v = s[~np.isnan(y)]
    return bool(v.size == 0 or ((v >= 0.0) & (v <= 1.0)).all())


def _linear_columns(
    s: np.ndarray, y: np.ndarray, pred: np.ndarray | None, bins: int | None
) -> tuple[np.ndarray, list[str]]:
    """Per-image columns whose resample sums give every non-rank statistic, (n, c) float64.

    Blocks of L columns: known, pos, [tp, tn], [squared error, then the residual y - p of
    each calibration bin k (bin0 .. bin{K-1})]."""
    known = ~np.isnan(y)
    pos = y == 1.0
    blocks, names = [known, pos], ["known", "pos"]
    if pred is not None:
        blocks += [pos & pred, (y == 0.0) & ~pred]
        names += ["tp", "tn"]
    if bins:
        p = np.where(known, s, 0.0)
        resid = np.where(known, np.nan_to_num(y) - p, 0.0)
        blocks.append(resid * resid)
        names.append("sq")
        which = np.clip(np.floor(p * bins), 0, bins - 1).astype(np.intp)
        for k in range(bins):
            blocks.append(np.where(which == k, resid, 0.0))
            names.append(f"bin{k}")
    return np.concatenate(blocks, axis=1).astype(np.float64), names


@dataclass(frozen=True)
class BootStats:
    """Per-resample statistics of one model, each (B, L); None where not requested.

    ``valid[b, j]``: resample b has both classes of label j (its AUC is defined).
    """

    known: np.ndarray
    pos: np.ndarray
    auc: np.ndarray | None = None
    tp: np.ndarray | None = None
    tn: np.ndarray | None = None
    brier: np.ndarray | None = None
    ece: np.ndarray | None = None

    @property
    def valid(self) -> np.ndarray:
        return (self.pos > 0) & (self.known - self.pos > 0)


def _from_linear(lin: np.ndarray, names: list[str], n_lab: int, bins: int | None) -> dict:
    block = {name: lin[:, k * n_lab : (k + 1) * n_lab] for k, name in enumerate(names)}
    out = {key: block.get(key) for key in ("known", "pos", "tp", "tn")}
    if bins:
        known = block["known"]
        err = np.abs(np.stack([block[f"bin{k}"] for k in range(bins)])).sum(axis=0)
        for key, total in (("brier", block["sq"]), ("ece", err)):
            val = np.full(known.shape, np.nan)
            np.divide(total, known, out=val, where=known > 0)
            out[key] = val
    return out


def bootstrap_stats(
    scores: np.ndarray,
    labels: np.ndarray,
    rs: Resampler,
    *,
    pred: np.ndarray | None = None,
    want_auc: bool = True,
    bins: int | None = None,
) -> BootStats:
    """Per-resample AUCs, confusion counts at ``pred`` and calibration (``bins``) of one model.

    Validated (n, L) inputs. Linear statistics are one product of the patient counts with the
    per-patient sums of :func:`_linear_columns`; AUCs gather the image counts per label.
    """
    scores, labels = _check_pair_2d(scores, labels)  # NaN scores would read as ties (0.5)
    n, n_lab = scores.shape
    if rs.n_rows != n:
        raise ValueError(f"resampler has {rs.n_rows} rows, scores have {n}")
    cols, names = _linear_columns(scores, labels, pred, bins)
    # float32 products when the counts are float32: exact for the 0/1 columns (integer sums
    # < 2**24), ~1e-7 relative for the Brier / calibration sums (immaterial for their CIs)
    per_patient = _per_patient(cols, rs.codes, rs.n_clusters).astype(rs.count_dtype)
    lin = np.zeros((rs.n_boot, cols.shape[1]))
    boot_auc = np.full((rs.n_boot, n_lab), np.nan) if want_auc else None
    p = rs.n_clusters
    plans = [(j, _auc_plan(scores[:, j], labels[:, j], rs.codes, p)) for j in range(n_lab)]
    plans = [(j, plan) for j, plan in plans if plan is not None and want_auc]
    for b0, pc_t in rs.cluster_counts():
        b1 = b0 + pc_t.shape[1]
        lin[b0:b1] = (per_patient @ pc_t).T
        for j, plan in plans:
            boot_auc[b0:b1, j] = _chunk_auc(pc_t, plan)
    return BootStats(auc=boot_auc, **_from_linear(lin, names, n_lab, bins))


def _per_patient(cols: np.ndarray, codes: np.ndarray, n_clusters: int) -> np.ndarray:
    """Per-patient sums of per-image columns, transposed: (c, P) float64, C-contiguous."""
    out = np.zeros((cols.shape[1], n_clusters))
    for k in range(cols.shape[1]):
        out[k] = np.bincount(codes, weights=cols[:, k], minlength=n_clusters)
    return out


def bootstrap_auc(
    scores: np.ndarray,
    labels: np.ndarray,
    idx: np.ndarray,
    *,
    clusters: np.ndarray | None = None,
) -> np.ndarray:
    """AUC of every resample and label: shape (B, L); 1-D inputs give (B,).

    ``idx`` (B, P) are the drawn units: image indices without ``clusters``, patient indices
    (0..P-1 in the order of ``np.unique(clusters)``) with them. Exactly equal to ``auc`` on
    the explicitly resampled arrays, without a Python loop over resamples. Resamples lacking
    positives or negatives give NaN.
    """
    one_d = np.ndim(scores) == 1
    s, y = _check_pair_2d(scores, labels)
    out = bootstrap_stats(s, y, _resampler_from_idx(idx, s.shape[0], clusters)).auc
    return out[:, 0] if one_d else out


# --------------------------------------------------------------------------- jackknife


@dataclass(frozen=True)
class Jackknife:
    """Leave-one-unit-out values of per-label statistics on one set of units (patients).

    ``point`` (L,); ``loo`` (L, P): the statistic recomputed without unit i (NaN where it is
    undefined); ``df`` (L,): degrees of freedom of the label's t interval (:func:`_auc_df`).
    Any linear combination of statistics on the SAME units (a macro, a paired difference, a
    drop) is inferred from the same combination of their ``loo`` rows
    (:func:`inference.jackknife_variance`): the pairing is kept exactly.
    """

    point: np.ndarray
    loo: np.ndarray
    df: np.ndarray


def _icc(values: np.ndarray, groups: np.ndarray, n_groups: int) -> float:
    """One-way ANOVA intra-class correlation of ``values`` within ``groups`` (dense indices
    below ``n_groups``), in [0, 1]; 1 when it cannot be estimated (no group with two values:
    the conservative side)."""
    cnt = np.bincount(groups, minlength=n_groups)
    have = cnt > 0
    k, n = int(have.sum()), values.size
    if k < 2 or n <= k:
        return 1.0
    sums = np.bincount(groups, weights=values, minlength=n_groups)
    means = np.divide(sums, cnt, out=np.zeros(n_groups), where=have)
    msb = float((cnt * (means - values.mean()) ** 2).sum()) / (k - 1)
    msw = float(((values - means[groups]) ** 2).sum()) / (n - k)
    n0 = (n - float((cnt.astype(np.float64) ** 2).sum()) / n) / (k - 1)
    denom = msb + (n0 - 1.0) * msw
    return 1.0 if denom <= 0 else float(np.clip((msb - msw) / denom, 0.0, 1.0))


def _effective_units(sizes: np.ndarray, rho: float) -> float:
    """Effective number of units whose contributions have variance proportional to
    ``m (1 + (m - 1) rho)`` (m images each, within-unit correlation rho): the Satterthwaite
    df of a sum of their squared contributions (Imbens & Kolesar 2016 with a random-effects
    working model). Equals the count for equal sizes; far fewer when one patient has many
    correlated images."""
    w = sizes * (1.0 + (sizes - 1.0) * rho)
    if w.size < 2:
        return float(w.size)
    return max(2.0, float(w.sum() ** 2 / (w * w).sum()))  # >= 1 df from two or more units


def _auc_df(part_pos: np.ndarray, part_neg: np.ndarray, eff_pos: float, eff_neg: float) -> float:
    """Satterthwaite df of an AUC's variance: its positive-class part (per patient, the
    placement values of its positive images around the AUC) with ``eff_pos - 1`` df and its
    negative-class part with ``eff_neg - 1`` df. Chosen by ``benchmarks/sim_intervals.py``:
    with df = (patients of the rarer class - 1) the 95% intervals covered 0.930 at 50
    positive patients (prevalence 2%, 1-15 images per patient, ICC 0.9; 4,000 replicates),
    with these df 0.946."""
    vp, vn = float(part_pos @ part_pos), float(part_neg @ part_neg)
    dp, dn = eff_pos - 1.0, eff_neg - 1.0
    if dp <= 0 or dn <= 0:
        return max(0.0, min(dp, dn))
    if vp + vn == 0.0:
        return min(dp, dn)
    return (vp + vn) ** 2 / (vp * vp / dp + vn * vn / dn)


def _jack_auc_1d(s: np.ndarray, y: np.ndarray, codes: np.ndarray, p: int):
    """(AUC, leave-one-patient-out AUCs (p,), df) of one label, O(n log n).

    Without patient i the Mann-Whitney sum loses its positives' row sums and its negatives'
    column sums, and regains the pairs within i (counted twice): ``U_(-i) = U - R_i - C_i +
    W_i`` over ``(M - m_i)(N - n_i)`` pairs. Integer arithmetic in units of 1/2 (ties).
    """
    known = ~np.isnan(y)
    s, y, c = s[known], y[known], codes[known]
    pos = y == 1.0
    cp, cn = c[pos], c[~pos]
    m_all, n_all = cp.size, cn.size
    loo = np.full(p, np.nan)
    if m_all == 0 or n_all == 0:
        return math.nan, loo, 0.0
    # one sort: per distinct score, the negatives below / positives above and the ties
    rank = np.unique(s, return_inverse=True)[1].astype(np.int64).reshape(-1)
    rp, rn = rank[pos], rank[~pos]
    n_cnt = np.bincount(rn, minlength=rank.size)
    p_cnt = np.bincount(rp, minlength=rank.size)
    r2 = 2 * (np.cumsum(n_cnt) - n_cnt)[rp] + n_cnt[rp]  # 2 x (negatives below + ties / 2)
    c2 = 2 * (m_all - np.cumsum(p_cnt))[rn] + p_cnt[rn]  # 2 x (positives above + ties / 2)
    u2 = int(r2.sum(dtype=np.int64))
    row = np.bincount(cp, weights=r2, minlength=p)
    col = np.bincount(cn, weights=c2, minlength=p)
    m_i, n_i = np.bincount(cp, minlength=p), np.bincount(cn, minlength=p)
    within = _within_pairs(rank, pos, c, (m_i > 0) & (n_i > 0), p)
    den = 2.0 * (m_all - m_i) * (n_all - n_i)
    np.divide(u2 - row - col + within, den, out=loo, where=den > 0)
    theta = u2 / (2.0 * m_all * n_all)
    eff_pos = _effective_units(m_i[m_i > 0].astype(np.float64), _icc(r2 / (2.0 * n_all), cp, p))
    eff_neg = _effective_units(n_i[n_i > 0].astype(np.float64), _icc(c2 / (2.0 * m_all), cn, p))
    part_pos = (row / (2.0 * n_all) - m_i * theta) / m_all
    part_neg = (col / (2.0 * m_all) - n_i * theta) / n_all
    return theta, loo, min(_auc_df(part_pos, part_neg, eff_pos, eff_neg), p - 1.0)


def _within_pairs(rank: np.ndarray, pos: np.ndarray, c: np.ndarray, both: np.ndarray, p: int):
    """Twice the Mann-Whitney sum of each patient's own (positive, negative) pairs, (p,),
    from the scores' dense ranks: only patients with both classes have any, so only their
    rows are sorted."""
    rows = both[c]
    if not rows.any():
        return np.zeros(p)
    n_rank = int(rank.max()) + 1
    rank, pos, c = rank[rows], pos[rows], c[rows].astype(np.int64)
    key_n = np.sort(c[~pos] * n_rank + rank[~pos])
    key_p = c[pos] * n_rank + rank[pos]
    start = np.searchsorted(key_n, c[pos] * n_rank, "left")
    w2 = np.searchsorted(key_n, key_p, "left") + np.searchsorted(key_n, key_p, "right") - 2 * start
    return np.bincount(c[pos], weights=w2, minlength=p)


def jackknife_auc(
    scores: np.ndarray,
    labels: np.ndarray,
    clusters: np.ndarray | None = None,
    *,
    n_units: int | None = None,
) -> Jackknife:
    """Per-label AUC with its leave-one-patient-out values and t degrees of freedom.

    ``clusters`` None: every image is its own unit. Units (0..P-1) are ``cluster_codes``'s
    renumbering, so two models scored on the same rows get aligned ``loo`` columns. With
    ``n_units`` the clusters are taken as unit indices in [0, n_units) as they are: the units
    of a larger set (a subgroup's rows on the whole test set's patients, for a gap between
    subgroups); a unit without rows here leaves the AUC unchanged. Exact: ``loo[j, i]``
    equals :func:`auc` on the rows of every other unit (tested).
    """
    s, y = _check_pair_2d(scores, labels)
    if n_units is None:
        codes, p = cluster_codes(clusters, s.shape[0])
    else:
        codes, p = np.asarray(clusters, dtype=np.intp).reshape(s.shape[0]), int(n_units)
        if codes.size and (codes.min() < 0 or codes.max() >= p):
            raise ValueError(f"unit indices must lie in [0, {p})")
    out = [_jack_auc_1d(s[:, j], y[:, j], codes, p) for j in range(s.shape[1])]
    return Jackknife(
        np.array([o[0] for o in out]), np.stack([o[1] for o in out]).reshape(len(out), p),
        np.array([o[2] for o in out], dtype=np.float64),
    )  # fmt: skip


def jackknife_ratio(num: np.ndarray, den: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(point (L,), leave-one-unit-out values (L, P)) of ratios of per-unit sums ``num`` /
    ``den`` (each (L, P)): a rate (TP / positives), an accuracy or a Brier score. NaN where
    the denominator is 0."""
    tot_n, tot_d = num.sum(axis=1), den.sum(axis=1)
    point = np.full(tot_n.shape, np.nan)
    np.divide(tot_n, tot_d, out=point, where=tot_d > 0)
    d = tot_d[:, None] - den
    loo = np.full(num.shape, np.nan)
    np.divide(tot_n[:, None] - num, d, out=loo, where=d > 0)
    return point, loo


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


# --------------------------------------------------------------------------- evaluate


@dataclass(frozen=True)
class MetricRow:
    """One (label, subgroup) row of the evaluation table; None means undefined.

    ``threshold`` is the caller's (source-domain validation) threshold; the ``oracle_*``
    fields use Youden's threshold fitted on the evaluated subgroup itself and are only
    filled with ``oracle=True``. For ``label == "macro"``: ``n`` is the subgroup size,
    ``n_pos`` is the sum of positives over labels (positive image-label pairs), metrics are
    means over the macro's label set (``n_labels`` labels: for "all" those with enough
    positive and negative patients, for a subgroup those valid in every subgroup of its
    family, :func:`shared_label_sets`) and ``threshold`` is None. CIs are jackknife t
    intervals on the logit scale with ``ci_df`` degrees of freedom over ``n_patients`` units
    (``resampling_unit``); ``ci_note`` marks an approximate one; ``null_reason`` says why a
    value (or a CI) is null.
    """

    label: str
    subgroup: str
    n: int
    n_pos: int | None
    n_patients: int | None
    resampling_unit: str | None
    n_labels: int | None
    ci_df: float | None
    auc: float | None
    auc_lo: float | None
    auc_hi: float | None
    accuracy: float | None
    accuracy_lo: float | None
    accuracy_hi: float | None
    sensitivity: float | None
    sensitivity_lo: float | None
    sensitivity_hi: float | None
    specificity: float | None
    specificity_lo: float | None
    specificity_hi: float | None
    threshold: float | None
    brier: float | None
    brier_lo: float | None
    brier_hi: float | None
    ece: float | None
    ece_lo: float | None
    ece_hi: float | None
    null_reason: str | None
    ci_note: str | None = None
    oracle_threshold: float | None = None
    oracle_accuracy: float | None = None
    oracle_sensitivity: float | None = None
    oracle_specificity: float | None = None

    def as_dict(self) -> dict[str, object]:
        """Plain dict (field order preserved) for DataFrame / parquet rows."""
        return dataclasses.asdict(self)


_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "brier", "ece")
_THRESHOLDED = ("accuracy", "sensitivity", "specificity")
#: (numerator, denominator) blocks of ``_linear_columns`` behind each ratio metric
_RATIOS = {
    "accuracy": (("tp", "tn"), ("known",)),
    "sensitivity": (("tp",), ("pos",)),
    "specificity": (("tn",), ("known", "-pos")),
    "brier": (("sq",), ("known",)),
}
#: Metrics reported without a CI: the binned ECE is biased upwards, and a bootstrap around a
#: biased plug-in covered a calibrated model's true ECE in 0 of 300 simulations (statistics
#: red team). Its point is a scale; the Brier score carries the calibration CIs.
_NO_CI = frozenset({"ece"})


@dataclass(frozen=True)
class _Settings:
    ci: float
    min_positives: int
    min_negatives: int
    bins: int
    oracle: bool
    unit: str
    intervals: bool  # n_boot > 0: CIs wanted


@dataclass
class _Values:
    """Point (L,) and leave-one-patient-out (L, P) metrics of one subgroup; NaN outside the
    label set. ``df`` (L,): each label's t degrees of freedom; ``called`` (L,): "positive" /
    "negative" where the threshold calls every image of a label one class."""

    point: dict[str, np.ndarray]
    loo: dict[str, np.ndarray]
    df: np.ndarray
    support: LabelSupport
    probabilities: bool
    oracle: dict[str, np.ndarray]
    called: list[str | None]


def _ratio_values(s, y, pred, codes, p, bins) -> tuple[dict, dict]:
    """Point and leave-one-out values of the ratio metrics from per-patient sums."""
    n_lab = s.shape[1]
    cols, names = _linear_columns(s, y, pred, bins)
    pp = _per_patient(cols, codes, p)
    block = {name: pp[k * n_lab : (k + 1) * n_lab] for k, name in enumerate(names)}
    block["-pos"] = -block["pos"]
    point, loo = {}, {}
    for metric, (num, den) in _RATIOS.items():
        if all(k in block for k in (*num, *den)):
            point[metric], loo[metric] = jackknife_ratio(
                sum(block[k] for k in num), sum(block[k] for k in den)
            )
    return point, loo


def _subset_values(
    s: np.ndarray, y: np.ndarray, thr: np.ndarray, codes: np.ndarray, p: int, st: _Settings
) -> _Values:
    n_lab = s.shape[1]
    support = label_support(y, st.min_positives, st.min_negatives,
                            codes if st.unit == "patient" else None)  # fmt: skip
    thr_ok = ~np.isnan(thr)
    pred = s >= thr[None, :]
    probs = are_probabilities(s, y)
    jk = jackknife_auc(s, y, codes)
    point, loo = _ratio_values(s, y, pred, codes, p, st.bins if probs else None)
    point["auc"], loo["auc"] = jk.point, jk.loo
    for key in _THRESHOLDED:
        point[key] = np.where(thr_ok, point[key], np.nan)
    point["ece"] = calibration(s, y, st.bins)[1] if probs else np.full(n_lab, np.nan)
    point.setdefault("brier", np.full(n_lab, np.nan))
    for key in _METRICS:  # a NaN point has no interval: the leave-one-out rows stay as they are
        point[key] = np.where(support.ok, point[key], np.nan)
    orc: dict[str, np.ndarray] = {}
    if st.oracle:
        o_thr = np.array(
            [youden_threshold(s[:, j], y[:, j]) if support.ok[j] else np.nan for j in range(n_lab)]
        )
        o_tm = threshold_metrics(s, y, o_thr)
        orc = {"threshold": o_thr, **{k: getattr(o_tm, k) for k in _THRESHOLDED}}
    return _Values(point, loo, jk.df, support, probs, orc, _called(y, pred, thr_ok))


def _called(y: np.ndarray, pred: np.ndarray, thr_ok: np.ndarray) -> list[str | None]:
    """Per label: "positive" / "negative" when the threshold calls every image with a known
    label that class (a degenerate threshold: sensitivity and specificity are 0 or 1 by
    construction), else None."""
    out: list[str | None] = []
    for j in range(y.shape[1]):
        called = pred[~np.isnan(y[:, j]), j]
        if not thr_ok[j] or called.size == 0 or 0 < called.sum() < called.size:
            out.append(None)
        else:
            out.append("positive" if called.all() else "negative")
    return out


def _interval_fields(
    values: dict[str, tuple[float, np.ndarray | None]], df: float, st: _Settings
) -> tuple[dict[str, float | None], list[str]]:
    """Each metric's value and jackknife t interval (logit scale), and the metrics whose
    value has no interval (a degenerate estimate)."""
    kw: dict[str, float | None] = {}
    no_ci = []
    for key in _METRICS:
        v, loo = values[key]
        v = opt(v)
        lo = hi = None
        if v is not None and st.intervals and key not in _NO_CI and loo is not None:
            lo, hi = level_interval(v, jackknife_variance(loo), df, st.ci)
            if lo is None:
                no_ci.append(key)
        kw[key], kw[f"{key}_lo"], kw[f"{key}_hi"] = v, lo, hi
    return kw, no_ci


def _notes(
    kw: dict, v: _Values, no_ci: list[str], thr_missing: bool, called: str | None, df: float
):
    """Why values (or CIs) that could exist are null."""
    out = []
    if kw["auc"] is None:
        return out
    if thr_missing:
        out.append("no source threshold: accuracy, sensitivity, specificity null")
    if called:
        sens, spec = (1, 0) if called == "positive" else (0, 1)
        out.append(f"degenerate threshold: the source threshold calls every image {called}, "
                   f"so sensitivity is {sens} and specificity {spec} by construction (no CIs)")  # fmt: skip
    if not v.probabilities:
        out.append("scores are not probabilities in [0, 1]: no calibration")
    if no_ci and not df >= 1:
        out.append("no CIs: too few (effective) patients of the rarer class for an interval")
    elif no_ci:
        out.append(f"no CI for {', '.join(no_ci)}: the estimate is 0 or 1, or no single "
                   "patient moves it (nothing for an interval to rest on)")  # fmt: skip
    return out


#: A point AUC at or above this (or at or below 1 - it) marks its interval approximate: with a
#: clustered binormal generator (ICC 0.67, prevalence 10%, 1-15 images per patient, 1,500
#: replicates; issue 24's red team) the jackknife logit 95% intervals covered 0.932-0.937 at a
#: true AUC of 0.95 and 0.906-0.919 at 0.98 (10-100 positive patients; the jackknife variance
#: 0.63-0.89x the true one, and the estimate skewed), against 0.935-0.962 at AUC 0.80-0.90.
HIGH_AUC = 0.95


def _ci_note(units: float, unit: str, st: _Settings, auc: float | None = None) -> str | None:
    """Marks an interval that rests on fewer units of the rarer class than the simulation
    verified (``inference.RELIABLE_UNITS``), or whose point AUC is at or beyond
    :data:`HIGH_AUC` (where the intervals under-cover)."""
    if not st.intervals:
        return None
    notes = []
    if units < RELIABLE_UNITS:
        notes.append(f"approximate CI: {int(units)} {unit}(s) in the rarer class; coverage was "
                     f"verified from {RELIABLE_UNITS} (benchmarks/sim_intervals.py)")  # fmt: skip
    if auc is not None and not abs(auc - 0.5) < HIGH_AUC - 0.5:
        notes.append(f"approximate CI: AUC {auc:.3f} is beyond {HIGH_AUC:g} (or {1 - HIGH_AUC:g}), "
                     "where the 95% intervals covered 0.91-0.94 in simulation "
                     "(docs/statistics.md)")  # fmt: skip
    return "; ".join(notes) or None


def _subset_rows(
    s: np.ndarray,
    y: np.ndarray,
    thr: np.ndarray,
    label_names: Sequence[str],
    subgroup: str,
    codes: np.ndarray,
    p: int,
    st: _Settings,
) -> tuple[_Values, list[MetricRow]]:
    v = _subset_values(s, y, thr, codes, p, st)
    sup = v.support
    rows = []
    for j, name in enumerate(label_names):
        vals = {k: (v.point[k][j], v.loo[k][j] if k in v.loo else None) for k in _METRICS}
        kw, no_ci = _interval_fields(vals, v.df[j], st)
        notes = [sup.reasons[j]] if sup.reasons[j] else []
        notes += _notes(kw, v, no_ci, bool(np.isnan(thr[j])), v.called[j], v.df[j])
        known = ~np.isnan(y[:, j])
        if st.oracle:
            kw["oracle_threshold"] = opt(v.oracle["threshold"][j])
            kw.update({f"oracle_{k}": opt(v.oracle[k][j]) for k in _THRESHOLDED})
        rarer = min(sup.units_pos[j], sup.units_neg[j])
        rows.append(
            MetricRow(
                label=str(name), subgroup=subgroup, n=int(sup.n_known[j]),
                n_pos=int(sup.n_pos[j]), n_patients=int(np.unique(codes[known]).size),
                resampling_unit=st.unit, n_labels=int(sup.ok[j]),
                ci_df=opt(v.df[j]) if sup.ok[j] and st.intervals else None,
                threshold=opt(thr[j]), null_reason="; ".join(notes) or None,
                ci_note=_ci_note(rarer, st.unit, st, kw["auc"]) if sup.ok[j] else None, **kw,
            )
        )  # fmt: skip
    return v, rows


def macro_df(variances: np.ndarray, dfs: np.ndarray, n_units: int) -> float:
    """Degrees of freedom of a mean over labels: Satterthwaite over the labels' variances
    and dfs, within [smallest label df, units - 1] (covariances between labels are left out
    of the weights: the bound below keeps it from exceeding what the weakest label allows
    once they dominate)."""
    v = np.asarray(variances, dtype=np.float64)
    d = np.asarray(dfs, dtype=np.float64)
    if v.size == 0 or np.isnan(v).any() or (d <= 0).any():
        return math.nan
    low = float(d.min())
    if v.sum() == 0.0:
        return low
    return float(min(max(low, v.sum() ** 2 / float((v * v / d).sum())), max(low, n_units - 1.0)))


def _macro_row(
    v: _Values, ok: np.ndarray, n: int, subgroup: str, p: int, st: _Settings
) -> MetricRow:
    """The macro over the label set ``ok`` (mean of the points and of the leave-one-out
    values, so its interval keeps the labels' covariances)."""
    sup = v.support
    any_ok = bool(ok.any())
    vals = {}
    for k in _METRICS:
        point = float(v.point[k][ok].mean()) if any_ok else math.nan
        vals[k] = (point, v.loo[k][ok].mean(axis=0) if any_ok and k in v.loo else None)
    var = np.array([jackknife_variance(v.loo["auc"][j]) for j in np.flatnonzero(ok)])
    df = macro_df(var, v.df[ok], p) if any_ok else math.nan
    kw, no_ci = _interval_fields(vals, df, st)
    notes = []
    if not sup.ok.any():
        notes.append(
            f"no label has >= {st.min_positives} positive and >= {st.min_negatives} negative "
            f"{st.unit}s"
        )
    elif not any_ok:
        notes.append(f"no label is valid in every {subgroup_family(subgroup)} subgroup: "
                     "no macro to compare side by side")  # fmt: skip
    notes += _notes(kw, v, no_ci, False, None, df)
    if kw["auc"] is not None and kw["accuracy"] is None:
        notes.append("a label of the set has no source threshold: thresholded metrics null")
    if st.oracle:
        kw.update({f"oracle_{k}": opt(v.oracle[k][ok].mean()) if any_ok else None
                   for k in _THRESHOLDED})  # fmt: skip
    rarer = float(np.minimum(sup.units_pos, sup.units_neg)[ok].min()) if any_ok else 0.0
    return MetricRow(
        label="macro", subgroup=subgroup, n=int(n), n_pos=int(sup.n_pos[ok].sum()),
        n_patients=p, resampling_unit=st.unit, n_labels=int(ok.sum()),
        ci_df=opt(df) if st.intervals else None, threshold=None,
        null_reason="; ".join(notes) or None,
        ci_note=_ci_note(rarer, st.unit, st, kw["auc"]) if any_ok else None, **kw,
    )  # fmt: skip


def _subsets(groups: Mapping[str, np.ndarray] | None, n: int) -> list[tuple[str, np.ndarray]]:
    subsets = [("all", np.ones(n, dtype=bool))]
    for name, mask in (groups or {}).items():
        if name == "all":
            raise ValueError('subgroup name "all" is reserved')
        m = np.asarray(mask)
        if m.dtype != bool or m.shape != (n,):
            raise ValueError(f"group {name!r} must be a boolean mask of length {n}")
        subsets.append((str(name), m))
    return subsets


def evaluate(
    scores: np.ndarray,
    labels: np.ndarray,
    thresholds: np.ndarray | Sequence[float],
    label_names: Sequence[str],
    *,
    groups: Mapping[str, np.ndarray] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    oracle: bool = False,
    clusters: np.ndarray | None = None,
    min_positives: int = 1,
    min_negatives: int = 1,
    calibration_bins: int = CALIBRATION_BINS,
) -> list[MetricRow]:
    """Point metrics with patient-level jackknife t CIs per label, "macro", and subgroup.

    Rows come subgroup by subgroup ("all" first, then ``groups`` in order), labels in
    order, then "macro". Each subgroup's units are its patients (those with >= 1 image in it,
    with their images in it); ``clusters`` None makes every image a unit. ``n_boot`` 0: no
    CIs (any other value: CIs; the jackknife draws nothing, so ``n_boot`` and ``seed`` only
    keep the callers of the bootstrap era working). ``thresholds`` should come from the source
    domain's validation split; ``oracle=True`` adds Youden-on-this-set metrics for
    comparison. Labels below ``min_positives`` / ``min_negatives`` get None metrics and a
    ``null_reason``; a subgroup's macro averages the labels valid in every subgroup of its
    family (:func:`shared_label_sets`).
    """
    del seed  # nothing is drawn
    s, y = _check_pair_2d(scores, labels)
    n, n_lab = s.shape
    thr = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if thr.size != n_lab:
        raise ValueError(f"need {n_lab} thresholds, got {thr.size}")
    label_names = [str(x) for x in label_names]
    if len(label_names) != n_lab:
        raise ValueError(f"need {n_lab} label names, got {len(label_names)}")
    if "macro" in label_names:
        raise ValueError('"macro" is reserved')
    if calibration_bins < 1:
        raise ValueError("calibration_bins must be >= 1")
    cluster_codes(clusters, n)  # validates the shape and dtype once
    st = _Settings(ci, min_positives, min_negatives, calibration_bins, oracle,
                   "image" if clusters is None else "patient", n_boot > 0)  # fmt: skip
    parts = []
    for name, mask in _subsets(groups, n):
        codes, p = cluster_codes(None if clusters is None else np.asarray(clusters)[mask],
                                 int(mask.sum()))  # fmt: skip
        values, rows = _subset_rows(s[mask], y[mask], thr, label_names, name, codes, p, st)
        parts.append((name, int(mask.sum()), p, values, rows))
    shared = shared_label_sets({name: v.support.ok for name, _, _, v, _ in parts})
    out: list[MetricRow] = []
    for name, size, p, values, rows in parts:
        ok = values.support.ok if name == "all" else shared[name]
        out += [*rows, _macro_row(values, ok, size, name, p, st)]
    return out


# --------------------------------------------------------------------------- subgroups


def _fmt_edge(x: float) -> str:
    x = float(x)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return str(int(x)) if x.is_integer() else repr(x)


def subgroup_masks(
    sex: np.ndarray | Sequence[str],
    age: np.ndarray | Sequence[float],
    age_bins: Sequence[float] = (0, 40, 70, math.inf),
) -> dict[str, np.ndarray]:
    """Boolean masks "sex=F", "sex=M" and "age=[lo,hi)" for each consecutive bin pair.

    Sex is matched case-insensitively after stripping; anything else (U, None, NaN) is in
    neither sex group. NaN ages belong to no age group. Bins are half-open [lo, hi).
    """
    sx = np.array(
        [v.strip().upper() if isinstance(v, str) else "" for v in np.asarray(sex, dtype=object)],
        dtype=object,
    )
    ag = np.asarray(age, dtype=np.float64).ravel()
    if sx.shape != ag.shape:
        raise ValueError(f"sex {sx.shape} and age {ag.shape} differ in length")
    edges = [float(e) for e in age_bins]
    if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError("age_bins must be strictly increasing")
    out: dict[str, np.ndarray] = {
        "sex=F": np.asarray(sx == "F", dtype=bool),
        "sex=M": np.asarray(sx == "M", dtype=bool),
    }
    for lo, hi in zip(edges, edges[1:], strict=False):
        with np.errstate(invalid="ignore"):
            out[f"age=[{_fmt_edge(lo)},{_fmt_edge(hi)})"] = (ag >= lo) & (ag < hi)
    return out


# --------------------------------------------------------------------------- paired tests


@dataclass(frozen=True)
class PairedResult:
    """AUC(a) - AUC(b) for one label (or "macro") with a paired jackknife t CI and p-value."""

    label: str
    delta: float | None
    delta_lo: float | None
    delta_hi: float | None
    p_value: float | None
    n: int
    n_pos: int | None
    df: float | None = None

    def as_dict(self) -> dict[str, object]:
        """Plain dict for DataFrame / parquet rows."""
        return dataclasses.asdict(self)


def paired_auc_difference(
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    labels: np.ndarray,
    ci: float = 0.95,
    *,
    label_names: Sequence[str] | None = None,
    clusters: np.ndarray | None = None,
    min_positives: int = 1,
    min_negatives: int = 1,
) -> list[PairedResult]:
    """Paired comparison of two models on the same images, per label and macro.

    Both models' leave-one-patient-out AUCs are taken over the same patients, so the
    difference's jackknife variance keeps the pairing (case-level variation cancels); CI and
    p follow the t rule of :func:`inference.infer_t`. ``label_names`` defaults to "0", "1",
    ...; the last result is "macro" over the fixed label set (see :func:`label_support`).
    """
    sa, y = _check_pair_2d(scores_a, labels)
    sb, _ = _check_pair_2d(scores_b, labels)
    if sa.shape != sb.shape:
        raise ValueError("scores_a and scores_b must have the same shape")
    n, n_lab = sa.shape
    codes, p = cluster_codes(clusters, n)
    names = [str(j) for j in range(n_lab)] if label_names is None else list(label_names)
    if len(names) != n_lab:
        raise ValueError(f"need {n_lab} label names, got {len(names)}")
    sup = label_support(y, min_positives, min_negatives, None if clusters is None else codes)
    ja, jb = jackknife_auc(sa, y, codes), jackknife_auc(sb, y, codes)
    d_point, d_loo = ja.point - jb.point, ja.loo - jb.loo
    df = np.minimum(ja.df, jb.df)

    def result(label: str, point: float, loo: np.ndarray, dof: float, nn, npos) -> PairedResult:
        r = infer_t(point, jackknife_variance(loo), dof, ci=ci, n_units=p)
        return PairedResult(label, r.estimate, r.lo, r.hi, r.p_value, int(nn), int(npos),
                            opt(dof) if r.estimate is not None else None)  # fmt: skip

    out = [
        result(names[j], d_point[j] if sup.ok[j] else math.nan, d_loo[j], df[j],
               sup.n_known[j], sup.n_pos[j])
        for j in range(n_lab)
    ]  # fmt: skip
    ok = sup.ok
    if ok.any():
        var = np.array([jackknife_variance(d_loo[j]) for j in np.flatnonzero(ok)])
        m_df = macro_df(var, df[ok], p)
        out.append(result("macro", float(d_point[ok].mean()), d_loo[ok].mean(axis=0), m_df, n,
                          sup.n_pos.sum()))  # fmt: skip
    else:
        out.append(PairedResult("macro", None, None, None, None, n, int(sup.n_pos.sum())))
    return out


def paired_t_test(
    x: Sequence[float | None] | np.ndarray, y: Sequence[float | None] | np.ndarray
) -> tuple[float, float]:
    """Paired Student t test of x vs y (e.g. AUCs across seeds): (t, two-sided p).

    This is the test the paper reports. Pairs with a None/NaN on either side are dropped;
    fewer than 2 pairs, or zero variance with zero mean difference, give (nan, nan).
    """
    a = np.array([np.nan if v is None else v for v in x], dtype=np.float64)
    b = np.array([np.nan if v is None else v for v in y], dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError("x and y must have the same length")
    d = (a - b)[~(np.isnan(a) | np.isnan(b))]
    k = d.size
    if k < 2:
        return math.nan, math.nan
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        if mean == 0.0:
            return math.nan, math.nan
        return math.copysign(math.inf, mean), 0.0
    t = mean / (sd / math.sqrt(k))
    return t, t_two_sided_p(t, k - 1.0)


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
