"""How many candidates a tuned cell trains, and what releasing only the best of them costs.

Papernot and Steinke, "Hyperparameter Tuning with Renyi Differential Privacy" (ICLR 2022,
arXiv 2110.03620): run a DP algorithm Q a random number K of times (each run draws its own
hyperparameters from a fixed, public distribution), release only the best run's output. If K
is drawn from a truncated negative binomial or a Poisson distribution, the release costs a
small additive term over one run's RDP, not K times it.

Two things the theorem needs and the sweep must keep:
- **K stays secret.** The bound covers the best run's output alone. Releasing K (a count of
  candidate trials, their names or indices, the cell's wall time) releases best-of-k for a
  known k, for which the general bound is k-fold composition: K, the losing runs and
  everything that reveals them live in the private set. K is drawn from OS entropy, never from
  the public seed, and so is each run's configuration (a seeded configuration sequence would
  tell which draw won, hence a lower bound on K).
- **Every run is the same Q.** Q = "draw a configuration, train it, score it"; its curve must
  bound every configuration the space can draw (``tuning.calibrate`` takes the maximum).

Each distribution is a small frozen dataclass with ``mean``, ``pmf``, ``draw`` and
``select_rdp`` (its theorem applied to a per-run curve); :data:`RUN_DISTRIBUTIONS` maps the
names a grid may use to constructors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from privdom_ray.selection.rdp import as_orders, monotone, rdp_to_delta


class RunDistribution(Protocol):
    """The distribution of K, the number of candidate runs of one tuned cell."""

    name: str

    def mean(self) -> float: ...

    def pmf(self, k: np.ndarray) -> np.ndarray: ...

    def draw(self, rng: np.random.Generator | None = None) -> int: ...

    def select_rdp(
        self, run_rdp: np.ndarray, orders: Iterable[float] | None = None
    ) -> np.ndarray: ...

    def as_dict(self) -> dict[str, Any]: ...


def secret_generator(rng: np.random.Generator | None = None) -> np.random.Generator:
    """``rng`` (tests only), else a generator seeded from OS entropy: numpy's SeedSequence
    draws 128 bits from ``secrets`` when given no seed, so no public seed can replay K."""
    return np.random.default_rng() if rng is None else rng


@dataclass(frozen=True)
class TruncatedNegativeBinomial:
    """K with P[K = k] = (1-gamma)^k / (gamma^-eta - 1) * prod_{l<k} (l + eta)/(l + 1), k >= 1
    (Papernot and Steinke 2022, Definition 1): a negative binomial NB(eta, gamma) conditioned
    on K >= 1. ``eta`` = 1 is the geometric distribution, ``eta`` = 0 the logarithmic one
    (P[K = k] = (1-gamma)^k / (k log(1/gamma))). The theorem allows eta in (-1, 0) too; it is
    not offered here (no maintained sampler, and dp-accounting, our cross-check, stops at 0).
    """

    eta: float
    gamma: float
    name: str = "truncated_negative_binomial"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta}")
        if not 0 < self.gamma < 1:
            raise ValueError(f"gamma must be in (0, 1), got {self.gamma}")

    @classmethod
    def from_mean(cls, eta: float, mean: float) -> TruncatedNegativeBinomial:
        """The distribution with shape ``eta`` whose E[K] is ``mean`` (> 1): gamma by root
        finding (E[K] falls from infinity to 1 as gamma goes from 0 to 1)."""
        if not mean > 1:
            raise ValueError(f"the mean number of runs must exceed 1, got {mean}")
        if eta == 1:
            return cls(1.0, 1.0 / mean)
        from scipy.optimize import brentq

        gamma = brentq(lambda g: _tnb_mean(eta, g) - mean, 1e-12, 1 - 1e-12, xtol=1e-15)
        return cls(float(eta), float(gamma))

    def mean(self) -> float:
        """E[K] (Papernot and Steinke 2022, Definition 1): eta (1-gamma) / (gamma (1 -
        gamma^eta)), and (1/gamma - 1) / log(1/gamma) at eta = 0."""
        return _tnb_mean(self.eta, self.gamma)

    def pmf(self, k: np.ndarray) -> np.ndarray:
        from scipy.special import gammaln

        k = np.asarray(k, dtype=np.float64)
        valid = k >= 1
        kk = np.where(valid, k, 1.0)
        log1mg = math.log1p(-self.gamma)
        if self.eta == 0:
            logp = kk * log1mg - np.log(kk) - math.log(math.log(1 / self.gamma))
        else:
            log_norm = math.log(math.expm1(-self.eta * math.log(self.gamma)))
            log_prod = gammaln(kk + self.eta) - gammaln(self.eta) - gammaln(kk + 1)
            logp = kk * log1mg + log_prod - log_norm
        return np.where(valid, np.exp(logp), 0.0)

    def draw(self, rng: np.random.Generator | None = None) -> int:
        """One K, from OS entropy unless a test injects ``rng``: numpy's logarithmic sampler
        at eta = 0, else its negative binomial NB(eta, gamma) redrawn until K >= 1."""
        g = secret_generator(rng)
        if self.eta == 0:
            return int(g.logseries(1 - self.gamma))
        while True:
            k = int(g.negative_binomial(self.eta, self.gamma))
            if k >= 1:
                return k

    def select_rdp(self, run_rdp: np.ndarray, orders: Iterable[float] | None = None) -> np.ndarray:
        """RDP of "run K times, release the best" (Papernot and Steinke 2022, Theorem 2): if
        one run is (lambda, eps)-RDP and (lambda_hat, eps_hat)-RDP, the selection is
        (lambda, eps')-RDP with
            eps' = eps + (1 + eta)(1 - 1/lambda_hat) eps_hat + (1 + eta) log(1/gamma)/lambda_hat
                   + log(E[K]) / (lambda - 1),
        for every lambda > 1 and lambda_hat >= 1; lambda_hat is optimised over ``orders``,
        then the curve is tightened by monotonicity in the order."""
        a = as_orders(orders)
        run_rdp = _curve(run_rdp, a)
        with np.errstate(invalid="ignore"):
            hat = (1 - 1 / a) * run_rdp + math.log(1 / self.gamma) / a
        constant = (1 + self.eta) * float(np.nanmin(hat))
        out = run_rdp + constant + math.log(self.mean()) / (a - 1)
        return monotone(out, a)

    @property
    def theorem(self) -> str:
        return "Papernot-Steinke 2022, Theorem 2 (truncated negative binomial)"

    def as_dict(self) -> dict[str, Any]:
        return {"distribution": self.name, "eta": self.eta, "gamma": self.gamma,
                "mean": self.mean()}  # fmt: skip


def _tnb_mean(eta: float, gamma: float) -> float:
    log_g = math.log(gamma)
    if eta == 0:
        return (1 / gamma - 1) / -log_g
    return eta * (1 - gamma) / (gamma * -math.expm1(eta * log_g))


@dataclass(frozen=True)
class PoissonRuns:
    """K ~ Poisson(mu), K = 0 included: then nothing is released (the cell has no model, and
    redrawing would change the distribution the bound is about). P[K = 0] = exp(-mu)."""

    mu: float
    name: str = "poisson"

    def __post_init__(self) -> None:
        # mu < 1 makes log(mu) / (lambda - 1) negative: the bound would fall below one run's
        # own curve, a claim a tuning sweep has no use for and we do not want to rest on
        if not (math.isfinite(self.mu) and self.mu >= 1):
            raise ValueError(
                f"tuning.runs.mu must be a finite number >= 1 (the mean number of candidate "
                f"runs), got {self.mu}"
            )

    def mean(self) -> float:
        return self.mu

    def pmf(self, k: np.ndarray) -> np.ndarray:
        from scipy.stats import poisson

        return poisson.pmf(np.asarray(k), self.mu)

    def draw(self, rng: np.random.Generator | None = None) -> int:
        return int(secret_generator(rng).poisson(self.mu))

    def select_rdp(self, run_rdp: np.ndarray, orders: Iterable[float] | None = None) -> np.ndarray:
        """RDP of "run K ~ Poisson(mu) times, release the best" (Papernot and Steinke 2022,
        Theorem 6): if one run is (lambda, eps)-RDP and (eps_hat, delta_hat)-DP with
        exp(eps_hat) <= 1 + 1/(lambda - 1), the selection is (lambda, eps')-RDP with
            eps' = eps + mu delta_hat + log(mu) / (lambda - 1).
        eps_hat = log(1 + 1/(lambda - 1)) exactly; delta_hat comes from the run's own curve
        (:func:`rdp.rdp_to_delta`). Then tightened by monotonicity in the order."""
        a = as_orders(orders)
        run_rdp = _curve(run_rdp, a)
        delta_hat = np.array([rdp_to_delta(run_rdp, math.log1p(1 / (x - 1)), a) for x in a])
        out = run_rdp + self.mu * delta_hat + math.log(self.mu) / (a - 1)
        return monotone(out, a)

    @property
    def theorem(self) -> str:
        return "Papernot-Steinke 2022, Theorem 6 (Poisson)"

    def as_dict(self) -> dict[str, Any]:
        return {"distribution": self.name, "mu": self.mu, "mean": self.mu}


def _curve(run_rdp: np.ndarray, orders: np.ndarray) -> np.ndarray:
    run_rdp = np.asarray(run_rdp, dtype=np.float64)
    if run_rdp.shape != orders.shape:
        raise ValueError(f"the curve has {run_rdp.shape} values for {orders.shape} orders")
    if (run_rdp < 0).any():
        raise ValueError("an RDP curve cannot be negative")
    return run_rdp


def _tnb(spec: Mapping[str, Any], eta: float | None = None) -> TruncatedNegativeBinomial:
    eta = float(spec["eta"]) if eta is None else eta
    if "gamma" in spec:
        return TruncatedNegativeBinomial(eta, float(spec["gamma"]))
    return TruncatedNegativeBinomial.from_mean(eta, float(spec.get("mean", DEFAULT_MEAN)))


#: Names a grid's ``tuning.runs.distribution`` may use (with ``mean`` or ``gamma``; ``eta``
#: for the general truncated negative binomial; ``mean`` or ``mu`` for Poisson).
RUN_DISTRIBUTIONS: dict[str, Callable[[Mapping[str, Any]], RunDistribution]] = {
    "truncated_negative_binomial": _tnb,
    "geometric": lambda s: _tnb(s, eta=1.0),
    "logarithmic": lambda s: _tnb(s, eta=0.0),
    "poisson": lambda s: PoissonRuns(float(s.get("mu", s.get("mean", DEFAULT_MEAN)))),
}

#: E[K] of the default: about ten candidates per cell.
DEFAULT_MEAN = 10.0
#: The default distribution of K: logarithmic (truncated negative binomial, eta = 0) with
#: E[K] = 10. Why: of logarithmic, eta 0.5, geometric, eta 2 and Poisson at the same mean, it
#: needs the least per-run noise for a given total epsilon in all nine (shape, target) cells
#: of docs/tuning-design.md (demo and paper shapes, epsilon 1, 3, 8; 16-17% less sigma than
#: the geometric at epsilon 1, 4-8% at epsilon 8). Its price is the longest tail (mode 1,
#: P[K > 30] = 8%, 95% quantile 41), so ``plan`` shows a quantile beside E[K];
#: ``geometric`` is the choice when compute must be predictable.
DEFAULT_RUNS: RunDistribution = TruncatedNegativeBinomial.from_mean(0.0, DEFAULT_MEAN)


def run_distribution(spec: Mapping[str, Any] | None) -> RunDistribution:
    """The distribution a grid's ``runs`` mapping names (``None``: :data:`DEFAULT_RUNS`)."""
    if spec is None:
        return DEFAULT_RUNS
    name = str(spec.get("distribution", "truncated_negative_binomial"))
    if name not in RUN_DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {name!r}; allowed: {sorted(RUN_DISTRIBUTIONS)}")
    return RUN_DISTRIBUTIONS[name](spec)


def quantile(dist: RunDistribution, p: float, k_max: int = 100_000) -> int:
    """The smallest k with P[K <= k] >= p: what ``plan`` shows beside E[K] (the tail sets the
    worst-case compute, and the truncated negative binomials have long ones)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    cdf = np.cumsum(dist.pmf(np.arange(0, k_max + 1)))
    idx = int(np.searchsorted(cdf, p))
    if idx > k_max:
        raise ValueError(f"the {p} quantile of K exceeds {k_max}")
    return idx


def replace_mean(dist: RunDistribution, mean: float) -> RunDistribution:
    """The same family and shape with another E[K] (for tables and ``plan`` what-ifs)."""
    if isinstance(dist, PoissonRuns):
        return dataclasses.replace(dist, mu=mean)
    if isinstance(dist, TruncatedNegativeBinomial):
        return TruncatedNegativeBinomial.from_mean(dist.eta, mean)
    raise TypeError(f"unknown distribution {dist!r}")
