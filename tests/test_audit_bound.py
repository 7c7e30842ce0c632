"""The one-run bound's statistics on their own: randomised response (known epsilon) and a
Gaussian mechanism (known mu), brute-force checks of the theorem's formula, the grid and its
Bonferroni correction, the canaries a twin needs, and the power simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from privdom_ray import audit_bound as ab
from privdom_ray.audit_bound import guesses, power


def _rr_correct(rng: np.random.Generator, m: int, epsilon: float) -> int:
    """Correct guesses of epsilon-randomised response on m coins (each right w.p. e^eps/(1+e^eps))."""
    return int(rng.binomial(m, 1.0 / (1.0 + math.exp(-epsilon))))


@pytest.mark.parametrize("epsilon", [1.0, 3.0])
def test_randomised_response_bound_holds_in_95_percent(epsilon):
    rng = np.random.default_rng(19)
    m = 1000
    lows = np.array(
        [
            ab.epsilon_lower_binomial(m, m, _rr_correct(rng, m, epsilon), delta=1e-5)
            for _ in range(400)
        ]
    )
    assert np.mean(lows <= epsilon) >= 0.95
    assert np.median(lows) > 0.6 * epsilon  # and it is not vacuous


@pytest.mark.parametrize("epsilon", [1.0, 4.0])
@pytest.mark.parametrize("m", [10_000, 100_000])
def test_randomised_response_bound_is_close_for_large_m(epsilon, m):
    v = _rr_correct(np.random.default_rng(m), m, epsilon)
    low = ab.epsilon_lower_binomial(m, m, v, delta=1e-5)
    assert 0.8 * epsilon <= low <= epsilon


def test_bound_is_monotone_in_correct_guesses_and_zero_at_chance():
    m = 1000
    lows = [ab.epsilon_lower_binomial(m, m, v, delta=1e-5) for v in range(0, m + 1, 10)]
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
    assert ab.epsilon_lower_binomial(m, r, v, delta=delta) < ab.epsilon_lower_binomial(
        m, r, v, delta=0.0
    )


def test_bound_is_the_largest_rejected_epsilon():
    m, r, v, beta = 500, 200, 170, 0.05
    low = ab.epsilon_lower_binomial(m, r, v, delta=1e-5, beta=beta)
    assert ab.p_value(m, r, v, low, 1e-5) < beta <= ab.p_value(m, r, v, low + 1e-4, 1e-5)


def test_fdp_epsilon_bound_holds_for_randomised_response():
    """The f-DP recursion with the (epsilon, delta) curve: valid, and as tight as the binomial."""
    rng = np.random.default_rng(23)
    m, epsilon = 1000, 1.0
    vs = [_rr_correct(rng, m, epsilon) for _ in range(200)]
    lows = np.array([ab.epsilon_lower_fdp(m, m, v, delta=1e-5) for v in vs])
    assert np.mean(lows <= epsilon) >= 0.95
    steinke = np.array([ab.epsilon_lower_binomial(m, m, v, delta=1e-5) for v in vs])
    assert np.all(np.abs(lows - steinke) < 0.02)


def test_fdp_epsilon_bound_handles_delta_better_at_large_m():
    """All guesses right: the 2 m delta term caps the binomial bound; the f-DP one is not."""
    m, level = 16_000, 0.05 / 7
    pure = ab.epsilon_lower_binomial(m, m, m, delta=0.0, beta=level)
    steinke = ab.epsilon_lower_binomial(m, m, m, delta=1e-5, beta=level)
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
    result = ab.audit(scores, coins, delta=1e-5, diagnostics=False)
    grid = ab.guess_grid(m)
    assert result.grid_size == len(grid) == len(ab.GUESS_FRACTIONS) + len(ab.TOP_FRACTIONS)
    assert (result.k_plus, result.k_minus) in grid
    level = result.beta / result.grid_size
    per_rule = [
        ab.epsilon_lower_fdp(m, c.guesses, c.correct, delta=1e-5, beta=level)
        for c in (ab.count_correct(scores, coins, kp, km) for kp, km in grid)
    ]
    assert result.epsilon_lower == max(per_rule) > 0
    # the correction costs something: the same rule alone at beta would claim more
    alone = ab.epsilon_lower_fdp(m, result.guesses, result.correct, delta=1e-5, beta=result.beta)
    assert result.epsilon_lower < alone
    assert result.mu_lower is None and result.epsilon_lower_binomial is None


def test_audit_of_scores_independent_of_the_coins_is_zero():
    """Chance: scores that carry no information about the coins give no evidence."""
    rng = np.random.default_rng(11)
    lows = []
    for _ in range(100):
        coins = rng.random(512) < 0.5
        lows.append(
            ab.audit(rng.standard_normal(512), coins, delta=1e-5, diagnostics=False).epsilon_lower
        )
    assert np.mean(np.array(lows) == 0.0) >= 0.95


def test_perfect_separation_is_capped_by_the_number_of_canaries():
    """All m guesses right: the pure-DP bound solves p^m = beta / |grid|; delta lowers it a
    little for the f-DP bound and more for the binomial one."""
    for m in (256, 1000):
        coins = np.arange(m) % 2 == 0
        pure = ab.audit(coins.astype(float), coins, delta=0.0)
        assert pure.correct == pure.guesses == m
        p = (pure.beta / pure.grid_size) ** (1 / m)
        assert pure.epsilon_lower == pytest.approx(math.log(p / (1 - p)), abs=2e-3)
        approx = ab.audit(coins.astype(float), coins, delta=1e-5)
        assert pure.epsilon_lower - 0.15 < approx.epsilon_lower <= pure.epsilon_lower
        assert approx.epsilon_lower_binomial < approx.epsilon_lower
        assert ab.max_lower(m, 1e-5) == approx.epsilon_lower  # nothing can show more


# ------------------------------------------------------------------------------ the twins' m


def test_one_sided_rules_guess_in_only():
    grid = ab.guess_grid(1000)
    assert grid[: len(ab.GUESS_FRACTIONS)] == tuple(
        (round(f * 1000), round(f * 1000)) for f in ab.GUESS_FRACTIONS
    )
    assert grid[len(ab.GUESS_FRACTIONS) :] == ((10, 0), (100, 0), (300, 0), (450, 0))
    assert len(ab.guess_grid(3)) == len(set(ab.guess_grid(3)))  # duplicates removed


def test_a_nearly_noiseless_run_is_capped_by_its_never_sampled_canaries_unless_one_sided():
    """Included canaries that were never Poisson-sampled score like excluded ones: the
    symmetric rules' "out" guesses always hold a few errors, which cap them below epsilon 8
    at 2^17 canaries; the one-sided rules do not see them."""
    rng = np.random.default_rng(5)
    m = 2**17
    coins = rng.random(m) < 0.5
    times = np.where(coins, rng.binomial(48, 1 / 8, m), 0)  # the demo's q and steps
    scores = times + 1e-3 * rng.standard_normal(m)
    symmetric = ab.audit(scores, coins, delta=1e-5, grid=ab.guess_grid(m, top=()),
                         diagnostics=False)  # fmt: skip
    both = ab.audit(scores, coins, delta=1e-5, diagnostics=False)
    assert symmetric.epsilon_lower < 7.5 < 8.5 < both.epsilon_lower and both.k_minus == 0


def test_canaries_for_an_epsilon_let_the_bound_exceed_it():
    assert ab.canaries_for(math.inf, 1e-5) == ab.canaries_for(1.0, 1e-5) == ab.MIN_CANARIES
    previous = 0
    for eps in (1.0, 4.0, 8.0, 9.5, 11.0):
        m = ab.canaries_for(eps, 1e-5)
        assert m >= previous and ab.max_lower(m, 1e-5, tests=2) >= eps + 1.0
        previous = m
    assert ab.canaries_for(30.0, 1e-5) == ab.MAX_CANARIES  # as many as allowed, and it says so
    assert ab.max_lower(ab.MAX_CANARIES, 1e-5, tests=2) < 30.0
    # m = 1000 (the old default) caps the bound near 5: an epsilon-8 cell cannot be refuted
    assert 4.5 < ab.max_lower(1000, 1e-5, tests=2) < 5.5


def test_critical_count_is_the_fewest_correct_that_refute():
    m, r, eps, delta, level = 20_000, 2000, 1.0, 1e-5, 0.05 / 22
    v = ab.critical_correct(m, r, eps, delta, level)
    assert v is not None and r / 2 < v < r
    rejects = ab.approx_dp_inverse(eps, delta)
    assert ab.fdp_rejects(rejects, m, r, v, beta=level)
    assert not ab.fdp_rejects(rejects, m, r, v - 1, beta=level)
    assert ab.epsilon_lower_fdp(m, r, v, delta=delta, beta=level) >= eps - 1e-3
    assert ab.critical_correct(1000, 10, 8.0, delta, level) is None  # 10 guesses cannot


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_randomised_response_coverage_at_the_twins_m(epsilon):
    """The deciding bound at a twin's m and levels (2^17 canaries, 11 rules, 2 attacks): for
    epsilon-randomised response each rule's v is Binomial(r, p), so the chance that ANY rule
    refutes the true epsilon is at most the sum of the exact binomial tails, which must stay
    within the attack's beta / 2; and the bound is not vacuous (all guesses: near epsilon)."""
    m, delta = ab.MIN_CANARIES, 1e-5
    grid = ab.guess_grid(m)
    level = ab.DEFAULT_BETA / (2 * len(grid))
    p = 1 / (1 + math.exp(-epsilon))
    false_alarm = 0.0
    for kp, km in grid:
        v = ab.critical_correct(m, kp + km, epsilon, delta, level)
        if v is not None:
            false_alarm += float(stats.binom.sf(v - 1, kp + km, p))
    assert false_alarm <= ab.DEFAULT_BETA / 2
    typical = int(stats.binom.median(m, p))
    low = ab.epsilon_lower_fdp(m, m, typical, delta=delta, beta=level)
    assert 0.9 * epsilon < low <= epsilon


