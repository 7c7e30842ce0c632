"""Turn the aggregate tables into what a reader looks at: verdicts, transfer matrices, figures.

ONE pipeline: :class:`ReportView` is built once from the aggregate tables only
(``transfer.parquet`` and, when present, ``comparisons.parquet`` and ``reliability.parquet``;
never trial folders, so a report can be drawn anywhere the parquet files are copied), and
every output renders that view: the console summary (:func:`transfer_matrices_text`, printed
at the end of a sweep) and ``report.md`` (:func:`write_report`) are lists of
:class:`Section` functions over the same view, and the figures draw the same matrices and
comparison rows. A section is added by registering one function (:func:`register_section`).

Missing cells are shown as missing ("—"), never dropped; a metric that exists but is
undefined (too few positives) reads "n/a". matplotlib is imported only for the figures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from privdom_ray import atomic, guarantee
from privdom_ray.config import format_epsilon
from privdom_ray.stats import comparisons, inference, metrics, quantities, results

MISSING = "—"
UNDEFINED = "n/a"
REPORT = "report.md"
FIGURES = "figures"
NO_DP = "∞ (no DP)"
APPROX = " †"  # an approximate CI: too few units of the rarer class, or an AUC >= 0.95
_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "brier", "ece")


# ------------------------------------------------------------------------------ selections


def epsilons(df: pd.DataFrame) -> list[float]:
    return sorted(df["epsilon_target"].unique(), key=lambda e: (math.isinf(e), e))


def is_federated(df: pd.DataFrame) -> pd.Series:
    if "training_sites" not in df.columns:  # tables written before federations existed
        return pd.Series(False, index=df.index)
    return df["training_sites"].fillna(df["source"]) != df["source"]


def split_controls(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(standard single-site trials, the rest): controls such as clip-only never mix with
    epsilon = inf, and federated models are neither a site's own model nor an outside one."""
    standard = pd.Series(True, index=df.index)
    if "variant" in df.columns:
        standard &= df["variant"].fillna("standard") == "standard"
    return df[standard & ~is_federated(df)], df[~standard]


# ------------------------------------------------------------------------------ the view


class ReportView:
    """The aggregate tables plus every lookup the sections and figures need.

    ``df``: standard single-site rows of the transfer table (``full``: all rows). Cells are
    averaged over seeds (``k`` seeds, ``sd`` of the AUC across them). Comparison lookups
    return the row that answers a comparison (``is_summary``: the per-seed row with one
    seed, the across-seeds row with several).
    """

    def __init__(
        self,
        transfer: pd.DataFrame,
        cmp: pd.DataFrame | None = None,
        reliability: pd.DataFrame | None = None,
        *,
        standard_only: bool = True,
        guarantees: pd.DataFrame | None = None,
    ) -> None:
        self.full = transfer
        # one row per training set: what the tables' values cost it (an export's
        # guarantees.parquet; None in the data owner's folder)
        self.guarantees = guarantees
        self.df = transfer
        if standard_only and not transfer.empty:
            self.df = split_controls(transfer)[0]
        current = cmp is not None and {"is_summary", "df", "p_tost_iut"} <= set(cmp.columns)
        self.cmp = cmp if current else None
        self.old_cmp = cmp is not None and self.cmp is None  # written by an older version
        self.reliability = reliability
        df = self.df
        if df.empty:
            self.sources, self.targets, self.eps, self.seeds = [], [], [], []
            self.subgroups, self.labels, self.cells = [], [], pd.DataFrame()
        else:
            self.sources = sorted(df["source"].unique())
            self.targets = sorted(df["target"].unique())
            self.eps = epsilons(df)
            self.seeds = sorted(int(s) for s in df["seed"].dropna().unique())
            self.subgroups = list(pd.unique(df["subgroup"]))
            self.labels = [x for x in pd.unique(df["label"]) if x != "macro"]
            self.cells = _cells(df)
        self._summary: dict[tuple, dict] = {}
        if self.cmp is not None and not self.cmp.empty:
            rows = self.cmp[self.cmp["is_summary"].fillna(False).astype(bool)]
            for r in rows.to_dict("records"):
                self._summary[_summary_key(r)] = r

    @classmethod
    def load(cls, output: str | Path) -> ReportView:
        """The view of a sweep's output folder (transfer.parquet is required)."""
        path = Path(output) / results.GUARANTEES
        return cls(
            results.load(output), comparisons.load(output), comparisons.load_reliability(output),
            guarantees=pd.read_parquet(path) if path.is_file() else None,
        )  # fmt: skip

    @property
    def finite_eps(self) -> list[float]:
        return [e for e in self.eps if math.isfinite(e)]

    @property
    def has_nondp(self) -> bool:
        return any(math.isinf(e) for e in self.eps)

    @property
    def unit(self) -> str:
        """The resampling unit of the CIs ("patient", "image" or "patient/image")."""
        if "resampling_unit" not in self.df.columns:
            return "image"
        units = sorted(self.df["resampling_unit"].fillna("image").unique())
        return "/".join(units) or "image"

    def cell(self, eps: float, source: str, target: str, label="macro", subgroup="all") -> dict:
        """Seed-averaged metrics of one source -> target cell; NaN values (k = 0) if missing."""
        try:
            return self.cells.loc[(eps, label, subgroup, source, target)].to_dict()
        except KeyError:
            return {"k": 0}

    def matrix(self, eps: float, field: str = "auc", label="macro", subgroup="all"):
        """Rows = sources, columns = targets; NaN where the cell or value is missing."""
        return pd.DataFrame(
            [
                [self.cell(eps, s, t, label, subgroup).get(field, math.nan) for t in self.targets]
                for s in self.sources
            ],
            index=self.sources,
            columns=self.targets,
            dtype=float,
        )

    def summary(self, quantity: str, **where: Any) -> dict | None:
        """The summary comparison row of ``quantity`` at (source, target, label, subgroup,
        epsilon); None when comparisons.parquet lacks it."""
        key = (
            quantity,
            where.get("source"),
            where["target"],
            where.get("label", "macro"),
            where.get("subgroup", "all"),
            float(where["epsilon"]),
        )
        return self._summary.get(key)

    def rows(self, **where: Any) -> pd.DataFrame:
        """Summary comparison rows matching ``where`` (empty without comparisons)."""
        if self.cmp is None:
            return pd.DataFrame()
        sel = self.cmp[self.cmp["is_summary"].fillna(False).astype(bool)]
        for k, v in where.items():
            sel = sel[sel[k] == v]
        return sel


def _cells(df: pd.DataFrame) -> pd.DataFrame:
    """Seed-averaged metric columns per (epsilon, label, subgroup, source, target)."""
    cols = [
        c
        for m in _METRICS
        for c in (m, f"{m}_lo", f"{m}_hi")
        if c in df.columns and df[c].notna().any()
    ]
    cols += [c for c in ("n", "n_pos", "n_patients", "n_labels", "threshold") if c in df.columns]
    keys = ["epsilon_target", "label", "subgroup", "source", "target"]
    num = df[keys + cols].copy()
    for c in cols:
        num[c] = pd.to_numeric(num[c], errors="coerce")
    # an approximate CI (too few units of the rarer class, inference.RELIABLE_UNITS) is marked
    num["approx"] = df["ci_note"].notna().astype(float) if "ci_note" in df.columns else 0.0
    cols.append("approx")
    grp = num.groupby(keys, dropna=False)
    out = grp[cols].mean()
    out["sd"] = grp["auc"].std()
    out["k"] = grp["auc"].count()
    out["rows"] = grp.size()
    return out


def _summary_key(r: dict) -> tuple:
    source = r.get("source")
    return (
        r["quantity"],
        None if source is None or (isinstance(source, float) and math.isnan(source)) else source,
        r["target"],
        r["label"],
        r["subgroup"],
        float(r["epsilon"]),
    )


# ------------------------------------------------------------------------------ formatting


def _missing(x: Any) -> bool:
    return x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x))


def _num(x: Any, digits: int = 3, sign: bool = False) -> str:
    if _missing(x):
        return MISSING
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


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


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


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


# ------------------------------------------------------------------------------ sections


@dataclass(frozen=True)
class Section:
    """One part of the report: ``render(view)`` returns its markdown body (no heading).

    ``console``: also part of the console summary printed at the end of a sweep."""

    key: str
    title: str
    render: Callable[[ReportView], str]
    console: bool = False


def _no_comparisons(view: ReportView) -> str | None:
    if view.cmp is not None:
        return None
    if view.old_cmp:
        return (
            "comparisons.parquet was written by an older version (before the jackknife "
            "intervals and the own-drop primary endpoint): re-run the sweep's command, which "
            "re-evaluates the stored models and recomputes the tables without retraining.\n"
        )
    return (
        "comparisons.parquet not found: CIs of differences, p-values and verdicts need the "
        "per-image predictions and are written by the sweep's aggregator.\n"
    )


