"""The report's privacy sections: what the reported epsilon covers (one composed guarantee per
training set) and the canary audit's empirical lower bounds on epsilon.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from privdom_ray import guarantee
from privdom_ray.config import format_epsilon
from privdom_ray.report.formatting import _eps_label, _missing, _num, _privacy_note, _table
from privdom_ray.report.view import ReportView, epsilons, split_controls
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
    """ "a seeds 0, 1; b seed 2": cells by source (— for none)."""
    parts = []
    for source, part in cells.groupby("source", sort=True):
        seeds = sorted(int(x) for x in part["seed"])
        parts.append(f"{source} seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
    return "; ".join(parts) or "—"
