"""Lower bounds on epsilon from one training run with m randomly included canaries, and the
power of such an audit.

Why: a DP run reports an upper bound on epsilon, computed from the noise the code was told to
add. An audit measures a lower bound from what the run actually released: if the lower bound
exceeds the claimed epsilon, the implementation (noise, clipping, sampling, accounting) is
broken. One-run auditing (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training
Run", NeurIPS 2023, arXiv:2305.08846) needs a single training run: m canaries are each included
independently with probability 1/2 (a secret coin), the auditor scores every canary from the
released output, guesses "in" for its top ``k_plus`` scores and "out" for its bottom ``k_minus``
(abstaining on the rest), and counts ``v`` correct guesses out of ``r = k_plus + k_minus``.

The deciding bound (:func:`epsilon_lower_fdp`, ``AuditResult.epsilon_lower``). Mahloujifar,
Melis & Chaudhuri ("Auditing f-Differential Privacy in One Run", ICML 2025, arXiv:2410.22235)
bound the guessing game with a whole trade-off curve f. Their recursion (:func:`fdp_rejects`),
for k = 2 classes (in / out) with abstentions: start from the probability beta of the observed
outcome (>= v correct of r), with per-canary correct mass x_v = beta v / m and incorrect mass
y_v = beta (r - v) / m; for i = v - 1 .. 0, flipping one canary's coin turns a correct guess at
level i + 1 into an incorrect one at level i, so f-DP forces y_i = max(y_{i+1}, B^-1(x_{i+1}))
with B^-1(x) = f(1 - x) (the least probability of an event under one hypothesis given
probability x under the other), and the outcomes with exactly i correct add x_i - x_{i+1} =
i / (r - i) * (y_i - y_{i+1}). The hypothesis is rejected when the guesses would need more mass
than the auditor spent: x_0 + y_0 > r / m. With the (epsilon, delta) curve
f(a) = max(0, 1 - delta - e^eps a, e^-eps (1 - delta - a)), which every (epsilon, delta)-DP
mechanism satisfies, a rejection refutes the (epsilon, delta) claim; the largest epsilon
rejected is the run's ``epsilon_lower``, which holds with probability >= 1 - beta over the
coins.

Beside it (diagnostics, never used to decide): Steinke et al.'s binomial bound
(:func:`p_value`, :func:`epsilon_lower_binomial`; their Theorem 3.1)::

    P[W >= v] <= f(v) + 2 m delta * max_{i = 1..m} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, p) >= v],   p = e^epsilon / (1 + e^epsilon),

whose 2 m delta term caps it near 6.2 at delta = 1e-5 whatever m is (so it could never refute
an epsilon-8 claim; the f-DP bound reaches 8.1 at m = 16000 guesses all right), and the largest
mu-GDP curve G_mu(a) = Phi(Phi^-1(1 - a) - mu) rejected (:func:`mu_lower`, as epsilon at the
run's delta; DP-SGD is close to, not exactly, Gaussian-DP).

Choosing the guesses (:func:`guess_grid`, :func:`audit`). The best of a few rules is reported;
a maximum over rules is a multiple test, so every rule is tested at beta / |grid|
(Bonferroni: the probability that any rule rejects a true claim is at most beta, whatever the
dependence). The default grid has 7 symmetric rules (k_plus = k_minus = 1, 2, 5, 10, 20, 30 or
50% of m: with noisy scores both tails carry information) and 4 "in"-only rules (k_plus = 1,
10, 30 or 45% of m, k_minus = 0): a canary that is included but never Poisson-sampled, which
happens with probability (1 - q)^steps (~0.2% at 6 epochs), scores like an excluded one, so
the "out" guesses of a nearly noiseless run always hold a few errors, which cap the symmetric
rules below epsilon 8 at any m; the top scores of such a run are all included canaries.
Several attacks on one run (the twin's plain scores and its replay of the public seed's noise)
are tested at beta / attacks each, so the largest of their bounds still holds at 1 - beta.

What one run can show (:func:`max_lower`): even with every guess right, m canaries prove at
most about ln(m / ln(tests |grid| / beta)) (m = 1000: 5.1, 2^17: 10.0 with 11 rules and two
attacks), so a claim above that cannot be refuted, however broken the run.
:func:`canaries_for` picks m from the claimed epsilon: at least 2^17 (at the demo's epsilon 1
the simulated power levels off there: 2^16 to 2^19 canaries all catch about half the
calibrated noise), doubled until the attainable bound exceeds epsilon + 1.

Power (:func:`audit_power`): the smallest noise scaling an audit detects, from a simulation of
the gradient canaries' scores (Poisson-sampled Dirac canaries of norm C under Gaussian noise,
:func:`step_llr`) with the twin's own (m, q, steps, sigma), without the real gradients (which
only add variance: the simulation is optimistic where they are large).

The noise check (:class:`NoiseCheck`): two exact tests on the noised coordinates a white-box
auditor sees, at level ``NOISE_ALPHA`` each: less noise than stated, and noise that follows
the public seed. They catch what the bound cannot see at a large epsilon, but they test the
noise, not epsilon.

numpy and scipy only, so the statistics are tested on their own (randomised response).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special, stats
from scipy.optimize import brentq

DEFAULT_BETA = 0.05
#: Fractions of m guessed on each side by the symmetric rules (k_plus = k_minus = fraction * m).
GUESS_FRACTIONS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
#: Fractions of m guessed "in" by the one-sided rules (k_minus = 0).
TOP_FRACTIONS: tuple[float, ...] = (0.01, 0.1, 0.3, 0.45)
#: The fewest and most canaries :func:`canaries_for` chooses (Dirac canaries need one
#: trainable coordinate each; ResNet9 has 4.9 M).
MIN_CANARIES, MAX_CANARIES = 2**17, 2**20
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
    return _count_sorted(included[order], k_plus, k_minus)


def _count_sorted(ranked: np.ndarray, k_plus: int, k_minus: int) -> GuessCount:
    """:func:`count_correct` on coins already ordered by score, highest first."""
    m = len(ranked)
    correct = int(ranked[:k_plus].sum()) + int((~ranked[m - k_minus :]).sum())
    return GuessCount(k_plus=k_plus, k_minus=k_minus, correct=correct)


def guess_grid(
    m: int,
    fractions: Sequence[float] = GUESS_FRACTIONS,
    top: Sequence[float] = TOP_FRACTIONS,
) -> tuple[tuple[int, int], ...]:
    """The (k_plus, k_minus) rules: k = max(1, round(f * m)) on each side for the symmetric
    ``fractions`` (at most m in all), then k_plus = round(f * m), k_minus = 0 for ``top``;
    duplicates removed (small m)."""
    if m < 1:
        raise ValueError("need at least one canary")
    grid: list[tuple[int, int]] = []
    for f in fractions:
        k = min(max(1, round(f * m)), m // 2) or 1
        k_minus = min(k, m - k)
        if (k, k_minus) not in grid:
            grid.append((k, k_minus))
    for f in top:
        rule = (min(max(1, round(f * m)), m), 0)
        if rule not in grid:
            grid.append(rule)
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


# --------------------------------------------------------------------------------------------
# The noise check: how much noise the run really added
# --------------------------------------------------------------------------------------------

#: Level of each noise test (kept far below beta: a false alarm calls a correct build broken).
NOISE_ALPHA = 1e-6


@dataclass(frozen=True)
class NoiseCheck:
    """Two exact tests on the noised coordinates a white-box auditor sees (canaries.py measures
    them at the excluded canaries' coordinates, which no canary touches), in units of the
    stated noise deviation sigma C: z = (clipped sum + noise) / (sigma C), ``units`` of them.

    ``too_little``: the run added less noise than stated. With the stated noise, sum z^2 =
    A + 2B + chi^2_units, where A = sum (clipped sum / sigma C)^2 >= 0 and B = sum of the
    clipped sums times the noise drawn after them (a martingale with exp(-B - A/2) of mean 1,
    so P[A + 2B <= -2 ln(2/alpha)] <= alpha/2); so sum z^2 falls below the chi^2 quantile
    alpha/2 minus 2 ln(2/alpha) with probability at most alpha, whatever the gradients.
    ``follows_seed``: the noise is the one the public seed gives. For a build whose noise is
    independent of the replayed noise k (standard normal in these units), sum z k / sqrt(sum
    z^2) is exactly standard normal given the z; above its 1 - alpha quantile, it is not
    independent."""

    units: int
    sum_squares: float
    replay_z: float | None  # None: no replay (non-private twins)
    alpha: float = NOISE_ALPHA

    @property
    def ratio(self) -> float:
        """sqrt(mean z^2): about the added noise over the stated one (real gradients add a
        little), 1 for a correct build."""
        return math.sqrt(self.sum_squares / self.units) if self.units else math.nan

    @property
    def floor(self) -> float:
        """The least sum z^2 the stated noise allows (level alpha)."""
        return float(stats.chi2.ppf(self.alpha / 2, self.units)) - 2 * math.log(2 / self.alpha)

    @property
    def too_little(self) -> bool:
        return self.units > 0 and self.sum_squares < self.floor

    @property
    def follows_seed(self) -> bool:
        return self.replay_z is not None and self.replay_z > float(stats.norm.isf(self.alpha))

    def detects_scale(self, power: float = 0.8) -> float:
        """The largest noise factor s whose run ``too_little`` flags with probability
        ``power`` (real gradients left out: they only add to sum z^2)."""
        if not self.units or self.floor <= 0:
            return 0.0
        return math.sqrt(self.floor / float(stats.chi2.ppf(power, self.units)))

    def as_dict(self) -> dict[str, object]:
        return {
            **dataclasses.asdict(self),
            "ratio": self.ratio,
            "too_little": self.too_little,
            "follows_seed": self.follows_seed,
            "detects_scale": self.detects_scale(),
        }


def noise_check(
    square: np.ndarray, cross: np.ndarray | None, *, steps: int, alpha: float = NOISE_ALPHA
) -> NoiseCheck:
    """The noise tests from per-coordinate sums over ``steps`` steps of z^2 and (replay) z k."""
    square = np.asarray(square, dtype=np.float64)
    total = float(square.sum())
    replay = None
    if cross is not None and total > 0:
        replay = float(np.asarray(cross, dtype=np.float64).sum() / math.sqrt(total))
    return NoiseCheck(int(len(square) * steps), total, replay, alpha)


# --------------------------------------------------------------------------------------------
# Power: what an audit of these shapes catches (a simulation)
# --------------------------------------------------------------------------------------------


def step_llr(z: np.ndarray, sample_rate: float, shift: float) -> np.ndarray:
    """One step's log likelihood ratio "canary in" vs "out" for a released coordinate ``z`` in
    units of the noise's standard deviation (sigma C): in, the canary adds ``shift`` (its norm
    over sigma C, 1/sigma for a canary of norm C) with probability q. Summed over steps it is
    the Neyman-Pearson score for a run whose noise is what its ledger says; with less noise it
    still ranks a canary by how often it shows. (canaries.py applies the same formula to
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
