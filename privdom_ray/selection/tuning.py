"""The privacy plan of a tuned cell: per-run noise calibrated so that the best-of-K release stays
within the cell's target epsilon, and the validation releases that ride along for free.

One candidate run Q is: draw a configuration from the (public) search space, train it with
DP-SGD on the training split T, then on the validation split V choose its epoch
(``validation.select_checkpoint``), release its score (``validation.release_score``) and its
thresholds (``validation.release_thresholds``). T and V compose in parallel
(``rdp.parallel``), so Q's curve is max(train, validation) per order. The cell releases the
best of K runs (``runs.py``), plus anything released once per cell before the runs (``fixed``,
e.g. the DP label counts the loss weights come from), which composes sequentially.

By default the validation releases get the largest linear curve rho * alpha that the training
curve dominates at every order (:func:`validation_budget`): then max(train, validation) =
train and the selections cost nothing beyond training. Everything here is RDP, converted once
at the end (``rdp.rdp_to_epsilon``): the selection theorems are RDP statements.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from privdom_ray.selection import rdp
from privdom_ray.selection.runs import DEFAULT_RUNS, RunDistribution, run_distribution


@dataclass(frozen=True)
class RunShape:
    """What one configuration of the search space does to privacy: its Poisson sample rate
    (logical batch / N_train, as ``privacy.poisson_rate``) and its exact step count."""

    sample_rate: float
    steps: int


@dataclass(frozen=True)
class CandidateNoise:
    """A run shape with its calibrated DP-SGD noise multiplier."""

    sample_rate: float
    steps: int
    noise_multiplier: float

    def as_tuple(self) -> tuple[float, float, int]:
        return (float(self.noise_multiplier), float(self.sample_rate), int(self.steps))


@dataclass(frozen=True)
class ValidationNoise:
    """The noise of a run's three validation releases (None: that release is not made)."""

    score_noise_multiplier: float | None = None  # Gaussian, std = sigma x B
    checkpoint_epsilon: float | None = None  # exponential mechanism, bounded-range epsilon
    histogram_noise_multiplier: float | None = None  # Gaussian, std = sigma x sqrt(labels)

    def rdp(self, orders: Iterable[float] | None = None) -> np.ndarray:
        """Their sequential composition on V (all three read the same validation units)."""
        a = rdp.as_orders(orders)
        total = np.zeros_like(a)
        for sigma in (self.score_noise_multiplier, self.histogram_noise_multiplier):
            if sigma is not None:
                total = total + rdp.gaussian_rdp(sigma, a)
        if self.checkpoint_epsilon is not None:
            total = total + rdp.exponential_rdp(self.checkpoint_epsilon, a)
        return total


#: Default shares of the validation budget: the three releases equally.
VALIDATION_SHARES: Mapping[str, float] = {"score": 1.0, "checkpoint": 1.0, "thresholds": 1.0}


def validation_budget(train_rdp: np.ndarray, orders: Iterable[float] | None = None) -> float:
    """rho = min over orders of train(alpha) / alpha: the largest rho whose linear curve
    rho * alpha (Gaussian and exponential mechanisms compose to one) stays under the
    training curve at every order, so that max(train, validation) = train."""
    a = rdp.as_orders(orders)
    return float(np.min(np.asarray(train_rdp, dtype=np.float64) / a))


def validation_budget_at(
    epsilon: float, delta: float, orders: Iterable[float] | None = None, tolerance: float = 1e-3
) -> float:
    """The largest rho (to ``tolerance``) whose curve rho * alpha converts to at most
    ``epsilon`` at ``delta``: the budget of an untuned cell's validation releases. There the
    training epsilon comes from PRV, not RDP, and parallel composition holds for (epsilon,
    delta) pairs at one delta too, so the cell's epsilon stays its training epsilon as long as
    the validation releases' own epsilon does not exceed it."""
    a = rdp.as_orders(orders)

    def eps_of_inverse(x: float) -> float:  # decreasing in x = 1/rho, as _smallest needs
        return rdp.rdp_to_epsilon(a / x, delta, a)[0]

    return 1.0 / _smallest(eps_of_inverse, epsilon, tolerance)


