"""The noise check: two exact tests on the noised coordinates a white-box auditor sees (less
noise than stated, noise that follows the public seed).

Separate from the bound: it tests the noise, not epsilon, and catches what the bound cannot see
at a large epsilon.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

# The noise check: how much noise the run really added
# --------------------------------------------------------------------------------------------

#: Level of each noise test (kept far below beta: a false alarm calls a correct build broken).
NOISE_ALPHA = 1e-6


@dataclass(frozen=True)
class NoiseCheck:
    """Two exact tests on the noised coordinates a white-box auditor sees (canaries.gradient measures
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
