"""The audit of one run: the best rule of the grid at a Bonferroni-corrected level, the audit's
record (:class:`RunAudit`) and its recomputation from stored counts, what one run can show, and
how many canaries a claim needs.

Separate from the bounds: this is what a twin and the ``audit`` command call, and what they
store and recompute.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from privdom_ray.audit_bound.bounds import (
    DEFAULT_BETA,
    epsilon_lower_binomial,
    epsilon_lower_fdp,
    gdp_epsilon,
    mu_lower,
)
from privdom_ray.audit_bound.guesses import count_correct, guess_grid
from privdom_ray.audit_bound.noise import NoiseCheck
from privdom_ray.audit_bound.power import AuditPower

#: The fewest and most canaries :func:`canaries_for` chooses (Dirac canaries need one
#: trainable coordinate each; ResNet9 has 4.9 M).
MIN_CANARIES, MAX_CANARIES = 2**17, 2**20


@dataclass(frozen=True)
class AuditResult:
    """One attack on one run: the best guessing rule of the grid and its bounds at ``beta``."""

    kind: str  # "gradient" or "input" canaries
    m: int  # canaries (each included with probability 1/2)
    included: int  # canaries whose coin said "in"
    epsilon_lower: float  # f-DP (epsilon, delta) bound; refutes a claim; 0.0 = nothing
    k_plus: int  # the rule that gave epsilon_lower
    k_minus: int
    guesses: int  # r = k_plus + k_minus
    correct: int  # v
    beta: float  # this attack's level (the grid correction included)
    delta: float
    grid_size: int  # rules tried; each tested at beta / grid_size
    # diagnostics, each its own best rule over the same grid and correction (None = not run)
    epsilon_lower_binomial: float | None = None  # Steinke et al.'s (epsilon, delta) bound
    mu_lower: float | None = None  # largest mu-GDP curve rejected
    epsilon_lower_gdp: float | None = None  # mu_lower as epsilon at ``delta``


def audit(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    beta: float = DEFAULT_BETA,
    grid: Sequence[tuple[int, int]] | None = None,
    kind: str = "gradient",
    diagnostics: bool = True,
) -> AuditResult:
    """The best (k_plus, k_minus) of ``grid`` (default :func:`guess_grid`), each tested at
    ``beta / len(grid)``; higher score = guess "in". ``diagnostics`` adds Steinke et al.'s
    binomial bound and the GDP one (each its own best rule, same correction). ``included`` are
    the secret coins, used only to count correct guesses once the rules are fixed."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    grid = tuple(grid) if grid is not None else guess_grid(m)
    level = beta / len(grid)
    counts = [count_correct(scores, included, kp, km) for kp, km in grid]
    bounds = [epsilon_lower_fdp(m, c.guesses, c.correct, delta=delta, beta=level) for c in counts]
    best = int(np.argmax(bounds))
    extra: dict[str, float] = {}
    if diagnostics:
        extra["epsilon_lower_binomial"] = max(
            epsilon_lower_binomial(m, c.guesses, c.correct, delta=delta, beta=level) for c in counts
        )
        mu = max(mu_lower(m, c.guesses, c.correct, beta=level) for c in counts)
        extra.update(mu_lower=mu, epsilon_lower_gdp=gdp_epsilon(mu, delta) if mu > 0 else 0.0)
    chosen = counts[best]
    return AuditResult(
        kind=kind,
        m=m,
        included=int(included.sum()),
        epsilon_lower=float(bounds[best]),
        k_plus=chosen.k_plus,
        k_minus=chosen.k_minus,
        guesses=chosen.guesses,
        correct=chosen.correct,
        beta=beta,
        delta=delta,
        grid_size=len(grid),
        **extra,
    )