def split_validation(
    rho: float, shares: Mapping[str, float] = VALIDATION_SHARES
) -> ValidationNoise:
    """Noise for the releases named in ``shares`` (score, checkpoint, thresholds), each given
    its share of rho: a Gaussian with rho_i alpha = alpha / (2 sigma^2), the exponential
    mechanism with alpha eps^2/8 = rho_i alpha."""
    unknown = set(shares) - set(VALIDATION_SHARES)
    if unknown or any(v < 0 for v in shares.values()) or not sum(shares.values()) > 0:
        raise ValueError(f"shares must be >= 0 over {sorted(VALIDATION_SHARES)}, got {shares}")
    if not rho > 0:
        raise ValueError(f"the validation budget must be > 0, got {rho}")
    part = {k: rho * v / sum(shares.values()) for k, v in shares.items() if v > 0}

    def sigma(name: str) -> float | None:
        return 1 / math.sqrt(2 * part[name]) if name in part else None

    eps = math.sqrt(8 * part["checkpoint"]) if "checkpoint" in part else None
    return ValidationNoise(sigma("score"), eps, sigma("thresholds"))


@dataclass(frozen=True)
class TuningPlan:
    """Everything a ledger needs to recompute a tuned cell's epsilon (``recompute``), and the
    numbers it reports. ``epsilon_run`` is one run's own epsilon at the same delta, for
    comparison only: the released model's guarantee is ``epsilon_total``."""

    epsilon_target: float
    delta: float
    runs: RunDistribution
    candidates: tuple[CandidateNoise, ...]
    validation: ValidationNoise
    fixed: tuple[tuple[float, float, int], ...] = ()  # (sigma, q, steps), once per cell
    orders: tuple[float, ...] = rdp.ORDERS
    epsilon_total: float = math.nan
    epsilon_run: float = math.nan
    accountant: str = rdp.ACCOUNTANT
    theorem: str = field(default="")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["runs"] = self.runs.as_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TuningPlan:
        """Rebuild a stored plan; its epsilons are recomputed, never read back."""
        return plan(
            epsilon_target=float(d["epsilon_target"]),
            delta=float(d["delta"]),
            runs=run_distribution(d["runs"]),
            candidates=[CandidateNoise(**c) for c in d["candidates"]],
            validation=ValidationNoise(**d["validation"]),
            fixed=[tuple(m) for m in d.get("fixed", ())],
            orders=d.get("orders"),
        )


def run_rdp(
    candidates: Sequence[CandidateNoise],
    validation: ValidationNoise,
    orders: Iterable[float] | None = None,
) -> np.ndarray:
    """One run's curve: the worst configuration it can draw, in parallel with V's releases."""
    a = rdp.as_orders(orders)
    if not candidates:
        raise ValueError("a tuned cell needs at least one run shape")
    curves = [rdp.mechanisms_rdp([c.as_tuple()], a) for c in candidates]
    return rdp.parallel(np.max(curves, axis=0), validation.rdp(a))


def tuned_rdp(
    candidates: Sequence[CandidateNoise],
    validation: ValidationNoise,
    runs: RunDistribution,
    fixed: Sequence[tuple[float, float, int]] = (),
    orders: Iterable[float] | None = None,
) -> np.ndarray:
    """The released model's curve: the selection theorem on one run's curve, then the
    once-per-cell releases composed on top."""
    a = rdp.as_orders(orders)
    return runs.select_rdp(run_rdp(candidates, validation, a), a) + rdp.mechanisms_rdp(fixed, a)


