"""Behavioural tests for privdom_ray.stats.metrics (real computations, sklearn as the oracle)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from privdom_ray.config import EvaluationConfig
from privdom_ray.stats import evaluation, resampling, thresholds
from privdom_ray.stats import inference as I
from privdom_ray.stats import metrics as M


def _data(n: int = 2000, n_lab: int = 5, seed: int = 0, decimals: int | None = None):
    """Multi-label data with mixed prevalence (incl. > 50%), NaN masks and optional ties."""
    rng = np.random.default_rng(seed)
    prev = np.array([0.1, 0.5, 0.8, 0.03, 0.3])[:n_lab]
    y = (rng.random((n, n_lab)) < prev).astype(float)
    s = rng.normal(size=(n, n_lab)) + 1.2 * y
    if decimals is not None:
        s = np.round(s, decimals)
    y[rng.random((n, n_lab)) < 0.07] = np.nan
    return s, y


def _sk_auc(s: np.ndarray, y: np.ndarray) -> float:
    k = ~np.isnan(y)
    return roc_auc_score(y[k], s[k])


# --------------------------------------------------------------------------- AUC


@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_auc_matches_sklearn(decimals):
    s, y = _data(decimals=decimals, seed=3)
    for j in range(s.shape[1]):
        assert M.auc(s[:, j], y[:, j]) == pytest.approx(_sk_auc(s[:, j], y[:, j]), abs=1e-9)


def test_auc_rank_based_and_undefined():
    s, y = _data(n=500, n_lab=1, seed=1)
    p = 1 / (1 + np.exp(-s[:, 0]))
    assert M.auc(p, y[:, 0]) == M.auc(s[:, 0], y[:, 0])
    assert math.isnan(M.auc(np.arange(4.0), np.array([1.0, 1.0, np.nan, 1.0])))
    assert math.isnan(M.auc(np.arange(3.0), np.zeros(3)))
    assert M.auc(np.array([0.5, 0.5]), np.array([0.0, 1.0])) == 0.5  # full tie
    with pytest.raises(ValueError):
        M.auc(np.arange(3.0), np.array([0.0, 2.0, 1.0]))


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_indices_shape_dtype_determinism():
    a = resampling.bootstrap_indices(50, 7, seed=11)
    assert a.shape == (7, 50) and a.dtype == np.int32
    assert a.min() >= 0 and a.max() < 50
    np.testing.assert_array_equal(a, resampling.bootstrap_indices(50, 7, seed=11))
    assert not np.array_equal(a, resampling.bootstrap_indices(50, 7, seed=12))
    assert resampling.bootstrap_indices(0, 3, seed=0).shape == (3, 0)


@pytest.mark.parametrize("decimals", [None, 1])
def test_bootstrap_auc_equals_explicit_resample(decimals):
    s, y = _data(n=800, seed=5, decimals=decimals)
    idx = resampling.bootstrap_indices(len(s), 40, seed=2)
    boot = resampling.bootstrap_auc(s, y, idx)
    assert boot.shape == (40, s.shape[1])
    for b in (0, 1, 17, 39):
        for j in range(s.shape[1]):
            expect = M.auc(s[idx[b], j], y[idx[b], j])
            assert boot[b, j] == expect  # bit-exact: same integer rank statistic
            assert boot[b, j] == pytest.approx(_sk_auc(s[idx[b], j], y[idx[b], j]), abs=1e-9)


def test_bootstrap_auc_chunking_and_1d(monkeypatch):
    s, y = _data(n=300, seed=8, decimals=1)
    idx = resampling.bootstrap_indices(len(s), 25, seed=4)
    full = resampling.bootstrap_auc(s, y, idx)
    monkeypatch.setattr(resampling, "_CHUNK_CELLS", 700)  # force several small chunks
    np.testing.assert_array_equal(full, resampling.bootstrap_auc(s, y, idx))
    np.testing.assert_array_equal(full[:, 2], resampling.bootstrap_auc(s[:, 2], y[:, 2], idx))


def test_bootstrap_auc_nan_when_resample_lacks_a_class():
    s = np.array([0.1, 0.2, 0.3, 0.9])
    y = np.array([0.0, 0.0, 0.0, 1.0])
    idx = np.array([[0, 1, 2, 0], [3, 0, 1, 2], [3, 3, 3, 3]], dtype=np.int32)
    out = resampling.bootstrap_auc(s, y, idx)
    assert math.isnan(out[0]) and out[1] == 1.0 and math.isnan(out[2])
    with pytest.raises(ValueError):
        resampling.bootstrap_auc(s, y, np.array([[0, 4, 1, 1]]))
    # a NaN score where the label is known is refused (it would count as a tie: AUC 0.5)
    rs = resampling.make_resampler(4, 10, 0, None)
    with pytest.raises(ValueError, match="NaN"):
        resampling.bootstrap_stats(np.array([[0.1], [np.nan], [0.3], [0.9]]), y[:, None], rs)


def test_ci_coverage_binormal():
    """95% order-statistic CIs cover the true AUC Phi(d/sqrt 2) in roughly 95% of datasets."""
    rng = np.random.default_rng(123)
    d, n_half, n_sim = 1.0, 100, 200
    true_auc = 0.5 * (1 + math.erf(d / math.sqrt(2) / math.sqrt(2)))
    y = np.r_[np.zeros(n_half), np.ones(n_half)]
    covered = 0
    for k in range(n_sim):
        s = rng.normal(size=2 * n_half) + d * y
        idx = resampling.bootstrap_indices(2 * n_half, 200, seed=k)
        lo, hi = I.order_ci(resampling.bootstrap_auc(s, y, idx), 0.95)
        covered += lo <= true_auc <= hi
    assert 0.85 <= covered / n_sim <= 0.99


def _expand(draws_row: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Image rows of one resample's drawn patients, in draw order (explicit resampling)."""
    return np.concatenate([np.flatnonzero(codes == p) for p in draws_row])


