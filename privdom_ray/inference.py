"""One set of inference rules for every CI, p-value and verdict (numpy + scipy only).

Why one module: a CI and a p-value computed by different rules can disagree (a 95% CI that
excludes 0 next to p = 0.06). Here both come from the same B valid resampled values
``d(1) <= ... <= d(B)`` of a statistic, with ``alpha = 1 - ci`` and
``m = floor(alpha (B + 1) / 2)``:

* CI = ``[d(m), d(B + 1 - m)]`` (null when ``m < 1``: too few resamples for that level);
* two-sided p of "statistic = 0" = ``min(1, 2 (min(#{d <= 0}, #{d >= 0}) + 1) / (B + 1))``.

Then "the CI excludes 0" <=> ``p <= alpha``, exactly: with ``k = min(#{d<=0}, #{d>=0})``,
``d(m) > 0`` <=> ``#{d<=0} <= m - 1`` and ``d(B+1-m) < 0`` <=> ``#{d>=0} <= m - 1``, so the CI
excludes 0 <=> ``k + 1 <= m`` <=> ``2 (k + 1) / (B + 1) <= alpha`` (k + 1 is an integer).
``tests/test_inference.py`` checks this on many random cases with ties.

Equivalence (TOST) uses the same rule at level ``1 - 2 alpha``: the two one-sided p-values
``(#{d <= -margin} + 1) / (B + 1)`` and ``(#{d >= margin} + 1) / (B + 1)`` are both <= alpha
<=> the ``1 - 2 alpha`` CI lies strictly inside ``(-margin, margin)``.

"No difference" is never a conclusion: a large p-value only means "not shown"; the verdicts
are "equivalent within ±m", "non-inferior", "different" or "inconclusive" (see
:func:`verdict`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy import stats

__all__ = [
    "EQUIVALENT",
    "DIFFERENT",
    "INCONCLUSIVE",
    "NON_INFERIOR",
    "Inference",
    "alpha_of",
    "bh",
    "ci_rank",
    "hierarchical",
    "holm",
    "infer",
    "nanmean",
    "opt",
    "order_ci",
    "p_floor",
    "p_one_sided",
    "p_two_sided",
    "seed_draws",
    "t_two_sided_p",
    "verdict",
]

EQUIVALENT = "equivalent within ±m"
NON_INFERIOR = "non-inferior"
DIFFERENT = "different"
INCONCLUSIVE = "inconclusive"


# --------------------------------------------------------------------------- small helpers


def opt(x: float | None) -> float | None:
    """NaN -> None so undefined values become nulls downstream; +-inf is kept."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def nanmean(v: Sequence[float] | np.ndarray) -> float:
    """Mean ignoring NaN; NaN (no warning) when nothing is left."""
    a = np.asarray(v, dtype=np.float64).ravel()
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


def _valid(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).ravel()
    return v[~np.isnan(v)]


# --------------------------------------------------------------------------- the one rule


def alpha_of(ci: float) -> float:
    """``1 - ci`` rounded to 10 decimals, so 0.95 gives exactly the float 0.05."""
    if not 0.0 < ci < 1.0:
        raise ValueError("ci must be in (0, 1)")
    return round(1.0 - ci, 10)


def ci_rank(n_valid: int, alpha: float) -> int:
    """m = floor(alpha (B + 1) / 2), in exact rational arithmetic (no float floor surprises)."""
    a = Fraction(alpha).limit_denominator(10**10)
    return math.floor(a * (n_valid + 1) / 2)


def order_ci(values: np.ndarray, ci: float = 0.95) -> tuple[float | None, float | None]:
    """``[d(m), d(B+1-m)]`` of the valid (non-NaN) resampled values; (None, None) if m < 1."""
    v = np.sort(_valid(values))
    m = ci_rank(v.size, alpha_of(ci))
    if m < 1:
        return None, None
    return float(v[m - 1]), float(v[v.size - m])


def p_one_sided(values: np.ndarray, bound: float, side: str) -> float | None:
    """``(#{d <= bound} + 1) / (B + 1)`` (side "le") or with ``d >= bound`` (side "ge").

    Small when the resamples lie on the other side of ``bound``: "le" tests H0
    "statistic <= bound" against "statistic > bound".
    """
    v = _valid(values)
    if v.size == 0:
        return None
    if side == "le":
        k = int((v <= bound).sum())
    elif side == "ge":
        k = int((v >= bound).sum())
    else:
        raise ValueError('side must be "le" or "ge"')
    return (k + 1) / (v.size + 1)


def p_two_sided(values: np.ndarray, null: float = 0.0) -> float | None:
    """``min(1, 2 (min(#{d <= null}, #{d >= null}) + 1) / (B + 1))``; None without resamples.

    Identical resamples all at the null (e.g. two identical models) give exactly 1.
    """
    v = _valid(values)
    if v.size == 0:
        return None
    k = min(int((v <= null).sum()), int((v >= null).sum()))
    return min(1.0, 2.0 * (k + 1) / (v.size + 1))


def p_floor(n_valid: int) -> float:
    """The smallest two-sided p the rule can give with ``n_valid`` resamples: 2 / (B + 1)."""
    return 2.0 / (n_valid + 1)


