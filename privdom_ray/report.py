"""Turn the transfer table into what a reader looks at: transfer matrices per epsilon.

Reads only the aggregated table (never trial folders), so a report can be drawn anywhere the
parquet file is copied. Missing cells are shown as missing ("—"), never dropped.
"""

from __future__ import annotations

import math

import pandas as pd

from privdom_ray.grid import format_epsilon

MISSING = "—"


def macro_all(df: pd.DataFrame) -> pd.DataFrame:
    """Macro-AUC rows of the whole test sets (subgroup "all")."""
    return df[(df["label"] == "macro") & (df["subgroup"] == "all")]


def transfer_matrix(df: pd.DataFrame, epsilon: float) -> pd.DataFrame:
    """Rows = source, columns = target, macro AUC averaged over seeds; NaN where missing."""
    sel = macro_all(df)
    sel = sel[sel["epsilon_target"] == epsilon]
    sources = sorted(df["source"].unique())
    targets = sorted(df["target"].unique())
    mat = sel.pivot_table(index="source", columns="target", values="auc", aggfunc="mean")
    return mat.reindex(index=sources, columns=targets)


def epsilons(df: pd.DataFrame) -> list[float]:
    return sorted(df["epsilon_target"].unique(), key=lambda e: (math.isinf(e), e))


def _fmt(x: float) -> str:
    return MISSING if pd.isna(x) else f"{x:.3f}"


def matrix_markdown(mat: pd.DataFrame, title: str) -> str:
    header = "| source \\ target | " + " | ".join(mat.columns) + " |"
    sep = "|---" * (len(mat.columns) + 1) + "|"
    rows = [f"| {src} | " + " | ".join(_fmt(v) for v in mat.loc[src]) + " |" for src in mat.index]
    return "\n".join([f"### {title}", "", header, sep, *rows, ""])


def transfer_matrices_text(df: pd.DataFrame) -> str:
    """One markdown matrix per epsilon (macro AUC over the five labels), plus on/off-domain means."""
    if df.empty:
        return "(no finished trials yet: the transfer table is empty)"
    out = ["## Transfer matrices (macro AUC, rows = trained on, columns = tested on)", ""]
    for eps in epsilons(df):
        mat = transfer_matrix(df, eps)
        accountant = _accountants(df, eps)
        title = f"epsilon = {format_epsilon(eps)}" + (
            f" ({accountant})" if accountant else " (no DP)"
        )
        out.append(matrix_markdown(mat, title))
        on = [mat.loc[s, s] for s in mat.index if s in mat.columns]
        off = [mat.loc[s, t] for s in mat.index for t in mat.columns if s != t]
        out.append(f"mean on-domain {_mean(on)}, mean off-domain {_mean(off)}\n")
    return "\n".join(out)


def _accountants(df: pd.DataFrame, eps: float) -> str:
    if math.isinf(eps):
        return ""
    used = sorted(df.loc[df["epsilon_target"] == eps, "accountant"].dropna().unique())
    return "epsilon by " + ", ".join(used) + " accountant"


def _mean(values: list[float]) -> str:
    finite = [v for v in values if not pd.isna(v)]
    return _fmt(sum(finite) / len(finite)) if finite else MISSING