#: The estimand, with the paper's wording (shared/reference/paper.md, abstract).
ESTIMAND = (
    "**Primary endpoint**: the paper's claim, *\"DP-DT ... showed no evidence of a difference "
    "from non-DP-DT in the AUC drop from single-institution to cross-institution "
    'performance"*. Per test site T and ε: **drop(DP)** = DP on-domain AUC − mean DP '
    "off-domain AUC on T (the DP models' own drop), **drop(non-DP)** the same for the non-DP "
    "models, and **Δdrop = drop(DP) − drop(non-DP)** (macro AUC, all test images; a larger "
    "drop is worse). Beside it, under their own names: DP's **on-domain cost**, on-domain "
    "ΔAUC = on-domain AUC(DP) − AUC(non-DP), and its **off-domain cost**, off-domain ΔAUC = "
    "mean off-domain AUC(DP) − (non-DP) (negative: DP loses AUC); Δdrop = on-domain ΔAUC − "
    "off-domain ΔAUC. (The paper's published arithmetic subtracted the "
    "non-DP on-domain AUC on both sides, which cancels the on-domain term and leaves the "
    "off-domain cost only: a DP model that loses 0.04 AUC at home and abroad transfers as "
    "well as the non-DP one, and one that loses it at home only transfers better.)"
)


def _primary_intro(view: ReportView, margin: Any, alpha: float) -> str:
    return (
        ESTIMAND + f" Equivalence within ±{_num(margin, 3)} AUC by two one-sided tests at "
        f"α = {alpha:g} (the {1 - 2 * alpha:.0%} CI inside the margin). Two claims are read "
        "from it: **per site** (one named site among several), with the three p-values a "
        "verdict can rest on (TOST, difference, non-inferiority) Holm-adjusted across the test "
        "sites per ε; and **at every site at once**, an intersection-union test with no "
        "adjustment (every site's 90% CI inside the margin; its p is the largest TOST p). "
        'Neither is adjusted across ε ("at every ε" is not a familywise-controlled claim). '
        '"Smallest margin" is what each test set could confirm: these data (the 90% CI\'s '
        "farthest bound) / the design (the 90% CI's half-width: were Δdrop exactly 0). The "
        "Δdrop 90% CI and both smallest margins are unadjusted (each site's own CI, as the "
        "every-site test reads it); the per-site verdict reads Holm-adjusted p's, so a site "
        "whose 90% CI lies inside the margin can still be inconclusive per site. "
        f"Intervals: {view.unit}-level jackknife t. " + _seeds_note(view) + "\n"
    )


def _primary_table(view: ReportView, eps: float) -> str:
    header = ["test site", "drop non-DP [95% CI]", "drop DP [95% CI]", "Δdrop [95% CI]",
              "Δdrop [90% CI]", "smallest margin: data / design",
              "Holm p: TOST / diff. / non-inf.", "per-site verdict (Holm)",
              "on-domain ΔAUC (cost) [95% CI]", "off-domain ΔAUC (cost) [95% CI]",
              "test units"]  # fmt: skip
    table = []
    for t in view.targets:
        r = view.summary(quantities.PRIMARY_QUANTITY, target=t, epsilon=eps)
        on = view.summary(quantities.ON_DOMAIN, target=t, epsilon=eps)
        off = view.summary(quantities.OFF_DOMAIN, target=t, epsilon=eps)
        tost = "" if r is None else _ci(r.get("tost_lo"), r.get("tost_hi"), 3, True)
        smallest = MISSING if r is None or _missing(r.get("margin_confirmable")) else (
            f"{r['margin_confirmable']:.3f} / {r['tost_half_width']:.3f}")  # fmt: skip
        holm = MISSING if r is None else " / ".join(
            _p(r.get(f"{c}_holm")) for c in ("p_tost", "p_value", "p_noninf"))  # fmt: skip
        units = MISSING if r is None else f"{r['n_patients']} {r['resampling_unit']}s"
        table.append([f"**{t}**", _value(r, "value_nondp"), _value(r, "value_dp"),
                      _value(r, "delta", 3, True), tost.strip() or MISSING, smallest, holm,
                      _verdict(r), _value(on, "delta", 3, True), _value(off, "delta", 3, True),
                      units])  # fmt: skip
    return _table(header, table)


def _every_site(view: ReportView, eps: float) -> str:
    """The intersection-union verdict of "equivalent at every site" at one epsilon."""
    rows = [view.summary(quantities.PRIMARY_QUANTITY, target=t, epsilon=eps)
            for t in view.targets]  # fmt: skip
    got = [r for r in rows if r is not None and not _missing(r.get("p_tost_iut"))]
    if not got:
        why = [re.search(r"no primary estimate at test site\(s\) [^(;]*", str(r["null_reason"]))
               for r in rows if r is not None]  # fmt: skip
        why = [m.group(0).strip() for m in why if m]
        return ("Every site at once: no verdict ("
                + (f"{why[0]}; the claim needs every site" if why else "no primary rows")
                + ").\n")  # fmt: skip
    r = got[0]
    alpha = inference.alpha_of(float(r["ci"]))
    missing = len(view.targets) - len(got)
    if missing:
        return (f"Every site at once: no verdict ({missing} of {len(view.targets)} test sites "
                "have no primary row; the claim needs every site).\n")  # fmt: skip
    yes = r["p_tost_iut"] <= alpha
    return (
        f"**Every site at once** (intersection-union test over {int(r['n_sites'])} sites, no "
        f"adjustment; p = largest TOST p = {_p(r['p_tost_iut'])}): "
        + (f"**equivalent within ±{r['margin']:g} at every site**" if yes
           else "not shown (at least one site's 90% CI reaches beyond the margin)")
        + ".\n"
    )  # fmt: skip


def _section_headline(view: ReportView) -> str:
    missing = _no_comparisons(view)
    if missing:
        return missing
    if not view.finite_eps or not view.has_nondp:
        return "Needs both DP and non-DP trials.\n"
    rows = view.rows(quantity=quantities.PRIMARY_QUANTITY)
    margin = rows["margin"].dropna().iloc[0] if rows["margin"].notna().any() else None
    alpha = inference.alpha_of(float(view.cmp["ci"].dropna().iloc[0]))
    out = [_primary_intro(view, margin, alpha)]
    for eps in view.finite_eps:
        out.append(f"### Primary: {_eps_label(eps)} vs non-DP — {_privacy_note(view.df, eps)}\n")
        out.append(_primary_table(view, eps))
        out.append(_every_site(view, eps))
        out.append(_paired_overview(view, eps))
    return "\n".join(out)


def _paired_overview(view: ReportView, eps: float) -> str:
    """The secondary headline: paired ΔAUC on-domain and off-domain (macro, all images)."""
    rows = []
    for s, t in _pairs(view):
        r = view.summary("delta_auc", source=s, target=t, epsilon=eps)
        rows.append([_pair_name(s, t), _value(r, "delta", 3, True),
                     MISSING if r is None else _ci(r.get("tost_lo"), r.get("tost_hi"), 3,
                                                   True).strip() or MISSING,
                     MISSING if r is None else _p(r.get("p_value")),
                     MISSING if r is None else _p(r.get("q_value")), _verdict(r)])  # fmt: skip
    header = ["source → target", "ΔAUC = DP − non-DP [95% CI]", "[90% CI]", "p", "q (BH)",
              "verdict on q (exploratory)"]  # fmt: skip
    return f"Paired ΔAUC, on-domain and off-domain ({_eps_label(eps)} vs non-DP):\n\n" + _table(
        header, rows
    )


def _section_conclusions(view: ReportView) -> str:
    return (
        "- A verdict is one of: **equivalent within ±m** (the 90% CI of the difference lies "
        "inside ±m: DP changes the quantity by less than m, either way); **different** (the "
        "95% CI excludes 0, with the direction); **non-inferior** (DP is not worse by m or "
        "more, but may be better by more than m); **inconclusive** (the data cannot tell: "
        "the smallest margin column says how large a margin this test set could confirm). "
        'A large p-value is never read as "no difference": without equivalence, the data '
        "are compatible with a difference as large as the CI's far end.\n"
        f"- Every CI and p-value treats test {view.unit}s as the unit (all images of a patient "
        "together): a leave-one-patient-out jackknife variance (every model's AUCs without the "
        "same patient, so paired differences keep their pairing), a t quantile with "
        "Satterthwaite degrees of freedom from the rarer class's effective number of patients "
        "(few patients, or one patient with many correlated images, give wide intervals), and "
        "the logit scale for AUCs, rates and Brier scores. In simulation "
        "(benchmarks/sim_intervals.py: 1-15 correlated images per patient, prevalence 2-40%) "
        "these 95% intervals covered 0.946-0.973 of per-label AUCs at 10 positive patients and "
        "0.95 from 50, and their paired test rejected at most 5% of true nulls; the percentile "
        "bootstrap used before covered 0.87-0.90 at 10 and rejected up to 11%. A CI marked † "
        "rests on fewer patients than the simulation verified (10), or has a point AUC of "
        "0.95 or more (0.05 or less), where such intervals covered only 0.90-0.92 in "
        "simulation (docs/statistics.md). Domains "
        "without patient ids use images as the unit and say so (resampling_unit).\n"
        "- Seeds. " + _seeds_note(view) + "\n"
        "- Multiplicity. The primary endpoint's per-site verdicts read Holm-adjusted p-values "
        "(across test sites per ε); its every-site claim is an intersection-union test (no "
        "adjustment needed). Every other verdict is exploratory and reads Benjamini-Hochberg "
        "q-values (of its difference, TOST and non-inferiority p's) within the family "
        "(comparison, quantity): all labels, subgroups, sources, targets, ε and seeds of that "
        "quantity together (column q_family).\n"
        "- They cannot say why a model transfers badly (label-definition shift between sites "
        "shows in the per-label matrices), nor anything about sites, populations or epsilons "
        "not in the grid, nor about privacy (the ε column does that).\n"
        "- Macro values average a fixed label set: the labels with enough positive and "
        "negative patients (evaluation.min_positives / min_negatives) in the evaluated set; "
        "macros shown side by side for subgroups (sex, age) average the labels valid in every "
        "subgroup of that comparison, and the tables show how many (n_labels).\n"
    )