# ------------------------------------------------------------------------------ attacks, power


def test_attacks_share_beta_and_the_largest_bound_decides():
    rng = np.random.default_rng(8)
    m = 4000
    coins = rng.random(m) < 0.5
    weak, strong = 0.3 * coins + rng.standard_normal(m), 3.0 * coins + rng.standard_normal(m)
    both = ab.run_audit({"standard": weak, "replay": strong}, coins, delta=1e-5)
    alone = ab.run_audit({"replay": strong}, coins, delta=1e-5)
    assert both.attack == "replay" and both.attacks["replay"].beta == ab.DEFAULT_BETA / 2
    assert both.epsilon_lower == both.attacks["replay"].epsilon_lower
    assert both.epsilon_lower <= alone.epsilon_lower  # two attacks pay for the second
    assert both.epsilon_max == ab.max_lower(m, 1e-5, tests=2)
    record = both.as_dict()
    assert record["version"] == 2 and record["attack"] == "replay" and record["m"] == m
    assert ab.recompute(record) == (both.epsilon_lower, both.epsilon_max)
    # a version-1 record (Steinke et al.'s bound, 7 symmetric rules) recomputes as such
    old = {"m": 1000, "guesses": 400, "correct": 300, "delta": 1e-5, "grid_size": 7,
           "beta": 0.05, "epsilon_lower": 0.0, "kind": "gradient"}  # fmt: skip
    low, top = ab.recompute(old)
    assert low == ab.epsilon_lower_binomial(1000, 400, 300, delta=1e-5, beta=0.05 / 7)
    assert 4.0 < top < 5.5


