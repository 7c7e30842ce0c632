"""The audit twins' report section: the canary audit's bounds next to the epsilon spent, what
an audit could show at most, what it would catch, and which cells have no twin.

Collected by the report's registry (``AuditTwin.report_sections``); ``view`` is the report's
``ReportView``, duck-typed (kinds/ sits below report/): its ``full`` table and selections.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from privdom_ray.config import format_epsilon
from privdom_ray.markdown import missing, num
from privdom_ray.markdown import table as markdown_table

if TYPE_CHECKING:
    import pandas as pd


def audit_rows(view: Any) -> pd.DataFrame:
    full = view.full
    if "audit_epsilon_lower" not in full.columns:
        return full.iloc[:0]
    rows = full[full["audit_epsilon_lower"].notna()].drop_duplicates("trial_key")
    return rows.sort_values(["source", "epsilon_target", "seed"])


def audit_max(r: Mapping[str, Any]) -> float:
    """The most the twin's m canaries can show; tables written before the column existed had
    version-1 twins (Steinke et al.'s bound over 7 symmetric rules), computed here from m."""
    if not missing(r.get("audit_epsilon_max")):
        return float(r["audit_epsilon_max"])
    from privdom_ray.audit_bound import guess_grid, max_lower

    m, delta = int(r["audit_canaries"]), float(r.get("delta") or 1e-5)
    return max_lower(m, delta, grid=guess_grid(m, top=()), binomial=True)


def _audit_power(r: Mapping[str, Any]) -> str:
    """What the twin's audit would catch (80% of simulated runs), in words."""
    spent = r["audit_twin_epsilon"]
    if missing(spent) or not math.isfinite(spent) or r.get("audit_kind") != "gradient":
        return "—"
    replay = not missing(r.get("audit_epsilon_lower_replay"))
    scale = r.get("audit_power_noise_scale")
    if not replay:
        return "not estimated (twin from before the power estimate; re-run it)"
    if missing(scale):
        return "nothing: not even a build without noise"
    return f"noise ×≤{scale:.2f}, and noise replayed from the public seed"


def _audit_verdict(r: Mapping[str, Any], top: float) -> str:
    spent, lower = r["audit_twin_epsilon"], r["audit_epsilon_lower"]
    if missing(spent) or not math.isfinite(spent):
        return "no DP: shows what leaks"
    if lower > spent:
        return "**BROKEN: above ε spent**"
    noise = r.get("audit_noise_check")
    if not missing(noise) and noise != "ok":
        return f"**BROKEN: {noise}**"
    if top <= spent:
        return f"cannot tell: m = {int(r['audit_canaries'])} caps the bound at {top:.2f} ≤ ε spent"
    scale = r.get("audit_power_noise_scale")
    if missing(r.get("audit_epsilon_lower_replay")) or missing(scale):
        return "no evidence of a broken build, at unknown power"
    return "no evidence of a broken build"


def audit_section(view: Any) -> str:
    """Audit twins: the empirical lower bound on epsilon next to the epsilon spent, what the
    audit could show at most, and what it would catch."""
    rows = audit_rows(view)
    if rows.empty:
        return ""
    table = []
    for r in rows.to_dict("records"):
        top = audit_max(r)
        table.append([
            f"{r['source']}, ε = {format_epsilon(r['epsilon_target'])}, seed {r['seed']}",
            num(r["audit_twin_epsilon"], 2), f"{r['audit_kind']}, m = {int(r['audit_canaries'])}",
            num(r["audit_epsilon_lower"], 2), num(r.get("audit_epsilon_lower_replay"), 2),
            num(top, 2), _audit_power(r), num(r.get("audit_noise_ratio"), 3),
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
        markdown_table(head, table),
        *_audit_coverage(view, rows),
    ]) + "\n"  # fmt: skip


def _audit_coverage(view: Any, audited: pd.DataFrame) -> list[str]:
    """Which single-site cells have a twin's result and which have none, per ε: a cell
    without one was not audited (its ε rests on the accountant alone), never 'passed'."""
    cells = view.split_controls(view.full)[0].drop_duplicates("trial_key")
    done = set(audited["trial_key"])
    missing = cells[~cells["trial_key"].isin(done)]
    if missing.empty:
        return [f"Every single-site cell ({len(cells)}) was audited.", ""]
    table = [
        [view.eps_label(eps), _cell_list(part[part["trial_key"].isin(done)]),
         _cell_list(part[~part["trial_key"].isin(done)])]
        for eps, part in ((e, cells[cells["epsilon_target"] == e]) for e in view.epsilons(cells))
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
        markdown_table(["ε", "audited (a twin's result above)", "not audited (no twin result)"], table),
    ]


def _cell_list(cells: pd.DataFrame) -> str:
    """ "a seeds 0, 1; b seed 2": cells by source (— for none)."""
    parts = []
    for source, part in cells.groupby("source", sort=True):
        seeds = sorted(int(x) for x in part["seed"])
        parts.append(f"{source} seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
    return "; ".join(parts) or "—"
