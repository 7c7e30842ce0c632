"""The report's privacy section: what the reported epsilon covers (one composed guarantee per
training set). The canary audit's section is the audit-twin kind's (``kinds.audit``).
"""

from __future__ import annotations

from privdom_ray import guarantee
from privdom_ray.config import format_epsilon
from privdom_ray.report.formatting import _privacy_note
from privdom_ray.report.view import ReportView, epsilons
from privdom_ray.stats import results


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
        "site's training images, composed by "
        + guarantee.composed_by(g["accountant"].dropna())
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
