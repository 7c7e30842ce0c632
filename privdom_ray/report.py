"""Turn the transfer table into what a reader looks at: transfer matrices per epsilon.

Reads only the aggregated tables (``transfer.parquet`` and, when present,
``comparisons.parquet``; never trial folders), so a report can be drawn anywhere the parquet
files are copied. Missing cells are shown as missing ("—"), never dropped.

``transfer_matrices_text`` is the short console summary; ``write_report`` writes
``report.md`` and PNG figures (matplotlib is imported only there).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from privdom_ray import results
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


def split_controls(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(standard single-site trials, the rest): controls such as clip-only never mix with
    epsilon = inf, and federated models are neither a site's own model nor an outside one."""
    standard = pd.Series(True, index=df.index)
    if "variant" in df.columns:
        standard &= df["variant"].fillna("standard") == "standard"
    return df[standard & ~is_federated(df)], df[~standard]


def is_federated(df: pd.DataFrame) -> pd.Series:
    if "training_sites" not in df.columns:  # tables written before federations existed
        return pd.Series(False, index=df.index)
    return df["training_sites"].fillna(df["source"]) != df["source"]


def federated_text(df: pd.DataFrame) -> str:
    """Federated vs single-site models: mean macro AUC on member sites and on held-out sites."""
    fed = df[is_federated(df)]
    if fed.empty:
        return ""
    single, _ = split_controls(df)
    out = [
        "### Federated vs single-site training (macro AUC, mean over targets and seeds)",
        "",
        "| epsilon | model | on member sites | on held-out sites |",
        "|---|---|---|---|",
    ]
    for eps in epsilons(fed):
        for name in sorted(fed["source"].unique()):
            sel = macro_all(fed[(fed["source"] == name) & (fed["epsilon_target"] == eps)])
            if sel.empty:
                continue
            sites = set(sel["training_sites"].iloc[0].split(","))
            member = sel["target"].isin(sites)
            on, off = sel.loc[member, "auc"].mean(), sel.loc[~member, "auc"].mean()
            out.append(f"| {format_epsilon(eps)} | federated {name} | {_fmt(on)} | {_fmt(off)} |")
            ref = macro_all(single[single["epsilon_target"] == eps])
            ref = ref[ref["source"].isin(sites)]
            if len(ref):
                own = ref["source"] == ref["target"]
                out.append(
                    f"| {format_epsilon(eps)} | single-site ({', '.join(sorted(sites))}) | "
                    f"{_fmt(ref.loc[own, 'auc'].mean())} (own site) | "
                    f"{_fmt(ref.loc[~own, 'auc'].mean())} (other sites) |"
                )
    out.append("")
    out.append(
        "Federated epsilons are per site: every member site's data is protected at the row's "
        "epsilon or better (see each trial's ledger.json, `sites`)."
    )
    return "\n".join(out) + "\n"


def controls_and_leakage_text(df: pd.DataFrame) -> str:
    """Matrices of the control trials and the membership-inference audit per epsilon/variant."""
    df_std, controls = split_controls(df)
    out = []
    for variant in sorted(controls["variant"].unique()) if len(controls) else []:
        sub = controls[controls["variant"] == variant]
        title = f"control: {variant} (clipping + Poisson sampling, no noise; epsilon = inf)"
        out.append(matrix_markdown(transfer_matrix(sub, math.inf), title))
    if "mia_auc" in df.columns and df["mia_auc"].notna().any():
        out.append(
            "### Membership inference (loss threshold; train vs held-out images of the source)"
        )
        out.append("")
        out.append("| trials | attack AUC (0.5 = no leakage) | TPR at 1% FPR |")
        out.append("|---|---|---|")
        trials = df.drop_duplicates("trial_key")
        fed = is_federated(trials)
        groups = [
            (
                f"epsilon = {format_epsilon(e)}",
                trials[
                    (trials["epsilon_target"] == e)
                    & (trials["variant"].fillna("standard") == "standard")
                    & ~fed
                ],
            )
            for e in epsilons(df_std)
        ]
        groups += [
            (
                f"federated, epsilon = {format_epsilon(e)} (worst site)",
                trials[fed & (trials["epsilon_target"] == e)],
            )
            for e in (epsilons(trials[fed]) if fed.any() else [])
        ]
        groups += [
            (v, trials[trials["variant"] == v]) for v in sorted(controls["variant"].unique())
        ]
        for name, g in groups:
            if len(g):
                out.append(
                    f"| {name} | {_fmt(g['mia_auc'].mean())} | {_fmt(g['mia_tpr_at_1fpr'].mean())} |"
                )
        out.append("")
    return "\n".join(out)


