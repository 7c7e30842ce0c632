"""Private selection: the Papernot-Steinke bound against independent recomputations, the
distribution of K and its secrecy, calibration, and the sensitivity of each validation release
on neighbouring datasets. Real Opacus and dp-accounting, numpy data, no Ray, no torch model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from dp_accounting import (
    GaussianDpEvent,
    PoissonSampledDpEvent,
    SelfComposedDpEvent,
)
from dp_accounting.dp_event import RepeatAndSelectDpEvent
from dp_accounting.rdp import RdpAccountant
from scipy import integrate
from scipy.special import logsumexp

from privdom_ray.selection import rdp, runs, tuning, validation
from privdom_ray.stats import thresholds

INTEGER_ORDERS = tuple(range(2, 65)) + (80, 96, 128, 192, 256, 512)
DELTA = 1e-5

# ---------------------------------------------------------------- independent computations
# Written from the papers, sharing no code with privdom_ray.selection.


def sgm_rdp_by_hand(q: float, sigma: float, steps: int, order: int) -> float:
    """Poisson-subsampled Gaussian at an integer order (Mironov, Talwar, Zhang 2019, Eq. for
    integer alpha): log sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k)/(2 sigma^2)) / (a-1)."""
    k = np.arange(order + 1)
    log_binom = math.lgamma(order + 1) - np.array(
        [math.lgamma(i + 1) + math.lgamma(order - i + 1) for i in k]
    )
    with np.errstate(divide="ignore"):
        terms = log_binom + (order - k) * math.log1p(-q) + k * math.log(q)
    terms = terms + (k * k - k) / (2 * sigma**2)
    return steps * float(logsumexp(terms)) / (order - 1)


def tnb_mean_by_sum(eta: float, gamma: float, k_max: int = 200_000) -> float:
    """E[K] by summing the pmf of Definition 1 (recurrence on the product), not the formula."""
    p = np.empty(k_max)
    p[0] = (1 - gamma) * (eta if eta > 0 else 1.0)  # k = 1 term before normalisation
    for k in range(1, k_max):
        p[k] = p[k - 1] * (1 - gamma) * ((k + eta) / (k + 1) if eta > 0 else k / (k + 1))
    p /= p.sum()
    return float((np.arange(1, k_max + 1) * p).sum())


def epsilon_by_hand(orders, curve, delta) -> float:
    """Balle et al. 2020, Theorem 21."""
    return min(
        r + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
        for a, r in zip(orders, curve, strict=True)
    )


def selection_by_hand(orders, curve, dist) -> list[float]:
    """Theorem 2 (truncated negative binomial) or Theorem 6 (Poisson), then monotonicity."""
    out = []
    if not isinstance(dist, runs.PoissonRuns):
        log_mean = math.log(tnb_mean_by_sum(dist.eta, dist.gamma))
    for lam, eps in zip(orders, curve, strict=True):
        if isinstance(dist, runs.PoissonRuns):
            eps_hat = math.log(1 + 1 / (lam - 1))
            log_d = min(
                (a - 1) * (r - eps_hat + math.log(1 - 1 / a)) - math.log(a)
                for a, r in zip(orders, curve, strict=True)
            )
            out.append(eps + dist.mu * min(1.0, math.exp(log_d)) + math.log(dist.mu) / (lam - 1))
        else:
            eta, gamma = dist.eta, dist.gamma
            best = min(
                (1 + eta) * (1 - 1 / lh) * eh + (1 + eta) * math.log(1 / gamma) / lh
                for lh, eh in zip(orders, curve, strict=True)
            )
            out.append(eps + best + log_mean / (lam - 1))
    return [min(v for a, v in zip(orders, out, strict=True) if a >= lam) for lam in orders]


def dp_accounting_epsilon(q, sigma, steps, dist, delta) -> float:
    """Google's dp-accounting: its own subsampled-Gaussian RDP and its RepeatAndSelect."""
    run = SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)
    shape = math.inf if isinstance(dist, runs.PoissonRuns) else dist.eta
    acc = RdpAccountant(orders=list(INTEGER_ORDERS))
    acc.compose(RepeatAndSelectDpEvent(run, dist.mean(), shape))
    return acc.get_epsilon(delta)


