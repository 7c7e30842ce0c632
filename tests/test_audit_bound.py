"""The one-run bound's statistics on their own: randomised response (known epsilon) and a
Gaussian mechanism (known mu), brute-force checks of the theorem's formula, the grid and its
Bonferroni correction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privdom_ray import audit_bound as ab


def _rr_correct(rng: np.random.Generator, m: int, epsilon: float) -> int:
    """Correct guesses of epsilon-randomised response on m coins (each right w.p. e^eps/(1+e^eps))."""
    return int(rng.binomial(m, 1.0 / (1.0 + math.exp(-epsilon))))


@pytest.mark.parametrize("epsilon", [1.0, 3.0])
def test_randomised_response_bound_holds_in_95_percent(epsilon):
    rng = np.random.default_rng(19)
    m = 1000
    lows = np.array(
        [ab.epsilon_lower(m, m, _rr_correct(rng, m, epsilon), delta=1e-5) for _ in range(400)]
    )
    assert np.mean(lows <= epsilon) >= 0.95
    assert np.median(lows) > 0.6 * epsilon  # and it is not vacuous


@pytest.mark.parametrize("epsilon", [1.0, 4.0])
@pytest.mark.parametrize("m", [10_000, 100_000])
def test_randomised_response_bound_is_close_for_large_m(epsilon, m):
    v = _rr_correct(np.random.default_rng(m), m, epsilon)
    low = ab.epsilon_lower(m, m, v, delta=1e-5)
    assert 0.8 * epsilon <= low <= epsilon


def test_bound_is_monotone_in_correct_guesses_and_zero_at_chance():
    m = 1000
    lows = [ab.epsilon_lower(m, m, v, delta=1e-5) for v in range(0, m + 1, 10)]
    assert all(b >= a for a, b in zip(lows, lows[1:], strict=False))
    assert lows[-1] > lows[len(lows) // 2 + 10] > 0
    assert all(low == 0.0 for low in lows[: len(lows) // 2 + 1])  # v <= r / 2: no evidence


def test_p_value_matches_the_theorem_by_brute_force():
    """f(v) + 2 m delta max_{i=1..m} (f(v-i) - f(v)) / i with exact binomial sums."""
    m, r, v, eps, delta = 40, 30, 24, 0.7, 1e-3
    p = math.exp(eps) / (1 + math.exp(eps))

    def f(t: int) -> float:
        return sum(math.comb(r, j) * p**j * (1 - p) ** (r - j) for j in range(max(t, 0), r + 1))

    expected = f(v) + 2 * m * delta * max((f(v - i) - f(v)) / i for i in range(1, m + 1))
    assert ab.p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-9)
    assert ab.p_value(m, r, v, eps, 0.0) == pytest.approx(f(v), rel=1e-9)
    # the delta term only makes the test more conservative
    assert ab.epsilon_lower(m, r, v, delta=delta) < ab.epsilon_lower(m, r, v, delta=0.0)


def test_bound_is_the_largest_rejected_epsilon():
    m, r, v, beta = 500, 200, 170, 0.05
    low = ab.epsilon_lower(m, r, v, delta=1e-5, beta=beta)
    assert ab.p_value(m, r, v, low, 1e-5) < beta <= ab.p_value(m, r, v, low + 1e-4, 1e-5)


def test_fdp_epsilon_bound_holds_for_randomised_response():
    """The f-DP recursion with the (epsilon, delta) curve: valid, and as tight as the binomial."""
    rng = np.random.default_rng(23)
    m, epsilon = 1000, 1.0
    vs = [_rr_correct(rng, m, epsilon) for _ in range(200)]
    lows = np.array([ab.epsilon_lower_fdp(m, m, v, delta=1e-5) for v in vs])
    assert np.mean(lows <= epsilon) >= 0.95
    steinke = np.array([ab.epsilon_lower(m, m, v, delta=1e-5) for v in vs])
    assert np.all(np.abs(lows - steinke) < 0.02)


def test_fdp_epsilon_bound_handles_delta_better_at_large_m():
    """All guesses right: the 2 m delta term caps the binomial bound; the f-DP one is not."""
    m, level = 16_000, 0.05 / 7
    pure = ab.epsilon_lower(m, m, m, delta=0.0, beta=level)
    steinke = ab.epsilon_lower(m, m, m, delta=1e-5, beta=level)
    fdp = ab.epsilon_lower_fdp(m, m, m, delta=1e-5, beta=level)
    assert steinke < pure - 1.5 and fdp == pytest.approx(pure, abs=0.01)
    assert ab.epsilon_lower_fdp(m, m, m, delta=0.0, beta=level) == pytest.approx(pure, abs=1e-3)


def test_gaussian_mechanism_mu_bound_holds_and_is_informative():
    """Scores mu * coin + N(0, 1) are exactly mu-GDP in each coin."""
    rng = np.random.default_rng(7)
    mu, m = 1.0, 500
    lows = []
    for _ in range(200):
        coins = rng.random(m) < 0.5
        c = ab.count_correct(mu * coins + rng.standard_normal(m), coins, 50, 50)
        lows.append(ab.mu_lower(m, c.guesses, c.correct))
    assert np.mean(np.array(lows) <= mu) >= 0.95
    coins = rng.random(10_000) < 0.5
    result = ab.audit(2.0 * coins + rng.standard_normal(10_000), coins, delta=1e-5)
    assert 1.2 <= result.mu_lower <= 2.0
    assert result.epsilon_lower_gdp == pytest.approx(ab.gdp_epsilon(result.mu_lower, 1e-5))
    assert result.epsilon_lower < result.epsilon_lower_gdp < ab.gdp_epsilon(2.0, 1e-5)


def test_gdp_epsilon_inverts_the_gdp_curve():
    for mu in (0.3, 1.0, 3.0):
        eps = ab.gdp_epsilon(mu, 1e-5)
        assert ab.gdp_delta(mu, eps) == pytest.approx(1e-5, rel=1e-6)
    assert ab.gdp_epsilon(1.0, 1e-5) == pytest.approx(4.38, abs=0.01)  # Dong, Roth & Su's curve
    assert ab.gdp_epsilon(0.0, 1e-5) == 0.0


def test_count_correct_top_and_bottom_with_index_tie_break():
    scores = np.array([5.0, 1.0, 3.0, 3.0, -2.0, 0.0])
    coins = np.array([True, False, True, False, False, True])
    # top 2: indices 0, 2 (3.0 tie -> lower index first), both in; bottom 2: 5 (in), 4 (out)
    assert ab.count_correct(scores, coins, 2, 2) == ab.GuessCount(2, 2, 3)
    assert ab.count_correct(scores, coins, 0, 0).correct == 0
    with pytest.raises(ValueError):
        ab.count_correct(scores, coins, 4, 3)
    with pytest.raises(ValueError):
        ab.count_correct(np.array([np.nan]), np.array([True]), 1, 0)


def test_audit_takes_the_best_rule_at_the_bonferroni_level():
    rng = np.random.default_rng(3)
    m = 1000
    coins = rng.random(m) < 0.5
    scores = 1.5 * coins + rng.standard_normal(m)
    result = ab.audit(scores, coins, delta=1e-5, fdp=False)
    grid = ab.guess_grid(m)
    assert result.grid_size == len(grid) == len(ab.GUESS_FRACTIONS)
    assert (result.k_plus, result.k_minus) in grid and result.guesses == 2 * result.k_plus
    level = result.beta / result.grid_size
    per_rule = [
        ab.epsilon_lower(m, c.guesses, c.correct, delta=1e-5, beta=level)
        for c in (ab.count_correct(scores, coins, kp, km) for kp, km in grid)
    ]
    assert result.epsilon_lower == max(per_rule) > 0
    # the correction costs something: the same rule alone at beta would claim more
    assert result.epsilon_lower < ab.epsilon_lower(m, result.guesses, result.correct, delta=1e-5)
    assert result.mu_lower is None and result.epsilon_lower_gdp is None


def test_audit_of_scores_independent_of_the_coins_is_zero():
    """Chance: scores that carry no information about the coins give no evidence."""
    rng = np.random.default_rng(11)
    lows = []
    for _ in range(100):
        coins = rng.random(512) < 0.5
        lows.append(ab.audit(rng.standard_normal(512), coins, delta=1e-5, fdp=False).epsilon_lower)
    assert np.mean(np.array(lows) == 0.0) >= 0.95


def test_perfect_separation_is_capped_by_the_number_of_canaries():
    """All m guesses right: the pure-DP bound solves p^m = beta / |grid|; delta lowers it."""
    for m in (256, 1000):
        coins = np.arange(m) % 2 == 0
        pure = ab.audit(coins.astype(float), coins, delta=0.0)
        assert pure.correct == pure.guesses == m
        p = (pure.beta / pure.grid_size) ** (1 / m)
        assert pure.epsilon_lower == pytest.approx(math.log(p / (1 - p)), abs=1e-5)
        approx = ab.audit(coins.astype(float), coins, delta=1e-5)
        assert pure.epsilon_lower - 0.15 < approx.epsilon_lower < pure.epsilon_lower
        assert approx.epsilon_lower_gdp > approx.epsilon_lower