def _section_test_sets(view: ReportView) -> str:
    """n, patients and prevalence per target and subgroup (the same for every model)."""
    if view.df.empty:
        return "(no rows)\n"
    first = view.df.drop_duplicates(["target", "subgroup", "label"])
    header = ["target", "subgroup", "images", "units", *view.labels]
    rows = []
    for t in view.targets:
        for g in view.subgroups:
            sel = first[(first["target"] == t) & (first["subgroup"] == g)].set_index("label")
            if "macro" not in sel.index:
                continue
            m = sel.loc["macro"]
            units = MISSING
            if "n_patients" in sel.columns and not _missing(m.get("n_patients")):
                units = f"{int(m['n_patients'])} {m.get('resampling_unit') or 'image'}s"
            cells = []
            for lab in view.labels:
                r = sel.loc[lab] if lab in sel.index else None
                ok = r is not None and not _missing(r["n"]) and r["n"] > 0
                cells.append(f"{int(r['n_pos'])} ({r['n_pos'] / r['n']:.0%})" if ok else MISSING)
            rows.append([f"**{t}**" if g == "all" else t, g, str(int(m["n"])), units, *cells])
    return (
        "Positives per label (prevalence among images with a known label); the same for "
        "every model evaluated on the target.\n\n" + _table(header, rows)
    )


def _matrix_rows(view: ReportView, eps: float, label: str, digits: int = 3) -> list[list[str]]:
    return [
        [f"**{s}**", *(_cell_text(view.cell(eps, s, t, label), digits) for t in view.targets)]
        for s in view.sources
    ]


def _on_off_means(view: ReportView, eps: float) -> str:
    mat = view.matrix(eps)
    on = [mat.loc[s, s] for s in mat.index if s in mat.columns]
    off = [mat.loc[s, t] for s in mat.index for t in mat.columns if s != t]
    return f"mean on-domain {_mean(on)}, mean off-domain {_mean(off)}\n"


def _mean(values: Iterable[float]) -> str:
    return _num(inference.nanmean(list(values)))


def _section_matrices(view: ReportView) -> str:
    k = len(view.seeds)
    how = (
        f"Cells: mean macro AUC over the {k} seeds [mean of the per-seed 95% CI bounds, the "
        "test-set uncertainty of one model] ± SD across seeds (training variability)."
        if k > 1
        else f"Cells: macro AUC [95% CI, {view.unit}-level jackknife t, logit scale]."
    )
    out = [
        how + ' "—": no evaluation; "n/a": too few positives or negatives; "†": an '
        "approximate CI (fewer patients of the rarer class than the simulation verified, or "
        "an AUC of 0.95 or more, where 95% CIs covered 0.90-0.92).\n"
    ]
    for eps in view.eps:
        out.append(f"### {_eps_label(eps)} — {_privacy_note(view.df, eps)}\n")
        out.append(_table(["source \\ target", *view.targets], _matrix_rows(view, eps, "macro")))
        out.append(_on_off_means(view, eps))
    return "\n".join(out)


def _section_label_matrices(view: ReportView) -> str:
    out = [
        "The paper's per-label matrices: a label that transfers much worse than the others "
        "(e.g. an AUC below 0.5 off-domain) points to a label-definition shift between sites "
        "rather than to the model.\n"
    ]
    for eps in view.eps:
        for label in view.labels:
            out.append(f"### {label}, {_eps_label(eps)}\n")
            out.append(
                _table(["source \\ target", *view.targets], _matrix_rows(view, eps, label, 2))
            )
    return "\n".join(out)


def _section_drop(view: ReportView) -> str:
    out = [
        "For test site T: on-domain AUC = the model trained on T, tested on T; mean "
        "off-domain AUC = mean over the other sources S ≠ T of the models trained on S, "
        "tested on T (macro AUC, subgroup all), all at the row's ε. **drop** = on-domain − "
        "mean off-domain: each side's own drop. Δdrop = drop(DP) − drop(non-DP) (a larger drop "
        "is worse) = on-domain ΔAUC − off-domain ΔAUC, DP's on- and off-domain costs (AUC, "
        "DP − non-DP; negative: DP loses AUC).\n",
        _seeds_note(view) + "\n",
    ]
    if not view.finite_eps:
        out.append("No DP trials: nothing to compare.\n")
    missing = _no_comparisons(view)
    if missing:
        return "\n".join([*out, missing])
    header = ["test site", "drop non-DP", "drop DP", "Δdrop", "verdict (Holm)",
              "on-domain ΔAUC (cost)", "off-domain ΔAUC (cost)", "n off"]  # fmt: skip
    for eps in view.finite_eps:
        out.append(f"### {_eps_label(eps)} vs non-DP — {_privacy_note(view.df, eps)}\n")
        rows, abstract = [], []
        for t in view.targets:
            r = view.summary(quantities.PRIMARY_QUANTITY, target=t, epsilon=eps)
            nondp = view.summary(quantities.PRIMARY_QUANTITY, target=t, epsilon=math.inf)
            on = view.summary(quantities.ON_DOMAIN, target=t, epsilon=eps)
            off = view.summary(quantities.OFF_DOMAIN, target=t, epsilon=eps)
            n_off = MISSING if r is None or _missing(r.get("n_off")) else str(r["n_off"])
            rows.append([f"**{t}**", _value(nondp, "value_nondp"), _value(r, "value_dp"),
                         _value(r, "delta", 3, True), _verdict(r), _value(on, "delta", 3, True),
                         _value(off, "delta", 3, True), n_off])  # fmt: skip
            abstract.append(
                f"{_num(r and r.get('value_dp'), 2)} vs {_num(nondp and nondp.get('value_nondp'), 2)}"
                f", Δdrop {_num(r and r.get('delta'), 3, True)}, {_verdict(r)}"
            )
        out.append(_table(header, rows))
        out.append("Abstract-style summary (the paper's sentence, with its quantity named: each "
                   "side's own drop, Δdrop and the per-site verdict):\n")  # fmt: skip
        out.append(_table(["", *view.targets], [["AUC drop, drop(DP) vs drop(non-DP)", *abstract]]))
    return "\n".join(out)


def _section_thresholded(view: ReportView) -> str:
    out = [
        "Accuracy, sensitivity and specificity (macro over the label set) at the SOURCE's "
        "threshold (Youden's J on the source's validation split) carried unchanged to each "
        "target, with 95% CIs: what a deployed model's fixed cut-off does at another site.\n"
    ]
    header = ["source → target", "accuracy", "sensitivity", "specificity"]
    for eps in view.eps:
        out.append(f"### {_eps_label(eps)}\n")
        rows = []
        for s, t in _pairs(view):
            c = view.cell(eps, s, t)
            rows.append([_pair_name(s, t), *(_metric_text(c, m) for m in header[1:])])
        out.append(_table(header, rows))
    return "\n".join(out)


def _metric_text(c: dict, metric: str, digits: int = 3) -> str:
    if c.get("k", 0) == 0 and c.get("rows", 0) == 0:
        return MISSING
    v = c.get(metric)
    if _missing(v):
        return UNDEFINED
    return _num(v, digits) + _ci(c.get(f"{metric}_lo"), c.get(f"{metric}_hi"), digits)


def _section_calibration(view: ReportView) -> str:
    out = [
        "Brier score (with 95% CI) and expected calibration error (10 equal-width probability "
        "bins, no CI) of the sigmoid outputs, macro over the label set; lower is better. "
        "ΔBrier = DP − non-DP of the same source and seed on the same test patients "
        "(exploratory). The ECE is biased upwards, most in small test sets, and a bootstrap "
        "CI around it does not cover a well-calibrated model's ECE: read it as a scale only; "
        "the Brier score (a proper scoring rule) carries the comparison.\n"
    ]
    header = ["source → target", "Brier", "ECE", "ΔBrier [95% CI]", "p"]
    for eps in view.eps:
        out.append(f"### {_eps_label(eps)}\n")
        rows = []
        for s, t in _pairs(view):
            c = view.cell(eps, s, t)
            line = [_pair_name(s, t), _metric_text(c, "brier"), _metric_text(c, "ece")]
            r = (view.summary("delta_brier", source=s, target=t, epsilon=eps)
                 if math.isfinite(eps) else None)  # fmt: skip
            line += [_value(r, "delta", 3, True), MISSING if r is None else _p(r.get("p_value"))]
            rows.append(line)
        out.append(_table(header, rows))
    if view.reliability is not None and not view.reliability.empty:
        out.append("Reliability diagram (pooled over labels, on- vs off-domain): "
                   f"`{FIGURES}/reliability.png`.\n")  # fmt: skip
    return "\n".join(out)