def test_noise_only_moments_match_a_monte_carlo():
    rng = np.random.default_rng(0)
    for scale, q, sigma in ((0.5, 0.125, 3.6), (1.0, 0.125, 0.9), (0.2, 0.01, 1.5)):
        values = ab.step_llr(scale * rng.standard_normal(500_000), q, 1 / sigma)
        mean, var = power._noise_only_moments(scale, q, sigma)
        assert mean == pytest.approx(values.mean(), abs=1e-3 + 2e-3 * abs(values.mean()))
        assert var == pytest.approx(values.var(), rel=0.02)


def test_power_of_the_demos_epsilon_1_shapes_and_none_where_the_bound_cannot_reach():
    """The demo's q = 1/8 and 48 steps with 8192 canaries: at epsilon 1's sigma the audit
    catches noise reduced to about half and never the full noise; at epsilon 8's sigma these
    canaries cannot show 8 at all, so nothing is caught, not even a build without noise."""
    common = dict(m=8192, sample_rate=0.125, steps=48, delta=1e-5)
    one = ab.audit_power(ab.PowerSetting(noise_multiplier=3.625, epsilon=0.997, **common), runs=10)
    assert one.noise_scale is not None and 0.3 < one.noise_scale < 0.7
    assert one.exceeds == 0.0 and len(one.critical) == 10 and one.setting.m == 8192
    assert ab.max_lower(8192, 1e-5, tests=2) < 7.99
    eight = ab.audit_power(ab.PowerSetting(noise_multiplier=0.893, epsilon=7.99, **common), runs=4)
    assert eight.noise_scale is None and set(eight.critical) == {-1.0}


