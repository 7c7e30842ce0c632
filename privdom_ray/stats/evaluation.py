"""One test set's metric rows: per label, macro and subgroup, with jackknife t intervals.

:func:`evaluate` turns a model's scores on one test set into :class:`MetricRow` objects (the
transfer table's metric columns); :func:`subgroup_masks` names the sex and age subgroups;
:func:`paired_auc_difference` and :func:`paired_t_test` compare two models on the same patients.
Conventions as in :mod:`privdom_ray.stats.metrics`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from privdom_ray.stats.inference import (
    RELIABLE_UNITS,
    infer_t,
    jackknife_variance,
    level_interval,
    opt,
    t_two_sided_p,
)
from privdom_ray.stats.metrics import (
    CALIBRATION_BINS,
    LabelSupport,
    _check_pair_2d,
    cluster_codes,
    label_support,
    shared_label_sets,
    subgroup_family,
)
from privdom_ray.stats.resampling import (
    _linear_columns,
    _per_patient,
    are_probabilities,
    jackknife_auc,
    jackknife_ratio,
)
from privdom_ray.stats.thresholds import calibration, threshold_metrics, youden_threshold

__all__ = [
    "MetricRow",
    "PairedResult",
    "evaluate",
    "paired_auc_difference",
    "paired_t_test",
    "subgroup_masks",
]


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