def _section_fairness(view: ReportView) -> str:
    out = [
        "Macro AUC gaps per model and test site: female − male and oldest − youngest age bin, "
        f"each with a 95% CI from one jackknife over the test set's {view.unit}s (both "
        "subgroups left out patient by patient together) and the labels valid in both "
        "subgroups (n labels); DP's effect = gap(DP) − gap(non-DP), paired (same source, seed "
        "and test patients). A gap has no 'worse' direction, so verdicts are equivalence, "
        "different or inconclusive (exploratory: on BH q-values).\n"
    ]
    missing = _no_comparisons(view)
    if missing or not view.finite_eps or not view.has_nondp:
        return "\n".join([*out, missing or "Needs both DP and non-DP trials.\n"])
    header = ["source → target", "gap", "n labels", "gap DP [95% CI]", "gap non-DP [95% CI]",
              "Δ gap [95% CI]", "p", "q", "verdict"]  # fmt: skip
    for eps in view.finite_eps:
        out.append(f"### {_eps_label(eps)} vs non-DP\n")
        rows = []
        for s, t in _pairs(view):
            for q in ("auc_gap_sex", "auc_gap_age"):
                sel = view.rows(quantity=q, source=s, target=t, epsilon=eps)
                r = sel.iloc[0].to_dict() if len(sel) else None
                rows.append([_pair_name(s, t), r["subgroup"] if r else q,
                             MISSING if r is None else _num(r.get("n_labels"), 0),
                             _value(r, "value_dp"), _value(r, "value_nondp"),
                             _value(r, "delta", 3, True),
                             MISSING if r is None else _p(r.get("p_value")),
                             MISSING if r is None else _p(r.get("q_value")),
                             _verdict(r)])  # fmt: skip
        out.append(_table(header, rows))
        out.append(_subgroup_tables(view, eps))
    return "\n".join(out)


def subgroup_families(view: ReportView) -> dict[str, list[str]]:
    """The subgroups compared side by side ("sex", "age"), in the table's order."""
    fams: dict[str, list[str]] = {}
    for g in view.subgroups:
        if g != "all":
            fams.setdefault(metrics.subgroup_family(g), []).append(g)
    return fams


def _n_labels(view: ReportView, t: str, g: str | list[str]) -> str:
    """The macro's label count of subgroup(s) g on target t (the same for every model; a
    family's subgroups share one set, an empty subgroup has none)."""
    names = [g] if isinstance(g, str) else g
    c = view.df[(view.df["target"] == t) & view.df["subgroup"].isin(names)
                & (view.df["label"] == "macro")]  # fmt: skip
    if c.empty or "n_labels" not in c.columns or c["n_labels"].isna().all():
        return MISSING
    return str(int(c["n_labels"].max()))


def _subgroup_tables(view: ReportView, eps: float) -> str:
    """Macro AUC DP / non-DP per subgroup, one table per family: every subgroup of a family
    averages the same labels (n labels per target, from the transfer table)."""
    out = []
    for fam, names in subgroup_families(view).items():
        rows = []
        for s, t in _pairs(view):
            row = [_pair_name(s, t), _n_labels(view, t, names)]
            for g in names:
                dp = view.cell(eps, s, t, subgroup=g).get("auc")
                nd = view.cell(math.inf, s, t, subgroup=g).get("auc")
                r = view.summary("delta_auc", source=s, target=t, subgroup=g, epsilon=eps)
                q = "" if r is None else f" (q {_p(r.get('q_value'))})"
                row.append(f"{_num(dp)} / {_num(nd)}{q}")
            rows.append(row)
        out.append(f"Macro AUC DP / non-DP by {fam} (the labels valid in every {fam} subgroup "
                   "of the target; BH q of the paired difference):\n\n"
                   + _table(["source → target", "n labels", *names], rows))  # fmt: skip
    return "\n".join(out)


def _section_paired(view: ReportView) -> str:
    out = [
        "Every DP model vs the non-DP model of the same source and seed on the same test "
        f"{view.unit}s (exploratory: verdicts on BH q-values within the family (paired_delta, "
        "delta_auc)). " + _seeds_note(view) + "\n"
    ]
    missing = _no_comparisons(view)
    if missing or not view.finite_eps or not view.has_nondp:
        return "\n".join([*out, missing or "Needs both DP and non-DP trials.\n"])
    header = ["source → target", "AUC DP", "AUC non-DP", "ΔAUC [95% CI]", "p", "q", "verdict",
              "n", "units", "n labels"]  # fmt: skip
    for eps in view.finite_eps:
        out.append(f"### {_eps_label(eps)} vs non-DP, macro AUC, all test images\n")
        rows = [_paired_row(_pair_name(s, t), view.summary("delta_auc", source=s, target=t,
                                                           epsilon=eps)) for s, t in _pairs(view)]  # fmt: skip
        out.append(_table(header, rows))
        out.append(f"### {_eps_label(eps)} vs non-DP, on-domain macro AUC by subgroup\n")
        rows = [
            _paired_row(f"{s} → {s}, {g}", view.summary("delta_auc", source=s, target=s,
                                                          subgroup=g, epsilon=eps))
            for s in view.sources if s in view.targets for g in view.subgroups
        ]  # fmt: skip
        out.append(_table(header, rows))
    return "\n".join(out)


def _paired_row(name: str, r: dict | None) -> list[str]:
    if r is None:
        return [name, *[MISSING] * 9]
    units = (
        f"{r['n_patients']} {r['resampling_unit']}s"
        if not _missing(r.get("n_patients"))
        else MISSING
    )
    return [name, _num(r.get("value_dp")), _num(r.get("value_nondp")),
            _value(r, "delta", 3, True), _p(r.get("p_value")), _p(r.get("q_value")),
            _verdict(r), _num(r.get("n"), 0), units, _num(r.get("n_labels"), 0)]  # fmt: skip


def federated_text(view: ReportView) -> str:
    """Federated vs single-site models: mean macro AUC on member sites and on held-out sites."""
    full = view.full
    fed = full[is_federated(full)]
    if fed.empty:
        return ""
    single = view.df
    out = [
        "### Federated vs single-site training (macro AUC, mean over targets and seeds)",
        "",
        "| epsilon | model | on member sites | on held-out sites |",
        "|---|---|---|---|",
    ]
    macro = fed[(fed["label"] == "macro") & (fed["subgroup"] == "all")]
    ref_all = single[(single["label"] == "macro") & (single["subgroup"] == "all")]
    for eps in epsilons(fed):
        for name in sorted(fed["source"].unique()):
            sel = macro[(macro["source"] == name) & (macro["epsilon_target"] == eps)]
            if sel.empty:
                continue
            sites = set(sel["training_sites"].iloc[0].split(","))
            member = sel["target"].isin(sites)
            on, off = sel.loc[member, "auc"].mean(), sel.loc[~member, "auc"].mean()
            out.append(f"| {format_epsilon(eps)} | federated {name} | {_num(on)} | {_num(off)} |")
            ref = ref_all[(ref_all["epsilon_target"] == eps) & ref_all["source"].isin(sites)]
            if len(ref):
                own = ref["source"] == ref["target"]
                out.append(
                    f"| {format_epsilon(eps)} | single-site ({', '.join(sorted(sites))}) | "
                    f"{_num(ref.loc[own, 'auc'].mean())} (own site) | "
                    f"{_num(ref.loc[~own, 'auc'].mean())} (other sites) |"
                )
    out.append("")
    out.append(
        "Federated epsilons are per site: every member site's data is protected at the row's "
        "epsilon or better (see each trial's ledger.json, `sites`)."
    )
    out += ["", FEDERATION_TRUST]
    return "\n".join(out) + "\n"


#: The federation's trust model, as the report states it (docs/federated.md).
FEDERATION_TRUST = (
    "**Trust model: a trusted coordinator.** The coordinator (here the sweep's own trial "
    "process) draws every site's secret key and keeps all of them in its private checkpoint; "
    "the sites' noise and Poisson sampling derive from those keys. Each site's ε therefore "
    "holds against everyone who sees the released model, these tables and this report, but "
    "NOT against the coordinator: with the keys it can regenerate a site's noise, subtract "
    "it from the site's update and read the clipped gradient sums and which images each step "
    "used. An untrusted coordinator could also hand out keys it chose (replayable noise), "
    "send crafted global models whose updates leak inputs, ask for other (sigma, q, steps) "
    "than the plan, or skip the noise; a deployment that does not trust it draws each key at "
    "its site and never sends it, has every site check the plan against its own budget, and "
    "aggregates with secure aggregation. Besides its noised weights and step counts (covered "
    "by its ε) and its noised label counts, each site sends per round its validation macro "
    "AUC and k-anonymous validation-score histograms (every released bin holds at least 10 "
    "images, on a public 0.02 grid; labels with fewer images send nothing), computed from "
    "validation images without noise: outside the guarantee, like a single-site model's "
    "threshold."
)


