"""The report's secondary sections: thresholded metrics, calibration, fairness, paired ΔAUC,
federated models, controls and membership inference.
"""

from __future__ import annotations

import math

from privdom_ray.config import format_epsilon
from privdom_ray.folder import FIGURES
from privdom_ray.markdown import missing as _missing
from privdom_ray.markdown import num as _num
from privdom_ray.markdown import table as _table
from privdom_ray.report.formatting import (
    MISSING,
    UNDEFINED,
    _ci,
    _p,
    _pair_name,
    _pairs,
    _plain_matrix,
    _seeds_note,
    _value,
    _verdict,
)
from privdom_ray.report.sections import _no_comparisons
from privdom_ray.report.view import (
    ReportView,
    epsilons,
    in_matrices,
    is_federated,
    split_controls,
)
from privdom_ray.report.view import eps_label as _eps_label
from privdom_ray.stats import metrics


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
    standard = in_matrices(trials)
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
    """Controls and membership inference (the federated kind's part opens the section:
    ``kinds.federated``, collected by the report's registry)."""
    return controls_and_leakage_text(view)
