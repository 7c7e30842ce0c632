"""Per test set: the paired estimates the comparisons are built from.

Each model's AUC and Brier score with its leave-one-patient-out values on the same patients,
the DP-vs-non-DP pairs, the on- to off-domain drops, the fairness gaps, and the reliability
rows; each estimate carries what :mod:`privdom_ray.stats.inference` needs for its interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privdom_ray.config import EvaluationConfig
from privdom_ray.stats import evaluation, inference, metrics, resampling, thresholds
from privdom_ray.stats.quantities import (
    AUC_DROP,
    FAIRNESS_GAP,
    OFF_DOMAIN,
    ON_DOMAIN,
    PAIRED_DELTA,
    PRIMARY_QUANTITY,
    _warn,
)
from privdom_ray.stats.study import ModelInfo, TestSet

# ============================================================================ per test set


@dataclass
class Est:
    """A point value, its leave-one-unit-out values (P,) on one test set (or subgroup) and
    the degrees of freedom of its t rule. Sums, differences and means of Ests on the same
    units combine their leave-one-out values, which keeps the pairing exactly."""

    point: float
    loo: np.ndarray
    df: float

    def __sub__(self, other: Est) -> Est:
        return Est(self.point - other.point, self.loo - other.loo, _min_df(self.df, other.df))

    def infer(
        self,
        ci: float,
        margin: float | None = None,
        worse_if: str | None = None,
        level: bool = False,
    ) -> inference.Inference:
        """CI, p (and TOST) by the jackknife t rule; ``level``: a value in [0, 1] whose CI is
        on the logit scale (no test of it)."""  # fmt: skip
        var = inference.jackknife_variance(self.loo)
        if level:
            lo, hi = inference.level_interval(self.point, var, self.df, ci)
            return inference.Inference(inference.opt(self.point), lo, hi, None, self.loo.size,
                                       df=self.df)  # fmt: skip
        return inference.infer_t(self.point, var, self.df, ci=ci, margin=margin,
                                 worse_if=worse_if, n_units=self.loo.size)  # fmt: skip


@dataclass
class Pooled:
    """k seeds' estimates (k,) and their leave-one-out values on the same patients (k, P):
    the mean over training randomness, inferred by :func:`inference.pool_seeds`."""

    points: np.ndarray
    loos: np.ndarray
    df: float

    def infer(
        self,
        ci: float,
        margin: float | None = None,
        worse_if: str | None = None,
        level: bool = False,
    ) -> inference.Inference:
        if level:  # an AUC or Brier score: on the logit scale, as a single one
            return inference.pool_seeds_level(self.points, self.loos, ci=ci, df_test=self.df)
        return inference.pool_seeds(self.points, self.loos, ci=ci, margin=margin,
                                    worse_if=worse_if, jackknife=True, df_test=self.df)  # fmt: skip


def _mean(ests: Sequence[Est]) -> Est:
    return Est(float(np.mean([e.point for e in ests])), np.mean([e.loo for e in ests], axis=0),
               _min_df(*(e.df for e in ests)))  # fmt: skip


def _min_df(*dfs: float) -> float:
    """The smallest df; NaN (no interval) when any part has none."""
    return float(np.min(dfs))


@dataclass
class _Group:
    """One subgroup of a test set: its label support, the macro's label set ``ok`` and every
    model's AUCs (+ calibration) as Ests: columns = the labels, then the macro (NaN points
    outside the set)."""

    name: str
    mask: np.ndarray
    support: metrics.LabelSupport
    ok: np.ndarray  # (L,) the macro's labels (shared across the subgroup's family)
    n_patients: np.ndarray  # (L + 1,)
    auc: dict[str, list[Est]] = field(default_factory=dict)
    calib: dict[str, dict[str, list[Est]]] = field(default_factory=dict)


def _columns(point: np.ndarray, loo: np.ndarray, df: np.ndarray, sup, ok, p: int) -> list[Est]:
    """Label columns and the macro over ``ok`` of one statistic (NaN outside the support)."""
    pt = np.where(sup.ok, point, np.nan)
    cols = [Est(float(pt[j]), loo[j], float(df[j])) for j in range(pt.size)]
    if not ok.any():
        return [*cols, Est(math.nan, np.full(p, np.nan), math.nan)]
    var = np.array([inference.jackknife_variance(loo[j]) for j in np.flatnonzero(ok)])
    m_df = evaluation.macro_df(var, df[ok], p)
    return [*cols, Est(float(pt[ok].mean()), loo[ok].mean(axis=0), m_df)]


def _subgroup(ts: TestSet, g: _Group, ev: EvaluationConfig, calib: bool) -> _Group:
    """Every model's per-label and macro AUCs (and Brier scores) on one subgroup's units."""
    y = ts.y[g.mask]
    codes, p = metrics.cluster_codes(_units(ts, g.mask), int(g.mask.sum()))
    known = ~np.isnan(y)
    g.n_patients = np.array([*(np.unique(codes[known[:, j]]).size for j in range(y.shape[1])), p])
    for key, scores in ts.scores.items():
        s = scores[g.mask]
        jk = resampling.jackknife_auc(s, y, codes, n_units=p)
        g.auc[key] = _columns(jk.point, jk.loo, jk.df, g.support, g.ok, p)
        if calib and resampling.are_probabilities(s, y):
            sq = np.where(known, (np.nan_to_num(y) - np.where(known, s, 0.0)) ** 2, 0.0)
            num = np.stack([np.bincount(codes, weights=sq[:, j], minlength=p)
                            for j in range(y.shape[1])])  # fmt: skip
            den = np.stack([np.bincount(codes, weights=known[:, j].astype(np.float64),
                                        minlength=p) for j in range(y.shape[1])])  # fmt: skip
            point, loo = resampling.jackknife_ratio(num, den)
            g.calib[key] = {"delta_brier": _columns(point, loo, jk.df, g.support, g.ok, p)}
    return g


def _cells(ts: TestSet, g: _Group) -> list[dict[str, Any]]:
    """Per label column: the row fields describing the cell (n, positives, patients, ...)."""
    y = ts.y[g.mask]
    sup = g.support
    out = []
    for j, label in enumerate([*ts.labels, "macro"]):
        macro = label == "macro"
        reason = sup.reasons[j] if not macro else None
        if macro and not sup.ok.any():
            reason = (
                f"no label has enough positive and negative {ts.unit}s "
                "(evaluation.min_positives, min_negatives)"
            )
        elif macro and not g.ok.any():
            reason = (f"no label is valid in every {metrics.subgroup_family(g.name)} subgroup "
                      "of this test set: no macro to compare side by side")  # fmt: skip
        out.append(
            {
                "label": label,
                "subgroup": g.name,
                "n": int(y.shape[0]) if macro else int(sup.n_known[j]),
                "n_pos": int(sup.n_pos[g.ok].sum()) if macro else int(sup.n_pos[j]),
                "n_patients": int(g.n_patients[j]),
                "resampling_unit": ts.unit,
                "n_labels": int(g.ok.sum()) if macro else int(sup.ok[j]),
                "null_reason": reason,
            }
        )
    return out


@dataclass
class _Item:
    """One per-seed comparison: the DP and non-DP sides (and their difference) with fields."""

    comparison: str
    quantity: str
    seed: int
    fields: dict[str, Any]
    dp: Est | None = None
    nondp: Est | None = None
    off: Est | None = None  # drop rows: the mean off-domain AUC of the DP side

    @property
    def group_key(self) -> tuple:
        f = self.fields
        return (self.comparison, self.quantity, f.get("model"), f.get("source"), f["target"],
                f["label"], f["subgroup"], f["epsilon"])  # fmt: skip

    @property
    def delta(self) -> Est | None:
        if self.dp is None or self.nondp is None:
            return None
        return self.dp - self.nondp


def _model_fields(m: ModelInfo, target: str) -> dict[str, Any]:
    return {
        "model": m.model,
        "source": m.source,
        "target": target,
        "on_domain": target in m.sites,
        "epsilon": m.epsilon,
        "epsilon_spent": m.epsilon_spent if math.isfinite(m.epsilon) else None,
        "accountant": m.accountant if math.isfinite(m.epsilon) else None,
    }


def _nondp_partner(models: Sequence[ModelInfo]) -> dict[str, ModelInfo]:
    """DP model key -> the non-DP model of the same source, seed and architecture."""
    ref = {(m.source, m.seed, m.model): m for m in models if math.isinf(m.epsilon)}
    return {
        m.key: ref[(m.source, m.seed, m.model)]
        for m in models
        if math.isfinite(m.epsilon) and (m.source, m.seed, m.model) in ref
    }


def _paired_items(ts: TestSet, groups: list[_Group], models: list[ModelInfo]) -> list[_Item]:
    partner = _nondp_partner(models)
    items = []
    for dp in sorted(models, key=lambda m: (m.source, m.seed, m.epsilon)):
        ref = partner.get(dp.key)
        if ref is None:
            continue  # non-DP, or no non-DP model of this source and seed on this test set
        base = _model_fields(dp, ts.target)
        for g in groups:
            sides = [("delta_auc", g.auc)]
            if dp.key in g.calib and ref.key in g.calib:
                sides.append(
                    ("delta_brier", {k: g.calib[k]["delta_brier"] for k in (dp.key, ref.key)})
                )
            for j, cell in enumerate(_cells(ts, g)):
                for quantity, per_model in sides:
                    items.append(
                        _Item(PAIRED_DELTA, quantity, dp.seed, {**base, **cell},
                              dp=per_model[dp.key][j], nondp=per_model[ref.key][j])
                    )  # fmt: skip
    return items


@dataclass
class _DropSide:
    """On-domain and off-domain models on test site T for one (epsilon, seed, model)."""

    on: ModelInfo | None = None
    off: list[ModelInfo] = field(default_factory=list)

    def aucs(self, g: _Group, j: int) -> tuple[Est | None, Est | None]:
        on = g.auc[self.on.key][j] if self.on is not None else None
        off = _mean([g.auc[m.key][j] for m in self.off]) if self.off else None
        return on, off


def _drop_sides(ts: TestSet, models: list[ModelInfo]) -> dict[tuple, _DropSide]:
    sides: dict[tuple[float, int, str], _DropSide] = {}
    for m in models:
        if not m.single_site:
            continue  # a federation is neither the target's own model nor an outside one
        side = sides.setdefault((m.epsilon, m.seed, m.model), _DropSide())
        if m.source == ts.target:
            side.on = m
        else:
            side.off.append(m)
    return sides


def _drop_items(ts: TestSet, groups: list[_Group], models: list[ModelInfo]) -> list[_Item]:
    sides = _drop_sides(ts, models)
    items = []
    for (eps, seed, model), side in sorted(sides.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        nondp = sides.get((math.inf, seed, model))
        same_off = nondp is not None and sorted(m.source for m in nondp.off) == sorted(
            m.source for m in side.off
        )
        if nondp is not None and math.isfinite(eps) and not same_off:
            _warn(
                f"AUC drop on {ts.target} (seed {seed}, epsilon {eps:g}): the off-domain "
                f"sources differ between DP {sorted(m.source for m in side.off)} and non-DP "
                f"{sorted(m.source for m in nondp.off)}; DP-vs-non-DP difference left null"
            )
        base = {"model": model, "target": ts.target, "epsilon": eps, "n_off": len(side.off),
                "epsilon_spent": side.on.epsilon_spent if side.on and math.isfinite(eps) else None,
                "accountant": side.on.accountant if side.on and math.isfinite(eps) else None}  # fmt: skip
        for g in groups:
            for j, cell in enumerate(_cells(ts, g)):
                items += _drop_cell(side, nondp, same_off, g, j, {**base, **cell}, seed)
    return items


def _drop_cell(
    side: _DropSide, nondp: _DropSide | None, same_off: bool, g: _Group, j: int, fields, seed
) -> list[_Item]:
    """The drop rows of one (test site, epsilon, seed, subgroup, label column): each model's
    own drop, and its on-domain and off-domain parts."""
    on, off = side.aucs(g, j)
    drop = on - off if on is not None and off is not None else None
    if math.isinf(fields["epsilon"]):
        row = {**fields, "auc_on": on.point if on else None}
        return [_Item(AUC_DROP, PRIMARY_QUANTITY, seed, row, nondp=drop, off=off)]
    if nondp is None:
        row = {**fields, "auc_on": on.point if on else None}
        return [_Item(AUC_DROP, PRIMARY_QUANTITY, seed, row, dp=drop, off=off)]
    ref_on, ref_off = nondp.aucs(g, j)
    off_fields = dict(fields)
    if not same_off:  # the on-domain difference stands: only the off-domain side is unpaired
        off_fields["null_reason"] = ("the off-domain sources of the DP and non-DP drops "
                                     "differ (a missing evaluation): no DP-vs-non-DP "
                                     "difference of the off-domain mean or the drop")  # fmt: skip
        ref_off = None
    ref = ref_on - ref_off if ref_on is not None and ref_off is not None else None
    row = {**fields, "auc_on": on.point if on else None}
    row["null_reason"] = off_fields.get("null_reason") or _missing_side(drop, ref, fields)
    on_fields = {**fields, "null_reason": fields.get("null_reason")
                 or _missing_side(on, ref_on, fields, "on-domain AUC")}  # fmt: skip
    return [
        _Item(AUC_DROP, PRIMARY_QUANTITY, seed, row, dp=drop, nondp=ref, off=off),
        _Item(AUC_DROP, ON_DOMAIN, seed, on_fields, dp=on, nondp=ref_on),
        _Item(AUC_DROP, OFF_DOMAIN, seed, off_fields, dp=off, nondp=ref_off),
    ]


def _missing_side(dp: Est | None, nondp: Est | None, fields, what: str = "") -> str | None:
    """Why a drop row's DP-vs-non-DP difference is null when one side has no value (an
    evaluation it needs, the site's own model's or an outside one's, is missing)."""
    gone = [name for name, e in (("DP", dp), ("non-DP", nondp)) if e is None]
    if not gone:
        return None
    return (f"no {' or '.join(gone)} {what or 'AUC drop'} on {fields['target']} (an "
            "evaluation it needs is missing, e.g. the site's own model's): no DP-vs-non-DP "
            "difference")  # fmt: skip