def controls_and_leakage_text(view: ReportView) -> str:
    """Matrices of the control trials and the membership-inference audit per epsilon/variant."""
    full = view.full
    _, controls = split_controls(full)
    out = []
    for variant in sorted(controls["variant"].unique()) if len(controls) else []:
        sub = ReportView(controls[controls["variant"] == variant], standard_only=False)
        out.append(f"### control: {variant} (clipping + Poisson sampling, no noise; epsilon = inf)")
        out.append("")
        out.append(_plain_matrix(sub, math.inf))
    if "mia_auc" not in full.columns or not full["mia_auc"].notna().any():
        return "\n".join(out)
    out += [
        "### Membership inference (loss threshold; train vs held-out images of the source)",
        "",
        "| trials | attack AUC (0.5 = no leakage) | TPR at 1% FPR |",
        "|---|---|---|",
    ]
    trials = full.drop_duplicates("trial_key")
    fed = is_federated(trials)
    standard = trials["variant"].fillna("standard") == "standard"
    groups = [
        (
            f"epsilon = {format_epsilon(e)}",
            trials[(trials["epsilon_target"] == e) & standard & ~fed],
        )
        for e in view.eps
    ]
    groups += [
        (
            f"federated, epsilon = {format_epsilon(e)} (worst site)",
            trials[fed & (trials["epsilon_target"] == e)],
        )
        for e in (epsilons(trials[fed]) if fed.any() else [])
    ]
    groups += [(v, trials[trials["variant"] == v]) for v in sorted(controls["variant"].unique())]
    for name, g in groups:  # fmt: skip
        if len(g) and g["mia_auc"].notna().any():
            out.append(
                f"| {name} | {_num(g['mia_auc'].mean())} | {_num(g['mia_tpr_at_1fpr'].mean())} |"
            )
    out.append("")
    return "\n".join(out)


def _section_other(view: ReportView) -> str:
    return "\n".join(p for p in (federated_text(view), controls_and_leakage_text(view)) if p)


# ------------------------------------------------------------------------------ console


def _plain_matrix(view: ReportView, eps: float) -> str:
    """The macro matrix without CIs (the console's compact form of the same view cells)."""
    rows = [
        [s, *(_num(v) for v in view.matrix(eps).loc[s])] for s in view.sources
    ]  # missing cells are NaN in view.matrix: "—"
    return _table(["source \\ target", *view.targets], rows)


def _console_matrices(view: ReportView) -> str:
    out = []
    for eps in view.eps:
        used = sorted(view.df.loc[view.df["epsilon_target"] == eps, "accountant"].dropna().unique())
        how = " (no DP)" if math.isinf(eps) else f" (epsilon by {', '.join(used)} accountant)"
        out.append(f"### epsilon = {format_epsilon(eps)}{how}\n")
        out.append(_plain_matrix(view, eps))
        out.append(_on_off_means(view, eps))
    return "\n".join(out)


def _console_verdicts(view: ReportView) -> str:
    """The primary endpoint's verdicts, one line per (epsilon, test site)."""
    if view.cmp is None:
        return ""
    lines = []
    for eps in view.finite_eps:
        per_site = []
        for t in view.targets:
            r = view.summary(quantities.PRIMARY_QUANTITY, target=t, epsilon=eps)
            if r is not None and not _missing(r.get("delta")):
                per_site.append(f"- epsilon = {format_epsilon(eps)}, test site {t}: Δdrop "
                                f"{_value(r, 'delta', 3, True)}: {_verdict(r)}")  # fmt: skip
        if per_site:
            every = _every_site(view, eps).strip()
            lines += [*per_site, f"- epsilon = {format_epsilon(eps)}: {every}"]
    return "\n".join(lines) + "\n" if lines else ""


def _section_privacy(view: ReportView) -> str:
    """What the reported epsilon covers: one statement per training set for everything in
    these tables (an export's), and which values no epsilon covers."""
    trials = view.full.drop_duplicates("trial_key")
    dp = trials[trials["accountant"].fillna("none") != "none"]
    lines = _training_set_lines(view)
    if dp.empty:
        lines.append("No DP trials: nothing here carries a privacy guarantee.\n")
    for eps in epsilons(dp):
        sel = dp[dp["epsilon_target"] == eps]
        units = ", ".join(sorted(sel["privacy_unit"].dropna().unique())) or "image"
        weights = ", ".join(sorted(sel["loss_weights"].dropna().unique())) or "?"
        lines.append(
            f"- **ε = {format_epsilon(eps)}** ({_privacy_note(sel, eps)}): each training "
            f"{units} of the source (each site's own, for a federation) is protected in the "
            f"released weights and everything computed from them; loss weights: {weights}"
            + (" (the label counts' Gaussian release is part of ε)" if "dp_counts" in weights
               else "")
        )  # fmt: skip
    if (trials["accountant"].fillna("none") == "none").any():
        lines.append(
            f"- **ε = inf** and the controls: **{guarantee.NO_GUARANTEE}**. Every value of "
            "these rows (AUCs, thresholds, calibration bins, the non-DP side of each "
            "comparison) comes from a model without a privacy guarantee."
        )
    lines += [
        "",
        "The guarantee assumes the DP mechanism's randomness is secret: the noise and the "
        "Poisson sampling (and the label-count release) were drawn from OS entropy, and their "
        "states lived only in the private checkpoints, deleted when each trial finished. The "
        "training-set size (hence q and the step count) is treated as public, as in Opacus.",
        "",
        "Values in these tables that the epsilon does **not** cover (the parquet schema marks "
        "each column, field metadata `privacy`):",
    ]
    for cls, meaning in results.PRIVACY_CLASSES.items():
        if cls == "identifier" and view.guarantees is not None:
            continue  # an export: keys were replaced by release ids
        if cls in ("nondp", "validation", "training", "timing", "audit", "identifier"):
            cols = [c for c in view.full.columns if results.privacy_class(c) == cls]
            if cls == "nondp":
                cols = [c for c, k in results.COMPARISONS_PRIVACY.items() if k == cls][:4] + ["…"]
            if cols:
                lines.append(f"- {', '.join(f'`{c}`' for c in cols)}: {meaning}")
    lines.append(
        "\nEvery other value is computed only from test images (never trained on), from the "
        "ledger, or is configuration. Per-image predictions, training curves, logs and "
        "checkpoints stay with the data owner; `launch.py export` copies only the shareable set."
    )
    return "\n".join(lines) + "\n"


def _training_set_lines(view: ReportView) -> list[str]:
    """Per training set: the composed epsilon of everything in these tables computed from its
    images (an export's guarantees.parquet), or where to find it."""
    g = view.guarantees
    if g is None or g.empty:
        return [
            "Several DP trainings of one training set (other epsilons and seeds, federations, "
            "audit twins) compose. `launch.py export` states, per training set, the ε of "
            "everything it exports composed by the PLD accountant (in its report, PRIVACY.md, "
            "guarantees.parquet and each model card); by default the audit columns stay home.",
            "",
        ]
    audit = bool(g["audit_included"].any())
    out = [
        "**One guarantee per training set**: everything in these tables computed from the "
        "site's training images, composed by the PLD accountant"
        + (", the audit twins' canary results included:" if audit else
           " (the audit twins' columns are not in these tables):"),
        "",
    ]  # fmt: skip
    for r in g.to_dict("records"):
        extra = ""
        if not audit and r.get("audit_twins"):
            extra = f" (with the audit twins: ε = {r['epsilon_with_audit']:.4g})"
        out.append(f"- **{r['training_site']}**: {r['statement']}{extra}")
    return [*out, ""]


def _audit_rows(view: ReportView) -> pd.DataFrame:
    full = view.full
    if "audit_epsilon_lower" not in full.columns:
        return pd.DataFrame()
    rows = full[full["audit_epsilon_lower"].notna()].drop_duplicates("trial_key")
    return rows.sort_values(["source", "epsilon_target", "seed"])


def _audit_max(r: Mapping[str, Any]) -> float:
    """The most the twin's m canaries can show; tables written before the column existed had
    version-1 twins (Steinke et al.'s bound over 7 symmetric rules), computed here from m."""
    if not _missing(r.get("audit_epsilon_max")):
        return float(r["audit_epsilon_max"])
    from privdom_ray.audit_bound import guess_grid, max_lower

    m, delta = int(r["audit_canaries"]), float(r.get("delta") or 1e-5)
    return max_lower(m, delta, grid=guess_grid(m, top=()), binomial=True)


def _audit_power(r: Mapping[str, Any]) -> str:
    """What the twin's audit would catch (80% of simulated runs), in words."""
    spent = r["audit_twin_epsilon"]
    if _missing(spent) or not math.isfinite(spent) or r.get("audit_kind") != "gradient":
        return "—"
    replay = not _missing(r.get("audit_epsilon_lower_replay"))
    scale = r.get("audit_power_noise_scale")
    if not replay:
        return "not estimated (twin from before the power estimate; re-run it)"
    if _missing(scale):
        return "nothing: not even a build without noise"
    return f"noise ×≤{scale:.2f}, and noise replayed from the public seed"


