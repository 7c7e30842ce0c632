"""Formatting helpers shared by the report's sections, console summary and figures.

The report's file names; numbers, confidence intervals, p-values and verdicts as text; markdown tables; epsilon labels
the privacy and seed notes; the macro matrix without CIs. Missing cells are shown as missing ("—"), never dropped; a
metric that exists but is undefined (too few positives) reads "n/a".
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from privdom_ray.config import format_epsilon
from privdom_ray.markdown import MISSING  # noqa: F401 (the report's name for it)
from privdom_ray.markdown import missing as _missing
from privdom_ray.markdown import num as _num
from privdom_ray.markdown import table as _table
from privdom_ray.report.view import ReportView
from privdom_ray.stats import inference, quantities

UNDEFINED = "n/a"
NO_DP = "∞ (no DP)"
APPROX = " †"  # an approximate CI: too few units of the rarer class, or an AUC >= 0.95


# ------------------------------------------------------------------------------ formatting


def _ci(lo: Any, hi: Any, digits: int = 2, sign: bool = False) -> str:
    if _missing(lo) or _missing(hi):
        return ""
    return f" [{_num(lo, digits, sign)}, {_num(hi, digits, sign)}]"


def _value(r: dict | None, col: str, digits: int = 3, sign: bool = False) -> str:
    """ "0.812 [0.780, 0.840]" of a comparison row's column and its CI columns."""
    if r is None:
        return MISSING
    v = r.get(col)
    if _missing(v):
        return MISSING  # why: the row's null_reason in comparisons.parquet
    lo, hi = (r.get("delta_lo"), r.get("delta_hi")) if col == "delta" else (
        r.get(f"{col}_lo"), r.get(f"{col}_hi"))  # fmt: skip
    return _num(v, digits, sign) + _ci(lo, hi, digits, sign)


def _p(p: Any) -> str:
    """A p-value (t rule: no resampling floor); below 0.001 it is shown as the bound it is."""
    if _missing(p):
        return MISSING
    if p < 0.001:
        return "< 0.001"
    return f"{p:.3g}" if p < 0.1 else f"{p:.2f}"


def _verdict(r: dict | None) -> str:
    """The verdict, with the direction when the difference is detectable."""
    if r is None or _missing(r.get("verdict")):
        return MISSING
    v = str(r["verdict"]).replace("±m", f"±{r['margin']:g}")
    if r["verdict"] == inference.DIFFERENT and not _missing(r.get("worse_if")):
        harm = r["delta"] if r["worse_if"] == "higher" else -r["delta"]
        if r.get("quantity") == quantities.PRIMARY_QUANTITY:
            v += " (DP's drop larger)" if harm > 0 else " (DP's drop smaller)"
        else:
            v += " (DP worse)" if harm > 0 else " (DP better)"
    if r.get("n_seeds") == 1:  # training randomness is not covered: a verdict on these models
        v += " (1 seed: these trained models only)"
    return v


def _privacy_note(df: pd.DataFrame, eps: float) -> str:
    """ "target ε = 1; spent 0.995 by the prv accountant, δ = 1e-05" from the ledger columns."""
    if math.isinf(eps):
        return "ε = inf: trained without DP"
    trials = df[df["epsilon_target"] == eps].drop_duplicates("trial_key")
    spent = trials["epsilon_spent"].dropna()
    acc = ", ".join(sorted(trials["accountant"].dropna().astype(str).unique())) or "unknown"
    deltas = ", ".join(f"{d:g}" for d in sorted(trials["delta"].dropna().unique()))
    if spent.empty:
        spent_text = MISSING
    elif math.isclose(spent.min(), spent.max(), rel_tol=1e-3):
        spent_text = f"{spent.iloc[0]:.3g}"
    else:
        spent_text = f"{spent.min():.3g}–{spent.max():.3g}"
    return f"target ε = {format_epsilon(eps)}; ε spent {spent_text} by the {acc} accountant" + (
        f", δ = {deltas}" if deltas else ""
    )


def _seeds_note(view: ReportView) -> str:
    k = len(view.seeds)
    if k <= 1:
        return (
            f"One seed ({', '.join(map(str, view.seeds)) or MISSING}): CIs and p-values cover "
            f"the sampling of test {view.unit}s for one trained model per cell; training "
            "randomness (a second seed could give a different model) is NOT covered."
        )
    return (
        f"{k} seeds ({', '.join(map(str, view.seeds))}): values are means over seeds; CIs and "
        "p-values are for the mean over training randomness: a t interval whose variance adds "
        f"the between-seed variance to the test-{view.unit} noise the seeds share, with "
        f"conservative degrees of freedom (few seeds give wide intervals: {k} seeds cannot "
        "pin down training variability). The paired t test across seeds (the paper's test) is "
        "in the p_t column of comparisons.parquet, conditional on the test set (it treats the "
        "test patients as fixed, so it is no inference about new patients)."
    )


def _cell_text(c: dict, digits: int = 3) -> str:
    """ "0.812 [0.78, 0.84]" (one seed) or "... ±0.004" (SD over k seeds); n/a if undefined."""
    if c.get("k", 0) == 0 and c.get("rows", 0) == 0:
        return MISSING
    if _missing(c.get("auc")):
        return UNDEFINED
    text = _num(c["auc"], digits) + _ci(c.get("auc_lo"), c.get("auc_hi"))
    if c["k"] > 1 and not _missing(c.get("sd")):
        text += f" ±{c['sd']:.3f}"
    if not _missing(c.get("auc_lo")) and c.get("approx", 0) > 0:
        text += APPROX
    return text


def _pairs(view: ReportView) -> list[tuple[str, str]]:
    """(source, target) pairs, on-domain first."""
    pairs = [(s, t) for s in view.sources for t in view.targets]
    return sorted(pairs, key=lambda p: (p[0] != p[1], p))


def _pair_name(s: str, t: str) -> str:
    return f"{s} → {t}" + (" (on-domain)" if s == t else "")


def _plain_matrix(view: ReportView, eps: float) -> str:
    """The macro matrix without CIs (the console's compact form of the same view cells)."""
    rows = [
        [s, *(_num(v) for v in view.matrix(eps).loc[s])] for s in view.sources
    ]  # missing cells are NaN in view.matrix: "—"
    return _table(["source \\ target", *view.targets], rows)