# --------------------------------------------------------------------------- the RDP curve


@pytest.mark.parametrize(("q", "sigma", "steps"), [(0.125, 2.4, 48), (1 / 1003, 0.9, 80240)])
def test_dpsgd_curve_matches_the_closed_form_at_integer_orders(q, sigma, steps):
    curve = rdp.dpsgd_rdp(sigma, q, steps, INTEGER_ORDERS)
    by_hand = [sgm_rdp_by_hand(q, sigma, steps, a) for a in INTEGER_ORDERS]
    np.testing.assert_allclose(curve, by_hand, rtol=1e-9)


def test_fractional_orders_match_direct_integration():
    """Opacus's series for fractional orders against the defining integral
    A_a = E_{z~N(0,s^2)}[(1 - q + q exp((2z - 1)/(2 s^2)))^a]."""
    for q, s, a in [(0.125, 1.2, 1.5), (0.125, 3.0, 2.7), (0.01, 0.8, 1.3), (0.5, 2.0, 4.4)]:

        def f(z, q=q, s=s, a=a):
            log = a * math.log1p(q * math.expm1((2 * z - 1) / (2 * s * s))) - z * z / (2 * s * s)
            return math.exp(log) / (s * math.sqrt(2 * math.pi))

        val, _ = integrate.quad(f, -14 * s, 14 * s + a + 2, limit=400, epsrel=1e-11)
        expected = math.log(val) / (a - 1)
        assert rdp.dpsgd_rdp(s, q, 1, [a])[0] == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------- the selection bound

BOUND_CASES = [
    (runs.TruncatedNegativeBinomial.from_mean(0.0, 10), 2.4, 0.125, 48),
    (runs.TruncatedNegativeBinomial.from_mean(1.0, 10), 1.2, 0.125, 48),
    (runs.TruncatedNegativeBinomial.from_mean(0.5, 5), 6.0, 0.125, 48),
    (runs.TruncatedNegativeBinomial.from_mean(2.0, 20), 1.0, 1 / 106, 8480),
    (runs.PoissonRuns(10.0), 3.0, 0.125, 48),
    (runs.PoissonRuns(4.0), 1.1, 1 / 1003, 80240),
]


@pytest.mark.parametrize(("dist", "sigma", "q", "steps"), BOUND_CASES)
def test_selection_epsilon_is_never_below_independent_recomputations(dist, sigma, q, steps):
    cand = [tuning.CandidateNoise(q, steps, sigma)]
    plan = tuning.plan(
        epsilon_target=100.0,
        delta=DELTA,
        runs=dist,
        candidates=cand,
        validation=tuning.ValidationNoise(),
        orders=INTEGER_ORDERS,
    )
    curve = [sgm_rdp_by_hand(q, sigma, steps, a) for a in INTEGER_ORDERS]
    by_hand = epsilon_by_hand(INTEGER_ORDERS, selection_by_hand(INTEGER_ORDERS, curve, dist), DELTA)
    google = dp_accounting_epsilon(q, sigma, steps, dist, DELTA)
    assert plan.epsilon_total >= by_hand * (1 - 1e-9)
    assert plan.epsilon_total >= google * (1 - 1e-6)
    # the same theorem on the same orders: not needlessly loose either
    assert plan.epsilon_total <= by_hand * (1 + 1e-6)
    # and tuning costs more than one run, less than K runs composed
    assert plan.epsilon_run < plan.epsilon_total
    k_runs = rdp.rdp_to_epsilon(dist.mean() * np.array(curve), DELTA, INTEGER_ORDERS)[0]
    assert plan.epsilon_total < k_runs


def test_default_orders_give_a_bound_at_most_the_integer_one():
    """The default grid adds orders, so it can only tighten a valid bound, never loosen it."""
    dist = runs.DEFAULT_RUNS
    cand = [tuning.CandidateNoise(0.125, 48, 2.4)]
    kw = dict(epsilon_target=9.0, delta=DELTA, runs=dist, candidates=cand)
    coarse = tuning.plan(**kw, validation=tuning.ValidationNoise(), orders=INTEGER_ORDERS)
    fine = tuning.plan(**kw, validation=tuning.ValidationNoise())
    assert fine.epsilon_total <= coarse.epsilon_total
    assert fine.epsilon_total > 0.9 * coarse.epsilon_total


