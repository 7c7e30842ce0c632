"""Lower bounds on epsilon from one training run with m randomly included canaries.

Why: a DP run reports an upper bound on epsilon, computed from the noise the code was told to
add. An audit measures a lower bound from what the run actually released: if the lower bound
exceeds the claimed epsilon, the implementation (noise, clipping, sampling, accounting) is
broken. One-run auditing (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training
Run", NeurIPS 2023, arXiv:2305.08846) needs a single training run: m canaries are each included
independently with probability 1/2 (a secret coin), the auditor scores every canary from the
released output, guesses "in" for its top ``k_plus`` scores and "out" for its bottom ``k_minus``
(abstaining on the rest), and counts ``v`` correct guesses out of ``r = k_plus + k_minus``.

The bound (:func:`p_value`, :func:`epsilon_lower`). If the run is (epsilon, delta)-DP with
respect to adding or removing each canary, their main theorem (Theorem 3.1 of
arXiv:2305.08846, for (epsilon, delta); pure DP is delta = 0) states, for every v::

    P[W >= v] <= f(v) + 2 m delta * max_{i = 1..m} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, p) >= v],   p = e^epsilon / (1 + e^epsilon),

with W the number of correct guesses (for delta = 0: W is stochastically dominated by
Binomial(r, p), the accuracy of epsilon-randomised response). The maximum only needs
i = 1..v (for i > v, f(v - i) = 1 and the ratio falls with i). ``epsilon_lower`` is the
largest epsilon whose right-hand side is still below beta at the observed v: with probability
at least 1 - beta over the coins, a run that really is (epsilon, delta)-DP reports at most its
epsilon. The bound is the same computation as the authors' published p-value algorithm
(their appendix), re-implemented here vectorised.

Choosing k_plus / k_minus (:func:`guess_grid`, :func:`audit`). The paper reports the best of a
few choices of (k_plus, k_minus). Taking a maximum over choices is a multiple test, so every
choice is tested at beta / |grid| (Bonferroni): the probability that *any* choice rejects a true
epsilon is at most |grid| * beta / |grid| = beta, whatever the dependence between choices.
The default grid guesses k = 1, 2, 5, 10, 20, 30 or 50% of m on *each* side (k_plus = k_minus
= k; 7 choices, so beta / 7): gradient-canary scores are a shift of the "in" distribution, so
both tails carry information, and the small k exploit the confident extremes when the signal is
weak while the large ones make every guess when the signal is strong (non-DP runs).

The f-DP analysis (:func:`fdp_rejects`). Mahloujifar, Melis & Chaudhuri ("Auditing
f-Differential Privacy in One Run", arXiv:2410.22235) bound the same guessing game with a whole
trade-off curve f instead of one (epsilon, delta) point. Their recursion, for k = 2 classes (in /
out) with abstentions: start from the probability beta of the observed outcome (>= v correct of
r), with per-canary correct mass x_v = beta v / m and incorrect mass y_v = beta (r - v) / m;
for i = v - 1 .. 0, flipping one canary's coin turns a correct guess at level i + 1 into an
incorrect one at level i, so f-DP forces y_i = max(y_{i+1}, B^-1(x_{i+1})) with
B^-1(x) = f(1 - x) (the least probability of an event under one hypothesis given probability x
under the other), and the outcomes with exactly i correct add x_i - x_{i+1} =
i / (r - i) * (y_i - y_{i+1}). The hypothesis is rejected when the guesses would need more mass
than the auditor spent: x_0 + y_0 > r / m. Two curves are reported:

- ``epsilon_lower_fdp`` (:func:`epsilon_lower_fdp`): the (epsilon, delta) curve
  f(a) = max(0, 1 - delta - e^eps a, e^-eps (1 - delta - a)). Every (epsilon, delta)-DP
  mechanism is f-DP for it, so this refutes an (epsilon, delta) claim as rigorously as
  ``epsilon_lower``; it handles delta far better than the 2 m delta term (at m = 16000 guesses
  all right, delta = 1e-5: 8.1 against 6.2), and equals the pure-DP bound when delta = 0.
- ``mu_lower`` / ``epsilon_lower_gdp`` (:func:`mu_lower`, :func:`gdp_epsilon`): the largest
  mu-GDP curve G_mu(a) = Phi(Phi^-1(1 - a) - mu) rejected, as epsilon at the run's delta. DP-SGD
  is close to, not exactly, Gaussian-DP, so this one is a diagnostic, not a refutation.

Each bound holds at 1 - beta on its own; quoting the larger of ``epsilon_lower`` and
``epsilon_lower_fdp`` is a two-fold multiple test (1 - 2 beta).

What one run can show: even with every guess right, m canaries prove at most about
ln(m / ln(|grid| / beta)) (m = 256: 3.9, 1000: 5.3, 4000: 6.7 at delta = 0), so a claim above
that cannot be refuted by any m-canary audit, however broken the run; the 2 m delta term caps
``epsilon_lower`` lower still once m delta is not small (delta = 1e-5: 6.2 at m = 4000 and
beyond). Audit broken builds in cells whose epsilon is below the cap.

numpy and scipy only, so the statistics are tested on their own (randomised response).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special, stats
from scipy.optimize import brentq

DEFAULT_BETA = 0.05
#: Fractions of m guessed on each side by the default grid (k_plus = k_minus = fraction * m).
GUESS_FRACTIONS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
#: Largest epsilon / mu the searches consider (p = e^eps / (1 + e^eps) rounds to 1 beyond ~36).
_EPS_MAX, _MU_MAX = 40.0, 40.0
_NORMAL = statistics.NormalDist()


@dataclass(frozen=True)
class GuessCount:
    """One guessing rule's outcome: top ``k_plus`` guessed in, bottom ``k_minus`` out."""

    k_plus: int
    k_minus: int
    correct: int

    @property
    def guesses(self) -> int:
        return self.k_plus + self.k_minus