def _audit_verdict(r: Mapping[str, Any], top: float) -> str:
    spent, lower = r["audit_twin_epsilon"], r["audit_epsilon_lower"]
    if _missing(spent) or not math.isfinite(spent):
        return "no DP: shows what leaks"
    if lower > spent:
        return "**BROKEN: above ε spent**"
    noise = r.get("audit_noise_check")
    if not _missing(noise) and noise != "ok":
        return f"**BROKEN: {noise}**"
    if top <= spent:
        return f"cannot tell: m = {int(r['audit_canaries'])} caps the bound at {top:.2f} ≤ ε spent"
    scale = r.get("audit_power_noise_scale")
    if _missing(r.get("audit_epsilon_lower_replay")) or _missing(scale):
        return "no evidence of a broken build, at unknown power"
    return "no evidence of a broken build"


def _section_audit(view: ReportView) -> str:
    """Audit twins: the empirical lower bound on epsilon next to the epsilon spent, what the
    audit could show at most, and what it would catch."""
    rows = _audit_rows(view)
    if rows.empty:
        return ""
    table = []
    for r in rows.to_dict("records"):
        top = _audit_max(r)
        table.append([
            f"{r['source']}, ε = {format_epsilon(r['epsilon_target'])}, seed {r['seed']}",
            _num(r["audit_twin_epsilon"], 2), f"{r['audit_kind']}, m = {int(r['audit_canaries'])}",
            _num(r["audit_epsilon_lower"], 2), _num(r.get("audit_epsilon_lower_replay"), 2),
            _num(top, 2), _audit_power(r), _num(r.get("audit_noise_ratio"), 3),
            _audit_verdict(r, top),
        ])  # fmt: skip
    head = ["cell", "ε spent", "canaries", "ε lower (95%)", "replay attack", "most m canaries "
            "can show", "catches (80% of simulated runs)", "noise measured / stated",
            "verdict"]  # fmt: skip
    return "\n".join([
        "Each audited cell has a twin trained the same way with m canaries, each included by a "
        "secret coin; the auditor guesses the coins from the twin's output, and the correct "
        "guesses give an ε that holds with 95% confidence as a LOWER bound (the f-DP analysis of "
        "Mahloujifar, Melis & Chaudhuri 2025; one-run auditing: Steinke, Nasr & Jagielski "
        "2023). Gradient canaries audit DP-SGD itself (a white-box adversary who sees every "
        "noised update); input canaries audit only the final model (black box) and give far "
        "weaker bounds. A twin attacks twice, each at 2.5%: with its plain scores, and after "
        "subtracting the noise a build that drew it from the public seed would have added (the "
        "replay attack); the table's bound is the larger. A bound above the ε spent means the "
        "implementation or the accounting is broken (`launch.py audit` exits 1).",
        "",
        "What an audit can say is limited. No run with m canaries can show more than the "
        "'most' column, so a cell whose ε spent is above it cannot be refuted at all (verdict "
        "'cannot tell'). Below it, a correct build's bound sits well under its ε: the audit "
        "catches gross failures, not small accounting slack. 'Catches' is the audit's power: "
        "the largest factor s such that a build adding only s times the calibrated noise is "
        "caught in 80% of runs, simulated with the twin's own m, q, steps and sigma (without "
        "the real gradients, which only add variance); a build whose noise follows the public "
        "seed is caught whenever a build without noise would be. 'No evidence of a broken "
        "build' is all a passed audit says. The twin also measures the noise it added, at the "
        "coordinates of the excluded canaries: less than its ledger states, or noise that "
        "follows the public seed, is a broken build whatever the bound (two exact tests at "
        "level 1e-6; they test the noise, not ε).",
        "",
        _table(head, table),
        *_audit_coverage(view, rows),
    ]) + "\n"  # fmt: skip


def _audit_coverage(view: ReportView, audited: pd.DataFrame) -> list[str]:
    """Which single-site cells have a twin's result and which have none, per ε: a cell
    without one was not audited (its ε rests on the accountant alone), never 'passed'."""
    cells = split_controls(view.full)[0].drop_duplicates("trial_key")
    done = set(audited["trial_key"])
    missing = cells[~cells["trial_key"].isin(done)]
    if missing.empty:
        return [f"Every single-site cell ({len(cells)}) was audited.", ""]
    table = [
        [_eps_label(eps), _cell_list(part[part["trial_key"].isin(done)]),
         _cell_list(part[~part["trial_key"].isin(done)])]
        for eps, part in ((e, cells[cells["epsilon_target"] == e]) for e in epsilons(cells))
    ]  # fmt: skip
    return [
        f"**Audited: {len(cells) - len(missing)} of {len(cells)} single-site cells; "
        f"NOT audited: {len(missing)}.** A cell without a twin was not audited: its ε rests "
        "on the accountant alone and nothing in this section speaks for it (not 'no evidence "
        "of a broken build'). Which cells get a twin is the grid's `audit.cells` (default: one "
        "per ε, chosen from the grid alone, never from data), or its twin has not finished. A "
        "twin checks the code and the accounting that train every cell, at its own cell's ε, "
        "sample rate and δ.",
        "",
        _table(["ε", "audited (a twin's result above)", "not audited (no twin result)"], table),
    ]