# ------------------------------------------------------------------------ the distribution of K


@pytest.mark.parametrize(("eta", "mean"), [(0.0, 10.0), (1.0, 10.0), (0.5, 3.0), (3.0, 25.0)])
def test_truncated_negative_binomial_mean_pmf_and_inversion(eta, mean):
    dist = runs.TruncatedNegativeBinomial.from_mean(eta, mean)
    assert dist.mean() == pytest.approx(mean, rel=1e-9)
    assert tnb_mean_by_sum(eta, dist.gamma) == pytest.approx(mean, rel=1e-6)
    k = np.arange(0, 20_000)
    p = dist.pmf(k)
    assert p[0] == 0.0
    assert p.sum() == pytest.approx(1.0, abs=1e-9)
    assert (k * p).sum() == pytest.approx(mean, rel=1e-6)
    if eta == 1.0:
        assert dist.gamma == pytest.approx(1 / mean)
        np.testing.assert_allclose(p[1:6], dist.gamma * (1 - dist.gamma) ** np.arange(5))


@pytest.mark.parametrize(
    "dist",
    [
        runs.TruncatedNegativeBinomial.from_mean(0.0, 10),
        runs.TruncatedNegativeBinomial.from_mean(1.0, 10),
        runs.TruncatedNegativeBinomial.from_mean(2.5, 6),
        runs.PoissonRuns(10.0),
    ],
)
def test_draws_follow_the_distribution_the_bound_is_about(dist):
    rng = np.random.default_rng(12345)  # injected: tests only
    draws = np.array([dist.draw(rng) for _ in range(20_000)])
    assert draws.mean() == pytest.approx(dist.mean(), rel=0.05)
    for k in (0, 1, 2, 5):
        expected = float(dist.pmf(np.array([k]))[0])
        assert np.mean(draws == k) == pytest.approx(
            expected, abs=4 * math.sqrt(expected / 20_000) + 1e-4
        )


def test_k_is_drawn_from_os_entropy_not_a_seed():
    """Each draw without an injected generator is seeded afresh from OS entropy: a public seed
    would make every draw (and every run of the same cell) the same."""
    dist = runs.DEFAULT_RUNS
    first = [dist.draw() for _ in range(32)]
    second = [dist.draw() for _ in range(32)]
    assert len(set(first)) > 1
    assert first != second


def test_run_distribution_registry_and_default():
    assert runs.run_distribution(None) is runs.DEFAULT_RUNS
    assert runs.DEFAULT_RUNS.mean() == pytest.approx(10.0)
    geo = runs.run_distribution({"distribution": "geometric", "mean": 4})
    assert (geo.eta, geo.gamma) == (1.0, 0.25)
    log = runs.run_distribution({"distribution": "logarithmic", "mean": 10})
    assert log == runs.DEFAULT_RUNS
    assert runs.run_distribution({"distribution": "poisson", "mean": 7}).mean() == 7
    assert runs.run_distribution(geo.as_dict()) == geo  # a ledger's dict rebuilds it
    with pytest.raises(ValueError, match="unknown distribution"):
        runs.run_distribution({"distribution": "uniform"})
    # a mean below one run would put log(mu) < 0 into the bound: refused, naming the key
    with pytest.raises(ValueError, match=r"tuning\.runs\.mu must be .* >= 1"):
        runs.run_distribution({"distribution": "poisson", "mean": 0.5})
    assert runs.quantile(geo, 0.5) == 3  # P[K <= 2] = 0.4375, P[K <= 3] = 0.578
    assert tuning.expected_trainings(geo) == 4.0
    assert tuning.expected_trainings(None) == 1.0


# ---------------------------------------------------------------------------- calibration

DEMO = tuning.RunShape(sample_rate=0.125, steps=48)  # N = 470, logical batch 64, 6 epochs