def transfer_matrices_text(df: pd.DataFrame) -> str:
    """One markdown matrix per epsilon (macro AUC over the five labels), plus on/off-domain means."""
    if df.empty:
        return "(no finished trials yet: the transfer table is empty)"
    full = df
    df, _ = split_controls(df)
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
    out.append(federated_text(full))
    out.append(controls_and_leakage_text(full))
    return "\n".join(out)


def _accountants(df: pd.DataFrame, eps: float) -> str:
    if math.isinf(eps):
        return ""
    used = sorted(df.loc[df["epsilon_target"] == eps, "accountant"].dropna().unique())
    return "epsilon by " + ", ".join(used) + " accountant"


def _mean(values: list[float]) -> str:
    finite = [v for v in values if not pd.isna(v)]
    return _fmt(sum(finite) / len(finite)) if finite else MISSING


# ------------------------------------------------------------------------------ full report

REPORT = "report.md"
FIGURES = "figures"
NO_DP = "∞ (no DP)"


def write_report(output: Path, *, figures: bool = True) -> str:
    """Write ``<output>/report.md`` (atomically) and PNG figures under ``<output>/figures/``.

    Reads ``transfer.parquet`` (required) and ``comparisons.parquet`` (optional: without it
    the report has no p-values and no paired ΔAUC table, and says so). Returns the markdown.
    """
    output = Path(output)
    full = results.load(output)
    df, _ = split_controls(full)
    cmp_path = output / "comparisons.parquet"
    cmp = pd.read_parquet(cmp_path) if cmp_path.is_file() else None
    view = _View(df, cmp)
    parts = [_header(view)]
    if df.empty:
        parts.append("(no finished trials yet: the transfer table is empty)\n")
    else:
        parts += [
            _section_matrices(view),
            _section_drop(view),
            _section_fairness(view),
            _section_paired(view),
            "## 5. Controls, federated models and membership inference\n\n"
            + federated_text(full)
            + controls_and_leakage_text(full),
        ]
        if figures:
            parts.append(_section_figures(_draw_figures(view, output / FIGURES)))
    text = "\n".join(parts).rstrip() + "\n"
    results.atomic_write(output / REPORT, lambda p: p.write_text(text, encoding="utf-8"))
    return text