@pytest.mark.slow
def test_power_simulation_agrees_with_a_per_step_simulation():
    """The power simulation draws the steps a canary was not sampled in by their normal limit;
    a simulation of every step gives the same detection rates on either side of the
    simulated 80% point (the demo's epsilon-1 shapes, 8192 canaries)."""
    setting = ab.PowerSetting(m=8192, sample_rate=0.125, steps=48, noise_multiplier=3.625,
                              epsilon=0.997, delta=1e-5)  # fmt: skip
    power = ab.audit_power(setting, runs=20)
    s80 = power.noise_scale
    grid = ab.guess_grid(setting.m)
    level = setting.beta / (2 * len(grid))
    crit = [ab.critical_correct(setting.m, kp + km, 0.997, 1e-5, level) for kp, km in grid]
    rng = np.random.default_rng(1)

    def caught(scale: float) -> bool:
        coins = rng.random(setting.m) < 0.5
        llr = np.zeros(setting.m)
        for _ in range(setting.steps):
            z = (coins & (rng.random(setting.m) < 0.125)) / 3.625
            llr += ab.step_llr(z + scale * rng.standard_normal(setting.m), 0.125, 1 / 3.625)
        ranked = coins[np.argsort(-llr, kind="stable")]
        counts = [guesses._count_sorted(ranked, kp, km).correct for kp, km in grid]
        return any(c is not None and v >= c for v, c in zip(counts, crit, strict=True))

    below = np.mean([caught(0.8 * s80) for _ in range(20)])
    above = np.mean([caught(min(1.0, 1.25 * s80)) for _ in range(20)])
    assert below >= 0.8 and above <= 0.5


# ------------------------------------------------------------------------------ noise check


def test_noise_check_holds_its_level_whatever_the_gradients():
    """Stated noise, gradients that react to the past noise (the worst case the martingale
    bound covers): "too little" at most alpha of the time; the replay z of an independent
    replay is standard normal."""
    rng = np.random.default_rng(4)
    alpha, coords, steps = 0.05, 200, 40
    flags, zs = [], []
    for _ in range(400):
        noise = rng.standard_normal((steps, coords))
        grads = np.zeros((steps, coords))
        grads[1:] = -0.8 * noise[:-1]  # pulls the next released value back: sum z^2 down
        z = grads + noise
        replay = rng.standard_normal((steps, coords))
        check = ab.noise_check((z**2).sum(0), (z * replay).sum(0), steps=steps, alpha=alpha)
        flags.append(check.too_little or check.follows_seed)
        zs.append(check.replay_z)
    assert np.mean(flags) <= alpha + 0.02
    assert abs(np.mean(zs)) < 0.15 and 0.85 < np.std(zs) < 1.15


def test_noise_check_catches_too_little_noise_and_the_seeds_noise():
    rng = np.random.default_rng(5)
    coords, steps = 2000, 48
    noise = rng.standard_normal((steps, coords))
    half = ab.noise_check(((0.5 * noise) ** 2).sum(0), None, steps=steps)
    assert half.too_little and half.ratio == pytest.approx(0.5, rel=0.01)
    assert half.replay_z is None and not half.follows_seed
    seeds = ab.noise_check((noise**2).sum(0), (noise * noise).sum(0), steps=steps)
    assert seeds.follows_seed and not seeds.too_little and seeds.replay_z > 100
    # detects_scale: a build at that noise factor is flagged about 80% of the time
    check = ab.noise_check(np.full(coords, float(steps)), None, steps=steps)
    s = check.detects_scale()
    assert 0.95 < s < 1.0
    flagged = [
        ab.noise_check(
            ((s * rng.standard_normal((steps, coords))) ** 2).sum(0), None, steps=steps
        ).too_little  # fmt: skip
        for _ in range(200)
    ]
    assert 0.7 < np.mean(flagged) < 0.9
    record = seeds.as_dict()
    assert record["follows_seed"] and record["units"] == coords * steps
