"""The comparisons table's rows: per seed and across seeds, the tests and their q-values.

Turns the per-test-set estimates (:mod:`privdom_ray.stats.estimates`) into rows: one per seed,
one pooled across seeds, the primary endpoint's equivalence tests with their multiplicity
correction, exploratory q-values, and the typed frame.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from privdom_ray.config import EvaluationConfig
from privdom_ray.stats import evaluation, inference
from privdom_ray.stats.estimates import Est, Pooled, _Item, _min_df
from privdom_ray.stats.quantities import ACROSS_SEEDS, PRIMARY_QUANTITY, QUANTITIES, _warn

# ============================================================================ rows


def _test_name(unit: str, seeds: int) -> str:
    if seeds > 1:
        return f"t interval over seeds (between-seed + shared {unit}-jackknife variance), paired"
    return f"paired {unit} jackknife t (the same {unit}s left out for every model)"


def _row(
    comparison: str,
    quantity: str,
    fields: dict[str, Any],
    sides: tuple[Any, Any, Any, Any],
    ev: EvaluationConfig,
) -> dict[str, Any]:
    """One table row: CIs of both sides and of the off-domain mean; CI, p, TOST and verdict
    of their difference (``sides`` = dp, nondp, delta, off: Est or Pooled)."""
    dp, nondp, delta, off = sides
    q = QUANTITIES[quantity]
    margin = ev.equivalence_margin if q.margin else None
    row = {**fields, "comparison": comparison, "quantity": quantity, "worse_if": q.worse_if,
           "margin": margin, "ci": ev.ci}  # fmt: skip
    for name, est, level in (("value_dp", dp, q.level), ("value_nondp", nondp, q.level),
                             ("auc_off", off, True)):  # fmt: skip
        if est is not None and ev.n_boot:
            r = est.infer(ev.ci, level=level)
            col = "auc_off_mean" if name == "auc_off" else name
            row[col], row[f"{name}_lo"], row[f"{name}_hi"] = r.estimate, r.lo, r.hi
        elif est is not None:
            row["auc_off_mean" if name == "auc_off" else name] = inference.opt(_point(est))
    if delta is None:
        return row
    if not ev.n_boot:  # evaluation.n_boot = 0: no CIs, no tests
        row["delta"] = inference.opt(_point(delta))
        return row
    r = delta.infer(ev.ci, margin, q.worse_if)
    row.update(
        delta=r.estimate, delta_lo=r.lo, delta_hi=r.hi, p_value=r.p_value, df=r.df,
        tost_lo=r.tost_lo, tost_hi=r.tost_hi, p_tost=r.p_tost, p_noninf=r.p_noninf,
        verdict=inference.verdict(r, inference.alpha_of(ev.ci)),
    )  # fmt: skip
    if r.tost_lo is not None:
        row["margin_confirmable"] = max(abs(r.tost_lo), abs(r.tost_hi))
        row["tost_half_width"] = (r.tost_hi - r.tost_lo) / 2.0
    if row["verdict"] is None and r.estimate is not None and margin is not None:
        row["null_reason"] = row.get("null_reason") or (
            "no verdict: the difference has no interval (too few units of the rarer class, "
            "or a leave-one-out value is undefined)"
        )
    return row


def _point(est: Any) -> float:
    return float(np.mean(est.points)) if isinstance(est, Pooled) else est.point


def _per_seed_row(it: _Item, ev: EvaluationConfig) -> dict[str, Any]:
    fields = {**it.fields, "seed": it.seed, "n_seeds": 1,
              "test": _test_name(it.fields["resampling_unit"], 1)}  # fmt: skip
    return _row(it.comparison, it.quantity, fields, (it.dp, it.nondp, it.delta, it.off), ev)


def _pool(ests: list[Est | None]) -> Pooled | None:
    """The seeds' estimates of one side, pooled (None if a seed has none or a NaN point)."""
    if not ests or any(e is None or math.isnan(e.point) for e in ests):
        return None
    return Pooled(np.array([e.point for e in ests]), np.stack([e.loo for e in ests]),
                  _min_df(*(e.df for e in ests)))  # fmt: skip