class _View:
    """The two tables plus the lookups every section needs (seed-averaged cells, p-values)."""

    def __init__(self, df: pd.DataFrame, cmp: pd.DataFrame | None) -> None:
        self.df = df
        self.cmp = cmp
        if df.empty:
            self.sources, self.targets, self.eps, self.seeds, self.subgroups = [], [], [], [], []
            self.cells = pd.DataFrame()
        else:
            self.sources = sorted(df["source"].unique())
            self.targets = sorted(df["target"].unique())
            self.eps = epsilons(df)
            self.seeds = sorted(int(s) for s in df["seed"].dropna().unique())
            self.subgroups = list(pd.unique(df["subgroup"]))
            grp = df.groupby(
                ["epsilon_target", "label", "subgroup", "source", "target"], dropna=False
            )
            self.cells = grp.agg(
                auc=("auc", "mean"),
                lo=("auc_lo", "mean"),
                hi=("auc_hi", "mean"),
                sd=("auc", "std"),
                k=("auc", "count"),
            )
        self._cmp_index: dict[tuple, pd.DataFrame] = {}
        if cmp is not None and not cmp.empty:
            keyed = cmp.assign(source=cmp["source"].fillna(""))
            cols = ["comparison", "quantity", "source", "target", "label", "subgroup", "epsilon"]
            self._cmp_index = {k: g for k, g in keyed.groupby(cols, sort=False, dropna=False)}

    @property
    def finite_eps(self) -> list[float]:
        return [e for e in self.eps if math.isfinite(e)]

    @property
    def has_nondp(self) -> bool:
        return any(math.isinf(e) for e in self.eps)

    def cell(self, eps: float, source: str, target: str, label="macro", subgroup="all") -> dict:
        """Seed-averaged AUC of one source -> target cell; NaN values when missing."""
        try:
            row = self.cells.loc[(eps, label, subgroup, source, target)]
        except KeyError:
            return {"auc": math.nan, "lo": math.nan, "hi": math.nan, "sd": math.nan, "k": 0}
        return row.to_dict()

    def matrix(self, eps: float, field: str = "auc", label="macro", subgroup="all"):
        return pd.DataFrame(
            [
                [self.cell(eps, s, t, label, subgroup)[field] for t in self.targets]
                for s in self.sources
            ],
            index=self.sources,
            columns=self.targets,
            dtype=float,
        )

    def per_seed(self, comparison: str, quantity: str, **where: Any) -> pd.DataFrame | None:
        """The per-seed comparison rows of one (source, target, label, subgroup, epsilon)."""
        return self._cmp_index.get(self._key(comparison, quantity, where))

    @staticmethod
    def _key(comparison: str, quantity: str, where: dict[str, Any]) -> tuple:
        return (
            comparison,
            quantity,
            where.get("source", ""),
            where["target"],
            where.get("label", "macro"),
            where.get("subgroup", "all"),
            where["epsilon"],
        )

    def stat(self, comparison: str, quantity: str, **where: Any) -> dict | None:
        """One comparison, summarised over seeds.

        One seed: that seed's row (bootstrap CI and p). Several seeds: the across_seeds row
        (mean, SD, paired t test across seeds). None when comparisons.parquet lacks it.
        """
        key = self._key(comparison, quantity, where)
        per_seed = self._cmp_index.get(key)
        if per_seed is None or per_seed.empty:
            return None
        if len(per_seed) == 1:
            r = per_seed.iloc[0]
            return {**r.to_dict(), "k": 1, "sd": math.nan}
        summary = self._cmp_index.get(("across_seeds", *key[1:]))
        if summary is None or summary.empty:
            return None
        r = summary.iloc[0]
        return {**r.to_dict(), "k": int(r["n_seeds"]), "sd": r["delta_sd"]}


# ------------------------------------------------------------------------------ formatting


def _num(x: Any, digits: int = 3, sign: bool = False) -> str:
    if x is None or pd.isna(x):
        return MISSING
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _p(p: Any) -> str:
    if p is None or pd.isna(p):
        return MISSING
    if p < 0.001:
        return "<0.001"
    return f"{p:.3f}" if p < 0.01 else f"{p:.2f}"


def _ci(lo: Any, hi: Any, digits: int = 2, sign: bool = False) -> str:
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return ""
    return f" [{_num(lo, digits, sign)}, {_num(hi, digits, sign)}]"


def _cell_text(c: dict) -> str:
    """ "0.812 [0.78, 0.84]" (one seed) or "0.812 [0.78, 0.84] ±0.004" (k seeds)."""
    if pd.isna(c["auc"]):
        return MISSING
    text = _num(c["auc"]) + _ci(c["lo"], c["hi"])
    if c["k"] > 1 and not pd.isna(c["sd"]):
        text += f" ±{c['sd']:.3f}"
    return text


def _eps_label(eps: float) -> str:
    return "ε = " + format_epsilon(eps) + (" (no DP)" if math.isinf(eps) else "")


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


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _seeds_note(view: _View) -> str:
    k = len(view.seeds)
    if k <= 1:
        return (
            f"One seed ({', '.join(map(str, view.seeds)) or MISSING}): p-values are paired "
            "bootstrap p-values on the shared resamples of each test set."
        )
    return (
        f"{k} seeds ({', '.join(map(str, view.seeds))}): values are means over seeds, "
        "p-values come from paired Student t tests across seeds (the paper's test)."
    )


# ------------------------------------------------------------------------------ sections