@dataclass(frozen=True)
class AuditResult:
    """The audit of one run: the best guessing rule of the grid and its bounds at 1 - beta."""

    kind: str  # "gradient" or "input" canaries
    m: int  # canaries (each included with probability 1/2)
    included: int  # canaries whose coin said "in"
    epsilon_lower: float  # one-run (epsilon, delta) bound; 0.0 = nothing beyond chance
    k_plus: int
    k_minus: int
    guesses: int  # r = k_plus + k_minus
    correct: int  # v
    beta: float  # the bounds hold with probability >= 1 - beta (grid correction included)
    delta: float
    grid_size: int  # choices of (k_plus, k_minus) tried; each tested at beta / grid_size
    # f-DP analysis (None = not run), each its own best rule over the same grid and correction
    epsilon_lower_fdp: float | None = None  # (epsilon, delta) curve: refutes a claim too
    mu_lower: float | None = None  # largest mu-GDP curve rejected (diagnostic)
    epsilon_lower_gdp: float | None = None  # mu_lower as epsilon at ``delta``


# --------------------------------------------------------------------------------------------
# Guesses
# --------------------------------------------------------------------------------------------


def count_correct(
    scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int
) -> GuessCount:
    """Correct guesses when the top ``k_plus`` scores are guessed "in" and the bottom
    ``k_minus`` "out". Ties are broken by canary index (public, independent of the coins)."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if included.shape != scores.shape or scores.ndim != 1:
        raise ValueError("scores and included must be 1-D arrays of the same length")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"need 0 <= k_plus + k_minus <= m, got {k_plus} + {k_minus} > {m}")
    order = np.argsort(-scores, kind="stable")  # highest first
    top, bottom = order[:k_plus], order[m - k_minus :]
    correct = int(included[top].sum()) + int((~included[bottom]).sum())
    return GuessCount(k_plus=k_plus, k_minus=k_minus, correct=correct)


def guess_grid(m: int, fractions: Sequence[float] = GUESS_FRACTIONS) -> tuple[tuple[int, int], ...]:
    """The (k_plus, k_minus) choices: k = max(1, round(f * m)) on each side, at most m in all,
    duplicates removed (small m)."""
    if m < 1:
        raise ValueError("need at least one canary")
    grid: list[tuple[int, int]] = []
    for f in fractions:
        k = min(max(1, round(f * m)), m // 2) or 1
        k_minus = min(k, m - k)
        if (k, k_minus) not in grid:
            grid.append((k, k_minus))
    return tuple(grid)


# --------------------------------------------------------------------------------------------
# Steinke, Nasr & Jagielski: the (epsilon, delta) bound
# --------------------------------------------------------------------------------------------


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[>= v correct of r guesses] for an (epsilon, delta)-DP run with m
    canaries (the module docstring's theorem)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError("need epsilon >= 0 and 0 <= delta <= 1")
    if v == 0:
        return 1.0
    p = float(special.expit(epsilon))
    tail = float(stats.binom.sf(v - 1, r, p))  # f(v) = P[Binomial(r, p) >= v]
    if delta == 0:
        return min(1.0, tail)
    # (f(v - i) - f(v)) = P[v - i <= Binomial < v], i = 1..v: cumulative pmf from v - 1 down
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, p))
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def epsilon_lower(m: int, r: int, v: int, *, delta: float, beta: float = DEFAULT_BETA) -> float:
    """Largest epsilon that ``v`` correct of ``r`` guesses rejects at level ``beta``
    (``p_value < beta``); 0.0 when not even epsilon = 0 is rejected."""
    if not 0 < beta < 1:
        raise ValueError("beta must be in (0, 1)")
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while hi < _EPS_MAX and p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi * 2
    if hi >= _EPS_MAX and p_value(m, r, v, _EPS_MAX, delta) < beta:
        return _EPS_MAX
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < beta else (lo, mid)
    return lo


# --------------------------------------------------------------------------------------------
# Mahloujifar, Melis & Chaudhuri: the Gaussian f-DP bound
# --------------------------------------------------------------------------------------------


def gdp_inverse(mu: float) -> Callable[[float], float]:
    """B^-1 of the mu-GDP curve: x -> Phi(Phi^-1(x) - mu)."""

    def inverse(x: float) -> float:
        if x <= 0.0 or x >= 1.0:
            return min(max(x, 0.0), 1.0)
        return _NORMAL.cdf(_NORMAL.inv_cdf(x) - mu)

    return inverse


def approx_dp_inverse(epsilon: float, delta: float) -> Callable[[float], float]:
    """B^-1 of the (epsilon, delta) curve: x -> max(0, e^-eps (x - delta),
    1 - delta - e^eps (1 - x))."""
    shrink = math.exp(-epsilon)
    grow = math.exp(min(epsilon, 700.0))

    def inverse(x: float) -> float:
        return max(0.0, shrink * (x - delta), 1.0 - delta - grow * (1.0 - x))

    return inverse


def fdp_rejects(
    inverse: Callable[[float], float], m: int, r: int, v: int, *, beta: float = DEFAULT_BETA
) -> bool:
    """Whether ``v`` correct of ``r`` guesses among ``m`` canaries has probability below
    ``beta`` under every mechanism that is f-DP for the curve whose B^-1 is ``inverse`` (the
    recursion of the module docstring; x, y only grow, so it stops once over budget)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    budget = r / m  # per-canary probability of guessing at all
    x, y = beta * v / m, beta * (r - v) / m  # correct / incorrect mass at level v
    for i in range(v - 1, -1, -1):
        y_next = max(y, inverse(x))
        x += i / (r - i) * (y_next - y)
        y = y_next
        if x + y > budget:
            return True
    return x + y > budget