@pytest.mark.parametrize(
    ("target", "dist"),
    [(1.0, runs.DEFAULT_RUNS), (8.0, runs.PoissonRuns(10.0))],
)
def test_calibration_spends_at_most_the_target_and_close_to_it(target, dist):
    """On integer orders, where dp-accounting's own curve is exact, so it can check the plan."""
    plan = tuning.calibrate(
        epsilon=target, delta=DELTA, shapes=[DEMO], runs=dist, orders=INTEGER_ORDERS
    )
    assert target * (1 - 0.005) <= plan.epsilon_total <= target
    (cand,) = plan.candidates
    independent = dp_accounting_epsilon(
        cand.sample_rate, cand.noise_multiplier, cand.steps, dist, DELTA
    )
    assert independent <= target
    # a little less noise would overspend
    lower = tuning.plan(
        epsilon_target=target,
        delta=DELTA,
        runs=dist,
        candidates=[tuning.CandidateNoise(0.125, 48, cand.noise_multiplier * 0.98)],
        validation=plan.validation,
        orders=INTEGER_ORDERS,
    )
    assert lower.epsilon_total > target


def test_calibration_covers_every_shape_the_space_can_draw():
    """Two run shapes (e.g. 4 and 8 epochs): the bound uses their worst case at each order."""
    shapes = [tuning.RunShape(0.125, 32), tuning.RunShape(0.125, 64)]
    plan = tuning.calibrate(epsilon=3.0, delta=DELTA, shapes=shapes)
    assert 3.0 * (1 - 0.005) <= plan.epsilon_total <= 3.0
    short, long = (c.noise_multiplier for c in plan.candidates)
    assert long > short  # more steps need more noise for the same curve
    # the longer shape alone with its sigma must fit too (it is one of the runs)
    alone = tuning.plan(
        epsilon_target=3.0,
        delta=DELTA,
        runs=plan.runs,
        candidates=[plan.candidates[1]],
        validation=tuning.ValidationNoise(),
    )
    assert alone.epsilon_total <= plan.epsilon_total * (1 + 1e-9)


def test_validation_releases_ride_free_but_are_counted():
    plan = tuning.calibrate(epsilon=3.0, delta=DELTA, shapes=[DEMO])
    v = plan.validation
    assert v.score_noise_multiplier and v.checkpoint_epsilon and v.histogram_noise_multiplier
    kw = dict(epsilon_target=3.0, delta=DELTA, runs=plan.runs, candidates=plan.candidates)
    without = tuning.plan(**kw, validation=tuning.ValidationNoise())
    assert plan.epsilon_total == pytest.approx(without.epsilon_total, rel=1e-12)
    a = rdp.as_orders()
    train = rdp.dpsgd_rdp(plan.candidates[0].noise_multiplier, 0.125, 48, a)
    assert (v.rdp(a) <= train * (1 + 1e-12)).all()
    # twice the validation budget is not free: the max then takes the validation curve
    louder = tuning.split_validation(2 * tuning.validation_budget(train, a))
    assert tuning.plan(**kw, validation=louder).epsilon_total > plan.epsilon_total * 1.05


def test_parallel_composition_takes_the_max_per_order():
    a = rdp.as_orders([2, 8, 32])
    train, val = np.array([0.1, 0.5, 3.0]), np.array([0.2, 0.4, 0.8])
    np.testing.assert_array_equal(rdp.parallel(train, val), [0.2, 0.5, 3.0])
    assert (
        rdp.rdp_to_epsilon(rdp.parallel(train, val), DELTA, a)[0]
        < rdp.rdp_to_epsilon(train + val, DELTA, a)[0]
    )
    with pytest.raises(ValueError, match="shape"):
        rdp.parallel(train, val[:2])


def test_plan_round_trip_recomputes_instead_of_trusting_stored_numbers():
    plan = tuning.calibrate(
        epsilon=3.0, delta=DELTA, shapes=[DEMO], fixed=[(40.0, 1.0, 1)], runs=runs.PoissonRuns(6)
    )
    stored = json.loads(json.dumps(plan.as_dict()))
    stored["epsilon_total"] = 0.01  # a tampered (or stale) number is ignored
    again = tuning.TuningPlan.from_dict(stored)
    assert again.epsilon_total == pytest.approx(plan.epsilon_total, rel=1e-12)
    assert again.runs == plan.runs and again.candidates == plan.candidates
    assert again.theorem.endswith("(Poisson)") and again.accountant == "rdp"