def _gap_pairs(age_bins: Sequence[float]) -> dict[str, tuple[str, str]]:
    """Quantity -> (subgroup a, subgroup b) of the gap a - b: female - male, oldest -
    youngest age bin (the grid's first and last bins)."""
    names = [k for k in evaluation.subgroup_masks([], [], age_bins) if k.startswith("age=")]
    return {"auc_gap_sex": ("sex=F", "sex=M"), "auc_gap_age": (names[-1], names[0])}


def _gap_items(ts: TestSet, models: list[ModelInfo], ev: EvaluationConfig) -> list[_Item]:
    """Macro AUC gaps per model with both subgroups on the test set's patients JOINTLY (one
    jackknife over every patient), and DP's effect on the gap vs its non-DP partner."""
    masks = evaluation.subgroup_masks(ts.sex, ts.age, ev.age_bins)
    codes, p = metrics.cluster_codes(ts.clusters, len(ts.y))
    partner = _nondp_partner(models)
    items = []
    for quantity, (a, b) in _gap_pairs(ev.age_bins).items():
        ma, mb = masks[a], masks[b]
        ok = (
            metrics.label_support(ts.y[ma], ev.min_positives, ev.min_negatives, _units(ts, ma)).ok
            & metrics.label_support(ts.y[mb], ev.min_positives, ev.min_negatives, _units(ts, mb)).ok
        )
        gaps = {m.key: _gap(ts, m.key, (codes, p), (ma, mb), ok) for m in models
                if m.key in ts.scores}  # fmt: skip
        cell = {"label": "macro", "subgroup": f"{a} - {b}", "n": int((ma | mb).sum()),
                "n_patients": int(np.unique(codes[ma | mb]).size),
                "resampling_unit": ts.unit, "n_labels": int(ok.sum()),
                "null_reason": None if ok.any() else f"no label has enough positive and "
                f"negative {ts.unit}s in both {a} and {b}"}  # fmt: skip
        for m in models:
            if m.key not in gaps:
                continue
            fields = {**_model_fields(m, ts.target), **cell}
            if math.isinf(m.epsilon):
                items.append(_Item(FAIRNESS_GAP, quantity, m.seed, fields, nondp=gaps[m.key]))
            elif m.key in partner and partner[m.key].key in gaps:
                ref = gaps[partner[m.key].key]
                items.append(_Item(FAIRNESS_GAP, quantity, m.seed, fields, gaps[m.key], ref))
    return items


