"""Power: the smallest noise scaling an audit of these shapes detects, from a simulation of the
gradient canaries' scores (Poisson-sampled Dirac canaries under Gaussian noise).

Separate from the audit: it runs before training (to choose m) and in benchmarks, never on a
run's scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from privdom_ray.audit_bound.bounds import DEFAULT_BETA, critical_correct
from privdom_ray.audit_bound.guesses import _count_sorted, guess_grid


def step_llr(z: np.ndarray, sample_rate: float, shift: float) -> np.ndarray:
    """One step's log likelihood ratio "canary in" vs "out" for a released coordinate ``z`` in
    units of the noise's standard deviation (sigma C): in, the canary adds ``shift`` (its norm
    over sigma C, 1/sigma for a canary of norm C) with probability q. Summed over steps it is
    the Neyman-Pearson score for a run whose noise is what its ledger says; with less noise it
    still ranks a canary by how often it shows. (canaries.gradient applies the same formula to
    torch tensors.)"""
    with np.errstate(divide="ignore"):
        stay = math.log1p(-sample_rate) if sample_rate < 1 else -math.inf
    return np.logaddexp(stay, math.log(sample_rate) + shift * z - 0.5 * shift**2)


@dataclass(frozen=True)
class PowerSetting:
    """What a twin's power depends on: its canaries, the mechanism's (q, steps, sigma) as the
    ledger states them, the epsilon the audit must exceed, and its tests."""

    m: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    epsilon: float  # the twin's epsilon spent: "caught" = epsilon_lower above it
    delta: float
    beta: float = DEFAULT_BETA
    tests: int = 2  # attacks sharing beta (the scaled-noise build is caught by the plain one)


@dataclass(frozen=True)
class AuditPower:
    """``noise_scale``: the largest factor s such that a build adding s times the calibrated
    noise is caught (epsilon_lower > epsilon spent) in at least ``target`` of the simulated
    runs; None when not even a build without noise is. ``critical`` holds each run's largest
    caught factor (-1: none; 1: even the full noise, a false alarm), so the estimate can be
    recomputed; ``exceeds`` is the share of runs caught at the full noise (false alarms)."""

    noise_scale: float | None
    target: float
    runs: int
    seed: int
    critical: tuple[float, ...]
    exceeds: float
    setting: PowerSetting


def audit_power(
    setting: PowerSetting, *, runs: int = 24, seed: int = 0, target: float = 0.8
) -> AuditPower:
    """Simulate ``runs`` audits of gradient canaries scored by :func:`step_llr`, each at noise
    factors s in [0, 1] (the same draws for every s of a run), and find each run's largest
    caught s by bisection (detection only grows as the noise shrinks). Per canary, the steps
    it was sampled in are simulated exactly and the others by their normal limit (exact mean
    and variance of ``step_llr`` under noise alone, by Gauss-Hermite quadrature): O(m epochs)
    per run rather than O(m steps)."""
    s = setting
    grid = guess_grid(s.m)
    level = s.beta / (s.tests * len(grid))
    critical = [critical_correct(s.m, kp + km, s.epsilon, s.delta, level) for kp, km in grid]
    rules = [(kp, km, c) for (kp, km), c in zip(grid, critical, strict=True) if c is not None]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x706F_7765]))
    found = []
    for _ in range(runs):
        draws = _PowerDraws.draw(rng, s)

        def caught(scale: float, draws: _PowerDraws = draws) -> bool:
            ranked = draws.coins[np.argsort(-draws.scores(scale, s), kind="stable")]
            return any(_count_sorted(ranked, kp, km).correct >= c for kp, km, c in rules)

        found.append(_largest_caught(caught))
    ordered = sorted(found, reverse=True)
    at_target = ordered[math.ceil(target * runs) - 1]
    return AuditPower(
        noise_scale=None if at_target < 0 else at_target,
        target=target,
        runs=runs,
        seed=seed,
        critical=tuple(found),
        exceeds=float(np.mean([f >= 1.0 for f in found])),
        setting=setting,
    )


def _largest_caught(caught: Callable[[float], bool], steps: int = 6) -> float:
    """The largest noise factor in [0, 1] caught (to 1/2^steps), -1 if none, 1 if even 1 is."""
    if caught(1.0):
        return 1.0
    if not caught(0.0):
        return -1.0
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if caught(mid) else (lo, mid)
    return lo


@dataclass
class _PowerDraws:
    """One simulated run's randomness, reused for every noise factor (common random numbers)."""

    coins: np.ndarray  # (m,) bool
    owner: np.ndarray  # canary of each sampled step (flat)
    sampled_noise: np.ndarray  # standard normal of each sampled step
    unsampled: np.ndarray  # (m,) number of steps a canary was not sampled in
    bulk: np.ndarray  # (m,) standard normal: the unsampled steps' sum, standardised

    @classmethod
    def draw(cls, rng: np.random.Generator, s: PowerSetting) -> _PowerDraws:
        coins = rng.random(s.m) < 0.5
        times = np.where(coins, rng.binomial(s.steps, s.sample_rate, s.m), 0)
        owner = np.repeat(np.arange(s.m), times)
        return cls(coins, owner, rng.standard_normal(len(owner)), s.steps - times,
                   rng.standard_normal(s.m))  # fmt: skip

    def scores(self, scale: float, s: PowerSetting) -> np.ndarray:
        sigma, q = s.noise_multiplier, s.sample_rate
        z = 1.0 / sigma + scale * self.sampled_noise
        llr = step_llr(z, q, 1.0 / sigma)
        out = np.bincount(self.owner, weights=llr, minlength=len(self.coins))
        mean, var = _noise_only_moments(scale, q, sigma)
        return out + self.unsampled * mean + np.sqrt(self.unsampled * var) * self.bulk


def _noise_only_moments(scale: float, q: float, sigma: float) -> tuple[float, float]:
    """Mean and variance of step_llr(scale N) for N standard normal (Gauss-Hermite, 64 nodes)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)
    weights = weights / weights.sum()
    values = step_llr(scale * nodes, q, 1.0 / sigma)
    mean = float(weights @ values)
    return mean, float(max(weights @ (values - mean) ** 2, 0.0))
