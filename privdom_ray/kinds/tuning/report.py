"""The tuned cells' report section (issue 26): what was searched, the distribution of K and
E[K], each DP cell's per-run noise and cost; never the K drawn (the Papernot-Steinke bound
covers the best candidate's output only: publishing K voids it).

Collected by the report's registry (``Tuned.report_sections``); ``view`` is the report's
``ReportView``, duck-typed (kinds/ sits below report/): its ``full`` table, whose public
``tuning`` column (``Tuned.own_columns``) holds each tuned row's search as JSON.
"""

from __future__ import annotations

import json
import math
from typing import Any

from privdom_ray.config import format_epsilon
from privdom_ray.markdown import missing, num
from privdom_ray.markdown import table as markdown_table

#: Why the report states E[K] and never the K a cell drew.
K_SECRET = (
    "K itself is never shown: the Papernot-Steinke bound covers the best candidate's output "
    "only, and publishing the K drawn would void it (for a known K only K-fold composition "
    "holds)."
)


def tuned_rows(view: Any) -> Any:
    """One row per tuned trial (a non-null ``tuning`` column), sorted."""
    full = view.full
    if "tuning" not in full.columns:
        return full.iloc[:0]
    rows = full[full["tuning"].notna()].drop_duplicates("trial_key")
    return rows.sort_values(["source", "epsilon_target", "seed"])


def tuning_section(view: Any) -> str:
    """The search, K's distribution and E[K], and per DP cell its per-run sigma and epsilon."""
    rows = tuned_rows(view)
    if rows.empty:
        return ""
    searches = sorted(set(rows["tuning"]))
    lines = []
    for text in searches:
        s = json.loads(text)
        space = ", ".join(f"`{name}` {how}" for name, how in s["space"].items())
        lines.append(
            f"- Searched (random search, every candidate drawn independently from OS "
            f"entropy): {space}. K ~ {s['runs']}, **E[K] = {s['mean']:.3g}** trainings per "
            f"cell (95% of cells draw at most {s['q95']}), DP and non-DP cells alike (the "
            "non-DP baseline selects without noise)."
        )
    lines += ["", K_SECRET, ""]
    dp = rows[rows["accountant"].fillna("none") != "none"]
    if not dp.empty:
        lines.append(
            "Per tuned DP cell: every candidate trains at its run shape's noise (the released "
            "model's shape below), and the cell's ε is the Papernot-Steinke bound on one "
            "candidate's RDP (training and validation releases in parallel: the patient-wise "
            "split is a salted hash, independent of the data), converted to (ε, δ):"
        )
        body = [
            [str(r["source"]), format_epsilon(r["epsilon_target"]), str(r["seed"]),
             num(r["noise_multiplier"], 3), num(r["sample_rate"], 4),
             "—" if missing(r["steps"]) else str(int(r["steps"])),
             num(r["epsilon_spent"], 3), str(r["accountant"])]
            for r in dp.to_dict("records")
        ]  # fmt: skip
        lines += ["", markdown_table(
            ["source", "ε target", "seed", "σ per run", "q", "steps", "ε (bound)", "accountant"],
            body), ""]  # fmt: skip
    lines.append(TUNED_VALIDATION)
    return "\n".join(lines) + "\n"


TUNED_VALIDATION = (
    "In tuned DP cells `best_epoch` and `threshold` are DP releases on the source's validation "
    "split (exponential mechanism over the epochs, noisy histograms for the thresholds), "
    "inside the cell's ε (they compose in parallel with training); in tuned non-DP cells "
    "they carry no guarantee."
)


def tuned_validation_note(view: Any) -> str:
    """The privacy section's opening for a table with tuned DP cells: their validation
    choices are inside ε, so the list of values outside it concerns the other cells."""
    rows = tuned_rows(view)
    if rows.empty or (rows["accountant"].fillna("none") == "none").all():
        return ""
    return (TUNED_VALIDATION + " The `best_epoch` and `threshold` entries of the list below "
            "concern only the rows whose choices were not DP releases.\n")  # fmt: skip


def search_json(tuning: Any, mean: float, q95: int) -> str:
    """The public ``tuning`` column of a tuned row: the space as written, K's distribution,
    E[K] and K's 95% quantile (configuration: never the K drawn)."""
    space = {d.name: f"{d.sampler}{list(d.args)}" for d in tuning.space}
    runs = ", ".join(f"{k} {v}" for k, v in tuning.runs)
    return json.dumps({"space": space, "runs": runs, "mean": float(mean),
                       "q95": int(q95) if math.isfinite(q95) else None}, sort_keys=True)  # fmt: skip