def _cell_list(cells: pd.DataFrame) -> str:
    """"a seeds 0, 1; b seed 2": cells by source (— for none)."""
    parts = []
    for source, part in cells.groupby("source", sort=True):
        seeds = sorted(int(x) for x in part["seed"])
        parts.append(f"{source} seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
    return "; ".join(parts) or "—"


# ------------------------------------------------------------------------------ registry


SECTIONS: list[Section] = [
    Section("headline", "Does DP change transfer? Equivalence verdicts", _section_headline),
    Section("conclusions", "What these tests can and cannot conclude", _section_conclusions),
    Section("privacy", "What this epsilon covers", _section_privacy),
    Section("test_sets", "Test sets: images, patients and prevalence", _section_test_sets),
    Section(
        "matrices",
        "Transfer matrices (macro AUC over the labels; rows = trained on, columns = tested on)",
        _section_matrices,
    ),  # fmt: skip
    Section("label_matrices", "Per-label transfer matrices", _section_label_matrices),
    Section(
        "drop",
        "AUC drop from on-domain to off-domain: each side's own drop, DP's costs",
        _section_drop,
    ),
    Section("thresholded", "Thresholded metrics at the source's threshold", _section_thresholded),
    Section("calibration", "Calibration", _section_calibration),
    Section("fairness", "Fairness: subgroup gaps and DP's effect on them", _section_fairness),
    Section("paired", "Paired ΔAUC = AUC(DP) − AUC(non-DP) (exploratory)", _section_paired),
    Section("other", "Controls, federated models and membership inference", _section_other),
    Section("audit", "Canary audit: an empirical lower bound on epsilon", _section_audit),
]

CONSOLE: list[Section] = [
    Section(
        "matrices",
        "Transfer matrices (macro AUC, rows = trained on, columns = tested on)",
        _console_matrices,
    ),  # fmt: skip
    Section(
        "verdicts",
        "Primary endpoint: drop(DP) - drop(non-DP) per test site (see report.md)",
        _console_verdicts,
    ),
    Section("other", "", _section_other),
]


def register_section(section: Section, *, after: str | None = None) -> None:
    """Add a report section after the one keyed ``after`` (at the end when None)."""
    keys = [s.key for s in SECTIONS]
    if section.key in keys:
        raise ValueError(f"a section {section.key!r} exists already")
    SECTIONS.insert(keys.index(after) + 1 if after is not None else len(SECTIONS), section)


def render(view: ReportView, sections: Iterable[Section], *, numbered: bool = True) -> str:
    """Markdown of ``sections`` over one view (empty bodies are left out)."""
    parts, k = [], 0
    for section in sections:
        body = section.render(view)
        if not body.strip():
            continue
        if section.title:
            k += 1
            parts.append(f"## {f'{k}. ' if numbered else ''}{section.title}\n")
        parts.append(body)
    return "\n".join(parts)


def transfer_matrices_text(df: pd.DataFrame, cmp: pd.DataFrame | None = None) -> str:
    """The console summary: macro matrices per epsilon, the primary verdicts (with ``cmp``),
    federated models, controls and the membership audit (the report's view, compactly)."""
    if df.empty:
        return "(no finished trials yet: the transfer table is empty)"
    return render(ReportView(df, cmp), CONSOLE, numbered=False)


# ------------------------------------------------------------------------------ report.md


def write_report(output: Path, *, figures: bool = True) -> str:
    """Write ``<output>/report.md`` (atomically) and PNG figures under ``<output>/figures/``.

    Reads ``transfer.parquet`` (required), ``comparisons.parquet`` and
    ``reliability.parquet`` (optional: without them the report has no verdicts, CIs of
    differences or reliability diagram, and says so). Returns the markdown.
    """
    output = Path(output)
    view = ReportView.load(output)
    parts = [_header(view)]
    if view.df.empty:
        parts.append("(no finished trials yet: the transfer table is empty)\n")
    else:
        parts.append(render(view, SECTIONS))
        if figures:
            paths = _draw_figures(view, output / FIGURES)
            parts.append("## Figures\n\n" + "\n".join(f"![{p.stem}]({FIGURES}/{p.name})\n"
                                                      for p in paths))  # fmt: skip
    text = "\n".join(parts).rstrip() + "\n"
    atomic.atomic_write(output / REPORT, lambda p: p.write_text(text, encoding="utf-8"))
    return text


def _header(view: ReportView) -> str:
    df = view.df
    if df.empty:
        return "# Sweep report\n"
    sweep = ", ".join(sorted(df["sweep"].dropna().astype(str).unique())) or MISSING
    cmp_state = "present" if view.cmp is not None else "not found (no verdicts, no paired CIs)"
    if view.old_cmp:
        cmp_state = "from an older version (re-run the sweep's command: no retraining)"
    return "\n".join([
        f"# Sweep report: {sweep}",
        "",
        f"- sources: {', '.join(view.sources)}; targets: {', '.join(view.targets)}",
        f"- epsilons: {', '.join(format_epsilon(e) for e in view.eps)}; "
        f"seeds: {', '.join(map(str, view.seeds))}; models: "
        + ", ".join(sorted(df["model"].dropna().astype(str).unique())),
        f"- {df['trial_key'].nunique()} trials; intervals: {_interval_method(df)}; "
        f"unit: {view.unit}",
        "- privacy: " + "; ".join(_privacy_note(df, e) for e in view.finite_eps)
        + ("" if view.finite_eps else "no DP trials"),
        f"- comparisons.parquet: {cmp_state}",
        "",
        'A cell without a row in the tables is printed as "—" (missing), never dropped.',
        "",
    ])  # fmt: skip


def _interval_method(df: pd.DataFrame) -> str:
    """How the transfer table's CIs were made: jackknife t since evaluation protocol 4, the
    percentile bootstrap before (rows without ``ci_df``)."""
    if "ci_df" in df.columns and df["ci_df"].notna().any():
        old = df["ci_df"].isna() & df["auc_lo"].notna()
        if not old.any():
            return f"{_JACKKNIFE} (95%, see section 2)"
        return (f"{_JACKKNIFE}; {old.sum()} rows still from the percentile bootstrap of "
                "older evaluations (re-run the sweep's command to re-evaluate them)")  # fmt: skip
    n_boot = ", ".join(str(int(b)) for b in sorted(df["n_boot"].dropna().unique())) or MISSING
    return (f"percentile bootstrap ({n_boot} resamples), written before the jackknife "
            "intervals: re-run the sweep's command to re-evaluate (no retraining)")  # fmt: skip


_JACKKNIFE = "leave-one-patient-out jackknife t, logit scale"


# ------------------------------------------------------------------------------ figures


def _draw_figures(view: ReportView, folder: Path) -> list[Path]:
    """All PNGs; matplotlib's object API with the Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def new(figsize: tuple[float, float], **kw) -> tuple[Any, Any]:
        fig = Figure(figsize=figsize, layout="constrained")
        FigureCanvasAgg(fig)
        return fig, fig.subplots(**kw)

    paths = [_heatmap(view, eps, new, folder / f"transfer_matrix_eps-{format_epsilon(eps)}.png")
             for eps in view.eps]  # fmt: skip
    paths.append(_auc_vs_epsilon(view, new, folder / "auc_vs_epsilon.png"))
    paths.append(_subgroup_bars(view, new, folder / "subgroup_auc.png"))
    if view.finite_eps and view.has_nondp and view.cmp is not None:
        paths.append(_drop_bars(view, new, folder / "auc_drop.png"))
        paths.append(_equivalence_plot(view, new, folder / "equivalence.png"))
    if view.reliability is not None and not view.reliability.empty:
        paths.append(_reliability_plot(view, new, folder / "reliability.png"))
    if not _audit_rows(view).empty:
        paths.append(_audit_plot(view, new, folder / "audit_epsilon.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    atomic.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    return path


def _accountant_title(view: ReportView, eps: float) -> str:
    if math.isinf(eps):
        return "ε = ∞ (no DP)"
    return _privacy_note(view.df, eps).replace("target ε", "ε")


def _heatmap(view: ReportView, eps: float, new, path: Path) -> Path:
    from matplotlib.patches import Rectangle

    auc = view.matrix(eps).to_numpy()
    lo, hi = view.matrix(eps, "auc_lo").to_numpy(), view.matrix(eps, "auc_hi").to_numpy()
    n_s, n_t = auc.shape
    fig, ax = new((1.6 * n_t + 2.6, 1.1 * n_s + 1.8))
    finite = auc[~np.isnan(auc)]
    vmin = min(0.5, float(finite.min())) if finite.size else 0.5
    im = ax.imshow(np.ma.masked_invalid(auc), cmap=_cmap("viridis"), vmin=vmin, vmax=1.0)
    for i in range(n_s):
        for j in range(n_t):
            if np.isnan(auc[i, j]):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.85", hatch="//",
                                       edgecolor="0.6", linewidth=0))  # fmt: skip
                ax.text(j, i, MISSING, ha="center", va="center", fontsize=14, color="0.3")
                continue
            text = f"{auc[i, j]:.3f}"
            if not (np.isnan(lo[i, j]) or np.isnan(hi[i, j])):
                text += f"\n[{lo[i, j]:.2f}, {hi[i, j]:.2f}]"
            light = (auc[i, j] - vmin) / max(1e-9, 1.0 - vmin) > 0.6
            weight = "bold" if view.sources[i] == view.targets[j] else "normal"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, fontweight=weight,
                    color="black" if light else "white")  # fmt: skip
    ax.set_xticks(range(n_t), view.targets)
    ax.set_yticks(range(n_s), view.sources)
    ax.set_xlabel("tested on (target)")
    ax.set_ylabel("trained on (source)")
    seeds = f", mean of {len(view.seeds)} seeds" if len(view.seeds) > 1 else ""
    ax.set_title(f"Macro AUC [95% CI, {view.unit} jackknife t]{seeds}\n"
                 f"{_accountant_title(view, eps)}", fontsize=9)  # fmt: skip
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
    ax.set_xticks([pos[e] for e in ticks],
                  [NO_DP if math.isinf(e) else format_epsilon(e) for e in ticks])  # fmt: skip
    ax.set_xlabel("ε (target; log scale)")
    ax.grid(alpha=0.3)


def _accountants_used(view: ReportView) -> str:
    finite = view.df.loc[np.isfinite(view.df["epsilon_target"]), "accountant"]
    used = sorted(finite.dropna().unique())
    return ("ε by " + ", ".join(used) + " accountant") if used else "no DP trials"


def _errorbars(ax: Any, xs: list, ys: list, err: list, **kw) -> None:
    if xs:
        yerr = np.nan_to_num(np.array(err, dtype=float).T, nan=0.0)
        ax.errorbar(xs, ys, yerr=yerr, capsize=3, **kw)


def _auc_vs_epsilon(view: ReportView, new, path: Path) -> Path:
    pos = _eps_positions(view.eps)
    fig, (ax_on, ax_off) = new((11, 4.4), ncols=2, sharey=True)
    width = 0.04 * max(1.0, max(pos.values()) - min(pos.values()))
    for i, s in enumerate(view.sources):
        shift = (i - (len(view.sources) - 1) / 2) * width
        pts = [(pos[e] + shift, view.cell(e, s, s)) for e in view.eps]
        pts = [(x, c) for x, c in pts if not _missing(c.get("auc"))]
        _errorbars(ax_on, [x for x, _ in pts], [c["auc"] for _, c in pts],
                   [(c["auc"] - c.get("auc_lo", np.nan), c.get("auc_hi", np.nan) - c["auc"])
                    for _, c in pts], marker="o", label=s)  # fmt: skip
    for i, t in enumerate(view.targets):
        shift = (i - (len(view.targets) - 1) / 2) * width
        xs, ys, err = [], [], []
        for e in view.eps:
            y = inference.nanmean([view.cell(e, s, t).get("auc", np.nan) for s in view.sources
                                   if s != t])  # fmt: skip
            if math.isnan(y):
                continue
            r = view.summary("drop", target=t, epsilon=e)
            lo = r.get("auc_off_lo") if r else None
            hi = r.get("auc_off_hi") if r else None
            xs.append(pos[e] + shift)
            ys.append(y)
            err.append((0.0, 0.0) if _missing(lo) or _missing(hi) else (y - lo, hi - y))
        _errorbars(ax_off, xs, ys, err, marker="s", label=t)
    ax_on.set_title("On-domain (trained and tested on the same site)\nerror bars: 95% CI",
                    fontsize=9)  # fmt: skip
    off_note = "95% CI of the mean" if view.cmp is not None else "no CIs: comparisons missing"
    ax_off.set_title(f"Off-domain: mean over other sources, per test site\n{off_note}", fontsize=9)
    ax_on.set_ylabel("macro AUC")
    for ax in (ax_on, ax_off):
        _eps_axis(ax, pos)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, title="source" if ax is ax_on else "test site")
    fig.suptitle(f"Macro AUC vs ε ({_accountants_used(view)})", fontsize=10)
    return _save(fig, path)


def _subgroup_bars(view: ReportView, new, path: Path) -> Path:
    on = [s for s in view.sources if s in view.targets]
    n_e = max(1, len(view.eps))
    fig, axes = new((max(6.0, 1.3 * len(view.subgroups) * n_e / 2 + 2), 2.8 * max(1, len(on))),
                    nrows=max(1, len(on)), squeeze=False)  # fmt: skip
    width = 0.8 / n_e
    x = np.arange(len(view.subgroups))
    for ax, s in zip(axes[:, 0], on or [None], strict=False):
        if s is None:
            ax.text(0.5, 0.5, "no on-domain cells", ha="center", transform=ax.transAxes)
            continue
        for k, e in enumerate(view.eps):
            cells = [view.cell(e, s, s, subgroup=g) for g in view.subgroups]
            h, lo, hi = (np.array([c.get(f, np.nan) for c in cells], dtype=float)
                         for f in ("auc", "auc_lo", "auc_hi"))  # fmt: skip
            xs = x + (k - (n_e - 1) / 2) * width
            label = NO_DP if math.isinf(e) else f"ε = {format_epsilon(e)}"
            # NaN heights and error bars draw nothing: a missing bar stays visibly missing
            ax.bar(xs, h, width, yerr=np.vstack([h - lo, hi - h]), capsize=2, label=label)
            for xi, hv in zip(xs, h, strict=True):
                if np.isnan(hv):
                    ax.text(xi, 0.02, MISSING, ha="center", va="bottom", fontsize=9)
        ticks = [f"{g}\n{_n_labels(view, s, g)} labels" for g in view.subgroups]
        ax.set_xticks(x, ticks, fontsize=8)
        ax.set_xlim(-0.5, len(view.subgroups) - 0.5)  # all-missing groups keep their slot
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("macro AUC")
        ax.set_title(f"{s} → {s} (on-domain); error bars: 95% CI", fontsize=9)
        ax.legend(fontsize=7, ncols=n_e)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Macro AUC by subgroup ({_accountants_used(view)}; — = missing); the "
                 "subgroups of one family (sex, age) average the same labels", fontsize=9)  # fmt: skip
    return _save(fig, path)


def _drop_bars(view: ReportView, new, path: Path) -> Path:
    fig, axes = new((max(6.0, 1.6 * len(view.targets) + 2), 3.2 * len(view.finite_eps)),
                    nrows=len(view.finite_eps), squeeze=False)  # fmt: skip
    series = (
        (quantities.PRIMARY_QUANTITY, math.inf, "value_nondp", "drop non-DP"),
        (quantities.PRIMARY_QUANTITY, None, "value_dp", "drop DP"),
        (quantities.ON_DOMAIN, None, "delta", "on-domain ΔAUC (DP − non-DP)"),
        (quantities.OFF_DOMAIN, None, "delta", "off-domain ΔAUC (DP − non-DP)"),
    )
    for ax, eps in zip(axes[:, 0], view.finite_eps, strict=True):
        x = np.arange(len(view.targets))
        for k, (q, e, col, label) in enumerate(series):
            rows = [view.summary(q, target=t, epsilon=e or eps) or {} for t in view.targets]
            ci = ("delta_lo", "delta_hi") if col == "delta" else (f"{col}_lo", f"{col}_hi")
            h, lo, hi = (np.array([r.get(c, np.nan) for r in rows], dtype=float)
                         for c in (col, *ci))  # fmt: skip
            xs = x + (k - 1.5) * 0.2
            ax.bar(xs, np.nan_to_num(h), 0.2, yerr=np.nan_to_num(np.vstack([h - lo, hi - h])),
                   capsize=2, label=label)  # fmt: skip
            for xi, hv in zip(xs, h, strict=True):
                if np.isnan(hv):
                    ax.text(xi, 0, MISSING, ha="center", va="bottom", fontsize=9)
        ax.axhline(0, color="0.3", linewidth=0.8)
        ax.set_xticks(x, view.targets)
        ax.set_xlabel("test site")
        ax.set_ylabel("AUC")
        ax.set_title(f"{_accountant_title(view, eps)} vs no DP; error bars: 95% CI", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Each side's own AUC drop (on-domain − mean off-domain) per test site, and "
                 "DP's on- and off-domain costs", fontsize=10)  # fmt: skip
    return _save(fig, path)


def _equivalence_plot(view: ReportView, new, path: Path) -> Path:
    """Forest plot of the primary endpoint: Δ with its 90% (TOST) and 95% CIs vs ±margin."""
    rows = [(eps, t, view.summary(quantities.PRIMARY_QUANTITY, target=t, epsilon=eps))
            for eps in view.finite_eps for t in view.targets]  # fmt: skip
    fig, ax = new((7.5, 0.45 * len(rows) + 1.8))
    margin = next((r["margin"] for *_, r in rows if r and not _missing(r.get("margin"))), None)
    if margin is not None:
        ax.axvspan(-margin, margin, color="tab:green", alpha=0.12, label=f"±{margin:g} margin")
    ax.axvline(0, color="0.3", linewidth=0.8)
    for i, (*_, r) in enumerate(rows):
        if r is None or _missing(r.get("delta")):
            ax.text(0, i, MISSING, ha="center", va="center")
            continue
        for lo, hi, lw in (("delta_lo", "delta_hi", 1.2), ("tost_lo", "tost_hi", 3.5)):
            if not _missing(r.get(lo)):
                ax.plot([r[lo], r[hi]], [i, i], color="tab:blue", linewidth=lw)
        ax.plot(r["delta"], i, "o", color="black")
        ax.text(1.01, i, _verdict(r), transform=ax.get_yaxis_transform(), va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{t}, ε = {format_epsilon(e)}" for e, t, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("Δdrop = drop(DP) − drop(non-DP), each side's own drop (AUC; > 0: DP "
                  "transfers worse)")  # fmt: skip
    ax.set_title("Primary endpoint: thick = 90% CI (TOST), thin = 95% CI; per-site verdicts "
                 "on Holm p", fontsize=9)  # fmt: skip
    if margin is not None:
        ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def _audit_plot(view: ReportView, new, path: Path) -> Path:
    """Canary audit: epsilon_lower against epsilon spent, with the y = x line (above it: a
    broken implementation). Non-DP twins sit at the right edge, marked "no DP"."""
    rows = _audit_rows(view)
    finite = rows["audit_twin_epsilon"].replace([np.inf, -np.inf], np.nan).dropna()
    top = max([1.0, *finite.tolist(), *rows["audit_epsilon_lower"].tolist()]) * 1.15
    fig, ax = new((5.5, 4.6))
    ax.plot([0, top], [0, top], color="0.4", linestyle="--", linewidth=0.9, label="y = x")
    for source in sorted(rows["source"].unique()):
        sel = rows[rows["source"] == source]
        x = sel["audit_twin_epsilon"].replace(np.inf, top)
        (line,) = ax.plot(x, sel["audit_epsilon_lower"], "o", label=source)
        most = [min(_audit_max(r), top) for r in sel.to_dict("records")]
        ax.plot(x, most, "_", markersize=12, color=line.get_color(), alpha=0.6)
    ax.axvline(top, color="0.8", linewidth=0.8)
    ax.text(top, 0.02 * top, " no DP", rotation=90, va="bottom", fontsize=7)
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(0, top * 1.05)
    ax.set_xlabel("ε spent (accountant)")
    ax.set_ylabel("ε lower bound (canary audit, 95%)")
    ax.set_title(
        "Canary audit: points above y = x would be a broken implementation\n"
        "(dashes: the most the twin's canaries can show)",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    return _save(fig, path)


def _reliability_plot(view: ReportView, new, path: Path) -> Path:
    """Reliability diagram pooled over labels and seeds: on- vs off-domain, per epsilon."""
    rel = view.reliability
    rel = rel[rel["label"] == "pooled"]
    fig, axes = new((9, 4.2), ncols=2, sharey=True)
    for ax, on in zip(axes, (True, False), strict=True):
        ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=0.8)
        for eps in epsilons(rel.rename(columns={"epsilon": "epsilon_target"})):
            sel = rel[(rel["on_domain"] == on) & (rel["epsilon"] == eps)]
            grp = sel.assign(s=sel["mean_score"] * sel["n"], o=sel["observed"] * sel["n"])
            agg = grp.groupby("bin")[["n", "s", "o"]].sum()
            agg = agg[agg["n"] > 0]
            label = NO_DP if math.isinf(eps) else f"ε = {format_epsilon(eps)}"
            ax.plot(agg["s"] / agg["n"], agg["o"] / agg["n"], marker="o", label=label)
        ax.set_title("on-domain" if on else "off-domain", fontsize=9)
        ax.set_xlabel("mean predicted probability")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("observed fraction positive")
    fig.suptitle("Reliability diagram (test images, pooled over labels)", fontsize=10)
    return _save(fig, path)
