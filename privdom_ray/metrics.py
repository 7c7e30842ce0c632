"""Evaluation metrics: AUC, Youden thresholds, bootstrap CIs, subgroups and paired tests.

Conventions used throughout:

* ``labels`` are float arrays of shape ``(n, L)`` with values 0.0 / 1.0 and NaN meaning
  "unknown for this label"; a NaN excludes that image for that label only.
* ``scores`` are float arrays ``(n, L)`` (logits or probabilities; AUC is rank based).
* A thresholded prediction is positive when ``score >= threshold``.
* Anything undefined (no positives or no negatives, empty subgroup) is ``None`` in the
  row objects so that it becomes a null in parquet, never a fake 0.5.

The bootstrap is vectorised: for a chunk of resamples we build the count matrix
``C[b, i]`` = how often image ``i`` was drawn in resample ``b`` with one ``np.bincount``,
and then every AUC is an exact integer rank statistic computed with a cumulative sum of
the negatives' counts in score order (ties handled by ``searchsorted`` left/right, which
gives the Mann-Whitney mid-rank credit of 1/2). Thresholded confusion counts are a single
matrix product ``C @ indicators``. No Python loop runs over resamples.

numpy only (no scipy): the Student t tail uses a continued-fraction incomplete beta.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MetricRow",
    "PairedResult",
    "ThresholdMetrics",
    "auc",
    "bootstrap_auc",
    "bootstrap_indices",
    "evaluate",
    "paired_auc_difference",
    "paired_t_test",
    "percentile_ci",
    "subgroup_masks",
    "subgroup_seed",
    "threshold_metrics",
    "youden_threshold",
]

# Target number of (resample, image) cells per chunk: small enough that a chunk of the int64
# count matrix (1 MiB here) stays in L2 while it is gathered once per label; 2**16-2**17 was
# fastest on a busy 2-core box (about 4 resamples per chunk at n = 30,000).
_CHUNK_CELLS = 1 << 17


# --------------------------------------------------------------------------- helpers


def _opt(x: float | None) -> float | None:
    """NaN -> None so undefined values become nulls downstream; +-inf is kept."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


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


def _row_nanmean(a: np.ndarray) -> np.ndarray:
    """Mean over axis 1 ignoring NaN, NaN (no warning) where a row is all NaN."""
    ok = ~np.isnan(a)
    cnt = ok.sum(axis=1)
    tot = np.where(ok, a, 0.0).sum(axis=1)
    out = np.full(a.shape[0], np.nan)
    np.divide(tot, cnt, out=out, where=cnt > 0)
    return out