def _header(view: _View) -> str:
    df = view.df
    if df.empty:
        return "# Sweep report\n"
    sweep = ", ".join(sorted(df["sweep"].dropna().astype(str).unique())) or MISSING
    n_boot = ", ".join(str(int(b)) for b in sorted(df["n_boot"].dropna().unique())) or MISSING
    lines = [
        f"# Sweep report: {sweep}",
        "",
        f"- sources: {', '.join(view.sources)}; targets: {', '.join(view.targets)}",
        f"- epsilons: {', '.join(format_epsilon(e) for e in view.eps)}; "
        f"seeds: {', '.join(map(str, view.seeds))}; models: "
        + ", ".join(sorted(df["model"].dropna().astype(str).unique())),
        f"- {df['trial_key'].nunique()} trials; bootstrap resamples per CI: {n_boot}",
        "- privacy: "
        + "; ".join(_privacy_note(df, e) for e in view.eps if math.isfinite(e))
        + ("" if view.finite_eps else "no DP trials"),
        "- comparisons.parquet: "
        + ("present" if view.cmp is not None else "not found (no p-values, no paired ΔAUC)"),
        "",
        'A cell without a row in the tables is printed as "—" (missing), never dropped.',
        "",
    ]
    return "\n".join(lines)


def _section_matrices(view: _View) -> str:
    k = len(view.seeds)
    if k > 1:
        how = (
            f"Cells: mean macro AUC over the {k} seeds [mean of the per-seed 95% bootstrap CI "
            "bounds, i.e. the test-set uncertainty of one model] ± SD across seeds (training "
            "variability)."
        )
    else:
        how = "Cells: macro AUC [95% bootstrap CI over the test images]."
    out = [
        "## 1. Transfer matrices (macro AUC over the labels; rows = trained on, "
        "columns = tested on)",
        "",
        how,
        "",
    ]
    for eps in view.eps:
        out.append(f"### {_eps_label(eps)} — {_privacy_note(view.df, eps)}\n")
        rows = [
            [f"**{s}**", *(_cell_text(view.cell(eps, s, t)) for t in view.targets)]
            for s in view.sources
        ]
        out.append(_table(["source \\ target", *view.targets], rows))
        mat = view.matrix(eps)
        on = [mat.loc[s, s] for s in mat.index if s in mat.columns]
        off = [mat.loc[s, t] for s in mat.index for t in mat.columns if s != t]
        out.append(f"mean on-domain {_mean(on)}, mean off-domain {_mean(off)}\n")
    return "\n".join(out)


def _drop_values(view: _View, eps: float) -> dict[str, dict[str, float]]:
    """Per test site: on-domain and mean off-domain AUC at eps and at inf, and the drops."""
    m = view.matrix(eps)
    m0 = view.matrix(math.inf) if view.has_nondp else m * np.nan
    out = {}
    for t in view.targets:
        if t not in m.index:
            continue  # never trained on: no on-domain model, no drop
        off = [s for s in view.sources if s != t]
        on_dp, on_nd = m.loc[t, t], m0.loc[t, t]
        off_dp = _nanmean(m.loc[off, t]) if off else math.nan
        off_nd = _nanmean(m0.loc[off, t]) if off else math.nan
        out[t] = {
            "on_nondp": on_nd,
            "on_dp": on_dp,
            "off_nondp": off_nd,
            "off_dp": off_dp,
            "n_off": int(m.loc[off, t].notna().sum()) if off else 0,
            "drop_nondp": on_nd - off_nd,
            "drop_dp": on_dp - off_dp,
            "drop_abstract": on_nd - off_dp,
        }
    return out


def _nanmean(values: Iterable[float]) -> float:
    a = np.asarray(list(values), dtype=float)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


