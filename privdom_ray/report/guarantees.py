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
    note = dp_validation_note(trials)
    lines += [
        "",
        *([note, ""] if note else []),
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


def dp_validation_note(trials) -> str:
    """Which untuned DP trials chose their epoch and thresholds by DP releases (their ledger's
    validation entry, the table's ``epsilon_validation``): those two values are then inside
    the trial's epsilon; the trials finished before chose them exactly and stay outside."""
    if "epsilon_validation" not in trials.columns:
        return ""
    inside = trials[trials["epsilon_validation"].notna()]
    if inside.empty:
        return ""
    return (
        f"In {len(inside)} untuned DP trial(s) (column `epsilon_validation` not null) "
        "`best_epoch` and `threshold` are DP releases on the source's validation split: the "
        "epoch by the exponential mechanism over the epochs on the clipped per-patient "
        "validation loss, the thresholds from noisy per-label score histograms, noise from OS "
        "entropy. Their own ε (RDP accountant, `epsilon_validation`) is at most the trial's, "
        "and they compose in parallel with training (the patient-wise split is a salted hash "
        "of the patient id, independent of the data, so a neighbour differs in one split "
        "only): the trial's ε covers them. The `best_epoch` and `threshold` entries of the "
        "list below concern only the rows whose choices were not DP releases: DP trials finished "
        "before this release "
        "(chosen exactly; kept, not retrained), non-DP trials and controls, federations."
    )


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