# ----------------------------------------------------------------- validation releases


def val_split(rng, n_units=40, labels=5):
    """Images of n_units patients (1-4 images each), probabilities, labels with some masked."""
    per_unit = rng.integers(1, 5, n_units)
    units = np.repeat(np.arange(n_units), per_unit)
    n = units.size
    probs = rng.random((n, labels))
    y = (rng.random((n, labels)) < 0.3).astype(float)
    y[rng.random((n, labels)) < 0.15] = np.nan
    return probs, y, units


def neighbours(units, rng):
    """Index sets of neighbouring datasets: one unit removed, one image removed (its unit kept
    when it had others), as (keep mask, relabelled units) pairs."""
    out = []
    gone = rng.integers(units.max() + 1)
    keep = units != gone
    out.append((keep, np.unique(units[keep], return_inverse=True)[1]))
    image = rng.integers(units.size)
    keep = np.arange(units.size) != image
    out.append((keep, np.unique(units[keep], return_inverse=True)[1]))
    return out


def test_score_moves_by_at_most_its_bound_on_neighbours():
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(200):
        probs, y, units = val_split(rng)
        probs = probs**3  # some badly wrong, clipped units
        stat = validation.loss_statistic(
            validation.unit_values(validation.per_image_loss(probs, y), units)
        )
        for keep, u in neighbours(units, rng):
            other = validation.loss_statistic(
                validation.unit_values(validation.per_image_loss(probs[keep], y[keep]), u)
            )
            worst = max(worst, abs(stat - other))
    assert worst <= validation.LOSS_BOUND + 1e-12
    assert worst > 0.5 * validation.LOSS_BOUND  # the bound is nearly reached: not vacuous


def test_a_diverged_candidate_scores_worst_and_never_wins():
    b = validation.LOSS_BOUND
    # NaN unit losses count as the bound: the term stays in [0, B], the sensitivity holds
    assert validation.loss_statistic(np.array([np.nan, 0.2, np.nan])) == pytest.approx(2 * b + 0.2)
    nan = validation.ScoreRelease(math.nan, 10, b, 1.0)
    fine = [validation.ScoreRelease(x, 10, b, 1.0) for x in (5.0, 3.0)]
    assert validation.best_candidate([nan, *fine]) == 2
    assert validation.best_candidate([*fine, nan]) == 1


def test_epoch_utilities_move_by_at_most_the_bound_in_every_epoch():
    rng = np.random.default_rng(1)
    worst = 0.0
    for _ in range(200):
        probs, y, units = val_split(rng)
        losses = np.stack(
            [validation.per_image_loss(probs ** (e + 1), y) for e in range(6)], axis=1
        )
        u = validation.epoch_utilities(validation.unit_values(losses, units), bound=0.8)
        for keep, codes in neighbours(units, rng):
            u2 = validation.epoch_utilities(validation.unit_values(losses[keep], codes), bound=0.8)
            worst = max(worst, float(np.abs(u - u2).max()))
    assert 0.4 < worst <= 0.8 + 1e-12


def test_score_histograms_move_by_at_most_one_per_label_in_l2():
    rng = np.random.default_rng(2)
    worst = 0.0
    for _ in range(200):
        probs, y, units = val_split(rng)
        pos, neg = validation.histogram_statistic(probs, y, units, bins=20)
        for keep, codes in neighbours(units, rng):
            pos2, neg2 = validation.histogram_statistic(probs[keep], y[keep], codes, bins=20)
            per_label = np.sqrt(((pos - pos2) ** 2).sum(1) + ((neg - neg2) ** 2).sum(1))
            worst = max(worst, float(per_label.max()))
    assert 0.5 < worst <= 1.0 + 1e-12  # so the 5-label release has L2 sensitivity sqrt(5)