def _across_row(items: list[_Item], ev: EvaluationConfig) -> dict[str, Any]:
    """The across_seeds row of one comparison: the seeds' mean, inferred by pool_seeds; the
    paired t test across seeds (conditional on the test set) as secondary columns."""
    items = sorted(items, key=lambda it: it.seed)
    first = items[0]
    is_dp = first.dp is not None or first.delta is not None
    used = [it for it in items if (it.delta if is_dp else it.nondp) is not None
            and not math.isnan((it.delta if is_dp else it.nondp).point)]  # fmt: skip
    k = len(used)
    spent = [it.fields["epsilon_spent"] for it in used if it.fields.get("epsilon_spent")]
    fields = {**first.fields, "seed": None, "n_seeds": k,
              "test": _test_name(first.fields["resampling_unit"], 2),
              "epsilon_spent": float(np.mean(spent)) if spent else None,
              "auc_on": float(np.mean([it.fields["auc_on"] for it in used]))
              if used and all(it.fields.get("auc_on") is not None for it in used) else None}  # fmt: skip
    if k < 2:
        fields["null_reason"] = f"{k} seed(s) with a value: needs >= 2"
        return _row(first.comparison, first.quantity, fields, (None, None, None, None), ev)
    sides = tuple(_pool([getattr(it, a) for it in used]) for a in ("dp", "nondp", "delta", "off"))
    row = _row(first.comparison, first.quantity, fields, sides, ev)
    y = np.array([it.nondp.point for it in used])
    row.update(sd_nondp=float(np.std(y, ddof=1)))
    if is_dp:
        x = np.array([it.dp.point for it in used])
        t, p = evaluation.paired_t_test(x, y)
        row.update(sd_dp=float(np.std(x, ddof=1)), delta_sd=float(np.std(x - y, ddof=1)),
                   t_stat=inference.opt(t), p_t=inference.opt(p))  # fmt: skip
    return row


def _rows(items: list[_Item], ev: EvaluationConfig) -> list[dict[str, Any]]:
    rows = [_per_seed_row(it, ev) for it in items]
    groups: dict[tuple, list[_Item]] = defaultdict(list)
    for it in items:
        groups[it.group_key].append(it)
    for key in sorted(groups, key=lambda k: tuple("" if v is None else str(v) for v in k)):
        if len({it.seed for it in groups[key]}) >= 2:
            rows.append({**_across_row(groups[key], ev), "comparison": ACROSS_SEEDS})
    return rows


_GROUP_COLS = ["quantity", "model", "source", "target", "label", "subgroup", "epsilon"]
_P_COLUMNS = ("p_tost", "p_value", "p_noninf")
_Q_OF = {"p_tost": "q_tost", "p_value": "q_value", "p_noninf": "q_noninf"}


def _finalize(df: pd.DataFrame, ev: EvaluationConfig) -> pd.DataFrame:
    """Mark summary rows and the primary endpoint; Holm and the intersection-union test for
    the primary rows, BH q-values (and verdicts on them) for the exploratory ones."""
    if df.empty:
        return df
    key = pd.Series(
        ["|".join(map(str, t)) for t in df[_GROUP_COLS].itertuples(index=False)], index=df.index
    )
    across = df["comparison"] == ACROSS_SEEDS
    df["is_summary"] = across | ~key.isin(set(key[across]))
    family = (
        df["is_summary"]
        & (df["quantity"] == PRIMARY_QUANTITY)
        & (df["label"] == "macro")
        & (df["subgroup"] == "all")
        & np.isfinite(df["epsilon"].astype(float))
    )
    primary = family & df["p_tost"].notna()
    df["endpoint"] = np.where(primary, "primary", "exploratory")
    _primary_tests(df, primary, family, inference.alpha_of(ev.ci))
    _exploratory_q(df, ~primary, across, inference.alpha_of(ev.ci))
    return df


