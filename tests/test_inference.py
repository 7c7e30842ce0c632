"""The inference rules (privdom_ray.inference) and the patient-level bootstrap's error rates.

numpy only (no sklearn): the simulation checks the claims the statistics rest on, namely that
resampling patients gives nominal error rates on clustered data where resampling images does
not, and that CIs, p-values and verdicts can never disagree.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from privdom_ray import inference as I
from privdom_ray import metrics as M


def _random_cases(n_cases: int, seed: int):
    """Resampled statistics of many shapes: ties at 0 and at +-margin, NaNs, sizes that make
    alpha (B + 1) / 2 an integer (39, 199, 399) and random sizes, several levels."""
    rng = np.random.default_rng(seed)
    for k in range(n_cases):
        b = int(rng.choice([39, 40, 79, 199, 200, 399])) if k % 2 else int(rng.integers(1, 500))
        ci = float(rng.choice([0.8, 0.9, 0.95, 0.99]))
        shift = rng.normal(scale=2.0)
        if k % 3 == 0:
            d = np.round(rng.normal(shift, 2.0, b))  # integer values: many exact ties with 0
        elif k % 3 == 1:
            d = rng.normal(shift, 1.0, b)
        else:
            d = rng.choice([-1.0, 0.0, 0.0, 1.0], b) + (shift > 1)
        if k % 5 == 0:
            d[rng.random(b) < 0.1] = np.nan  # invalid resamples are dropped first
        yield d, ci


def test_ci_excludes_zero_exactly_when_p_is_at_most_alpha():
    seen = {True: 0, False: 0, "null": 0}
    for d, ci in _random_cases(3000, seed=1):
        alpha = I.alpha_of(ci)
        lo, hi = I.order_ci(d, ci)
        p = I.p_two_sided(d)
        if lo is None:
            assert I.ci_rank(int((~np.isnan(d)).sum()), alpha) < 1 and p > alpha
            seen["null"] += 1
            continue
        excludes = lo > 0 or hi < 0
        assert excludes == (p <= alpha), (lo, hi, p, alpha, d.size)
        seen[excludes] += 1
    assert min(seen.values()) > 100  # every branch exercised many times


def test_tost_and_noninferiority_agree_with_the_1_minus_2alpha_ci():
    rng = np.random.default_rng(2)
    n_eq = 0
    for d, ci in _random_cases(2000, seed=3):
        margin = float(rng.choice([0.5, 1.0, 2.0]))
        alpha = I.alpha_of(ci)
        if ci < 0.9:
            continue  # 1 - 2 alpha must be a level in (0, 1)
        r = I.infer(float(np.nanmean(d)), d, ci=ci, margin=margin, worse_if="higher")
        if r.tost_lo is None:
            assert r.p_tost > alpha and r.p_noninf > alpha
            continue
        inside = -margin < r.tost_lo and r.tost_hi < margin
        assert inside == (r.p_tost <= alpha)
        assert (r.tost_hi < margin) == (r.p_noninf <= alpha)
        n_eq += inside
        lower = I.infer(float(np.nanmean(d)), d, ci=ci, margin=margin, worse_if="lower")
        assert (lower.tost_lo > -margin) == (lower.p_noninf <= alpha)
    assert n_eq > 50


def test_order_statistic_ci_and_p_floor_known_values():
    d = np.arange(1.0, 200.0)  # B = 199, alpha = 0.05: m = floor(0.05 * 200 / 2) = 5
    assert I.ci_rank(199, 0.05) == 5
    assert I.order_ci(d, 0.95) == (5.0, 195.0)
    assert I.p_two_sided(d) == pytest.approx(2 / 200) == I.p_floor(199)
    assert I.p_two_sided(np.zeros(10)) == 1.0
    assert I.order_ci(np.arange(30.0), 0.95) == (None, None)  # m = 0: too few for 95%
    assert I.p_two_sided(np.array([np.nan])) is None
    assert I.alpha_of(0.95) == 0.05 and I.ci_rank(39, I.alpha_of(0.95)) == 1


def test_holm_and_benjamini_hochberg_by_hand():
    assert I.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert I.holm([0.5, None, 0.01]) == [pytest.approx(0.5), None, pytest.approx(0.02)]
    assert I.bh([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.04, 0.04])
    assert I.bh([None, 0.2]) == [None, pytest.approx(0.2)]
    assert I.holm([]) == [] and I.bh([]) == []


def _inf(est, lo, hi, p, tost, noninf, worse="higher"):
    return I.Inference(est, lo, hi, p, 999, 0.02, worse, lo, hi, tost, noninf)


def test_verdicts_follow_their_definitions_in_order():
    a = 0.05
    assert I.verdict(_inf(0.0, -0.01, 0.01, 0.9, 0.001, 0.001), a) == I.EQUIVALENT
    # a tiny but detectable difference inside the margin is still "equivalent within ±m"
    assert I.verdict(_inf(0.005, 0.002, 0.008, 0.002, 0.001, 0.001), a) == I.EQUIVALENT
    assert I.verdict(_inf(0.05, 0.03, 0.07, 0.002, 0.9, 0.9), a) == I.DIFFERENT
    assert I.verdict(_inf(-0.03, -0.06, 0.01, 0.2, 0.6, 0.01), a) == I.NON_INFERIOR
    assert I.verdict(_inf(0.0, -0.05, 0.05, 0.9, 0.4, 0.4), a) == I.INCONCLUSIVE
    # no direction (a fairness gap): never "non-inferior"
    assert I.verdict(_inf(-0.03, -0.06, 0.01, 0.2, 0.6, None, None), a) == I.INCONCLUSIVE
    # the Holm-adjusted TOST p replaces the raw one for primary endpoints
    raw = _inf(0.0, -0.01, 0.01, 0.9, 0.01, 0.01)
    assert I.verdict(raw, a, p_equivalence=0.03) == I.EQUIVALENT
    assert I.verdict(raw, a, p_equivalence=0.2) == I.NON_INFERIOR
    assert I.verdict(I.Inference(None, None, None, None, 0), a) is None


def test_hierarchical_bootstrap_means_the_drawn_seeds_on_one_patient_resample():
    per_seed = np.array([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])  # (k = 2 seeds, B = 3)
    draws = np.array([[0, 0], [0, 1], [1, 1]])
    np.testing.assert_array_equal(I.hierarchical(per_seed, draws), [1.0, 11.0, 30.0])
    d = I.seed_draws(3, 50, seed=4)
    assert d.shape == (50, 3) and d.min() >= 0 and d.max() <= 2
    np.testing.assert_array_equal(d, I.seed_draws(3, 50, seed=4))
    with pytest.raises(ValueError):
        I.hierarchical(per_seed, draws[:2])


def test_t_tail_matches_textbook_critical_values():
    for df, crit in [(1, 12.706204736), (4, 2.776445105), (10, 2.228138852), (30, 2.042272456)]:
        assert I.t_two_sided_p(crit, df) == pytest.approx(0.05, abs=1e-8)
    assert I.t_two_sided_p(0.0, 5) == pytest.approx(1.0)
    assert math.isnan(I.t_two_sided_p(math.nan, 3))


# ------------------------------------------------------------------------------ simulation


def _clustered(rng, n_pat: int, per: int):
    """Two truly equal models on clustered data: a patient effect on the labels and a
    patient-level error of each model (it misjudges all of a patient's images alike)."""
    u = np.repeat(rng.normal(size=n_pat), per)
    y = (rng.random(n_pat * per) < 1 / (1 + np.exp(1.0 - 1.5 * u))).astype(float)
    models = []
    for _ in range(2):
        err = np.repeat(rng.normal(scale=1.2, size=n_pat), per)
        models.append(y + err + 0.5 * rng.normal(size=y.size))
    return np.stack(models, axis=1), np.stack([y, y], axis=1), np.repeat(np.arange(n_pat), per)


def test_patient_bootstrap_has_nominal_error_rates_where_the_image_bootstrap_does_not():
    """300 patients x 8 images, 300 datasets, B = 200: the patient-level paired test of two
    equal models rejects at about 5% and its CI covers the true AUC; resampling images
    (the old procedure) rejects far too often and covers far too rarely."""
    rng = np.random.default_rng(2024)
    big_s, big_y, _ = _clustered(rng, 40_000, 8)
    true_auc = M.auc(big_s[:, 0], big_y[:, 0])  # the population AUC of either model
    n_sim, n_boot = 300, 200
    reject = {"patient": 0, "image": 0}
    cover = {"patient": 0, "image": 0}
    for k in range(n_sim):
        s, y, groups = _clustered(rng, 300, 8)
        for unit, clusters in (("patient", groups), ("image", None)):
            rs = M.make_resampler(len(y), n_boot, seed=k, clusters=clusters)
            boot = M.bootstrap_stats(s, y, rs).auc
            reject[unit] += I.p_two_sided(boot[:, 0] - boot[:, 1]) <= 0.05
            lo, hi = I.order_ci(boot[:, 0], 0.95)
            cover[unit] += lo <= true_auc <= hi
    rates = {u: (reject[u] / n_sim, cover[u] / n_sim) for u in reject}
    print("rejection rate, coverage at nominal 5% / 95%:", rates)
    assert 0.02 <= rates["patient"][0] <= 0.08, rates
    assert rates["patient"][1] >= 0.90, rates
    assert rates["image"][0] > 0.12 and rates["image"][1] < 0.85, rates


def test_tost_equivalence_for_identical_models_and_not_at_twice_the_margin():
    """On a large clustered test set: identical models are equivalent within ±0.02; a model
    whose AUC is lower by about 2 x 0.02 is not (it is "different")."""
    rng = np.random.default_rng(7)
    n_pat, per = 3000, 3
    s, y, groups = _clustered(rng, n_pat, per)
    a = s[:, 0]
    worse = a + np.random.default_rng(8).normal(scale=1.1, size=a.size)  # about -0.04 AUC
    scores = np.stack([a, a, worse], axis=1)
    labels = np.stack([y[:, 0]] * 3, axis=1)
    boot = M.bootstrap_stats(scores, labels, M.make_resampler(len(a), 400, 1, groups)).auc
    point = np.array([M.auc(scores[:, j], labels[:, j]) for j in range(3)])
    same = I.infer(point[1] - point[0], boot[:, 1] - boot[:, 0], ci=0.95, margin=0.02,
                   worse_if="lower")  # fmt: skip
    assert I.verdict(same, 0.05) == I.EQUIVALENT
    diff = I.infer(point[2] - point[0], boot[:, 2] - boot[:, 0], ci=0.95, margin=0.02,
                   worse_if="lower")  # fmt: skip
    assert -0.05 < diff.estimate < -0.03  # about twice the margin
    assert diff.p_tost > 0.05 and I.verdict(diff, 0.05) == I.DIFFERENT