def test_exponential_mechanism_stays_within_its_rdp_curve():
    """Exact Renyi divergences of the selection probabilities of neighbouring utilities
    (every coordinate moved by at most B) never exceed alpha eps^2/8."""
    rng = np.random.default_rng(3)
    orders = np.array([1.5, 2.0, 4.0, 16.0, 64.0])
    bound, eps = 1.0, 1.3
    for _ in range(500):
        u = rng.normal(0, 2, 6)
        u2 = u + rng.choice([-bound, 0, bound], 6) * rng.random(6) ** 0.1
        p = np.exp(eps * u / (2 * bound) - logsumexp(eps * u / (2 * bound)))
        p2 = np.exp(eps * u2 / (2 * bound) - logsumexp(eps * u2 / (2 * bound)))
        for a, cap in zip(orders, rdp.exponential_rdp(eps, orders), strict=True):
            for x, z in ((p, p2), (p2, p)):
                div = math.log(np.sum(x**a * z ** (1 - a))) / (a - 1)
                assert div <= cap + 1e-12


def test_checkpoint_choice_follows_the_exponential_mechanism():
    values = np.array([[0.2, 0.5, 0.9], [0.3, 0.2, 0.8]])  # 2 units x 3 epochs
    eps, bound = 2.0, 1.0
    u = validation.epoch_utilities(values, bound)
    expected = np.exp(eps * u / 2 - logsumexp(eps * u / 2))
    rng = np.random.default_rng(4)
    picks = [validation.select_checkpoint(values, eps, bound, rng).index for _ in range(20_000)]
    np.testing.assert_allclose(np.bincount(picks, minlength=3) / 20_000, expected, atol=0.015)
    assert {validation.select_checkpoint(values, eps).index for _ in range(200)} == {0, 1, 2}


def test_releases_add_noise_of_the_stated_scale():
    rng = np.random.default_rng(5)
    values = rng.random(30)
    stat = validation.loss_statistic(values, 0.7)
    noise = [validation.release_score(values, 3.0, 0.7, rng).noisy_sum - stat for _ in range(4000)]
    assert np.std(noise) == pytest.approx(3.0 * 0.7, rel=0.05)
    probs, y, units = val_split(rng)
    pos, _ = validation.histogram_statistic(probs, y, units, bins=10)
    rels = [
        validation.release_thresholds(probs, y, units, 2.0, bins=10, rng=rng) for _ in range(40)
    ]
    noise = np.concatenate([(r.hist_pos - pos).ravel() for r in rels])
    assert np.std(noise) == pytest.approx(2.0 * math.sqrt(5), rel=0.05)
    assert rels[0].thresholds.shape == (5,)


def test_youden_from_histograms_finds_the_best_cut_when_noise_is_small():
    """One image per unit and scores on the bin edges: the histogram threshold reaches the
    same Youden J as the exact threshold of thresholds.youden_threshold."""
    rng = np.random.default_rng(6)
    bins = 40
    n = 400
    y = (rng.random((n, 2)) < 0.4).astype(float)
    b = np.minimum((bins * (0.4 * y + 0.6 * rng.random((n, 2)))).astype(int), bins - 1)
    probs = (b + 0.5) / bins  # bin centres: each bin holds one distinct score
    units = np.arange(n)
    pos, neg = validation.histogram_statistic(probs, y, units, bins=bins)
    cuts = validation.youden_from_histograms(pos, neg)

    def j(t, col):
        pred = probs[:, col] >= t
        return pred[y[:, col] == 1].mean() - pred[y[:, col] == 0].mean()

    for col in range(2):
        exact = thresholds.youden_threshold(probs[:, col], y[:, col])
        assert j(cuts[col], col) == pytest.approx(j(exact, col), abs=1e-12)
    noisy = validation.release_thresholds(probs, y, units, 0.5, bins=bins, rng=rng).thresholds
    for col in range(2):
        assert j(noisy[col], col) > j(cuts[col], col) - 0.1


def test_untuned_cell_validation_budget_keeps_the_training_epsilon():
    """Without tuning the cell's epsilon is training's (PRV); the validation releases get the
    budget whose own epsilon at the same delta is at most that, so the max is unchanged."""
    rho = tuning.validation_budget_at(2.0, DELTA)
    noise = tuning.split_validation(rho)
    a = rdp.as_orders()
    eps_v = rdp.rdp_to_epsilon(noise.rdp(a), DELTA, a)[0]
    assert 2.0 * (1 - 2e-3) <= eps_v <= 2.0
    assert rdp.rdp_to_epsilon(2 * rho * a, DELTA, a)[0] > 2.0