def _primary_tests(df: pd.DataFrame, primary: pd.Series, family: pd.Series, alpha: float) -> None:
    """Per (model, epsilon): the three p's Holm-adjusted across the test sites (the per-site
    verdicts read them: with only the TOST p adjusted, a false "non-inferior" at one of 5
    sites came 22% of the time), and the intersection-union p of "equivalent at every site"
    (the largest unadjusted TOST p: no adjustment is needed for a claim that needs every
    site's test to pass; Holm for it cost power, 0.11 vs 0.40 at 1,000 patients). Every test
    site with a drop of its own (DP or non-DP, at any epsilon) belongs to the family: one
    without a primary estimate at this epsilon leaves p_tost_iut null (no every-site claim
    over the others), with a null_reason naming it."""
    has_drop = family & (df["value_dp"].notna() | df["value_nondp"].notna())
    for (model, eps), idx in df[primary].groupby(["model", "epsilon"]).groups.items():
        for col in _P_COLUMNS:
            df.loc[idx, f"{col}_holm"] = _nan(inference.holm(df.loc[idx, col].tolist()))
        df.loc[idx, "verdict"] = [inference.verdict(_inference_of(r, suffix="_holm"), alpha)
                                  for r in df.loc[idx, _INFERENCE_COLUMNS].to_dict("records")]  # fmt: skip
        sites = set(df.loc[has_drop & (df["model"] == model), "target"])
        missing = sorted(sites - set(df.loc[idx, "target"]))
        df.loc[idx, "n_sites"] = len(sites | set(df.loc[idx, "target"]))
        if not missing:
            df.loc[idx, "p_tost_iut"] = float(df.loc[idx, "p_tost"].max())
            continue
        why = (f"no every-site claim at epsilon {eps:g}: no primary estimate at test site(s) "
               f"{', '.join(map(str, missing))} (p_tost_iut left null)")  # fmt: skip
        _warn(f"primary endpoint ({model}): {why}")
        df.loc[idx, "null_reason"] = [why if pd.isna(r) else f"{r}; {why}"
                                      for r in df.loc[idx, "null_reason"]]  # fmt: skip


def _exploratory_q(df: pd.DataFrame, rows: pd.Series, across: pd.Series, alpha: float) -> None:
    """BH q-values of the difference, TOST and non-inferiority p's within (comparison,
    quantity) families, and the exploratory verdicts read on them."""
    family = df["comparison"].where(~across, ACROSS_SEEDS) + ", " + df["quantity"]
    sel = rows & df["p_value"].notna()
    df.loc[sel, "q_family"] = family[sel]
    for _, idx in df[sel].groupby(family[sel]).groups.items():
        for col in _P_COLUMNS:
            df.loc[idx, _Q_OF[col]] = _nan(inference.bh(df.loc[idx, col].tolist()))
        df.loc[idx, "verdict"] = [inference.verdict(_inference_of(r, q=True), alpha)
                                  for r in df.loc[idx, _INFERENCE_COLUMNS].to_dict("records")]  # fmt: skip


def _nan(values: list[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in values]


_INFERENCE_COLUMNS = [
    "delta",
    "delta_lo",
    "delta_hi",
    "margin",
    "worse_if",
    "tost_lo",
    "tost_hi",
    "df",
    *_P_COLUMNS,
    *(f"{c}_holm" for c in _P_COLUMNS),
    *_Q_OF.values(),
]


def _inference_of(row: dict, *, suffix: str = "", q: bool = False) -> inference.Inference:
    """The row's inference with its adjusted p's: ``suffix`` "_holm" (primary rows) or
    ``q`` (exploratory rows: the BH q-values in place of the p's)."""

    def g(name: str) -> Any:
        col = name
        if name in _P_COLUMNS:
            col = _Q_OF[name] if q else f"{name}{suffix}"
        v = row[col]
        return None if v is None or pd.isna(v) else v

    return inference.Inference(
        g("delta"), g("delta_lo"), g("delta_hi"), g("p_value"), 0,
        g("margin"), g("worse_if"), g("tost_lo"), g("tost_hi"), g("p_tost"), g("p_noninf"),
        g("df"),
    )  # fmt: skip


def _frame(rows: list[dict[str, Any]], schema: pa.Schema) -> pd.DataFrame:
    """Rows -> DataFrame with exactly the schema's columns and types (nulls where n/a):
    column by column (a NaN or None is a null), not value by value (20,000 rows x 70
    columns at the paper's size)."""
    if not rows:
        return schema.empty_table().to_pandas(types_mapper=_NULLABLE.get)
    arrays = []
    for f in schema:
        values = [row.get(f.name) for row in rows]
        if pa.types.is_floating(f.type):
            arr = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
            arrays.append(pa.array(arr, type=f.type, from_pandas=True))
        else:
            arrays.append(pa.array([_py(v) for v in values], type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema).to_pandas(types_mapper=_NULLABLE.get)


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
