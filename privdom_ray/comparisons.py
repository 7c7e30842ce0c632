"""DP-vs-non-DP comparisons from the per-image predictions of finished trials.

The transfer table holds one AUC per (trial, target, label, subgroup) with its own bootstrap
CI; it cannot say whether two models differ, because their CIs are not independent (same
test images). This module goes back to the predictions kept in each trial folder and
compares models *on the same resamples* of the same test set:

``paired_delta``
    every finite-epsilon model vs the ``inf`` (non-DP) model of the same source and seed,
    on the same target: ``delta_auc = AUC(dp) - AUC(non-DP)``, percentile CI and two-sided
    bootstrap p-value. Identical to :func:`privdom_ray.metrics.paired_auc_difference`
    (the tests check this bit for bit) but each model's resample AUCs are computed once and
    shared by every comparison that uses that model.
``auc_drop``
    the paper's "AUC drop" per test site T (see :data:`DROP_DEFINITIONS`), with a bootstrap
    CI over T's test images, and for DP rows its paired difference to the non-DP drop.
``across_seeds``
    mean and SD over seeds of both sides of every ``paired_delta`` / ``auc_drop`` row and a
    paired Student t test across seeds (:func:`privdom_ray.metrics.paired_t_test`), which is
    the test the paper reports. With one seed, SD, t and p are null and ``n_seeds`` says so.

Resamples: within test set T and subgroup g, every model uses
``bootstrap_indices(n_g, n_boot, subgroup_seed(seed, g))``, the same indices
``metrics.evaluate`` used for the transfer table's CIs. A subgroup is resampled within itself.

Models are paired only on the same target *fingerprint* (same test rows in the same order),
and their labels are checked to be identical; a mismatch skips the model with a
:class:`ComparisonWarning`. Only finished trials (``done``) and complete evaluations
(``eval.json`` present) are read. The table is an aggregate: no ids, paths or per-image rows.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from privdom_ray import metrics, results
from privdom_ray.grid import EvaluationConfig, parse_epsilon

COMPARISONS = "comparisons.parquet"

PAIRED_DELTA = "paired_delta"
AUC_DROP = "auc_drop"
ACROSS_SEEDS = "across_seeds"

DROP_DEFINITIONS = {
    "drop": (
        "AUC_eps(T->T) - mean_{S != T} AUC_eps(S->T): on-domain AUC of the model trained on "
        "test site T minus the mean AUC on T of the models trained on the other sources, all "
        "at the row's epsilon (same-epsilon drop; at epsilon = inf this is the non-DP drop)"
    ),
    "drop_vs_nondp_ondomain": (
        "AUC_inf(T->T) - mean_{S != T} AUC_eps(S->T): the NON-DP on-domain AUC minus the mean "
        "DP off-domain AUC at the row's epsilon; the 'DP' number of the paper's abstract "
        "('0.07 vs 0.07'), whose non-DP counterpart is drop at epsilon = inf"
    ),
}

_TESTS = {
    "bootstrap": "paired bootstrap (shared resamples of the test set)",
    "t": "paired Student t test across seeds",
}  # across_seeds rows with fewer than 2 paired seeds (or epsilon = inf) have test = null

# Columns of comparisons.parquet, in order (documented in the README).
SCHEMA = pa.schema(
    [
        ("comparison", pa.string()),
        ("quantity", pa.string()),
        ("test", pa.string()),
        ("model", pa.string()),
        ("source", pa.string()),
        ("target", pa.string()),
        ("on_domain", pa.bool_()),
        ("seed", pa.int64()),
        ("n_seeds", pa.int64()),
        ("label", pa.string()),
        ("subgroup", pa.string()),
        ("epsilon", pa.float64()),
        ("epsilon_spent", pa.float64()),
        ("accountant", pa.string()),
        ("n", pa.int64()),
        ("n_pos", pa.int64()),
        ("auc_dp", pa.float64()),
        ("auc_nondp", pa.float64()),
        ("auc_on", pa.float64()),
        ("auc_off_mean", pa.float64()),
        ("auc_off_lo", pa.float64()),
        ("auc_off_hi", pa.float64()),
        ("n_off", pa.int64()),
        ("drop", pa.float64()),
        ("drop_lo", pa.float64()),
        ("drop_hi", pa.float64()),
        ("drop_nondp", pa.float64()),
        ("delta_auc", pa.float64()),
        ("delta_lo", pa.float64()),
        ("delta_hi", pa.float64()),
        ("p_value", pa.float64()),
        ("t_stat", pa.float64()),
        ("mean_dp", pa.float64()),
        ("sd_dp", pa.float64()),
        ("mean_nondp", pa.float64()),
        ("sd_nondp", pa.float64()),
        ("delta_sd", pa.float64()),
        ("n_boot", pa.int64()),
        ("ci", pa.float64()),
    ]
)

# What each column means (the README's schema table is generated from / checked against this).
COLUMNS = {
    "comparison": "row kind: paired_delta, auc_drop or across_seeds",
    "quantity": "what is compared: delta_auc (paired_delta), drop or drop_vs_nondp_ondomain "
    "(auc_drop, see DROP_DEFINITIONS); across_seeds rows repeat the quantity they summarise",
    "test": "how p_value was obtained: paired bootstrap, paired Student t test across seeds, "
    "or null (nothing tested)",
    "model": "network architecture of the compared trials",
    "source": "training site of both models (paired_delta); null for auc_drop",
    "target": "test site (its test split, one fingerprint)",
    "on_domain": "the target's data trained the model: source == target, or the target is a "
    "member site of the federation (paired_delta); null for auc_drop",
    "seed": "training seed shared by the DP and non-DP models; null for across_seeds",
    "n_seeds": "seeds behind the row: 1 for per-seed rows, paired seeds used for across_seeds",
    "label": "one of the five labels, or macro (mean over labels with a defined AUC)",
    "subgroup": "all, sex=F, sex=M, age=[lo,hi): images of the test set in the subgroup",
    "epsilon": "target epsilon of the DP side; inf only on auc_drop rows of the non-DP drop",
    "epsilon_spent": "epsilon spent by the DP model (paired_delta: the source's DP model; "
    "auc_drop: the DP model trained on the test site); across_seeds: mean over seeds",
    "accountant": "accountant that produced epsilon_spent (prv, rdp; none for non-DP)",
    "n": "test images with a known label (per label) or in the subgroup (macro)",
    "n_pos": "positives (per label) or positive image-label pairs summed over labels (macro)",
    "auc_dp": "AUC of the DP model (paired_delta)",
    "auc_nondp": "AUC of the non-DP model of the same source and seed (paired_delta)",
    "auc_on": "auc_drop: on-domain AUC used in the quantity (the test site's own model, at the "
    "row's epsilon for drop, non-DP for drop_vs_nondp_ondomain)",
    "auc_off_mean": "auc_drop: mean AUC on the test site of the models trained on the other "
    "sources, at the row's epsilon",
    "auc_off_lo": "lower bootstrap CI bound of auc_off_mean",
    "auc_off_hi": "upper bootstrap CI bound of auc_off_mean",
    "n_off": "auc_drop: number of other sources averaged in auc_off_mean",
    "drop": "auc_drop: the quantity's value, auc_on - auc_off_mean",
    "drop_lo": "lower bootstrap CI bound of drop",
    "drop_hi": "upper bootstrap CI bound of drop",
    "drop_nondp": "auc_drop: the non-DP drop (epsilon = inf) of the same site, seed, label and "
    "subgroup; null when the off-domain sources differ from the DP row's",
    "delta_auc": "DP minus non-DP: auc_dp - auc_nondp (paired_delta), drop - drop_nondp "
    "(auc_drop); across_seeds: mean over seeds of the per-seed differences",
    "delta_lo": "lower paired-bootstrap CI bound of delta_auc (per-seed rows)",
    "delta_hi": "upper paired-bootstrap CI bound of delta_auc (per-seed rows)",
    "p_value": "two-sided p of delta_auc = 0: paired bootstrap (per-seed rows) or paired t "
    "test across seeds (across_seeds, needs >= 2 seeds)",
    "t_stat": "across_seeds: paired t statistic",
    "mean_dp": "across_seeds: mean over seeds of the DP side (auc_dp or drop)",
    "sd_dp": "across_seeds: SD (ddof=1) over seeds of the DP side; null with < 2 seeds",
    "mean_nondp": "across_seeds: mean over seeds of the non-DP side (auc_nondp or drop_nondp)",
    "sd_nondp": "across_seeds: SD over seeds of the non-DP side; null with < 2 seeds",
    "delta_sd": "across_seeds: SD over seeds of the per-seed differences",
    "n_boot": "bootstrap resamples per test set and subgroup",
    "ci": "confidence level of the bootstrap intervals",
}

_DEFAULT = EvaluationConfig()


class ComparisonWarning(UserWarning):
    """A model or evaluation was left out of a comparison (and why)."""


def _warn(msg: str) -> None:
    warnings.warn(msg, ComparisonWarning, stacklevel=3)


# ------------------------------------------------------------------------------ trial records


@dataclass
class _Trial:
    key: str
    source: str
    epsilon: float
    seed: int
    model: str
    epsilon_spent: float | None
    accountant: str | None
    # the domains whose data trained the model: (source,), or a federation's sites
    sites: tuple[str, ...] = ()
    evals: dict[tuple[str, str], Path] = field(default_factory=dict)  # (target, fp) -> folder

    @property
    def cell(self) -> tuple[str, float, int, str]:
        return (self.source, self.epsilon, self.seed, self.model)


def _float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_epsilon(value)
    return float(value)


def _training_sites(spec: dict[str, Any]) -> tuple[str, ...]:
    fed = spec.get("federation")
    if not fed:
        return (str(spec["source"]),)
    return tuple(s["name"] for s in fed["sites"] if s["weight"] > 0)


def _load_trials(output: Path, keys: Sequence[str]) -> list[_Trial]:
    """Finished trials of ``keys`` with their complete evaluations; one trial per cell."""
    trials: dict[tuple, _Trial] = {}
    for key in sorted(dict.fromkeys(keys)):
        tdir = results.trial_dir(output, key)
        if not results.is_trained(tdir):
            continue
        spec = results.read_json(tdir / "trial.json")["spec"]
        if spec.get("variant", "standard") != "standard":
            continue  # controls (clip-only) are not the non-DP baseline of any comparison
        ledger = results.read_json(tdir / "ledger.json")
        trial = _Trial(
            key=spec.get("key", key),
            source=str(spec["source"]),
            epsilon=parse_epsilon(spec["epsilon"]),
            seed=int(spec["seed"]),
            model=str(spec.get("model", "")),
            epsilon_spent=_float(ledger.get("epsilon_spent")),
            accountant=ledger.get("accountant"),
            sites=_training_sites(spec),
        )
        for edir in sorted((tdir / "eval").glob("*")):
            if edir.is_dir() and results.is_evaluated(edir):
                ev = results.read_json(edir / "eval.json")
                trial.evals[(str(ev["target"]), str(ev["fingerprint"]))] = edir
        if trial.cell in trials:
            _warn(
                f"trials {trials[trial.cell].key} and {trial.key} are the same cell "
                f"(source, epsilon, seed, model) = {trial.cell}; using {trials[trial.cell].key}"
            )
            continue
        trials[trial.cell] = trial
    return list(trials.values())


# ------------------------------------------------------------------------------ predictions


@dataclass
class _Predictions:
    labels: tuple[str, ...]
    scores: np.ndarray  # (n, L) float64
    y: np.ndarray  # (n, L) float64, NaN = unknown
    sex: np.ndarray
    age: np.ndarray


def _read_predictions(edir: Path) -> _Predictions:
    df = pd.read_parquet(edir / "predictions.parquet")
    if "row" in df.columns and not np.array_equal(df["row"].to_numpy(), np.arange(len(df))):
        df = df.sort_values("row", kind="stable")
    labels = tuple(c[len("score_") :] for c in df.columns if c.startswith("score_"))
    return _Predictions(
        labels=labels,
        scores=df[[f"score_{lab}" for lab in labels]].to_numpy(dtype=np.float64),
        y=df[[f"label_{lab}" for lab in labels]].to_numpy(dtype=np.float64),
        sex=df["sex"].to_numpy(dtype=object) if "sex" in df else np.full(len(df), "", object),
        age=df["age"].to_numpy(dtype=np.float64) if "age" in df else np.full(len(df), np.nan),
    )


@dataclass
class _Aucs:
    """One model on one (target, subgroup): point and resample AUCs, macro in the last column."""

    point: np.ndarray  # (L + 1,)
    boot: np.ndarray  # (B, L + 1)


def _with_macro(point: np.ndarray, boot: np.ndarray) -> _Aucs:
    """Append the macro column: mean over labels with a defined AUC (as metrics does)."""
    ok = ~np.isnan(point)
    p_macro = float(point[ok].mean()) if ok.any() else math.nan
    bok = ~np.isnan(boot)
    cnt = bok.sum(axis=1)
    tot = np.where(bok, boot, 0.0).sum(axis=1)
    b_macro = np.full(boot.shape[0], np.nan)
    np.divide(tot, cnt, out=b_macro, where=cnt > 0)
    return _Aucs(np.append(point, p_macro), np.column_stack([boot, b_macro]))


def _opt(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _summary(point: float, boot: np.ndarray, ci: float, *, p: bool) -> tuple:
    """(value, lo, hi[, p]) of one bootstrapped quantity; all None when the value is undefined."""
    v = _opt(point)
    if v is None:
        return (None, None, None, None) if p else (None, None, None)
    lo, hi = metrics.percentile_ci(boot, ci) if boot.size else (None, None)
    if not p:
        return v, lo, hi
    return v, lo, hi, metrics.bootstrap_p_value(boot) if boot.size else None


# ------------------------------------------------------------------------------ compute


def compute(
    output: Path,
    keys: Sequence[str],
    *,
    n_boot: int = _DEFAULT.n_boot,
    seed: int = _DEFAULT.seed,
    ci: float = _DEFAULT.ci,
    age_bins: Sequence[float] = _DEFAULT.age_bins,
) -> pd.DataFrame:
    """All comparison rows (paired_delta, auc_drop, across_seeds) of the finished trials ``keys``.

    ``n_boot``, ``seed``, ``ci`` and ``age_bins`` should be the grid's evaluation settings,
    so that the resamples coincide with the ones behind the transfer table's CIs.
    """
    output = Path(output)
    trials = _load_trials(output, keys)
    by_target: dict[str, Counter] = defaultdict(Counter)
    for t in trials:
        for target, fp in t.evals:
            by_target[target][fp] += 1
    rows: list[dict[str, Any]] = []
    for target in sorted(by_target):
        counts = by_target[target]
        fp = sorted(counts, key=lambda f: (-counts[f], f))[0]
        if len(counts) > 1:
            others = ", ".join(f for f in sorted(counts) if f != fp)
            _warn(
                f"target {target!r} was evaluated on several test sets; comparing on "
                f"fingerprint {fp} ({counts[fp]} models), ignoring {others}"
            )
        members = [t for t in trials if (target, fp) in t.evals]
        rows.extend(_target_rows(target, fp, members, n_boot, seed, ci, age_bins))
    return _frame(rows + _across_seeds(rows))


def _target_rows(
    target: str,
    fp: str,
    members: list[_Trial],
    n_boot: int,
    seed: int,
    ci: float,
    age_bins: Sequence[float],
) -> list[dict[str, Any]]:
    """paired_delta and auc_drop rows of one test set (every model on it shares resamples)."""
    preds: dict[str, _Predictions] = {}
    ref: _Predictions | None = None
    for t in members:
        p = _read_predictions(t.evals[(target, fp)])
        if ref is None:
            ref = p
        elif p.labels != ref.labels or p.y.shape != ref.y.shape:
            _warn(
                f"trial {t.key} on {target}-{fp}: labels {p.labels} / n={len(p.y)} differ "
                f"from {ref.labels} / n={len(ref.y)}; left out of the comparisons"
            )
            continue
        elif not np.array_equal(p.y, ref.y, equal_nan=True):
            _warn(
                f"trial {t.key} on {target}-{fp}: the test labels differ from the other models' "
                "on the same fingerprint; left out of the comparisons"
            )
            continue
        preds[t.key] = p
    if ref is None:
        return []
    members = [t for t in members if t.key in preds]
    col_names = [*ref.labels, "macro"]
    groups: dict[str, np.ndarray | None] = {"all": None}
    groups.update(metrics.subgroup_masks(ref.sex, ref.age, age_bins))

    # resample AUCs of every model on every subgroup, computed once
    aucs: dict[tuple[str, str], _Aucs] = {}
    counts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    n_lab = len(ref.labels)
    for g, mask in groups.items():
        yy = ref.y if mask is None else ref.y[mask]
        m = yy.shape[0]
        n_known = (~np.isnan(yy)).sum(axis=0)
        n_pos = (yy == 1.0).sum(axis=0)
        counts[g] = (np.append(n_known, m), np.append(n_pos, n_pos.sum()))
        idx = metrics.bootstrap_indices(m, n_boot, metrics.subgroup_seed(seed, g)) if m else None
        for t in members:
            ss = preds[t.key].scores if mask is None else preds[t.key].scores[mask]
            point = np.array([metrics.auc(ss[:, j], yy[:, j]) for j in range(n_lab)])
            if idx is None or n_boot == 0:
                boot = np.full((n_boot, n_lab), np.nan)
            else:
                boot = metrics.bootstrap_auc(ss, yy, idx)
            aucs[(t.key, g)] = _with_macro(point, boot)
        del idx

    common = {"target": target, "n_boot": int(n_boot), "ci": float(ci), "n_seeds": 1}
    rows = _paired_rows(members, aucs, counts, groups, col_names, ci, common)
    rows += _drop_rows(target, members, aucs, counts, groups, col_names, ci, common)
    return rows


def _paired_rows(members, aucs, counts, groups, col_names, ci, common) -> list[dict[str, Any]]:
    target = common["target"]
    nondp = {(t.source, t.seed, t.model): t for t in members if math.isinf(t.epsilon)}
    rows = []
    for dp in sorted(members, key=lambda t: (t.source, t.seed, t.epsilon)):
        if math.isinf(dp.epsilon):
            continue
        ref = nondp.get((dp.source, dp.seed, dp.model))
        if ref is None:
            continue  # no non-DP model of this source and seed evaluated on this test set
        for g in groups:
            a, b = aucs[(dp.key, g)], aucs[(ref.key, g)]
            n, n_pos = counts[g]
            for j, label in enumerate(col_names):
                delta, lo, hi, p = _summary(
                    a.point[j] - b.point[j], a.boot[:, j] - b.boot[:, j], ci, p=True
                )
                rows.append(
                    {
                        **common,
                        "comparison": PAIRED_DELTA,
                        "quantity": "delta_auc",
                        "test": _TESTS["bootstrap"],
                        "model": dp.model,
                        "source": dp.source,
                        "on_domain": target in dp.sites,
                        "seed": dp.seed,
                        "label": label,
                        "subgroup": g,
                        "epsilon": dp.epsilon,
                        "epsilon_spent": dp.epsilon_spent,
                        "accountant": dp.accountant,
                        "n": int(n[j]),
                        "n_pos": int(n_pos[j]),
                        "auc_dp": _opt(a.point[j]),
                        "auc_nondp": _opt(b.point[j]),
                        "delta_auc": delta,
                        "delta_lo": lo,
                        "delta_hi": hi,
                        "p_value": p,
                    }
                )
    return rows


@dataclass
class _DropSide:
    """On-domain and off-domain AUCs on test site T for one (epsilon, seed, model)."""

    on: _Trial | None
    off: list[_Trial]


def _drop_rows(
    target, members, aucs, counts, groups, col_names, ci, common
) -> list[dict[str, Any]]:
    sides: dict[tuple[float, int, str], _DropSide] = {}
    for t in members:
        if t.sites != (t.source,):
            continue  # a federation is neither the target's own model nor an outside one
        side = sides.setdefault((t.epsilon, t.seed, t.model), _DropSide(None, []))
        if t.source == target:
            side.on = t
        else:
            side.off.append(t)
    rows = []
    for (eps, seed, model), side in sorted(sides.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        nondp = sides.get((math.inf, seed, model))
        same_off = nondp is not None and sorted(t.source for t in nondp.off) == sorted(
            t.source for t in side.off
        )
        if nondp is not None and not math.isinf(eps) and not same_off:
            _warn(
                f"AUC drop on {target} (seed {seed}, epsilon {eps:g}): the off-domain sources "
                f"differ between DP {sorted(t.source for t in side.off)} and non-DP "
                f"{sorted(t.source for t in nondp.off)}; DP-vs-non-DP difference left null"
            )
        for g in groups:
            n, n_pos = counts[g]
            on, off_p, off_b = _side_aucs(side, aucs, g)
            quantities = [("drop", on)]
            if nondp is not None and not math.isinf(eps):
                quantities.append(("drop_vs_nondp_ondomain", _side_aucs(nondp, aucs, g)[0]))
            ref = None
            if nondp is not None:
                ref_on, ref_off_p, ref_off_b = _side_aucs(nondp, aucs, g)
                if ref_on is not None and ref_off_p is not None:
                    ref = (ref_on.point - ref_off_p, ref_on.boot - ref_off_b)
            for quantity, on_aucs in quantities:
                for j, label in enumerate(col_names):
                    row = {
                        **common,
                        "comparison": AUC_DROP,
                        "quantity": quantity,
                        "test": _TESTS["bootstrap"],
                        "model": model,
                        "seed": seed,
                        "label": label,
                        "subgroup": g,
                        "epsilon": eps,
                        "epsilon_spent": side.on.epsilon_spent if side.on else None,
                        "accountant": side.on.accountant if side.on else None,
                        "n": int(n[j]),
                        "n_pos": int(n_pos[j]),
                        "n_off": len(side.off),
                        "auc_on": _opt(on_aucs.point[j]) if on_aucs else None,
                    }
                    if off_p is not None:
                        row["auc_off_mean"], row["auc_off_lo"], row["auc_off_hi"] = _summary(
                            off_p[j], off_b[:, j], ci, p=False
                        )
                    if on_aucs is None or off_p is None:
                        rows.append(row)
                        continue
                    d_point = on_aucs.point[j] - off_p[j]
                    d_boot = on_aucs.boot[:, j] - off_b[:, j]
                    row["drop"], row["drop_lo"], row["drop_hi"] = _summary(
                        d_point, d_boot, ci, p=False
                    )
                    if ref is not None and (math.isinf(eps) or same_off):
                        row["drop_nondp"] = _opt(ref[0][j])
                        if not math.isinf(eps):
                            (
                                row["delta_auc"],
                                row["delta_lo"],
                                row["delta_hi"],
                                row["p_value"],
                            ) = _summary(d_point - ref[0][j], d_boot - ref[1][:, j], ci, p=True)
                    rows.append(row)
    return rows


def _side_aucs(side: _DropSide, aucs, g: str):
    """(on-domain _Aucs or None, mean off-domain point (L+1,) or None, its resamples)."""
    on = aucs[(side.on.key, g)] if side.on is not None else None
    if not side.off:
        return on, None, None
    off = [aucs[(t.key, g)] for t in side.off]
    return on, np.mean([a.point for a in off], axis=0), np.mean([a.boot for a in off], axis=0)


# ------------------------------------------------------------------------------ across seeds


def _across_seeds(per_seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean/SD over seeds and a paired t test across seeds, for every per-seed quantity.

    Pairs are (DP value, non-DP value) of the same seed: (auc_dp, auc_nondp) for
    paired_delta, (drop, drop_nondp) for auc_drop. Seeds where either side is null are left
    out, and ``n_seeds`` counts the seeds used. Rows of the non-DP drop itself
    (epsilon = inf) summarise that one side (mean_nondp, sd_nondp) with nothing to test.
    """
    keys = ("comparison", "quantity", "model", "source", "target", "label", "subgroup", "epsilon")
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in per_seed:
        groups[tuple(r.get(k) for k in keys)].append(r)
    out = []
    for key in sorted(groups, key=lambda k: tuple("" if v is None else str(v) for v in k)):
        grp = sorted(groups[key], key=lambda r: r["seed"])
        info = dict(zip(keys, key, strict=True))
        dp_col, nd_col = (
            ("auc_dp", "auc_nondp")
            if info["comparison"] == PAIRED_DELTA
            else ("drop", "drop_nondp")
        )
        is_nondp = math.isinf(info["epsilon"])
        used = [
            r
            for r in grp
            if _opt(r.get(nd_col)) is not None and (is_nondp or _opt(r.get(dp_col)) is not None)
        ]
        k_seeds = len(used)
        y = np.array([r[nd_col] for r in used], dtype=float)
        spent = [r["epsilon_spent"] for r in used if r.get("epsilon_spent") is not None]
        first = grp[0]
        row = {
            **info,
            "comparison": ACROSS_SEEDS,
            "test": _TESTS["t"] if not is_nondp and k_seeds >= 2 else None,
            "on_domain": first.get("on_domain"),
            "n_seeds": k_seeds,
            "epsilon_spent": float(np.mean(spent)) if spent else None,
            "accountant": ",".join(
                sorted({str(r["accountant"]) for r in grp if r.get("accountant")})
            )
            or None,
            "n": first.get("n"),
            "n_pos": first.get("n_pos"),
            "n_boot": first.get("n_boot"),
            "ci": first.get("ci"),
            "mean_nondp": float(y.mean()) if k_seeds else None,
            "sd_nondp": float(y.std(ddof=1)) if k_seeds >= 2 else None,
        }
        if not is_nondp and k_seeds:
            x = np.array([r[dp_col] for r in used], dtype=float)
            d = x - y
            row.update(
                mean_dp=float(x.mean()),
                sd_dp=float(x.std(ddof=1)) if k_seeds >= 2 else None,
                delta_auc=float(d.mean()),
                delta_sd=float(d.std(ddof=1)) if k_seeds >= 2 else None,
            )
            if k_seeds >= 2:
                t, p = metrics.paired_t_test(x, y)
                row.update(t_stat=_opt(t), p_value=_opt(p))
        out.append(row)
    return out


# ------------------------------------------------------------------------------ table


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows -> DataFrame with exactly SCHEMA's columns and types (nulls where not applicable)."""
    clean = [{k: _py(v) for k, v in row.items()} for row in rows]
    table = pa.Table.from_pylist(clean, schema=SCHEMA) if rows else SCHEMA.empty_table()
    return table.to_pandas(types_mapper=_NULLABLE.get)


_NULLABLE = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}


def _py(v: Any) -> Any:
    """numpy / pandas scalars -> plain Python, NaN / NA -> None (a null in parquet)."""
    if v is None or v is pd.NA:
        return None
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def write(output: Path, df: pd.DataFrame) -> Path:
    """Write ``<output>/comparisons.parquet`` atomically with the documented schema."""
    path = Path(output) / COMPARISONS
    df = df.loc[:, SCHEMA.names]
    results.write_parquet(path, pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False))
    return path


def load(output: str | Path) -> pd.DataFrame | None:
    """``<output>/comparisons.parquet`` as a DataFrame, or None when it was not written."""
    path = Path(output) / COMPARISONS
    return pd.read_parquet(path) if path.is_file() else None