@dataclass(frozen=True)
class RunAudit:
    """Every attack on one run, each tested at ``beta / len(attacks)`` so that the largest of
    their bounds, ``epsilon_lower``, holds at ``1 - beta``; ``epsilon_max`` is the most any run
    with these m canaries could show (:func:`max_lower`), ``power`` what this one can catch."""

    attacks: Mapping[str, AuditResult]
    beta: float
    epsilon_max: float
    score: str  # how the canaries were scored: "llr" (per-step likelihood ratio) or "sum"
    power: AuditPower | None = None
    noise: NoiseCheck | None = None  # DP gradient twins: the noise actually added

    @property
    def attack(self) -> str:
        """The attack whose bound is the largest (the first on ties)."""
        return max(self.attacks, key=lambda name: self.attacks[name].epsilon_lower)

    @property
    def epsilon_lower(self) -> float:
        return self.attacks[self.attack].epsilon_lower

    def as_dict(self) -> dict[str, object]:
        """The twin record's ``audit`` (version 2): the deciding numbers at the top level."""
        best = self.attacks[self.attack]
        return {
            "version": 2,
            "kind": best.kind,
            "m": best.m,
            "epsilon_lower": self.epsilon_lower,
            "attack": self.attack,
            "guesses": best.guesses,
            "correct": best.correct,
            "delta": best.delta,
            "beta": self.beta,
            "epsilon_max": self.epsilon_max,
            "score": self.score,
            "attacks": {name: dataclasses.asdict(a) for name, a in self.attacks.items()},
            "power": None if self.power is None else dataclasses.asdict(self.power),
            "noise": None if self.noise is None else self.noise.as_dict(),
        }


def run_audit(
    scores: Mapping[str, np.ndarray],
    included: np.ndarray,
    *,
    delta: float,
    beta: float = DEFAULT_BETA,
    kind: str = "gradient",
    score: str = "sum",
    diagnostics: bool = True,
) -> RunAudit:
    """Audit one run with every attack in ``scores`` (name -> scores), Bonferroni over them."""
    if not scores:
        raise ValueError("need at least one attack")
    level = beta / len(scores)
    attacks = {
        name: audit(s, included, delta=delta, beta=level, kind=kind, diagnostics=diagnostics)
        for name, s in scores.items()
    }
    m = len(included)
    return RunAudit(attacks, beta, max_lower(m, delta, beta=beta, tests=len(scores)), score)


def recompute(record: Mapping[str, object]) -> tuple[float, float]:
    """(epsilon_lower, epsilon_max) recomputed from a twin record's counts: what ``launch.py
    audit`` compares with the epsilon spent, never the stored bound. Version-1 records (before
    the f-DP bound decided and twins replayed the public seed's noise) stored Steinke et al.'s
    bound of one attack over the 7 symmetric rules."""
    m, delta = int(record["m"]), float(record.get("delta", 0.0))
    if record.get("version", 1) == 1:
        level = float(record.get("beta", DEFAULT_BETA)) / int(record.get("grid_size", 7))
        r, v = int(record["guesses"]), int(record["correct"])
        lower = epsilon_lower_binomial(m, r, v, delta=delta, beta=level)
        return lower, max_lower(m, delta, grid=guess_grid(m, top=()), binomial=True)
    attacks = record["attacks"]
    assert isinstance(attacks, Mapping)
    lowers = []
    for a in attacks.values():
        level = float(a["beta"]) / int(a["grid_size"])
        lowers.append(epsilon_lower_fdp(m, int(a["guesses"]), int(a["correct"]),
                                        delta=float(a["delta"]), beta=level))  # fmt: skip
    return max(lowers), max_lower(m, delta, beta=float(record["beta"]), tests=len(attacks))


def max_lower(
    m: int,
    delta: float,
    *,
    beta: float = DEFAULT_BETA,
    tests: int = 1,
    grid: Sequence[tuple[int, int]] | None = None,
    binomial: bool = False,
) -> float:
    """The largest bound any run with ``m`` canaries can show: every guess of the rule that
    guesses most right, at ``beta / (tests |grid|)`` (``binomial``: Steinke et al.'s bound)."""
    grid = tuple(grid) if grid is not None else guess_grid(m)
    level = beta / (tests * len(grid))
    r = max(kp + km for kp, km in grid)
    if binomial:
        return epsilon_lower_binomial(m, r, r, delta=delta, beta=level)
    return epsilon_lower_fdp(m, r, r, delta=delta, beta=level)


def canaries_for(
    epsilon: float,
    delta: float,
    *,
    beta: float = DEFAULT_BETA,
    tests: int = 2,
    headroom: float = 1.0,
) -> int:
    """Canaries for a twin of a cell claiming ``epsilon``: MIN_CANARIES, doubled until
    :func:`max_lower` exceeds ``epsilon + headroom`` (an audit that cannot get above the claim
    cannot refute it), at most MAX_CANARIES. A non-private cell (inf) gets MIN_CANARIES."""
    m = MIN_CANARIES
    if not math.isfinite(epsilon):
        return m
    while m < MAX_CANARIES and max_lower(m, delta, beta=beta, tests=tests) < epsilon + headroom:
        m *= 2
    return m
