"""The lower bounds on epsilon from (m canaries, r guesses, v correct): Steinke, Nasr &
Jagielski's binomial bound and Mahloujifar, Melis & Chaudhuri's f-DP bound, with its
Gaussian-DP form, and the fewest correct guesses that refute a claim (:func:`critical_correct`).

Separate from the audit: pure statistics on three integers, tested on their own (randomised
response).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import numpy as np
from scipy import special, stats
from scipy.optimize import brentq

DEFAULT_BETA = 0.05


#: Largest epsilon / mu the searches consider (p = e^eps / (1 + e^eps) rounds to 1 beyond ~36).
_EPS_MAX, _MU_MAX = 40.0, 40.0
_NORMAL = statistics.NormalDist()


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


def epsilon_lower_binomial(
    m: int, r: int, v: int, *, delta: float, beta: float = DEFAULT_BETA
) -> float:
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
        if y_next == y:  # x and y stay as they are for every level below: nothing changes
            break
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


def critical_correct(m: int, r: int, epsilon: float, delta: float, level: float) -> int | None:
    """The fewest correct of ``r`` guesses that refute (epsilon, delta) at ``level`` (the
    f-DP test is monotone in v); None when not even r correct would."""
    inverse = approx_dp_inverse(epsilon, delta)
    if not fdp_rejects(inverse, m, r, r, beta=level):
        return None
    lo, hi = -1, r  # rejects(hi); lo is below every rejecting count
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fdp_rejects(inverse, m, r, mid, beta=level) else (mid, hi)
    return hi
