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

Pooling training seeds (:func:`pool_seeds`) uses a second rule, a Student t interval with
one variance ``V`` and one number of degrees of freedom ``df`` (see :func:`seed_variance`):

* CI = ``est -+ t(1 - alpha/2, df) sqrt(V)``; two-sided p = ``2 P(T_df >= |est| / sqrt(V))``;
* TOST: the ``1 - 2 alpha`` CI ``est -+ t(1 - alpha, df) sqrt(V)``; one-sided p-values
  ``P(T_df >= (est + margin) / sqrt(V))`` (H0: statistic <= -margin) and
  ``P(T_df >= (margin - est) / sqrt(V))`` (H0: statistic >= +margin).

Every p is a monotone function of the same standardised distance as its CI bound, so the
same equivalences hold ("the CI excludes 0" <=> ``p <= alpha``; TOST p <= alpha <=> the
``1 - 2 alpha`` CI lies strictly inside ``(-margin, margin)``; the non-inferiority p <=
alpha <=> that CI's bound on the worse side lies inside the margin). Floating-point
rounding could break a tie at the exact boundary, so each p is snapped to the decision its
CI gives there (it moves by at most a rounding error). ``V == 0`` (identical models, no
test noise) gives the CI ``[est, est]`` and p-values 0 or 1 by the same rule.

Since evaluation protocol 4 every CI, p-value and verdict of the tables uses the t rule above
with a leave-one-patient-out JACKKNIFE variance (:func:`jackknife_variance`) and degrees of
freedom from the rarer class's patients (:func:`class_df`); metric levels in [0, 1] (AUC,
sensitivity, Brier, ...) get their interval on the logit scale (:func:`level_interval`).
Why: the percentile bootstrap's 95% intervals covered 0.89-0.92 at 10-20 positive patients
and its paired test rejected 7-9% of true nulls (``benchmarks/sim_intervals.py``); the
jackknife's variance is conservative by about P/(P - 1) in the rarer class, the t quantile
accounts for how few patients carry it, and the logit scale for the skew near 1. The
order-statistic rule (:func:`order_ci`, :func:`infer`) is the method before protocol 4, kept
for the simulations that compare the two.

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
from scipy import special, stats

