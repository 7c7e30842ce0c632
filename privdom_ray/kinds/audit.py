"""Audit twins: a one-run canary audit of a cell (``audit:`` in the grid).

A twin trains exactly like the cell it audits (same source, epsilon, seed, hyper-parameters
and mechanism) but with m canaries in its training set, each included by a secret fair coin;
afterwards the auditor guesses the coins from the twin's output, and the correct guesses give
a 95% lower bound on epsilon (``audit_bound``). Its model is never released and never enters
the transfer matrices; its audit result is attached to the audited cell's rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from privdom_ray.config import DEFAULT_DELTA, AuditSpec, TrialSpec
from privdom_ray.kinds import PlanContext, TrialKind, register
from privdom_ray.kinds.standard import single_site

INPUT_CANARIES = 1000  # ``auto`` for input canaries: each included one is a training image


def plan(ctx: PlanContext) -> Iterator[TrialSpec]:
    audit = ctx.spec.audit
    if audit is None:
        return
    for source in audit.sources or ctx.spec.sources:
        for epsilon in audit.epsilons or ctx.spec.epsilons:
            for seed in ctx.spec.seeds:
                cell = single_site(ctx, source, epsilon, seed, "audit")
                m = canaries(audit.canaries, audit.kind, epsilon, cell.delta)
                yield dataclasses.replace(cell, audit=AuditSpec(m, audit.kind, audit.auditor_seed))


def canaries(requested: int | str, kind: str, epsilon: float, delta: float) -> int:
    """The twin's m: the grid's number, or for ``auto`` gradient canaries enough for the bound
    to exceed the cell's epsilon (``audit_bound.canaries_for``; a non-private cell is audited
    at the default delta, like its twin). The resolved m is in the twin's key."""
    if requested != "auto":
        return int(requested)
    if kind == "input":
        return INPUT_CANARIES
    return _canaries_for(float(epsilon), float(delta or DEFAULT_DELTA))


@functools.lru_cache(maxsize=64)
def _canaries_for(epsilon: float, delta: float) -> int:
    from privdom_ray.audit_bound import canaries_for

    return canaries_for(epsilon, delta)


def audited(twin: TrialSpec) -> TrialSpec:
    """The standard cell a twin audits (its key names the rows the result is attached to)."""
    return dataclasses.replace(twin, variant="standard", audit=None).with_key()


register(
    TrialKind(
        name="audit",
        plan=plan,
        trainer="privdom_ray.trial:train_audit_twin",
        description="a cell's twin with m canaries: a one-run lower bound on its epsilon",
        evaluated=False,
        in_matrices=False,
        released=False,
    )
)


# --------------------------------------------------------------------------------------------
# A twin's result: what the table shows and what ``launch.py audit`` checks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TwinCheck:
    """A twin's audit recomputed from its counts, against the epsilon its ledger's mechanisms
    give (recomputed too): ``problem`` is non-empty when the bound exceeds it or a noise test
    fails (a broken implementation), or the stored bound is not what its counts give."""

    kind: str
    spent: float
    lower: float
    epsilon_max: float
    problem: str
    checked: bool  # a DP twin (a non-private one claims nothing to refute)


def check_twin(result: Mapping[str, Any] | None, ledger: Mapping[str, Any], name: str) -> TwinCheck:
    """Recompute the twin's deciding bound (``audit_bound.recompute``: never the stored number)
    and compare it with the epsilon recomputed from the twin's ledger."""
    from privdom_ray.audit_bound import recompute
    from privdom_ray.privacy import epsilon_of, ledger_mechanisms

    if result is None:
        return TwinCheck("", math.nan, math.nan, math.nan, "audit twin without a result", True)
    lower, top = recompute(result)
    private = ledger["accountant"] != "none"
    spent = math.inf
    if private:
        spent, _ = epsilon_of(
            ledger["accountant"], ledger_mechanisms(ledger), float(ledger["delta"])
        )
    problems = [_noise_problem(result.get("noise"), name)]
    if abs(lower - float(result["epsilon_lower"])) > 2e-3:
        problems.append(
            f"canary audit: the stored epsilon_lower {float(result['epsilon_lower']):.4g} is not "
            f"what its counts give ({lower:.4g}); the record was changed ({name})"
        )
    if lower > spent:
        problems.append(
            f"canary audit ({result['kind']}, m={result['m']}, "
            f"{result.get('attack', 'standard')} attack): epsilon_lower {lower:.3g} > epsilon "
            f"spent {spent:.3g} at 95% confidence: the DP implementation or its accounting is "
            f"broken ({name})"
        )
    problem = "; ".join(p for p in problems if p)
    return TwinCheck(str(result["kind"]), spent, lower, top, problem, private)