def _largest_rejected(rejects: Callable[[float], bool], hi: float, tol: float) -> float:
    """Largest t in [0, hi] with ``rejects(t)`` (monotone: true below some point); 0.0 if none."""
    if not rejects(0.0):
        return 0.0
    if rejects(hi):
        return hi
    lo = 0.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejects(mid) else (lo, mid)
    return lo


def epsilon_lower_fdp(m: int, r: int, v: int, *, delta: float, beta: float = DEFAULT_BETA) -> float:
    """Largest epsilon whose (epsilon, delta) curve the guesses reject (f-DP analysis)."""
    return _largest_rejected(
        lambda e: fdp_rejects(approx_dp_inverse(e, delta), m, r, v, beta=beta), _EPS_MAX, 1e-3
    )


def gdp_rejects(mu: float, m: int, r: int, v: int, *, beta: float = DEFAULT_BETA) -> bool:
    """:func:`fdp_rejects` for the mu-GDP curve."""
    return fdp_rejects(gdp_inverse(mu), m, r, v, beta=beta)


def mu_lower(m: int, r: int, v: int, *, beta: float = DEFAULT_BETA) -> float:
    """Largest mu whose mu-GDP curve the guesses reject; 0.0 when none."""
    return _largest_rejected(lambda mu: gdp_rejects(mu, m, r, v, beta=beta), _MU_MAX, 1e-3)


def gdp_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of the mu-GDP curve (Dong, Roth & Su 2019), overflow-safe."""
    if mu <= 0:
        return 0.0
    first = special.ndtr(-epsilon / mu + mu / 2)
    second = math.exp(epsilon + special.log_ndtr(-epsilon / mu - mu / 2))
    return float(max(0.0, first - second))


def gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest epsilon with mu-GDP => (epsilon, delta)-DP; 0.0 when delta(0) <= delta."""
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(mu, hi) > delta:
        hi *= 2
    return float(brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, hi, xtol=1e-9))


# --------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------


def audit(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    beta: float = DEFAULT_BETA,
    grid: Sequence[tuple[int, int]] | None = None,
    kind: str = "gradient",
    fdp: bool = True,
) -> AuditResult:
    """The best (k_plus, k_minus) of ``grid`` (default :func:`guess_grid`), each tested at
    ``beta / len(grid)``; higher score = guess "in". ``fdp`` adds the f-DP bounds (each its
    own best rule over the same grid, same correction). ``included`` are the secret coins, used
    only to count correct guesses once the rules are fixed."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    grid = tuple(grid) if grid is not None else guess_grid(m)
    level = beta / len(grid)
    counts = [count_correct(scores, included, kp, km) for kp, km in grid]
    bounds = [epsilon_lower(m, c.guesses, c.correct, delta=delta, beta=level) for c in counts]
    best = int(np.argmax(bounds))
    extra: dict[str, float] = {}
    if fdp:
        extra["epsilon_lower_fdp"] = max(
            epsilon_lower_fdp(m, c.guesses, c.correct, delta=delta, beta=level) for c in counts
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
