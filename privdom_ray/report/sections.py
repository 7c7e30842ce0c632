"""The report's sections on the primary endpoint and the transfer matrices.

:class:`Section` (a key, a title and a function of the view) and the sections: the headline
equivalence verdicts, what the tests can conclude, the test sets, the macro and per-label
transfer matrices and the on- to off-domain drop. The registry that orders all sections is
:data:`privdom_ray.report.SECTIONS`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from privdom_ray.markdown import missing as _missing
from privdom_ray.markdown import num as _num
from privdom_ray.markdown import table as _table
from privdom_ray.report.formatting import (
    MISSING,
    _cell_text,
    _ci,
    _p,
    _pair_name,
    _pairs,
    _privacy_note,
    _seeds_note,
    _value,
    _verdict,
)
from privdom_ray.report.view import ReportView
from privdom_ray.report.view import eps_label as _eps_label
from privdom_ray.stats import inference, quantities

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
