"""An audit twin's result: its part of the run record (``TwinRun``, trial.json's ``audit``),
what the table shows of it (``columns``) and what ``launch.py audit`` checks (``check_twin``):
every number recomputed from the twin's counts and sums, never read as stored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from privdom_ray.privacy import Ledger


@dataclass(frozen=True)
class TwinRun:
    """A twin's part of its run record (trial.json's ``audit``): its canary audit's result as
    the twin wrote it (``audit_bound``'s record, a nested document; ``check_twin`` and
    ``columns`` recompute from its counts and never trust its numbers)."""

    audit: Mapping[str, Any]

    @classmethod
    def of(cls, result: Any) -> TwinRun:
        if not isinstance(result, Mapping):
            raise ValueError(f"audit: {result!r} is not a mapping")
        return cls(dict(result))


def twin_result(record: Any) -> Mapping[str, Any] | None:
    """The twin's result from its record (a store.TrialRecord), None without one."""
    part = record.info.part
    return part.audit if isinstance(part, TwinRun) else None


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
    spent, problems = math.inf, [_noise_problem(result.get("noise"), name)]
    if private:
        try:
            spent, _ = epsilon_of(
                ledger["accountant"], ledger_mechanisms(ledger), float(ledger["delta"])
            )
        except Exception as exc:  # noqa: BLE001 - a tampered ledger fails the accountants
            spent = math.nan  # its ledger line names the field; no bound is compared
            problems.append(f"canary audit: the twin's epsilon cannot be recomputed "
                            f"({type(exc).__name__}: {exc}) ({name})")  # fmt: skip
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


def columns(result: Mapping[str, Any], ledger: Ledger) -> dict[str, Any]:
    """The audited cell's ``audit_*`` columns from its twin's result (results.audit_columns).
    Twins from before version 2 (m = 1000, Steinke et al.'s bound, no replay, no power) keep
    their numbers; their attainable maximum is computed from m."""
    from privdom_ray.audit_bound import guess_grid, max_lower

    spent = ledger.epsilon_spent
    out = {
        "audit_epsilon_lower": float(result["epsilon_lower"]),
        "audit_canaries": int(result["m"]),
        "audit_guesses": int(result["guesses"]),
        "audit_correct": int(result["correct"]),
        "audit_kind": str(result["kind"]),
        "audit_twin_epsilon": float(spent),
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