# --------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Inference:
    """A bootstrapped statistic with CI, p-values and (with a margin) equivalence tests.

    ``harm`` is the statistic oriented so that positive means "the DP side is worse":
    ``worse_if="higher"`` keeps the sign, ``"lower"`` flips it, None means no direction
    (then there is no non-inferiority test).
    """

    estimate: float | None
    lo: float | None
    hi: float | None
    p_value: float | None
    n_valid: int
    margin: float | None = None
    worse_if: str | None = None
    tost_lo: float | None = None
    tost_hi: float | None = None
    p_tost: float | None = None
    p_noninf: float | None = None


def infer(
    point: float | None,
    boot: np.ndarray,
    *,
    ci: float,
    margin: float | None = None,
    worse_if: str | None = None,
) -> Inference:
    """CI and two-sided p at ``ci``; with ``margin``: the ``1 - 2 alpha`` CI, TOST p and the
    one-sided non-inferiority p (all by the order-statistic rule on the same resamples)."""
    if worse_if not in (None, "higher", "lower"):
        raise ValueError('worse_if must be "higher", "lower" or None')
    est = opt(point)
    v = _valid(boot)
    if est is None:
        return Inference(None, None, None, None, int(v.size), margin, worse_if)
    lo, hi = order_ci(v, ci)
    out = Inference(est, lo, hi, p_two_sided(v), int(v.size), margin, worse_if)
    alpha = alpha_of(ci)
    if margin is None or v.size == 0 or alpha >= 0.5:
        return out  # no equivalence test (a 1 - 2 alpha CI needs ci > 0.5)
    tost_lo, tost_hi = order_ci(v, 1.0 - 2.0 * alpha)
    p_low = p_one_sided(v, -margin, "le")  # H0: statistic <= -margin
    p_high = p_one_sided(v, margin, "ge")  # H0: statistic >= +margin
    p_noninf = None
    if worse_if == "higher":
        p_noninf = p_high
    elif worse_if == "lower":
        p_noninf = p_low
    return Inference(
        est, lo, hi, out.p_value, out.n_valid, margin, worse_if,
        tost_lo, tost_hi, max(p_low, p_high), p_noninf,
    )  # fmt: skip


def verdict(inf: Inference, alpha: float, *, p_equivalence: float | None = None) -> str | None:
    """The row's verdict, first match wins (None when the estimate or margin is missing):

    1. "equivalent within ±m": TOST p <= alpha (the 1 - 2 alpha CI lies inside (-m, m));
       ``p_equivalence`` replaces the TOST p (e.g. Holm-adjusted for primary endpoints);
    2. "different": two-sided p <= alpha (the 1 - alpha CI excludes 0);
    3. "non-inferior": the one-sided p of "DP worse by m or more" is <= alpha (the 1 - 2 alpha
       CI's bound on the worse side lies inside the margin); needs a direction;
    4. "inconclusive": none of these (the data cannot tell; never read as "no difference").
    """
    if inf.estimate is None or inf.margin is None or inf.p_tost is None:
        return None
    p_eq = inf.p_tost if p_equivalence is None else p_equivalence
    if p_eq <= alpha:
        return EQUIVALENT
    if inf.p_value is not None and inf.p_value <= alpha:
        return DIFFERENT
    if inf.p_noninf is not None and inf.p_noninf <= alpha:
        return NON_INFERIOR
    return INCONCLUSIVE


# --------------------------------------------------------------------------- multiplicity


def _clean(p: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    arr = np.array([np.nan if v is None else float(v) for v in p], dtype=np.float64)
    return arr, np.flatnonzero(~np.isnan(arr))


def holm(p: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values (family-wise error); None stays None."""
    arr, ok = _clean(p)
    out: list[float | None] = [None] * len(arr)
    k = ok.size
    order = ok[np.argsort(arr[ok], kind="stable")]
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (k - i) * arr[j]))
        out[j] = running
    return out


def bh(p: Sequence[float | None]) -> list[float | None]:
    """Benjamini-Hochberg q-values (false discovery rate); None stays None."""
    arr, ok = _clean(p)
    out: list[float | None] = [None] * len(arr)
    if ok.size == 0:
        return out
    q = stats.false_discovery_control(arr[ok], method="bh")
    for j, v in zip(ok, q, strict=True):
        out[j] = float(v)
    return out


# --------------------------------------------------------------------------- seeds


def seed_draws(k: int, n_boot: int, seed: int) -> np.ndarray:
    """(B, k) seed indices drawn with replacement: the seed level of the hierarchical bootstrap."""
    rng = np.random.default_rng([int(seed), 0x5EED])
    return rng.integers(0, k, size=(n_boot, k))


def hierarchical(per_seed: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Seeds x patients bootstrap: resample b is the mean over the seeds drawn for b of the
    per-seed values on patient resample b (shape (k, B) in, (B,) out; NaN stays invalid).

    Each seed's models were evaluated on the same patient resamples, so one patient draw is
    shared by every seed of resample b: the statistic keeps the patient pairing.
    """
    k, n_boot = per_seed.shape
    if draws.shape != (n_boot, k):
        raise ValueError(f"draws must have shape ({n_boot}, {k})")
    return per_seed[draws, np.arange(n_boot)[:, None]].mean(axis=1)


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided Student t tail P(|T| >= |t|) (scipy)."""
    if math.isnan(t):
        return math.nan
    return float(min(1.0, 2.0 * stats.t.sf(abs(t), df)))