def _section_drop(view: _View) -> str:
    out = [
        "## 2. AUC drop from on-domain to off-domain, DP vs non-DP",
        "",
        "For test site T: on-domain AUC = model trained on T, tested on T; mean off-domain "
        "AUC = mean over the other sources S ≠ T of the models trained on S, tested on T "
        "(macro AUC, subgroup all).",
        "",
        "- **drop non-DP** = on-domain(non-DP) − mean off-domain(non-DP)",
        "- **drop DP (same ε)** = on-domain(DP) − mean off-domain(DP)",
        "- **drop DP (abstract)** = on-domain(**non-DP**) − mean off-domain(DP): the paper's "
        'abstract compares this with drop non-DP ("0.07 vs 0.07"); their difference is '
        "mean off-domain(non-DP) − mean off-domain(DP).",
        "",
        _seeds_note(view),
        "",
    ]
    if not view.finite_eps:
        out.append("No DP trials: nothing to compare.\n")
    if not view.has_nondp:
        out.append("No non-DP (ε = inf) trials: the non-DP columns are missing.\n")
    if view.cmp is None:
        out.append("comparisons.parquet not found: p-values are missing.\n")
    for eps in view.finite_eps:
        vals = _drop_values(view, eps)
        out.append(f"### {_eps_label(eps)} vs non-DP — {_privacy_note(view.df, eps)}\n")
        rows, abstract = [], []
        for t, v in vals.items():
            p_same = view.stat("auc_drop", "drop", target=t, epsilon=eps)
            p_abs = view.stat("auc_drop", "drop_vs_nondp_ondomain", target=t, epsilon=eps)
            rows.append(
                [
                    f"**{t}**",
                    _num(v["on_nondp"]),
                    _num(v["on_dp"]),
                    _num(v["off_nondp"]) + f" (n={v['n_off']})",
                    _num(v["off_dp"]),
                    _num(v["drop_nondp"]),
                    _num(v["drop_dp"]),
                    _p(p_same and p_same.get("p_value")),
                    _num(v["drop_abstract"]),
                    _p(p_abs and p_abs.get("p_value")),
                ]
            )
            abstract.append(
                f"{_num(v['drop_abstract'], 2)} vs {_num(v['drop_nondp'], 2)}, "
                f"P = {_p(p_abs and p_abs.get('p_value'))}"
            )
        header = [
            "test site",
            "on-domain non-DP",
            "on-domain DP",
            "mean off-domain non-DP (n sources)",
            "mean off-domain DP",
            "drop non-DP",
            "drop DP (same ε)",
            "p (same ε)",
            "drop DP (abstract)",
            "p (abstract)",
        ]
        out.append(_table(header, rows))
        out.append("Abstract-style summary (drop DP (abstract) vs drop non-DP, P):\n")
        out.append(_table(["", *vals.keys()], [["AUC drop, DP vs non-DP", *abstract]]))
    return "\n".join(out)


def _delta_text(st: dict | None) -> tuple[str, str]:
    """("+0.012 [-0.010, +0.030]" or "+0.012 ±0.004 (k seeds)", p) from a stat() result."""
    if st is None or pd.isna(st.get("delta_auc")):
        return MISSING, _p(None if st is None else st.get("p_value"))
    if st["k"] > 1:
        sd = "" if pd.isna(st["sd"]) else f" ±{st['sd']:.3f}"
        return _num(st["delta_auc"], sign=True) + sd + f" ({st['k']} seeds)", _p(st["p_value"])
    return _num(st["delta_auc"], sign=True) + _ci(st["delta_lo"], st["delta_hi"], 3, True), _p(
        st["p_value"]
    )


def _section_fairness(view: _View) -> str:
    out = [
        "## 3. Fairness: macro AUC per subgroup, DP vs non-DP",
        "",
        "Cells: AUC DP / AUC non-DP (mean over seeds) and the p-value of their paired "
        "difference (see section 4). " + _seeds_note(view),
        "",
    ]
    if not view.finite_eps or not view.has_nondp:
        out.append("Needs both DP and non-DP trials.\n")
        return "\n".join(out)
    for eps in view.finite_eps:
        out.append(f"### {_eps_label(eps)} vs non-DP\n")
        rows = []
        for s in view.sources:
            for t in view.targets:
                row = [f"{s} → {t}" + (" (on-domain)" if s == t else "")]
                for g in view.subgroups:
                    dp = view.cell(eps, s, t, subgroup=g)["auc"]
                    nd = view.cell(math.inf, s, t, subgroup=g)["auc"]
                    st = view.stat(
                        "paired_delta", "delta_auc", source=s, target=t, subgroup=g, epsilon=eps
                    )
                    p = "" if st is None else f" (p {_p(st.get('p_value'))})"
                    row.append(f"{_num(dp)} / {_num(nd)}{p}")
                rows.append(row)
        out.append(_table(["source → target", *view.subgroups], rows))
    return "\n".join(out)