def _gap(ts: TestSet, key: str, units: tuple, masks: tuple, ok: np.ndarray) -> Est:
    """Macro AUC(a) - macro AUC(b) over the labels ``ok`` of both, each subgroup's AUCs with
    leave-one-out values over ALL the test set's units (a unit outside a subgroup leaves its
    AUC unchanged), so the two sides are differenced patient by patient."""
    codes, p = units
    sides = []
    for mask in masks:
        s, y = ts.scores[key][mask], ts.y[mask]
        jk = resampling.jackknife_auc(s, y, codes[mask], n_units=p)
        sup = metrics.label_support(y, 1, 1)
        sides.append(_columns(jk.point, jk.loo, jk.df, sup, ok, p)[-1])
    return sides[0] - sides[1]


def _reliability_rows(ts: TestSet, models: list[ModelInfo], bins: int) -> list[dict[str, Any]]:
    """Reliability-diagram bins per model: aggregates of test predictions only."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    for m in models:
        s = ts.scores.get(m.key)
        if s is None or not resampling.are_probabilities(s, ts.y):
            continue
        n, ssum, pos = thresholds.reliability_bins(s, ts.y, bins)
        per = {lab: (n[j], ssum[j], pos[j]) for j, lab in enumerate(ts.labels)}
        per["pooled"] = (n.sum(axis=0), ssum.sum(axis=0), pos.sum(axis=0))
        for label, (cnt, tot, npos) in per.items():
            for k in range(bins):
                rows.append({
                    "model": m.model, "source": m.source, "target": ts.target,
                    "on_domain": ts.target in m.sites, "seed": m.seed, "epsilon": m.epsilon,
                    "label": label, "bin": k, "bin_lo": edges[k], "bin_hi": edges[k + 1],
                    "n": int(cnt[k]),
                    "mean_score": tot[k] / cnt[k] if cnt[k] else None,
                    "observed": npos[k] / cnt[k] if cnt[k] else None,
                })  # fmt: skip
    return rows


def _units(ts: TestSet, mask: np.ndarray) -> np.ndarray | None:
    """The patient of each row of ``mask`` (None: the test set is resampled by image)."""
    return None if ts.clusters is None else ts.clusters[mask]


def _test_set_items(ts: TestSet, models: dict[str, ModelInfo], ev: EvaluationConfig):
    """Every per-seed comparison item of one test set (all models on the same units). A
    subgroup's macro averages the labels valid in every subgroup of its family, as the
    transfer table's (``metrics.shared_label_sets``)."""
    members = [models[k] for k in ts.scores]
    masks = {"all": np.ones(len(ts.y), dtype=bool)}
    masks.update(evaluation.subgroup_masks(ts.sex, ts.age, ev.age_bins))
    support = {name: metrics.label_support(ts.y[m], ev.min_positives, ev.min_negatives,
                                           _units(ts, m)) for name, m in masks.items()}  # fmt: skip
    shared = metrics.shared_label_sets({name: sup.ok for name, sup in support.items()})
    groups = [
        _subgroup(ts, _Group(name, mask, support[name],
                             support[name].ok if name == "all" else shared[name],
                             np.zeros(0)), ev, calib=name == "all")
        for name, mask in masks.items()
    ]  # fmt: skip
    items = _paired_items(ts, groups, members) + _drop_items(ts, groups, members)
    items += _gap_items(ts, members, ev)
    return items, _reliability_rows(ts, members, ev.calibration_bins)