__all__ = [
    "EQUIVALENT",
    "DIFFERENT",
    "INCONCLUSIVE",
    "NON_INFERIOR",
    "Inference",
    "SeedVariance",
    "alpha_of",
    "RELIABLE_UNITS",
    "bh",
    "ci_rank",
    "class_df",
    "holm",
    "infer",
    "infer_t",
    "jackknife_variance",
    "level_interval",
    "nanmean",
    "opt",
    "order_ci",
    "p_floor",
    "p_one_sided",
    "p_two_sided",
    "pool_seeds",
    "pool_seeds_level",
    "seed_variance",
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
    df: float | None = None  # t rules: the degrees of freedom (None: order-statistic rule)


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


# --------------------------------------------------------------------------- jackknife t

#: Intervals resting on fewer units (patients) than this in the rarer class are marked
#: approximate: ``benchmarks/sim_intervals.py`` verified coverage >= 0.93 of the jackknife t
#: intervals from 10 positive patients on (and the grid's default minimum is 10).
RELIABLE_UNITS = 10


def jackknife_variance(loo: np.ndarray) -> float:
    """Jackknife variance ``(P - 1)/P sum_i (v_(-i) - mean)^2`` of leave-one-unit-out values.

    ``loo`` (P,): the statistic recomputed without each unit (patient). Linear in the values,
    so the variance of a difference, a mean over labels or a drop is that of the same
    combination of their leave-one-out vectors (pairing is kept exactly). NaN when a value is
    NaN or P < 2.
    """
    v = np.asarray(loo, dtype=np.float64).ravel()
    if v.size < 2 or np.isnan(v).any():
        return math.nan
    d = v - v.mean()
    return float((v.size - 1) / v.size * np.dot(d, d))


def class_df(units_pos: int | np.ndarray, units_neg: int | np.ndarray) -> float:
    """Degrees of freedom of a label's t interval: ``min(P_pos, P_neg) - 1``, the patients of
    the rarer class (they carry the variance; the simulation's choice, see docs/statistics.md)."""
    return float(np.min(np.minimum(units_pos, units_neg))) - 1.0


def _t_ppf(q: float, df: float) -> float:
    """Student t quantile (scipy.special's ufunc: microseconds, where scipy.stats.t.ppf's
    argument checking costs a millisecond a call, minutes over a paper-size table)."""
    return float(special.stdtrit(df, q))


def _t_sf(x: float, df: float) -> float:
    """P(T_df >= x)."""
    return float(special.stdtr(df, -x))


def _t_tail(dist: float, se: float, df: float) -> float:
    """P(T_df >= dist / se); se = 0: the limit, 0 if dist > 0 else 1."""
    if se == 0.0:
        return 0.0 if dist > 0 else 1.0
    return _t_sf(dist / se, df)


def infer_t(
    point: float | None,
    variance: float,
    df: float,
    *,
    ci: float,
    margin: float | None = None,
    worse_if: str | None = None,
    n_units: int = 0,
) -> Inference:
    """CI ``est -+ t(1 - alpha/2, df) sqrt(V)``, two-sided t p of "= 0" and, with ``margin``,
    the ``1 - 2 alpha`` CI, TOST p and non-inferiority p (module docstring: they agree by
    construction). A NaN variance or df < 1 gives no CI and no p."""
    if worse_if not in (None, "higher", "lower"):
        raise ValueError('worse_if must be "higher", "lower" or None')
    est = opt(point)
    if est is None or not (variance >= 0.0) or not (df >= 1.0):
        return Inference(est, None, None, None, n_units, margin, worse_if)
    alpha = alpha_of(ci)
    se = math.sqrt(variance)
    half = _t_ppf(1.0 - alpha / 2.0, df) * se
    lo, hi = est - half, est + half
    p = _agree(min(1.0, 2.0 * _t_tail(abs(est), se, df)), lo > 0 or hi < 0, alpha)
    if margin is None or alpha >= 0.5:
        return Inference(est, lo, hi, p, n_units, margin, worse_if, df=df)
    half2 = _t_ppf(1.0 - alpha, df) * se
    tost_lo, tost_hi = est - half2, est + half2
    p_low = _agree(_t_tail(est + margin, se, df), tost_lo > -margin, alpha)
    p_high = _agree(_t_tail(margin - est, se, df), tost_hi < margin, alpha)
    p_noninf = {"higher": p_high, "lower": p_low, None: None}[worse_if]
    return Inference(
        est, lo, hi, p, n_units, margin, worse_if,
        tost_lo, tost_hi, max(p_low, p_high), p_noninf, df,
    )  # fmt: skip


def level_interval(
    point: float | None, variance: float, df: float, ci: float
) -> tuple[float | None, float | None]:
    """CI of a value in [0, 1] (AUC, a rate, a Brier score) on the logit scale, mapped back:
    ``expit(logit(est) -+ t(1 - alpha/2, df) sqrt(V) / (est (1 - est)))``. The logit scale
    keeps the interval inside (0, 1) and follows the skew of an AUC near 1 (a symmetric
    interval covered 0.87-0.91 at 10 positive patients). (None, None) when there is no
    estimate, no variance (every leave-one-out value equals the estimate: a degenerate
    threshold, perfect separation), an estimate at 0 or 1, or df < 1."""
    est = opt(point)
    if est is None or not (variance > 0.0) or not (0.0 < est < 1.0) or not (df >= 1.0):
        return None, None
    half = _t_ppf(1.0 - alpha_of(ci) / 2.0, df)
    half *= math.sqrt(variance) / (est * (1.0 - est))
    g = math.log(est / (1.0 - est))
    return float(special.expit(g - half)), float(special.expit(g + half))


#: A verdict needs at least this share of the drawn resamples to be valid: a CI from the few
#: resamples in which a rare label happened to have both classes is conditional on that luck
#: (a red team got "equivalent" from 3 valid resamples of 1000).
MIN_VALID_SHARE = 0.5


def verdict(inf: Inference, alpha: float, n_boot: int | None = None) -> str | None:
    """The row's verdict, first match wins. None when the estimate or margin is missing, the
    1 - alpha CI is null, or (given ``n_boot``) fewer than :data:`MIN_VALID_SHARE` of the
    drawn resamples are valid:

    1. "equivalent within ±m": TOST p <= alpha (the 1 - 2 alpha CI lies inside (-m, m));
    2. "different": two-sided p <= alpha (the 1 - alpha CI excludes 0);
    3. "non-inferior": the one-sided p of "DP worse by m or more" is <= alpha (the 1 - 2 alpha
       CI's bound on the worse side lies inside the margin); needs a direction;
    4. "inconclusive": none of these (the data cannot tell; never read as "no difference").
    """
    if inf.estimate is None or inf.margin is None or inf.p_tost is None or inf.lo is None:
        return None  # no value, no margin, or too few resamples for the 1 - alpha CI
    if n_boot and inf.n_valid < MIN_VALID_SHARE * n_boot:
        return None
    if inf.p_tost <= alpha:
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


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided Student t tail P(|T| >= |t|) (scipy)."""
    if math.isnan(t):
        return math.nan
    return float(min(1.0, 2.0 * stats.t.sf(abs(t), df)))


#: The one-sided level of the upper confidence bound on the between-seed variance that sets
#: the degrees of freedom of :func:`seed_variance` (chosen by ``benchmarks/sim_seed_pooling.py``
#: and an exact Gaussian calculation: nominal coverage or more for k = 2, 3, 5, 10 seeds at
#: ci = 0.90, 0.95 and 0.99, whatever the split between seed and test-set variance).
SEED_DF_BOUND = 0.05


@dataclass(frozen=True)
class SeedVariance:
    """The variance of a mean over k training seeds and its degrees of freedom.

    ``v_patients``: test-noise variance of the all-seed mean (V_b); ``v_within``: mean
    per-seed test-noise variance (v̄); ``shared``: mean covariance of two different seeds'
    test noise ``(k V_b - v̄) / (k - 1)`` (the noise every seed shares: one test set);
    ``s2``: sample variance of the k per-seed estimates (ddof 1); ``variance`` =
    ``max(shared, 0) + s2 / k``; ``df`` its degrees of freedom; ``n_valid`` the patient
    resamples (bootstrap) or patients (jackknife) used.
    """

    k: int
    n_valid: int
    v_patients: float
    v_within: float
    shared: float
    s2: float
    variance: float
    df: float


def _sample_var(rows: np.ndarray, jackknife: bool) -> np.ndarray:
    """Per-row test-noise variance: the jackknife's (P - 1)/P sum d^2 of leave-one-out values,
    or the bootstrap's sample variance of resampled values."""
    if not jackknife:
        return np.var(rows, axis=-1, ddof=1)
    d = rows - rows.mean(axis=-1, keepdims=True)
    n = rows.shape[-1]
    return (n - 1) / n * np.einsum("...i,...i->...", d, d)


def seed_variance(
    points: np.ndarray,
    samples: np.ndarray,
    *,
    jackknife: bool = False,
    df_test: float | None = None,
) -> SeedVariance:
    """Variance of ``mean(points)`` as an estimate of the mean over training randomness.

    Model: ``D_s = mu + a_s + e_s`` with a seed effect ``a_s`` (variance sigma_a^2) and
    test-set noise ``e_s`` that two seeds share in part (all seeds are scored on the same
    patients: ``cov(e_s, e_t) = gamma``, ``var(e_s) = v``). Then
    ``var(mean D) = gamma + (sigma_a^2 + v - gamma) / k``. The sample variance of the points
    estimates ``sigma_a^2 + v - gamma`` (shared noise cancels between seeds) and the test
    noise's (co)variances estimate gamma as the mean cross-seed covariance, so

        V = max(shared, 0) + s2 / k,   shared = (k V_b - v̄) / (k - 1)

    (identically ``V_b + [s2/k - (v̄ - V_b)/(k - 1)]``, NOT truncated at 0 -- truncating
    makes the interval conservative where test noise dominates, coverage ~0.99 at k = 3).
    With identical seeds (s2 = 0, same noise) ``V = V_b``.

    ``samples`` (k, m): each seed's leave-one-patient-out values (``jackknife=True``, m =
    patients, the same patients for every seed) or patient-bootstrap resamples (m = B, column
    b of every seed on resample b; columns with a NaN are dropped): the method before
    protocol 4, kept for the simulations.

    Degrees of freedom: Satterthwaite with the between-seed term at its one-sided
    ``1 - SEED_DF_BOUND`` upper confidence bound ``U = (s2/k) (k - 1) / chi2(SEED_DF_BOUND,
    k - 1)`` (plain s2 gives large df whenever seeds agree by chance: 0.87 coverage at k = 2).
    Jackknife: the shared term has ``df_test`` df (the rarer class's patients - 1), so
    ``df = (c + U)^2 / (c^2 / df_test + U^2 / (k - 1))`` in ``[min(k - 1, df_test),
    max(k - 1, df_test)]``: at k = 5, where shared test noise dominates, treating it as exact
    (the bootstrap version, ``df = (k - 1) ((c + U) / U)^2`` capped at B - 1) covered 0.89.
    Raises ValueError for k < 2, non-finite points, mismatched shapes or a jackknife without
    ``df_test``; with fewer than 2 valid columns every variance is NaN.
    """
    pts = np.asarray(points, dtype=np.float64).ravel()
    bt = np.asarray(samples, dtype=np.float64)
    k = pts.size
    if k < 2:
        raise ValueError(f"pooling seeds needs k >= 2 per-seed estimates, got {k}")
    if not np.all(np.isfinite(pts)):
        raise ValueError("per-seed point estimates must be finite (drop missing seeds first)")
    if bt.ndim != 2 or bt.shape[0] != k:
        raise ValueError(f"samples must have shape ({k}, m), got {bt.shape}")
    if jackknife and df_test is None:
        raise ValueError("a jackknife needs df_test (the test noise's degrees of freedom)")
    valid = bt[:, ~np.isnan(bt).any(axis=0)]
    n = int(valid.shape[1])
    s2 = float(np.var(pts, ddof=1))
    if n < 2:
        return SeedVariance(k, n, math.nan, math.nan, math.nan, s2, math.nan, math.nan)
    v_b = float(_sample_var(valid.mean(axis=0), jackknife))
    v_bar = float(_sample_var(valid, jackknife).mean())
    shared = (k * v_b - v_bar) / (k - 1)
    c = max(shared, 0.0)
    upper = s2 / k * (k - 1) / float(stats.chi2.ppf(SEED_DF_BOUND, k - 1))
    if jackknife:
        d_test = float(df_test)
        df = d_test if upper <= 0.0 else (c + upper) ** 2 / (c * c / d_test + upper**2 / (k - 1))
        df = max(min(k - 1.0, d_test), min(max(k - 1.0, d_test), df))
        if not d_test >= 1.0:
            df = math.nan  # the test noise has no interval of its own: neither has the mean
    else:
        df = float(n - 1) if upper <= 0.0 else (k - 1) * ((c + upper) / upper) ** 2
        df = max(float(k - 1), min(float(n - 1), df))
    return SeedVariance(k, n, v_b, v_bar, shared, s2, c + s2 / k, df)


def _agree(p: float, reject: bool, alpha: float) -> float:
    """Snap p to the decision its CI gives (only moves p at the exact boundary)."""
    if reject:
        return min(p, alpha)
    return max(p, float(np.nextafter(alpha, 1.0)))


def pool_seeds(
    points: np.ndarray,
    samples: np.ndarray,
    *,
    ci: float,
    margin: float | None = None,
    worse_if: str | None = None,
    jackknife: bool = False,
    df_test: float | None = None,
) -> Inference:
    """Mean over k >= 2 training seeds with a t interval from :func:`seed_variance`.

    ``estimate`` = ``mean(points)``; CI = ``est -+ t(1 - alpha/2, df) sqrt(V)``; p = two-sided t
    p of "mean = 0"; with ``margin``: the ``1 - 2 alpha`` CI, TOST p = max of the two one-sided
    t p-values at ``-+margin`` and the non-inferiority p on the ``worse_if`` side
    (:func:`infer_t`: CI and p agree by construction). ``n_valid`` = patients (jackknife) or
    resamples used; fewer than 2 gives a null CI and p. Shapes as in :func:`seed_variance`.
    """
    if worse_if not in (None, "higher", "lower"):
        raise ValueError('worse_if must be "higher", "lower" or None')
    sv = seed_variance(points, samples, jackknife=jackknife, df_test=df_test)
    est = float(np.mean(np.asarray(points, dtype=np.float64)))
    if sv.n_valid < 2:
        return Inference(est, None, None, None, sv.n_valid, margin, worse_if)
    return infer_t(est, sv.variance, sv.df, ci=ci, margin=margin, worse_if=worse_if,
                   n_units=sv.n_valid)  # fmt: skip


def pool_seeds_level(
    points: np.ndarray, samples: np.ndarray, *, ci: float, df_test: float
) -> Inference:
    """The mean over k seeds of a value in (0, 1) (an AUC, a Brier score) with its interval on
    the logit scale: :func:`pool_seeds` on the logits of the points and of their
    leave-one-patient-out values, the CI mapped back (a t interval on the AUC scale covered
    0.93 at k = 5 where the test noise the seeds share dominates, as a single AUC's does).
    ``estimate`` is the plain mean of the points; no p-value (a level is not tested). Values
    at 0 or 1 give no interval."""
    pts = np.asarray(points, dtype=np.float64).ravel()
    loo = np.asarray(samples, dtype=np.float64)
    est = float(pts.mean())
    inside = np.isfinite(pts).all() and ((pts > 0) & (pts < 1)).all()
    if not inside or not ((loo > 0) & (loo < 1) | np.isnan(loo)).all():
        return Inference(opt(est), None, None, None, 0)
    r = pool_seeds(special.logit(pts), special.logit(loo), ci=ci, jackknife=True,
                   df_test=df_test)  # fmt: skip
    if r.lo is None:
        return Inference(est, None, None, None, r.n_valid, df=r.df)
    lo, hi = float(special.expit(r.lo)), float(special.expit(r.hi))
    return Inference(est, lo, hi, None, r.n_valid, df=r.df)