def _noise_problem(noise: Mapping[str, Any] | None, name: str) -> str:
    """The twin's noise tests, decided again from its sums (``audit_bound.NoiseCheck``)."""
    from privdom_ray.audit_bound import NoiseCheck

    if not noise:
        return ""
    check = NoiseCheck(int(noise["units"]), float(noise["sum_squares"]),
                       noise["replay_z"], float(noise["alpha"]))  # fmt: skip
    if check.too_little:
        return (
            f"noise check: the twin added {check.ratio:.3g} times the noise its ledger states "
            f"(sum of squares {check.sum_squares:.6g} over {check.units} noised coordinates, "
            f"below {check.floor:.6g} at level {check.alpha:g}): the DP implementation is "
            f"broken ({name})"
        )
    if check.follows_seed:
        return (
            f"noise check: the twin's noise follows the public seed (replay z = "
            f"{check.replay_z:.3g}): the DP implementation is broken ({name})"
        )
    return ""


def columns(result: Mapping[str, Any], ledger: Mapping[str, Any]) -> dict[str, Any]:
    """The audited cell's ``audit_*`` columns from its twin's result (results.audit_columns).
    Twins from before version 2 (m = 1000, Steinke et al.'s bound, no replay, no power) keep
    their numbers; their attainable maximum is computed from m."""
    from privdom_ray.audit_bound import guess_grid, max_lower

    spent = ledger["epsilon_spent"]
    out = {
        "audit_epsilon_lower": float(result["epsilon_lower"]),
        "audit_canaries": int(result["m"]),
        "audit_guesses": int(result["guesses"]),
        "audit_correct": int(result["correct"]),
        "audit_kind": str(result["kind"]),
        "audit_twin_epsilon": math.inf if spent in ("inf", "Infinity") else float(spent),
        "audit_epsilon_lower_replay": None,
        "audit_power_noise_scale": None,
        "audit_noise_ratio": None,
        "audit_noise_check": None,
    }
    if result.get("version", 1) == 1:
        m, delta = int(result["m"]), float(result.get("delta", 0.0))
        top = max_lower(m, delta, grid=guess_grid(m, top=()), binomial=True)
        return {**out, "audit_epsilon_max": top}
    replay = result["attacks"].get("replay")
    power, noise = result.get("power") or {}, result.get("noise") or {}
    return {
        **out,
        "audit_epsilon_max": float(result["epsilon_max"]),
        "audit_epsilon_lower_replay": None if replay is None else float(replay["epsilon_lower"]),
        "audit_power_noise_scale": power.get("noise_scale"),
        "audit_noise_ratio": _noise_check(noise).ratio if noise else None,
        "audit_noise_check": _noise_verdict(noise) if noise else None,
    }


def _noise_check(noise: Mapping[str, Any]):
    """The twin's noise tests rebuilt from their sums (a stored ratio or verdict is not read)."""
    from privdom_ray.audit_bound import NoiseCheck

    return NoiseCheck(int(noise["units"]), float(noise["sum_squares"]),
                      noise["replay_z"], float(noise["alpha"]))  # fmt: skip


def _noise_verdict(noise: Mapping[str, Any]) -> str:
    """The noise tests in words (recomputed from their sums, like ``launch.py audit``)."""
    check = _noise_check(noise)
    if check.too_little:
        return "too little noise"
    return "noise follows the public seed" if check.follows_seed else "ok"