def plan(
    *,
    epsilon_target: float,
    delta: float,
    runs: RunDistribution,
    candidates: Sequence[CandidateNoise],
    validation: ValidationNoise,
    fixed: Sequence[tuple[float, float, int]] = (),
    orders: Iterable[float] | None = None,
) -> TuningPlan:
    """A :class:`TuningPlan` with its epsilons computed from its mechanisms."""
    a = rdp.as_orders(orders)
    total, _ = rdp.rdp_to_epsilon(tuned_rdp(candidates, validation, runs, fixed, a), delta, a)
    one, _ = rdp.rdp_to_epsilon(run_rdp(candidates, validation, a), delta, a)
    return TuningPlan(
        epsilon_target, delta, runs, tuple(candidates), validation,
        tuple(tuple(m) for m in fixed), tuple(float(x) for x in a), total, one,
        theorem=getattr(runs, "theorem", ""),
    )  # fmt: skip


def calibrate(
    *,
    epsilon: float,
    delta: float,
    shapes: Sequence[RunShape],
    runs: RunDistribution = DEFAULT_RUNS,
    fixed: Sequence[tuple[float, float, int]] = (),
    validation_shares: Mapping[str, float] = VALIDATION_SHARES,
    orders: Iterable[float] | None = None,
    tolerance: float = 0.005,
) -> TuningPlan:
    """Per-run noise multipliers (one per run shape of the search space) whose best-of-K
    release, with ``fixed`` composed on top, spends at most ``epsilon`` at ``delta`` and at
    least ``epsilon * (1 - tolerance)``.

    Each shape is first calibrated alone; when the space has several, their sigmas are then
    scaled up by one common factor until the worst-case curve fits (a run may draw any shape).
    The validation releases then get the budget the final training curve leaves free.
    """
    a = rdp.as_orders(orders)
    if not shapes:
        raise ValueError("a tuned cell needs at least one run shape")
    none = ValidationNoise()

    def spent(sigmas: Sequence[float], which: Sequence[RunShape] = shapes) -> float:
        cands = [
            CandidateNoise(s.sample_rate, s.steps, x) for s, x in zip(which, sigmas, strict=True)
        ]
        return rdp.rdp_to_epsilon(tuned_rdp(cands, none, runs, fixed, a), delta, a)[0]

    alone = [_smallest(lambda x, s=s: spent([x], [s]), epsilon, tolerance) for s in shapes]
    factor = 1.0
    if spent(alone) > epsilon:
        factor = _smallest(lambda t: spent([t * x for x in alone]), epsilon, tolerance, lo=1.0)
    cands = [
        CandidateNoise(s.sample_rate, s.steps, factor * x)
        for s, x in zip(shapes, alone, strict=True)
    ]
    validation = split_validation(validation_budget(run_rdp(cands, none, a), a), validation_shares)
    out = plan(epsilon_target=epsilon, delta=delta, runs=runs, candidates=cands,
               validation=validation, fixed=fixed, orders=a)  # fmt: skip
    if out.epsilon_total > epsilon * (1 + 1e-9):
        raise RuntimeError(f"calibration overshot: {out.epsilon_total} > {epsilon}")
    return out


def _smallest(
    eps_of: Callable[[float], float], target: float, tolerance: float, lo: float | None = None
) -> float:
    """Smallest x (to ``tolerance`` relative epsilon) with eps_of(x) <= target, eps_of
    decreasing in x; bracketed by doubling, then bisected in log space."""
    if not target > 0:
        raise ValueError(f"the target epsilon must be > 0, got {target}")
    hi = 1.0 if lo is None else 2.0 * lo
    while eps_of(hi) > target:
        hi *= 2.0
        if hi > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {target}")
    if lo is None:
        lo = hi / 2.0
        while eps_of(lo) <= target:
            hi, lo = lo, lo / 2.0
            if lo < 1e-6:
                return hi
    for _ in range(100):
        if eps_of(hi) >= target * (1 - tolerance) or hi / lo - 1 < 1e-9:
            break
        mid = math.sqrt(lo * hi)
        if eps_of(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def expected_trainings(runs: RunDistribution | None) -> float:
    """What ``plan`` counts for a tuned cell: E[K] trainings (1 for an untuned one)."""
    return 1.0 if runs is None else float(runs.mean())