def _clusters(n: int, seed: int) -> np.ndarray:
    """An opaque, unsorted patient index per image (1-5 images per patient)."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(np.arange(n), rng.integers(1, 6, n))[:n]) * 7 + 3


@pytest.mark.parametrize("decimals", [None, 1])
def test_clustered_bootstrap_equals_explicit_patient_resample(decimals):
    s, y = _data(n=600, seed=15, decimals=decimals)
    p = 1 / (1 + np.exp(-s))  # probabilities, for the calibration statistics
    clusters = _clusters(600, seed=1)
    rs = resampling.make_resampler(600, 30, seed=5, clusters=clusters)
    assert rs.n_clusters == np.unique(clusters).size < 600
    thr = np.array([0.5, 0.4, 0.6, 0.5, 0.5])
    bs = resampling.bootstrap_stats(p, y, rs, pred=p >= thr, bins=10)
    np.testing.assert_array_equal(bs.auc, resampling.bootstrap_auc(p, y, rs.draws, clusters=clusters))
    tm = thresholds.threshold_metrics(p, y, thr, rs.draws, clusters=clusters)
    for b in (0, 11, 29):
        rows = _expand(rs.draws[b], rs.codes)
        brier, ece = thresholds.calibration(p[rows], y[rows], 10)
        acc, sens, spec = (getattr(thresholds.threshold_metrics(p[rows], y[rows], thr), k)
                           for k in ("accuracy", "sensitivity", "specificity"))  # fmt: skip
        for j in range(5):
            assert bs.auc[b, j] == M.auc(p[rows, j], y[rows, j])  # bit-exact
            assert bs.auc[b, j] == pytest.approx(_sk_auc(p[rows, j], y[rows, j]), abs=1e-9)
            assert bs.brier[b, j] == pytest.approx(brier[j], rel=1e-5)
            assert bs.ece[b, j] == pytest.approx(ece[j], rel=1e-5, abs=1e-7)
            assert tm.boot_accuracy[b, j] == pytest.approx(acc[j], abs=1e-12)
            assert tm.boot_sensitivity[b, j] == pytest.approx(sens[j], abs=1e-12)
            assert tm.boot_specificity[b, j] == pytest.approx(spec[j], abs=1e-12)


def test_clustered_bootstrap_chunking(monkeypatch):
    s, y = _data(n=300, seed=16, decimals=1)
    clusters = _clusters(300, seed=2)
    idx = resampling.make_resampler(300, 25, seed=3, clusters=clusters).draws
    full = resampling.bootstrap_auc(s, y, idx, clusters=clusters)
    monkeypatch.setattr(resampling, "_CHUNK_CELLS", 700)  # force several small chunks
    np.testing.assert_array_equal(full, resampling.bootstrap_auc(s, y, idx, clusters=clusters))
    with pytest.raises(ValueError):
        resampling.bootstrap_auc(s, y, idx, clusters=clusters[:-1])


# --------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize("decimals", [None, 1])
def test_youden_matches_roc_curve(decimals):
    s, y = _data(n=1500, seed=9, decimals=decimals)
    for j in range(s.shape[1]):
        k = ~np.isnan(y[:, j])
        fpr, tpr, thr = roc_curve(y[k, j], s[k, j])
        assert thresholds.youden_threshold(s[:, j], y[:, j]) == thr[np.argmax(tpr - fpr)]


def test_youden_edge_cases():
    # anti-informative scores: sklearn's argmax lands on its leading +inf threshold
    s = np.array([0.9, 0.8, 0.2, 0.1])
    y = np.array([0.0, 0.0, 1.0, 1.0])
    fpr, tpr, thr = roc_curve(y, s)
    assert thresholds.youden_threshold(s, y) == thr[np.argmax(tpr - fpr)] == math.inf
    assert math.isnan(thresholds.youden_threshold(s, np.ones(4)))


def _direct_rates(s, y, t):
    k = ~np.isnan(y)
    s, y = s[k], y[k]
    pred = s >= t
    tp = np.sum(pred & (y == 1))
    tn = np.sum(~pred & (y == 0))
    return (tp + tn) / y.size, tp / np.sum(y == 1), tn / np.sum(y == 0)


def test_threshold_metrics_match_direct():
    s, y = _data(n=700, seed=2, decimals=1)
    thr = np.array([0.5, 0.0, 0.7, 1.0, 0.3])
    idx = resampling.bootstrap_indices(len(s), 30, seed=1)
    tm = thresholds.threshold_metrics(s, y, thr, idx)
    for j in range(s.shape[1]):
        acc, sens, spec = _direct_rates(s[:, j], y[:, j], thr[j])
        assert tm.accuracy[j] == pytest.approx(acc, abs=1e-12)
        assert tm.sensitivity[j] == pytest.approx(sens, abs=1e-12)
        assert tm.specificity[j] == pytest.approx(spec, abs=1e-12)
        for b in (0, 13, 29):
            acc, sens, spec = _direct_rates(s[idx[b], j], y[idx[b], j], thr[j])
            assert tm.boot_accuracy[b, j] == pytest.approx(acc, abs=1e-12)
            assert tm.boot_sensitivity[b, j] == pytest.approx(sens, abs=1e-12)
            assert tm.boot_specificity[b, j] == pytest.approx(spec, abs=1e-12)
    no_boot = thresholds.threshold_metrics(s, y, thr)
    assert no_boot.boot_accuracy is None
    np.testing.assert_array_equal(no_boot.sensitivity, tm.sensitivity)


# --------------------------------------------------------------------------- evaluate


def test_evaluate_rows_and_values():
    s, y = _data(n=1200, seed=4)
    names = ["cardiomegaly", "effusion", "pneumonia", "atelectasis", "healthy"]
    thr = np.zeros(5)
    rng = np.random.default_rng(0)
    groups = {"sex=F": rng.random(len(s)) < 0.5}
    rows = evaluation.evaluate(s, y, thr, names, groups=groups, n_boot=100, seed=1, oracle=True)
    assert [(r.subgroup, r.label) for r in rows] == [
        (g, lab) for g in ("all", "sex=F") for lab in [*names, "macro"]
    ]
    by = {(r.subgroup, r.label): r for r in rows}
    for j, lab in enumerate(names):
        r = by["all", lab]
        assert r.n == int((~np.isnan(y[:, j])).sum())
        assert r.n_pos == int((y[:, j] == 1).sum())
        assert r.auc == pytest.approx(_sk_auc(s[:, j], y[:, j]), abs=1e-9)
        assert r.auc_lo < r.auc < r.auc_hi
        acc, sens, spec = _direct_rates(s[:, j], y[:, j], 0.0)
        assert (r.accuracy, r.sensitivity, r.specificity) == pytest.approx((acc, sens, spec))
        assert r.threshold == 0.0
        assert r.oracle_threshold == thresholds.youden_threshold(s[:, j], y[:, j])
        o_acc, _, _ = _direct_rates(s[:, j], y[:, j], r.oracle_threshold)
        assert r.oracle_accuracy == pytest.approx(o_acc)
        m = groups["sex=F"]
        assert by["sex=F", lab].auc == pytest.approx(M.auc(s[m, j], y[m, j]), abs=1e-12)
        assert r.resampling_unit == "image" and r.ci_df > 30 and r.n_labels == 1
        assert r.brier is None and "not probabilities" in r.null_reason  # logits: no calibration
    macro = by["all", "macro"]
    assert macro.n == len(s) and macro.threshold is None and macro.n_labels == 5
    assert macro.auc == pytest.approx(np.mean([by["all", lab].auc for lab in names]))
    assert macro.auc_lo < macro.auc < macro.auc_hi
    assert macro.sensitivity == pytest.approx(
        np.mean([by["all", lab].sensitivity for lab in names])
    )
    d = macro.as_dict()
    assert list(d)[:4] == ["label", "subgroup", "n", "n_pos"] and d["label"] == "macro"
    plain = evaluation.evaluate(s, y, thr, names, n_boot=10)
    assert len(plain) == 6 and plain[0].oracle_threshold is None


def test_evaluate_cis_are_the_jackknife_t_intervals_on_the_logit_scale():
    s, y = _data(n=400, seed=6)
    clusters = _clusters(400, seed=3)
    rows = evaluation.evaluate(s, y, np.zeros(5), list("abcde"), n_boot=1, clusters=clusters)
    jk = resampling.jackknife_auc(s, y, clusters)
    for j in range(5):
        lo, hi = I.level_interval(jk.point[j], I.jackknife_variance(jk.loo[j]), jk.df[j], 0.95)
        assert (rows[j].auc_lo, rows[j].auc_hi) == (lo, hi) and rows[j].ci_df == jk.df[j]
        # the logit scale: asymmetric around an AUC above 0.5, inside (0, 1)
        assert 0 < lo < rows[j].auc < hi < 1 and hi - rows[j].auc < rows[j].auc - lo
    macro = rows[5]
    var = I.jackknife_variance(jk.loo.mean(axis=0))
    df = evaluation.macro_df(np.array([I.jackknife_variance(v) for v in jk.loo]), jk.df, 400)
    assert (macro.auc_lo, macro.auc_hi) == I.level_interval(macro.auc, var, df, 0.95)
    assert rows[0].resampling_unit == "patient" and rows[5].n_patients == np.unique(clusters).size
    assert all(r.auc_lo is None and r.ci_df is None for r in
               evaluation.evaluate(s, y, np.zeros(5), list("abcde"), n_boot=0))  # fmt: skip


@pytest.mark.parametrize("decimals", [None, 1])
def test_jackknife_auc_equals_an_explicit_leave_one_patient_out_loop(decimals):
    s, y = _data(n=500, seed=21, decimals=decimals)  # ties, NaN labels, a 3% label
    clusters = _clusters(500, seed=8)
    jk = resampling.jackknife_auc(s, y, clusters)
    codes, p = M.cluster_codes(clusters, 500)
    assert jk.loo.shape == (5, p)
    for j in range(5):
        assert jk.point[j] == M.auc(s[:, j], y[:, j])
        for i in range(0, p, 7):
            keep = codes != i
            assert jk.loo[j, i] == pytest.approx(M.auc(s[keep, j], y[keep, j]), abs=1e-12)
    # units of a larger set: a unit without rows here leaves the AUC unchanged
    sub = codes < p // 2
    part = resampling.jackknife_auc(s[sub], y[sub], codes[sub], n_units=p)
    assert np.all(part.loo[:, p // 2 :] == part.point[:, None])
    with pytest.raises(ValueError, match="unit indices"):
        resampling.jackknife_auc(s, y, codes, n_units=p - 1)


def test_jackknife_ratio_and_the_rates_of_evaluate():
    num = np.array([[3.0, 0.0, 2.0, 1.0]])
    den = np.array([[4.0, 1.0, 2.0, 1.0]])
    point, loo = resampling.jackknife_ratio(num, den)
    assert point[0] == 6 / 8 and loo.tolist() == [[3 / 4, 6 / 7, 4 / 6, 5 / 7]]
    s, y = _data(n=300, seed=22)
    clusters = _clusters(300, seed=9)
    rows = evaluation.evaluate(s, y, np.zeros(5), list("abcde"), n_boot=1, clusters=clusters)
    codes, p = M.cluster_codes(clusters, 300)
    j = 1
    sens_loo = [thresholds.threshold_metrics(s[codes != i], y[codes != i], np.zeros(5)).sensitivity[j]
                for i in range(p)]  # fmt: skip
    lo, hi = I.level_interval(rows[j].sensitivity, I.jackknife_variance(np.array(sens_loo)),
                              rows[j].ci_df, 0.95)  # fmt: skip
    assert (rows[j].sensitivity_lo, rows[j].sensitivity_hi) == (pytest.approx(lo), pytest.approx(hi))


def test_a_patient_with_many_correlated_images_lowers_the_degrees_of_freedom():
    rng = np.random.default_rng(23)
    n_pat = 40
    sizes = np.ones(n_pat, int)
    heavy = sizes.copy()
    heavy[0] = 30  # one positive patient with 30 near-identical images
    dfs = []
    for m in (sizes, heavy):
        codes = np.repeat(np.arange(n_pat), m)
        ill = (np.arange(n_pat) < 12).astype(float)
        y = ill[codes][:, None]
        u = rng.normal(size=n_pat)[codes]
        s = (1.0 * y[:, 0] + u + 0.1 * rng.normal(size=codes.size))[:, None]
        dfs.append(resampling.jackknife_auc(s, y, codes).df[0])
    assert 9 <= dfs[0] <= 39  # 12 positive, 28 negative patients of one image each
    assert dfs[1] < 0.6 * dfs[0]  # the heavy patient counts as about one unit, not 30


def test_degenerate_thresholds_are_flagged_instead_of_zero_width_cis():
    s, y = _data(n=600, seed=24)
    p = 1 / (1 + np.exp(-s))
    thr = np.array([0.0, 0.5, 0.5, 0.5, 2.0])  # label a: every image positive; e: negative
    rows = evaluation.evaluate(p, y, thr, list("abcde"), n_boot=1)
    a, e = rows[0], rows[4]
    assert a.sensitivity == 1.0 and a.specificity == 0.0
    assert a.sensitivity_lo is None and a.specificity_hi is None  # not [1.000, 1.000]
    assert "calls every image positive" in a.null_reason
    assert "sensitivity is 1 and specificity 0" in a.null_reason
    assert e.sensitivity == 0.0 and "calls every image negative" in e.null_reason
    assert "sensitivity is 0 and specificity 1" in e.null_reason
    assert a.auc_lo < a.auc < a.auc_hi and a.accuracy_lo is not None  # the rest is intact
    assert rows[1].null_reason is None and rows[1].sensitivity_lo is not None


def test_subgroup_macros_of_one_family_share_one_label_set():
    rng = np.random.default_rng(25)
    n = 3000
    clusters = np.repeat(np.arange(1000), 3)
    sex = np.repeat(rng.choice(np.array(["F", "M"]), 1000), 3)
    age = np.repeat(rng.uniform(20, 90, 1000), 3)
    y = (rng.random((n, 5)) < 0.2).astype(float)
    y[(sex == "M") & (y[:, 1] == 1), 1] = 0.0  # label b: no positive man
    y[(age < 40) & (y[:, 3] == 1), 3] = 0.0  # label d: nobody under 40 positive
    s = y + rng.normal(size=y.shape)
    groups = evaluation.subgroup_masks(sex, age)
    rows = evaluation.evaluate(s, y, np.zeros(5), list("abcde"), groups=groups, n_boot=1,
                      clusters=clusters, min_positives=10, min_negatives=10)  # fmt: skip
    by = {(r.subgroup, r.label): r for r in rows}
    assert by["all", "macro"].n_labels == 5
    for g in ("sex=F", "sex=M"):  # b is valid for women only: both sexes average a, c, d, e
        assert by[g, "macro"].n_labels == 4
        assert by[g, "macro"].auc == pytest.approx(np.mean([by[g, k].auc for k in "acde"]))
    assert by["sex=F", "b"].auc is not None  # the label row itself stays
    ages = [g for g in groups if g.startswith("age=")]
    assert {by[g, "macro"].n_labels for g in ages} == {4}  # d fails in [0,40): a, b, c, e
    assert by["age=[40,70)", "macro"].auc == pytest.approx(
        np.mean([by["age=[40,70)", k].auc for k in "abce"]))  # fmt: skip
    shared = M.shared_label_sets({"all": np.array([1, 1, 0], bool), "x=1": np.array([1, 0, 1], bool),
                                  "x=2": np.array([1, 1, 1], bool), "x=3": np.zeros(3, bool)})  # fmt: skip
    assert shared["all"].tolist() == [1, 1, 0] and shared["x=2"].tolist() == [1, 0, 1]
    assert not shared["x=3"].any()


def test_intervals_below_the_verified_support_are_marked_approximate():
    rng = np.random.default_rng(26)
    clusters = np.repeat(np.arange(300), 2)
    y = np.zeros((600, 1))
    y[:12, 0] = 1.0  # 6 positive patients
    s = y + rng.normal(size=y.shape)
    row = evaluation.evaluate(s, y, [0.0], ["rare"], n_boot=1, clusters=clusters)[0]
    assert row.auc_lo is not None and "approximate CI: 6 patient(s)" in row.ci_note
    common = evaluation.evaluate(s, (rng.random((600, 1)) < 0.3).astype(float), [0.0], ["x"], n_boot=1,
                        clusters=clusters)[0]  # fmt: skip
    assert common.ci_note is None


def test_intervals_at_a_high_auc_are_marked_approximate():
    """A point AUC >= 0.95 (or <= 0.05) marks the interval approximate (such intervals covered
    0.90-0.92 in simulation); 0.90 with ample support does not; the macro by its own point."""
    rng = np.random.default_rng(7)
    clusters = np.repeat(np.arange(400), 2)
    y = (np.repeat(rng.random(400), 2)[:, None] < 0.3).astype(float).repeat(3, axis=1)
    s = y * np.array([4.0, 1.8, -4.0]) + rng.normal(size=y.shape)
    rows = evaluation.evaluate(s, y, [0.0] * 3, ["high", "mid", "low"], n_boot=1, clusters=clusters)
    by = {r.label: r for r in rows if r.subgroup == "all"}
    assert by["high"].auc >= 0.95 and "AUC 0.9" in by["high"].ci_note
    assert by["low"].auc <= 0.05 and "approximate CI: AUC 0.0" in by["low"].ci_note
    assert 0.8 < by["mid"].auc < 0.95 and by["mid"].ci_note is None
    assert 0.05 < by["macro"].auc < 0.95 and by["macro"].ci_note is None


def test_evaluate_degenerate_subgroups_give_none_with_a_reason():
    s, y = _data(n=600, seed=7)
    y[:, 1] = np.where(np.isnan(y[:, 1]), np.nan, 0.0)  # label 1: no positives anywhere
    no_pos_0 = y[:, 0] != 1  # subgroup where label 0 has no positives
    groups = {"nopos0": no_pos_0, "empty": np.zeros(len(s), bool), "one": np.eye(1, len(s))[0] > 0}
    rows = evaluation.evaluate(s, y, np.zeros(5), list("abcde"), groups=groups, n_boot=30, oracle=True,
                      min_positives=10, min_negatives=10)  # fmt: skip
    by = {(r.subgroup, r.label): r for r in rows}
    metric_fields = [
        f"{m}{sfx}"
        for m in ("auc", "accuracy", "sensitivity", "specificity", "brier", "ece")
        for sfx in ("", "_lo", "_hi")
    ] + ["oracle_threshold", "oracle_accuracy", "oracle_sensitivity", "oracle_specificity"]
    for key in [("all", "b"), ("nopos0", "a"), ("nopos0", "b"), ("one", "a"), ("empty", "c")]:
        r = by[key]
        assert all(getattr(r, f) is None for f in metric_fields), key
        assert r.null_reason and r.n_labels == 0 and r.ci_df is None
    assert by["nopos0", "a"].n_pos == 0 and by["nopos0", "a"].n > 0
    assert by["nopos0", "a"].null_reason == "0 positive image(s), fewer than min_positives = 10"
    assert by["empty", "c"].null_reason == "no image with a known label"
    assert by["empty", "macro"].n == 0 and by["empty", "macro"].auc is None
    assert by["empty", "macro"].null_reason.startswith(
        "no label has >= 10 positive and >= 10 negative"
    )
    # "d" (3% prevalence) has fewer than 10 positives even in the whole set
    assert by["all", "d"].n_pos < 10 and by["all", "d"].auc is None
    # macro is the mean over the labels that qualify, not a 0.5 for the others
    ok = [lab for lab in "abcde" if by["nopos0", lab].auc is not None]
    assert by["nopos0", "macro"].n_labels == len(ok) >= 2
    assert by["nopos0", "macro"].auc == pytest.approx(np.mean([by["nopos0", k].auc for k in ok]))
    for r in rows:  # never NaN: undefined is None
        assert not any(isinstance(v, float) and math.isnan(v) for v in r.as_dict().values())
    # by default (both classes present, the rule before the minimums) "d" has an AUC
    assert evaluation.evaluate(s, y, np.zeros(5), list("abcde"), n_boot=0)[3].auc is not None


def test_evaluate_deterministic():
    s, y = _data(n=500, seed=10)
    groups = evaluation.subgroup_masks(np.array(["F", "M", "U"] * 166 + ["F", "M"]), np.linspace(1, 99, 500))
    kw = dict(groups=groups, n_boot=40, seed=3)
    a = evaluation.evaluate(s, y, np.zeros(5), list("abcde"), **kw)
    b = evaluation.evaluate(s, y, np.zeros(5), list("abcde"), **kw)
    assert a == b
    # the jackknife draws nothing: the seed of the bootstrap era changes nothing
    assert a == evaluation.evaluate(s, y, np.zeros(5), list("abcde"), groups=groups, n_boot=40, seed=4)


def test_subgroup_masks():
    sex = np.array(["F", "M", "U", "f", "M", None], dtype=object)
    age = np.array([10.0, 40.0, np.nan, 69.9, 70.0, 120.0])
    g = evaluation.subgroup_masks(sex, age)
    assert list(g) == ["sex=F", "sex=M", "age=[0,40)", "age=[40,70)", "age=[70,inf)"]
    np.testing.assert_array_equal(g["sex=F"], [1, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(g["sex=M"], [0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(g["age=[0,40)"], [1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(g["age=[40,70)"], [0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(g["age=[70,inf)"], [0, 0, 0, 0, 1, 1])
    assert all(v.dtype == bool for v in g.values())
    g2 = evaluation.subgroup_masks(sex, age, age_bins=(0, 40.5, 100))
    assert list(g2)[2:] == ["age=[0,40.5)", "age=[40.5,100)"]


# --------------------------------------------------------------------------- paired


def test_paired_identical_models():
    s, y = _data(n=600, seed=11)
    res = evaluation.paired_auc_difference(s, s.copy(), y, label_names=list("abcde"))
    assert [r.label for r in res] == [*"abcde", "macro"]
    for r in res:
        assert r.delta == 0.0 and r.delta_lo == 0.0 and r.delta_hi == 0.0
        assert r.p_value == 1.0


def test_paired_clearly_better_model():
    rng = np.random.default_rng(12)
    s, y = _data(n=600, seed=12)
    worse = s + rng.normal(scale=3.0, size=s.shape)
    clusters = _clusters(600, seed=5)
    res = evaluation.paired_auc_difference(s, worse, y, clusters=clusters)
    ja, jb = resampling.jackknife_auc(s, y, clusters), resampling.jackknife_auc(worse, y, clusters)
    for j, r in enumerate(res[:-1]):
        assert r.delta == pytest.approx(M.auc(s[:, j], y[:, j]) - M.auc(worse[:, j], y[:, j]))
        assert r.n == int((~np.isnan(y[:, j])).sum())
        if r.delta is not None:  # the paired variance: the difference of leave-one-out AUCs
            t = I.infer_t(r.delta, I.jackknife_variance(ja.loo[j] - jb.loo[j]),
                          min(ja.df[j], jb.df[j]), ci=0.95)  # fmt: skip
            assert (r.delta_lo, r.delta_hi, r.p_value) == pytest.approx((t.lo, t.hi, t.p_value))
    macro = res[-1]
    assert macro.delta > 0.1 and macro.delta_lo > 0 and macro.p_value < 1e-6
    flipped = evaluation.paired_auc_difference(worse, s, y, clusters=clusters)[-1]
    assert flipped.delta == pytest.approx(-macro.delta)
    assert flipped.p_value == pytest.approx(macro.p_value)


def test_paired_degenerate_label_is_none():
    s, y = _data(n=200, n_lab=2, seed=13)
    y[:, 0] = np.where(np.isnan(y[:, 0]), np.nan, 1.0)
    res = evaluation.paired_auc_difference(s, -s, y)
    assert res[0].delta is None and res[0].p_value is None and res[0].delta_lo is None
    assert res[-1].delta == pytest.approx(res[1].delta)


# --------------------------------------------------------------------------- t test


def test_paired_t_test_known_values():
    t, p = evaluation.paired_t_test([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0])
    assert t == pytest.approx(2.5 / (1.2909944487358056 / 2), rel=1e-12)
    assert p == pytest.approx(0.030466, abs=2e-6)
    # sign symmetry and NaN/None handling
    t2, p2 = evaluation.paired_t_test([0, 0, 0, 0, None], [1, 2, 3, 4, 7])
    assert t2 == pytest.approx(-t) and p2 == pytest.approx(0.030466, abs=2e-6)
    assert all(math.isnan(v) for v in evaluation.paired_t_test([1.0], [0.0]))
    assert all(math.isnan(v) for v in evaluation.paired_t_test([], []))
    assert evaluation.paired_t_test([1, 2, 3], [0, 1, 2]) == (math.inf, 0.0)
    assert all(math.isnan(v) for v in evaluation.paired_t_test([1, 2, 3], [1, 2, 3]))


def test_membership_inference_separates_and_respects_fpr():
    rng = np.random.default_rng(0)
    members = rng.exponential(0.2, 2000)  # lower losses
    nonmembers = rng.exponential(1.0, 2000)
    auc_, tpr = M.membership_inference(members, nonmembers)
    labels = np.r_[np.ones(2000), np.zeros(2000)]
    assert auc_ == pytest.approx(roc_auc_score(labels, -np.r_[members, nonmembers]), abs=1e-12)
    assert auc_ > 0.75 and 0 < tpr < 1
    # the threshold admits at most 1% of non-members
    allowed = int(0.01 * 2000)
    threshold = np.sort(-nonmembers)[::-1][allowed]
    assert np.mean(-nonmembers > threshold) <= 0.01
    same_auc, _ = M.membership_inference(nonmembers[:1000], nonmembers[1000:])
    assert abs(same_auc - 0.5) < 0.05  # no leakage when members look like non-members
    assert M.membership_inference(np.array([]), nonmembers) == (None, None)


def test_per_image_bce_ignores_masked_labels():
    probs = np.array([[0.9, 0.5], [0.1, 0.2]])
    labels = np.array([[1.0, np.nan], [0.0, 1.0]])
    out = M.per_image_bce(probs, labels)
    assert out[0] == pytest.approx(-np.log(0.9))
    assert out[1] == pytest.approx((-np.log(0.9) - np.log(0.2)) / 2)


# --------------------------------------------------------------------------- patients, macro


def test_evaluate_leaves_out_the_patients_of_each_subgroup():
    s, y = _data(n=800, seed=17)
    clusters = _clusters(800, seed=4)
    f = np.isin(clusters % 2, [1])  # an arbitrary subgroup of images
    rows = evaluation.evaluate(s, y, np.zeros(5), list("abcde"), groups={"g": f}, n_boot=1,
                      clusters=clusters)  # fmt: skip
    by = {(r.subgroup, r.label): r for r in rows}
    jk_g = resampling.jackknife_auc(s[f], y[f], clusters[f])
    assert jk_g.loo.shape[1] == np.unique(clusters[f]).size  # the subgroup's own patients
    lo, hi = I.level_interval(jk_g.point[1], I.jackknife_variance(jk_g.loo[1]), jk_g.df[1], 0.95)
    assert (by["g", "b"].auc_lo, by["g", "b"].auc_hi) == (lo, hi)
    assert by["g", "macro"].n_patients == np.unique(clusters[f]).size
    assert by["all", "macro"].n_patients == np.unique(clusters).size
    known_a = ~np.isnan(y[:, 0])
    assert by["all", "a"].n_patients == np.unique(clusters[known_a]).size
    assert {r.resampling_unit for r in rows} == {"patient"}
    with pytest.raises(ValueError):
        evaluation.evaluate(s, y, np.zeros(5), list("abcde"), clusters=clusters.astype(float))


def test_macro_uses_a_fixed_label_set():
    rng = np.random.default_rng(18)
    n_pat, per = 120, 4
    clusters = np.repeat(np.arange(n_pat), per)
    y = (rng.random((n_pat * per, 3)) < 0.3).astype(float)
    y[:, 2] = 0.0
    y[:12, 2] = 1.0  # label 2: 12 positives in 3 patients
    s = y + rng.normal(size=y.shape)
    rows = evaluation.evaluate(s, y, np.zeros(3), ["x", "z", "rare"], n_boot=1, clusters=clusters)
    by = {r.label: r for r in rows}
    macro = by["macro"]
    assert macro.n_labels == 3
    assert macro.auc == pytest.approx(np.mean([by[k].auc for k in ("x", "z", "rare")]))
    # the macro's interval rests on the mean of the labels' leave-one-out AUCs: 3 labels always
    jk = resampling.jackknife_auc(s, y, clusters)
    df = evaluation.macro_df(np.array([I.jackknife_variance(v) for v in jk.loo]), jk.df, n_pat)
    assert (macro.auc_lo, macro.auc_hi) == I.level_interval(
        macro.auc, I.jackknife_variance(jk.loo.mean(axis=0)), df, 0.95)  # fmt: skip
    assert "approximate CI: 3 patient(s)" in by["rare"].ci_note and by["x"].ci_note is None
    # with a higher minimum the rare label leaves the set: null with a reason, macro of two
    strict = {r.label: r for r in evaluation.evaluate(s, y, np.zeros(3), ["x", "z", "rare"], n_boot=50,
                                             clusters=clusters, min_positives=13)}  # fmt: skip
    assert strict["rare"].auc is None and "min_positives = 13" in strict["rare"].null_reason
    assert strict["macro"].n_labels == 2
    # the patient is the unit that counts: 12 positive images are 3 positive patients
    by_patient = {
        r.label: r
        for r in evaluation.evaluate(
            s, y, np.zeros(3), ["x", "z", "rare"], n_boot=50, clusters=clusters, min_positives=4
        )
    }
    assert by_patient["rare"].null_reason == "3 positive patient(s), fewer than min_positives = 4"
    by_image = {r.label: r for r in evaluation.evaluate(s, y, np.zeros(3), ["x", "z", "rare"], n_boot=50,
                                               min_positives=4)}  # fmt: skip
    assert by_image["rare"].auc is not None  # by image (no patient groups) it had 12
    assert strict["macro"].auc == pytest.approx((strict["x"].auc + strict["z"].auc) / 2)


def test_calibration_matches_direct_computation():
    rng = np.random.default_rng(19)
    y = (rng.random((500, 2)) < 0.3).astype(float)
    p = np.clip(0.3 + 0.4 * y + rng.normal(scale=0.15, size=y.shape), 0, 1)
    y[:20, 1] = np.nan
    brier, ece = thresholds.calibration(p, y, bins=10)
    for j in range(2):
        k = ~np.isnan(y[:, j])
        pj, yj = p[k, j], y[k, j]
        assert brier[j] == pytest.approx(np.mean((pj - yj) ** 2), rel=1e-12)
        which = np.minimum((pj * 10).astype(int), 9)
        direct = sum(abs(yj[which == b].sum() - pj[which == b].sum()) for b in range(10))
        assert ece[j] == pytest.approx(direct / k.sum(), rel=1e-12)
    n, tot, pos = thresholds.reliability_bins(p, y, bins=10)
    assert n.sum(axis=1).tolist() == [500, 480] and pos.sum() == np.nansum(y)
    assert tot.sum() == pytest.approx(p[:, 0].sum() + p[20:, 1].sum())
    nan_b, nan_e = thresholds.calibration(p * 3, y)  # not probabilities: undefined, not wrong
    assert np.isnan(nan_b).all() and np.isnan(nan_e).all()
    rows = evaluation.evaluate(p, y, [0.5, 0.5], ["u", "v"], n_boot=100, seed=2)
    assert rows[0].brier == pytest.approx(brier[0]) and rows[0].ece == pytest.approx(ece[0])
    assert rows[0].brier_lo <= rows[0].brier <= rows[0].brier_hi
    assert rows[0].ece_lo is None and rows[0].ece_hi is None  # biased plug-in: point only
    assert rows[-1].brier == pytest.approx(brier.mean())


def test_module_defaults_agree_with_the_grid():
    ev = EvaluationConfig()
    assert (ev.min_positives, ev.min_negatives) == (M.MIN_POSITIVES, M.MIN_NEGATIVES)
    assert ev.calibration_bins == M.CALIBRATION_BINS