def _section_paired(view: _View) -> str:
    out = [
        "## 4. Paired ΔAUC = AUC(DP) − AUC(non-DP), same source, seed and test images",
        "",
    ]
    if view.cmp is None:
        out.append(
            "comparisons.parquet not found: the paired comparison needs the per-image "
            "predictions and is written by the sweep's aggregator.\n"
        )
        return "\n".join(out)
    out += [
        "ΔAUC [95% paired-bootstrap CI] with one seed; mean ΔAUC ± SD across seeds with "
        "several. " + _seeds_note(view),
        "",
    ]
    if not view.finite_eps or not view.has_nondp:
        out.append("Needs both DP and non-DP trials.\n")
        return "\n".join(out)
    header = ["source → target", "AUC DP", "AUC non-DP", "ΔAUC", "p", "n"]
    for eps in view.finite_eps:
        out.append(f"### {_eps_label(eps)} vs non-DP, macro AUC, all test images\n")
        pairs = sorted(
            ((s, t) for s in view.sources for t in view.targets), key=lambda p: (p[0] != p[1], p)
        )
        rows = []
        for s, t in pairs:
            st = view.stat("paired_delta", "delta_auc", source=s, target=t, epsilon=eps)
            rows.append(_paired_row(f"{s} → {t}" + (" (on-domain)" if s == t else ""), st))
        out.append(_table(header, rows))
        out.append(f"### {_eps_label(eps)} vs non-DP, on-domain macro AUC by subgroup\n")
        rows = []
        for s in view.sources:
            if s not in view.targets:
                continue
            for g in view.subgroups:
                st = view.stat(
                    "paired_delta", "delta_auc", source=s, target=s, subgroup=g, epsilon=eps
                )
                rows.append(_paired_row(f"{s} → {s}, {g}", st))
        out.append(_table(header, rows))
    return "\n".join(out)


def _paired_row(name: str, st: dict | None) -> list[str]:
    delta, p = _delta_text(st)
    if st is None:
        return [name, MISSING, MISSING, delta, p, MISSING]
    dp = st.get("auc_dp") if st["k"] == 1 else st.get("mean_dp")
    nd = st.get("auc_nondp") if st["k"] == 1 else st.get("mean_nondp")
    n = st.get("n")
    return [name, _num(dp), _num(nd), delta, p, MISSING if pd.isna(n) else str(int(n))]


def _section_figures(paths: list[Path]) -> str:
    out = ["## Figures", ""]
    out += [f"![{p.stem}]({FIGURES}/{p.name})\n" for p in paths]
    return "\n".join(out)


# ------------------------------------------------------------------------------ figures


