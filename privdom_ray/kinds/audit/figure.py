"""The audit twins' report figure: each twin's canary lower bound on epsilon against the
epsilon it spent, drawn by report/figures.py through ``AuditTwin.report_figures`` (matplotlib
comes in through the ``new`` figure factory report/ passes, so kinds/ imports no plotting)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from privdom_ray.kinds.audit.report import audit_max, audit_rows


def audit_plot(view: Any, new: Callable[..., Any]) -> Any:
    """Canary audit: epsilon_lower against epsilon spent, with the y = x line (above it: a
    broken implementation). Non-DP twins sit at the right edge, marked "no DP". None when
    the study has no twin."""
    rows = audit_rows(view)
    if rows.empty:
        return None
    finite = rows["audit_twin_epsilon"].replace([np.inf, -np.inf], np.nan).dropna()
    top = max([1.0, *finite.tolist(), *rows["audit_epsilon_lower"].tolist()]) * 1.15
    fig, ax = new((5.5, 4.6))
    ax.plot([0, top], [0, top], color="0.4", linestyle="--", linewidth=0.9, label="y = x")
    for source in sorted(rows["source"].unique()):
        sel = rows[rows["source"] == source]
        x = sel["audit_twin_epsilon"].replace(np.inf, top)
        (line,) = ax.plot(x, sel["audit_epsilon_lower"], "o", label=source)
        most = [min(audit_max(r), top) for r in sel.to_dict("records")]
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
    return fig