def _nanmean(v: Sequence[float] | np.ndarray) -> float:
    a = np.asarray(v, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


def percentile_ci(values: np.ndarray, ci: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval, ignoring NaN resamples; (None, None) if none are left.

    Resamples that happen to contain no positives (or no negatives) have an undefined AUC;
    dropping them is the usual practice and keeps the interval finite.
    """
    if not 0.0 < ci < 1.0:
        raise ValueError("ci must be in (0, 1)")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return None, None
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(v, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


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


# --------------------------------------------------------------------------- bootstrap


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Resample indices with replacement, shape (n_boot, n), int32, deterministic in seed.

    Generate once and pass the same array to both models of a paired comparison so that
    their resamples coincide.
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

    "all" keeps the plain seed so ``bootstrap_indices(n, n_boot, seed)`` reproduces the
    resamples ``evaluate`` used on the full set (handy for paired comparisons).
    """
    if name == "all":
        return int(seed)
    return int(seed) + zlib.crc32(name.encode("utf-8"))


@dataclass
class _AucPlan:
    """Per-label precomputation for the vectorised bootstrap AUC."""

    big: np.ndarray  # indices of the larger class, sorted by (possibly negated) score
    small: np.ndarray  # indices of the smaller class
    k_lt: np.ndarray  # per small item: #big items with score < its score
    k_le: np.ndarray  # per small item: #big items with score <= its score


def _auc_plan(s: np.ndarray, y: np.ndarray) -> _AucPlan | None:
    pos = np.flatnonzero(y == 1.0)
    neg = np.flatnonzero(y == 0.0)
    if pos.size == 0 or neg.size == 0:
        return None
    # AUC(s, y) == AUC(-s, 1 - y) with the same integer U, so let the cumulative sum run
    # over the larger class and gather at the (fewer) items of the smaller class.
    if pos.size > neg.size:
        pos, neg, s = neg, pos, -s
    big = neg[np.argsort(s[neg], kind="stable")]
    sv = s[big]
    sp = s[pos]
    return _AucPlan(
        big=big,
        small=pos,
        k_lt=np.searchsorted(sv, sp, side="left"),
        k_le=np.searchsorted(sv, sp, side="right"),
    )


def _bootstrap_core(
    scores: np.ndarray,
    labels: np.ndarray,
    idx: np.ndarray,
    pred: np.ndarray | None,
    want_auc: bool = True,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-resample AUCs (B, L) and confusion counts (B, 4, L) for validated inputs.

    Counts are [known, positives, true positives, true negatives] per label, from
    ``C @ indicators`` with the chunk's count matrix C. ``pred`` is the (n, L) boolean
    prediction matrix (None to skip thresholded counts).
    """
    n, n_lab = scores.shape
    n_boot = idx.shape[0]
    boot_auc = np.full((n_boot, n_lab), np.nan) if want_auc else None
    counts = np.zeros((n_boot, 4, n_lab)) if pred is not None else None
    if n_boot == 0 or n == 0:
        return boot_auc, counts

    plans = [_auc_plan(scores[:, j], labels[:, j]) for j in range(n_lab)] if want_auc else []
    ind = None
    if pred is not None:
        known = ~np.isnan(labels)
        pos = labels == 1.0
        neg = labels == 0.0
        # float32 products of 0/1 and small integer counts are exact while sums < 2**24
        fdt = np.float32 if n < (1 << 24) else np.float64
        ind = np.concatenate([known, pos, pos & pred, neg & ~pred], axis=1).astype(fdt)

    chunk = max(1, min(n_boot, _CHUNK_CELLS // n))
    for b0 in range(0, n_boot, chunk):
        ic = idx[b0 : b0 + chunk]
        bc = ic.shape[0]
        keys = ic + (np.arange(bc, dtype=np.int64) * n)[:, None]
        cnt = np.bincount(keys.ravel(), minlength=bc * n).reshape(bc, n)  # int64
        if ind is not None:
            counts[b0 : b0 + bc] = (cnt.astype(ind.dtype) @ ind).reshape(bc, 4, n_lab)
        for j, plan in enumerate(plans):
            if plan is None:
                continue
            c_big = np.take(cnt, plan.big, axis=1)
            cum = np.empty((bc, plan.big.size + 1), dtype=np.int64)
            cum[:, 0] = 0
            np.cumsum(c_big, axis=1, out=cum[:, 1:])
            c_small = np.take(cnt, plan.small, axis=1)
            below = np.take(cum, plan.k_lt, axis=1)
            below += np.take(cum, plan.k_le, axis=1)
            two_u = np.einsum("bp,bp->b", c_small, below)
            n_small = c_small.sum(axis=1)
            n_big = cum[:, -1]
            denom = 2 * n_small * n_big
            col = np.full(bc, np.nan)
            np.divide(two_u, denom, out=col, where=denom > 0)
            boot_auc[b0 : b0 + bc, j] = col
    return boot_auc, counts


def bootstrap_auc(scores: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """AUC of every resample (row of ``idx``) and label: shape (B, L); 1-D inputs give (B,).

    Exactly equal to ``auc`` on the explicitly resampled arrays, but without a Python loop
    over resamples. Resamples lacking positives or negatives give NaN.
    """
    one_d = np.ndim(scores) == 1
    s, y = _check_pair_2d(scores, labels)
    idx = _check_idx(idx, s.shape[0])
    out, _ = _bootstrap_core(s, y, idx, None)
    return out[:, 0] if one_d else out


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


def _rates(counts: np.ndarray, thr_ok: np.ndarray) -> tuple[np.ndarray, ...]:
    """(acc, sens, spec) from [..., 4, L] counts [known, pos, tp, tn]; NaN if undefined."""
    known, pos, tp, tn = (counts[..., k, :] for k in range(4))
    neg = known - pos

    def div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = np.full(np.broadcast(a, b).shape, np.nan)
        np.divide(a, b, out=out, where=(b > 0) & thr_ok)
        return out

    return div(tp + tn, known), div(tp, pos), div(tn, neg)


def threshold_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    thresholds: np.ndarray | Sequence[float],
    idx: np.ndarray | None = None,
) -> ThresholdMetrics:
    """Accuracy, sensitivity and specificity per label at given thresholds (score >= thr).

    With ``idx`` the per-resample values come from one matrix product of the resample
    count matrix with TP/TN indicator vectors (no loop over resamples).
    """
    s, y = _check_pair_2d(scores, labels)
    thr = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if thr.size != s.shape[1]:
        raise ValueError(f"need {s.shape[1]} thresholds, got {thr.size}")
    thr_ok = ~np.isnan(thr)
    pred = s >= thr[None, :]
    known = ~np.isnan(y)
    pos = y == 1.0
    neg = y == 0.0
    cols = [known, pos, pos & pred, neg & ~pred]
    point = np.stack([c.sum(axis=0) for c in cols]).astype(np.float64)
    acc, sens, spec = _rates(point, thr_ok)
    if idx is None:
        return ThresholdMetrics(acc, sens, spec)
    idx = _check_idx(idx, s.shape[0])
    _, counts = _bootstrap_core(s, y, idx, pred, want_auc=False)
    b_acc, b_sens, b_spec = _rates(counts, thr_ok)
    return ThresholdMetrics(acc, sens, spec, b_acc, b_sens, b_spec)


# --------------------------------------------------------------------------- evaluate


@dataclass(frozen=True)
class MetricRow:
    """One (label, subgroup) row of the evaluation table; None means undefined.

    ``threshold`` is the caller's (source-domain validation) threshold; the ``oracle_*``
    fields use Youden's threshold fitted on the evaluated subgroup itself and are only
    filled with ``oracle=True``. For ``label == "macro"``: ``n`` is the subgroup size,
    ``n_pos`` is the sum of positives over labels (positive image-label pairs), metrics
    are means over labels with defined values and ``threshold`` is None.
    """

    label: str
    subgroup: str
    n: int
    n_pos: int | None
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
    oracle_threshold: float | None = None
    oracle_accuracy: float | None = None
    oracle_sensitivity: float | None = None
    oracle_specificity: float | None = None

    def as_dict(self) -> dict[str, object]:
        """Plain dict (field order preserved) for DataFrame / parquet rows."""
        return dataclasses.asdict(self)


_METRICS = ("auc", "accuracy", "sensitivity", "specificity")


def _evaluate_subset(
    s: np.ndarray,
    y: np.ndarray,
    thr: np.ndarray,
    label_names: Sequence[str],
    subgroup: str,
    idx: np.ndarray,
    ci: float,
    oracle: bool,
) -> list[MetricRow]:
    n, n_lab = s.shape
    n_known = (~np.isnan(y)).sum(axis=0)
    n_pos = (y == 1.0).sum(axis=0)
    defined = (n_pos > 0) & (n_pos < n_known)  # both classes present

    thr_ok = ~np.isnan(thr)
    pred = s >= thr[None, :]
    boot_auc, counts = _bootstrap_core(s, y, idx, pred)
    b_acc, b_sens, b_spec = _rates(counts, thr_ok)
    tm = threshold_metrics(s, y, thr)

    point = {
        "auc": np.array([auc(s[:, j], y[:, j]) for j in range(n_lab)]),
        "accuracy": tm.accuracy.copy(),
        "sensitivity": tm.sensitivity.copy(),
        "specificity": tm.specificity.copy(),
    }
    boot = {"auc": boot_auc, "accuracy": b_acc, "sensitivity": b_sens, "specificity": b_spec}
    # a label without both classes in this subgroup has no metrics at all (not even
    # accuracy), so it is also excluded from every macro average
    for key in _METRICS:
        point[key][~defined] = np.nan
        boot[key][:, ~defined] = np.nan

    orc: dict[str, np.ndarray] = {}
    if oracle:
        o_thr = np.array(
            [youden_threshold(s[:, j], y[:, j]) if defined[j] else np.nan for j in range(n_lab)]
        )
        o_tm = threshold_metrics(s, y, o_thr)
        orc = {
            "threshold": o_thr,
            "accuracy": o_tm.accuracy,
            "sensitivity": o_tm.sensitivity,
            "specificity": o_tm.specificity,
        }

    def make_row(label: str, nn: int, npos: int | None, vals: dict, thr_v, o: dict) -> MetricRow:
        kw: dict[str, object] = {}
        for key in _METRICS:
            v, samples = vals[key]
            v = _opt(v)
            lo, hi = percentile_ci(samples, ci) if v is not None else (None, None)
            kw[key], kw[f"{key}_lo"], kw[f"{key}_hi"] = v, lo, hi
        if oracle:
            kw["oracle_threshold"] = _opt(o.get("threshold"))
            for key in ("accuracy", "sensitivity", "specificity"):
                kw[f"oracle_{key}"] = _opt(o[key])
        return MetricRow(
            label=label, subgroup=subgroup, n=int(nn), n_pos=npos, threshold=_opt(thr_v), **kw
        )

    rows = []
    for j, name in enumerate(label_names):
        vals = {key: (point[key][j], boot[key][:, j]) for key in _METRICS}
        o = {key: orc[key][j] for key in orc}
        rows.append(make_row(str(name), n_known[j], int(n_pos[j]), vals, thr[j], o))
    macro_vals = {key: (_nanmean(point[key]), _row_nanmean(boot[key])) for key in _METRICS}
    macro_o = {key: _nanmean(orc[key]) for key in orc if key != "threshold"}
    rows.append(make_row("macro", n, int(n_pos.sum()), macro_vals, None, macro_o))
    return rows


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
) -> list[MetricRow]:
    """Point metrics with percentile-bootstrap CIs per label, "macro", and subgroup.

    Rows come subgroup by subgroup ("all" first, then ``groups`` in order), labels in
    order, then "macro". Each subgroup is resampled within itself with the seed
    ``subgroup_seed(seed, name)``. ``thresholds`` should come from the source domain's
    validation split; ``oracle=True`` adds Youden-on-this-set metrics for comparison.
    Labels lacking positives or negatives in a subgroup get None metrics.
    """
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
    subsets: list[tuple[str, np.ndarray | None]] = [("all", None)]
    for name, mask in (groups or {}).items():
        if name == "all":
            raise ValueError('subgroup name "all" is reserved')
        m = np.asarray(mask)
        if m.dtype != bool or m.shape != (n,):
            raise ValueError(f"group {name!r} must be a boolean mask of length {n}")
        subsets.append((str(name), m))

    rows: list[MetricRow] = []
    for name, mask in subsets:
        ss, yy = (s, y) if mask is None else (s[mask], y[mask])
        idx = bootstrap_indices(ss.shape[0], n_boot, subgroup_seed(seed, name))
        rows.extend(_evaluate_subset(ss, yy, thr, label_names, name, idx, ci, oracle))
    return rows


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
        "sex=F": sx == "F",
        "sex=M": sx == "M",
    }
    out = {k: np.asarray(v, dtype=bool) for k, v in out.items()}
    for lo, hi in zip(edges, edges[1:], strict=False):
        with np.errstate(invalid="ignore"):
            out[f"age=[{_fmt_edge(lo)},{_fmt_edge(hi)})"] = (ag >= lo) & (ag < hi)
    return out


# --------------------------------------------------------------------------- paired tests


@dataclass(frozen=True)
class PairedResult:
    """AUC(a) - AUC(b) for one label (or "macro") with a paired bootstrap CI and p-value."""

    label: str
    delta: float | None
    delta_lo: float | None
    delta_hi: float | None
    p_value: float | None
    n: int
    n_pos: int | None

    def as_dict(self) -> dict[str, object]:
        """Plain dict for DataFrame / parquet rows."""
        return dataclasses.asdict(self)


def bootstrap_p_value(deltas: np.ndarray) -> float | None:
    """Two-sided bootstrap p: min(1, 2 * min((#d<=0 + 1), (#d>=0 + 1)) / (B + 1)).

    NaN resamples are dropped first. The +1 keeps p > 0 with finitely many resamples;
    identical models (all deltas 0) give exactly 1.
    """
    d = deltas[~np.isnan(deltas)]
    if d.size == 0:
        return None
    le = (int((d <= 0).sum()) + 1) / (d.size + 1)
    ge = (int((d >= 0).sum()) + 1) / (d.size + 1)
    return float(min(1.0, 2.0 * min(le, ge)))


def paired_auc_difference(
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    labels: np.ndarray,
    idx: np.ndarray,
    ci: float = 0.95,
    *,
    label_names: Sequence[str] | None = None,
) -> list[PairedResult]:
    """Paired bootstrap comparison of two models on the same images, per label and macro.

    Both models are scored on the same resamples ``idx`` so that image-level variation
    cancels. ``label_names`` defaults to "0", "1", ...; the last result is "macro"
    (mean over labels with a defined AUC, ``n`` = images, ``n_pos`` = summed positives).
    """
    sa, y = _check_pair_2d(scores_a, labels)
    sb, _ = _check_pair_2d(scores_b, labels)
    if sa.shape != sb.shape:
        raise ValueError("scores_a and scores_b must have the same shape")
    n, n_lab = sa.shape
    idx = _check_idx(idx, n)
    names = [str(j) for j in range(n_lab)] if label_names is None else list(label_names)
    if len(names) != n_lab:
        raise ValueError(f"need {n_lab} label names, got {len(names)}")
    pa = np.array([auc(sa[:, j], y[:, j]) for j in range(n_lab)])
    pb = np.array([auc(sb[:, j], y[:, j]) for j in range(n_lab)])
    ba = bootstrap_auc(sa, y, idx)
    bb = bootstrap_auc(sb, y, idx)
    n_known = (~np.isnan(y)).sum(axis=0)
    n_pos = (y == 1.0).sum(axis=0)

    def result(label: str, delta: float, d_boot: np.ndarray, nn: int, npos: int) -> PairedResult:
        dv = _opt(delta)
        lo, hi = percentile_ci(d_boot, ci) if dv is not None else (None, None)
        p = bootstrap_p_value(d_boot) if dv is not None else None
        return PairedResult(label, dv, lo, hi, p, int(nn), int(npos))

    out = [
        result(names[j], pa[j] - pb[j], ba[:, j] - bb[:, j], n_known[j], n_pos[j])
        for j in range(n_lab)
    ]
    d_macro = _nanmean(pa) - _nanmean(pb)
    out.append(result("macro", d_macro, _row_nanmean(ba) - _row_nanmean(bb), n, n_pos.sum()))
    return out


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_bt = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    bt = math.exp(log_bt)
    if x < (a + 1.0) / (a + b + 2.0):
        return bt * _betacf(a, b, x) / a
    return 1.0 - bt * _betacf(b, a, 1.0 - x) / b


def _t_two_sided_p(t: float, df: float) -> float:
    """Two-sided Student t tail: P(|T| >= |t|) = I_{df/(df+t^2)}(df/2, 1/2)."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return min(1.0, _betainc(df / 2.0, 0.5, df / (df + t * t)))


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
        t = math.copysign(math.inf, mean)
    else:
        t = mean / (sd / math.sqrt(k))
    return t, _t_two_sided_p(t, k - 1.0)


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