def _draw_figures(view: _View, folder: Path) -> list[Path]:
    """All PNGs; matplotlib's object API with the Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def new(figsize: tuple[float, float], **kw) -> tuple[Any, Any]:
        fig = Figure(figsize=figsize, layout="constrained")
        FigureCanvasAgg(fig)
        return fig, fig.subplots(**kw)

    paths = []
    for eps in view.eps:
        path = folder / f"transfer_matrix_eps-{format_epsilon(eps)}.png"
        _heatmap(view, eps, new, path)
        paths.append(path)
    paths.append(_auc_vs_epsilon(view, new, folder / "auc_vs_epsilon.png"))
    paths.append(_subgroup_bars(view, new, folder / "subgroup_auc.png"))
    if view.finite_eps and view.has_nondp:
        paths.append(_drop_bars(view, new, folder / "auc_drop.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    results.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    return path


def _accountant_title(view: _View, eps: float) -> str:
    if math.isinf(eps):
        return "ε = ∞ (no DP)"
    return _privacy_note(view.df, eps).replace("target ε", "ε")


def _heatmap(view: _View, eps: float, new, path: Path) -> Path:
    from matplotlib.patches import Rectangle

    auc = view.matrix(eps).to_numpy()
    lo, hi = view.matrix(eps, "lo").to_numpy(), view.matrix(eps, "hi").to_numpy()
    n_s, n_t = auc.shape
    fig, ax = new((1.6 * n_t + 2.6, 1.1 * n_s + 1.8))
    finite = auc[~np.isnan(auc)]
    vmin = min(0.5, float(finite.min())) if finite.size else 0.5
    cmap = _cmap("viridis")
    im = ax.imshow(np.ma.masked_invalid(auc), cmap=cmap, vmin=vmin, vmax=1.0)
    for i in range(n_s):
        for j in range(n_t):
            if np.isnan(auc[i, j]):
                ax.add_patch(
                    Rectangle(
                        (j - 0.5, i - 0.5),
                        1,
                        1,
                        facecolor="0.85",
                        hatch="//",
                        edgecolor="0.6",
                        linewidth=0,
                    )
                )
                ax.text(j, i, MISSING, ha="center", va="center", fontsize=14, color="0.3")
                continue
            text = f"{auc[i, j]:.3f}"
            if not (np.isnan(lo[i, j]) or np.isnan(hi[i, j])):
                text += f"\n[{lo[i, j]:.2f}, {hi[i, j]:.2f}]"
            light = (auc[i, j] - vmin) / max(1e-9, 1.0 - vmin) > 0.6
            weight = "bold" if view.sources[i] == view.targets[j] else "normal"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=8,
                fontweight=weight,
                color="black" if light else "white",
            )
    ax.set_xticks(range(n_t), view.targets)
    ax.set_yticks(range(n_s), view.sources)
    ax.set_xlabel("tested on (target)")
    ax.set_ylabel("trained on (source)")
    seeds = f", mean of {len(view.seeds)} seeds" if len(view.seeds) > 1 else ""
    ax.set_title(f"Macro AUC [95% CI]{seeds}\n{_accountant_title(view, eps)}", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, label="macro AUC")
    return _save(fig, path)


def _cmap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="0.85")


def _eps_positions(eps_list: list[float]) -> dict[float, float]:
    """x positions: log10(eps) for finite eps, inf one step to the right of the largest."""
    finite = [e for e in eps_list if math.isfinite(e)]
    pos = {e: math.log10(e) for e in finite}
    if any(math.isinf(e) for e in eps_list):
        if finite:
            span = max(pos.values()) - min(pos.values())
            pos[math.inf] = max(pos.values()) + max(0.5, 0.25 * span)
        else:
            pos[math.inf] = 0.0
    return pos


def _eps_axis(ax: Any, pos: dict[float, float]) -> None:
    ticks = sorted(pos, key=lambda e: pos[e])
    ax.set_xticks(
        [pos[e] for e in ticks],
        [NO_DP if math.isinf(e) else format_epsilon(e) for e in ticks],
    )
    ax.set_xlabel("ε (target; log scale)")
    ax.grid(alpha=0.3)


def _accountants_used(view: _View) -> str:
    used = sorted(
        view.df.loc[np.isfinite(view.df["epsilon_target"]), "accountant"].dropna().unique()
    )
    return ("ε by " + ", ".join(used) + " accountant") if used else "no DP trials"


def _auc_vs_epsilon(view: _View, new, path: Path) -> Path:
    pos = _eps_positions(view.eps)
    fig, (ax_on, ax_off) = new((11, 4.4), ncols=2, sharey=True)
    width = 0.04 * max(1.0, max(pos.values()) - min(pos.values()))
    drops = view.cmp is not None
    for i, s in enumerate(view.sources):
        shift = (i - (len(view.sources) - 1) / 2) * width
        xs, ys, err = [], [], []
        for e in view.eps:
            c = view.cell(e, s, s)
            if pd.isna(c["auc"]):
                continue
            xs.append(pos[e] + shift)
            ys.append(c["auc"])
            err.append((c["auc"] - c["lo"], c["hi"] - c["auc"]))
        if xs:
            yerr = np.nan_to_num(np.array(err).T, nan=0.0)
            ax_on.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, label=s)
    for i, t in enumerate(view.targets):
        shift = (i - (len(view.targets) - 1) / 2) * width
        xs, ys, err = [], [], []
        for e in view.eps:
            off = [view.cell(e, s, t)["auc"] for s in view.sources if s != t]
            y = _nanmean(off)
            if math.isnan(y):
                continue
            st = view.stat("auc_drop", "drop", target=t, epsilon=e) if drops else None
            lo, hi = (
                (st.get("auc_off_lo"), st.get("auc_off_hi"))
                if st is not None and st["k"] == 1
                else (None, None)
            )
            if st is not None and st["k"] > 1:  # mean of the per-seed CI bounds
                rows = view.per_seed("auc_drop", "drop", target=t, epsilon=e)
                lo, hi = rows["auc_off_lo"].mean(), rows["auc_off_hi"].mean()
            xs.append(pos[e] + shift)
            ys.append(y)
            err.append((y - lo, hi - y) if lo is not None and not pd.isna(lo) else (0.0, 0.0))
        if xs:
            ax_off.errorbar(xs, ys, yerr=np.array(err).T, marker="s", capsize=3, label=t)
    ax_on.set_title(
        "On-domain (trained and tested on the same site)\nerror bars: 95% bootstrap CI", fontsize=9
    )
    off_note = (
        "95% bootstrap CI of the mean" if drops else "no error bars: comparisons.parquet missing"
    )
    ax_off.set_title(f"Off-domain: mean over other sources, per test site\n{off_note}", fontsize=9)
    ax_on.set_ylabel("macro AUC")
    for ax in (ax_on, ax_off):
        _eps_axis(ax, pos)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, title="source" if ax is ax_on else "test site")
    fig.suptitle(f"Macro AUC vs ε ({_accountants_used(view)})", fontsize=10)
    return _save(fig, path)


def _subgroup_bars(view: _View, new, path: Path) -> Path:
    on = [s for s in view.sources if s in view.targets]
    fig, axes = new(
        (
            max(6.0, 1.3 * len(view.subgroups) * max(1, len(view.eps)) / 2 + 2),
            2.8 * max(1, len(on)),
        ),
        nrows=max(1, len(on)),
        squeeze=False,
    )
    n_e = max(1, len(view.eps))
    width = 0.8 / n_e
    x = np.arange(len(view.subgroups))
    for ax, s in zip(axes[:, 0], on or [None], strict=False):
        if s is None:
            ax.text(0.5, 0.5, "no on-domain cells", ha="center", transform=ax.transAxes)
            continue
        for k, e in enumerate(view.eps):
            cells = [view.cell(e, s, s, subgroup=g) for g in view.subgroups]
            h = np.array([c["auc"] for c in cells], dtype=float)
            lo = np.array([c["lo"] for c in cells], dtype=float)
            hi = np.array([c["hi"] for c in cells], dtype=float)
            xs = x + (k - (n_e - 1) / 2) * width
            label = NO_DP if math.isinf(e) else f"ε = {format_epsilon(e)}"
            # NaN heights and error bars draw nothing: a missing bar stays visibly missing
            ax.bar(xs, h, width, yerr=np.vstack([h - lo, hi - h]), capsize=2, label=label)
            for xi, hv in zip(xs, h, strict=True):
                if np.isnan(hv):
                    ax.text(xi, 0.02, MISSING, ha="center", va="bottom", fontsize=9)
        ax.set_xticks(x, view.subgroups, fontsize=8)
        ax.set_xlim(-0.5, len(view.subgroups) - 0.5)  # all-missing groups keep their slot
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("macro AUC")
        ax.set_title(f"{s} → {s} (on-domain); error bars: 95% bootstrap CI", fontsize=9)
        ax.legend(fontsize=7, ncols=n_e)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Macro AUC by subgroup ({_accountants_used(view)}; — = missing)", fontsize=10)
    return _save(fig, path)


def _drop_bars(view: _View, new, path: Path) -> Path:
    fig, axes = new(
        (max(6.0, 1.6 * len(view.targets) + 2), 3.2 * len(view.finite_eps)),
        nrows=len(view.finite_eps),
        squeeze=False,
    )
    series = (
        ("drop_nondp", "drop non-DP"),
        ("drop_dp", "drop DP (same ε)"),
        ("drop_abstract", "drop DP (abstract: non-DP on-domain)"),
    )
    for ax, eps in zip(axes[:, 0], view.finite_eps, strict=True):
        vals = _drop_values(view, eps)
        sites = list(vals)
        x = np.arange(len(sites))
        for k, (field, label) in enumerate(series):
            h = np.array([vals[t][field] for t in sites], dtype=float)
            xs = x + (k - 1) * 0.27
            ax.bar(xs, np.nan_to_num(h), 0.27, label=label)
            for xi, hv in zip(xs, h, strict=True):
                if np.isnan(hv):
                    ax.text(xi, 0, MISSING, ha="center", va="bottom", fontsize=9)
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.set_xticks(x, sites)
        ax.set_xlabel("test site")
        ax.set_ylabel("AUC drop")
        ax.set_title(f"{_accountant_title(view, eps)} vs no DP", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("AUC drop: on-domain − mean off-domain, per test site", fontsize=10)
    return _save(fig, path)
