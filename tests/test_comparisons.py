"""DP-vs-non-DP comparisons from real trial folders, written through the trial store.

``conftest.build_output`` writes finished trials (spec, ledger, model, evaluations with patient
groups) from synthetic scores, so the tests need no training, no Ray and no earlier sweep.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from helpers import folders
from helpers.trials import AGE_BINS, EV, build_output, make_testset, scores_for, write_trial
from scipy import stats

from privdom_ray import atomic, report
from privdom_ray.manifest import LABELS
from privdom_ray.stats import (
    comparisons,
    evaluation,
    inference,
    metrics,
    quantities,
    resampling,
    results,
)
from privdom_ray.stats.quantities import ComparisonWarning
from privdom_ray.store import EvalRecord


def compute(output: Path, keys: list[str], **kw) -> pd.DataFrame:
    return comparisons.compute(output, keys, EV, **kw)


def eval_of(output: Path, source: str, epsilon: str, target: str, seed: int = 0) -> EvalRecord:
    """The evaluation of trial (source, epsilon, seed) on ``target`` (read through the store)."""
    key = folders.find(output, source, float(epsilon), seed)
    return folders.evaluation(output, key, target, f"fp{target}")


def read_eval(ev: EvalRecord) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(scores, labels, predictions frame) of one evaluation."""
    df = ev.predictions()
    s = df[[f"score_{lab}" for lab in LABELS]].to_numpy(np.float64)
    y = df[[f"label_{lab}" for lab in LABELS]].to_numpy(np.float64)
    return s, y, df


@pytest.fixture(scope="module")
def _three_sites(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("three")
    return folder, compute(folder, build_output(folder))


@pytest.fixture(scope="module")
def _two_sites(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("two")
    return folder, compute(folder, build_output(folder, domains=("a", "b"), n=200))


@pytest.fixture
def three_sites(_three_sites) -> tuple[Path, pd.DataFrame]:
    """``build_output``'s default finished sweep (sites a, b, c), built once for the module
    (tests only read it), and a fresh copy of its comparisons table."""
    folder, df = _three_sites
    return folder, df.copy()


@pytest.fixture
def two_sites(_two_sites) -> tuple[Path, pd.DataFrame]:
    """Sites a and b with 200 test images each, built once for the module (tests only read
    it), and a fresh copy of its comparisons table."""
    folder, df = _two_sites
    return folder, df.copy()


def one(df: pd.DataFrame, **where) -> pd.Series:
    sel = df
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, (where, len(sel))
    return sel.iloc[0]


def macro_jack(s: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[float, np.ndarray, float]:
    """Macro AUC over the fixed label set, its leave-one-patient-out values and df, computed
    with metrics directly."""
    jk = resampling.jackknife_auc(s, y, groups)
    ok = metrics.label_support(y, EV.min_positives, EV.min_negatives, groups).ok
    var = np.array([inference.jackknife_variance(jk.loo[j]) for j in np.flatnonzero(ok)])
    df = evaluation.macro_df(var, jk.df[ok], jk.loo.shape[1])
    return float(jk.point[ok].mean()), jk.loo[ok].mean(axis=0), df


# ------------------------------------------------------------------------------ paired delta


def test_identical_models_give_zero_delta_p_one_and_equivalence(tmp_path):
    test = make_testset(200, seed=1)
    s = scores_for(test, 1.0, seed=2)
    keys = [
        write_trial(tmp_path, source="a", epsilon=eps, seed=0, evals={"a": ("fpa", test, s)})
        for eps in (1.0, math.inf)
    ]
    df = compute(tmp_path, keys)
    rows = df[(df["comparison"] == "paired_delta") & (df["quantity"] == "delta_auc")]
    assert len(rows) == (len(LABELS) + 1) * 6  # 5 labels + macro, "all" + 5 subgroups
    defined = rows[rows["delta"].notna()]
    assert len(defined) > 15
    assert (defined["delta"] == 0).all() and (defined["p_value"] == 1.0).all()
    assert (defined["delta_lo"] == 0).all() and (defined["delta_hi"] == 0).all()
    assert (defined["value_dp"] == defined["value_nondp"]).all()
    # every leave-one-out difference is 0: the variance is 0, equivalence is shown
    assert (defined["p_tost"] == 0).all() and (defined["margin_confirmable"] == 0).all()
    assert (defined["verdict"] == "equivalent within ±m").all()
    assert (defined["margin"] == EV.equivalence_margin).all()
    assert (defined["resampling_unit"] == "patient").all()
    assert (defined["test"] == "paired patient jackknife t (the same patients left out for "
                               "every model)").all()  # fmt: skip


def test_clearly_better_dp_model_is_different(tmp_path):
    test = make_testset(300, seed=3)
    keys = [
        write_trial(
            tmp_path,
            source="a",
            epsilon=eps,
            seed=0,
            evals={"a": ("fpa", test, scores_for(test, strength, seed=int(strength * 10)))},
        )
        for eps, strength in ((2.0, 3.0), (math.inf, 0.3))
    ]
    df = compute(tmp_path, keys)
    row = one(df, comparison="paired_delta", quantity="delta_auc", label="macro", subgroup="all")
    assert row["epsilon"] == 2.0 and row["on_domain"] and row["source"] == row["target"] == "a"
    assert row["delta"] > 0.2 and row["delta_lo"] > 0
    assert row["delta_hi"] >= row["delta"] >= row["delta_lo"]
    assert row["p_value"] < 1e-6 and row["df"] > 10
    assert row["verdict"] == "different" and row["worse_if"] == "lower"
    assert row["delta"] == pytest.approx(row["value_dp"] - row["value_nondp"], abs=1e-12)
    assert row["epsilon_spent"] == pytest.approx(1.98) and row["accountant"] == "prv"
    assert row["n"] == 300 and row["q_family"] == "paired_delta, delta_auc"
    assert row["n_patients"] == int(test["group"].max()) + 1


def test_paired_delta_equals_metrics_paired_auc_difference(two_sites):
    """The same patients left out for both models give exactly what
    evaluation.paired_auc_difference gives (label rows; "all" and the sexes also for the macro,
    whose label set is the same there)."""
    tmp_path, df = two_sites
    sa, y, pred = read_eval(eval_of(tmp_path, "a", "1", "b"))
    sb, _, _ = read_eval(eval_of(tmp_path, "a", "inf", "b"))
    groups = pred["patient_group"].to_numpy()
    masks = {"all": np.ones(len(y), bool)}
    masks.update(evaluation.subgroup_masks(pred["sex"], pred["age"], AGE_BINS))
    for g in ("all", "sex=F", "age=[40,70)"):
        m = masks[g]
        expect = evaluation.paired_auc_difference(
            sa[m], sb[m], y[m], 0.95, label_names=LABELS, clusters=groups[m],
            min_positives=EV.min_positives, min_negatives=EV.min_negatives,
        )  # fmt: skip
        for res in expect:
            row = one(df, comparison="paired_delta", quantity="delta_auc", source="a",
                      target="b", subgroup=g, label=res.label)  # fmt: skip
            if res.label == "macro" and g.startswith("age"):
                # cardiomegaly has no positive under 40: every age bin averages the 4 others
                assert row["n_labels"] == len(LABELS) - 1
                continue
            assert (row["n"], row["n_pos"]) == (res.n, res.n_pos)
            if res.delta is None:
                assert pd.isna(row["delta"]) and pd.isna(row["p_value"])
                continue
            assert row["delta"] == pytest.approx(res.delta, abs=1e-15)
            assert row["p_value"] == pytest.approx(res.p_value, rel=1e-9)
            assert (row["delta_lo"], row["delta_hi"]) == pytest.approx((res.delta_lo, res.delta_hi))
            assert row["df"] == pytest.approx(res.df)


def test_model_cis_are_the_transfer_tables_cis(two_sites):
    """Every model's AUC CI in a comparison row is the one evaluation.evaluate wrote for the
    transfer table: same patients left out, same label sets, same t rule."""
    tmp_path, df = two_sites
    rows = df[(df["comparison"] == "paired_delta") & (df["quantity"] == "delta_auc")]
    checked = 0
    for side, eps in (("dp", "1"), ("nondp", "inf")):
        for (source, target), sel in rows.groupby(["source", "target"]):
            mt = eval_of(tmp_path, source, eps, target).metrics()
            merged = sel.merge(mt, on=["label", "subgroup"])
            assert len(merged) == len(sel)
            for col, ref in (("", "auc"), ("_lo", "auc_lo"), ("_hi", "auc_hi")):
                got, want = merged[f"value_{side}{col}"], merged[ref]
                assert (got.isna() == want.isna()).all()
                np.testing.assert_allclose(got[got.notna()], want[want.notna()], rtol=1e-12)
            checked += int(merged["auc_lo"].notna().sum())
    assert checked > 40


# ------------------------------------------------------------------------------ AUC drop


def test_auc_drop_equals_hand_computation(three_sites):
    tmp_path, df = three_sites

    def auc(source, target, eps, label="macro"):
        mt = eval_of(tmp_path, source, eps, target).metrics()
        return float(one(mt, label=label, subgroup="all")["auc"])

    domains = ("a", "b", "c")
    for label in ("macro", LABELS[1]):
        for t in domains:
            off = [s for s in domains if s != t]
            on_ = {e: auc(t, t, e, label) for e in ("1", "inf")}
            off_ = {e: np.mean([auc(s, t, e, label) for s in off]) for e in ("1", "inf")}
            drop = {e: on_[e] - off_[e] for e in ("1", "inf")}
            common = {"comparison": "auc_drop", "target": t, "label": label, "subgroup": "all"}
            r_inf = one(df, **common, quantity="drop", epsilon=math.inf)
            r_dp = one(df, **common, quantity="drop", epsilon=1.0)
            r_on = one(df, **common, quantity="on_domain_auc", epsilon=1.0)
            r_off = one(df, **common, quantity="off_domain_auc", epsilon=1.0)
            assert r_inf["value_nondp"] == pytest.approx(drop["inf"], abs=1e-12)
            assert pd.isna(r_inf["value_dp"]) and pd.isna(r_inf["delta"])
            # each side's OWN drop: DP's on-domain AUC minus DP's off-domain mean
            assert r_dp["value_dp"] == pytest.approx(drop["1"], abs=1e-12)
            assert r_dp["value_nondp"] == pytest.approx(drop["inf"], abs=1e-12)
            assert r_dp["delta"] == pytest.approx(drop["1"] - drop["inf"], abs=1e-12)
            assert r_on["delta"] == pytest.approx(on_["1"] - on_["inf"], abs=1e-12)
            assert r_off["delta"] == pytest.approx(off_["1"] - off_["inf"], abs=1e-12)
            assert r_dp["delta"] == pytest.approx(r_on["delta"] - r_off["delta"], abs=1e-12)
            assert r_off["value_dp"] == pytest.approx(r_dp["auc_off_mean"], abs=1e-12)
            for r in (r_dp, r_on, r_off):
                assert r["n_off"] == 2 and pd.isna(r["source"]) and pd.isna(r["on_domain"])
                assert r["value_dp_lo"] <= r["value_dp"] <= r["value_dp_hi"]
                assert r["verdict"] in {"equivalent within ±m", "different", "non-inferior",
                                        "inconclusive"}  # fmt: skip
            assert r_dp["worse_if"] == "higher" and r_on["worse_if"] == r_off["worse_if"] == "lower"
            assert r_dp["auc_on"] == pytest.approx(on_["1"], abs=1e-12)
            assert r_dp["auc_off_mean"] == pytest.approx(off_["1"], abs=1e-12)
            assert 0 < r_dp["p_value"] <= 1
    # one seed: no across_seeds rows; the per-seed rows are the summaries
    assert not (df["comparison"] == "across_seeds").any() and df["is_summary"].all()
    assert "drop_vs_nondp_ondomain" not in set(df["quantity"])


def test_drop_difference_is_inferred_from_leave_one_patient_out_drops(three_sites):
    """All terms of a test site's drop are AUCs on that site's patients: the difference's
    interval is the t interval of the same combination of their leave-one-out AUCs."""
    tmp_path, df = three_sites
    t = "b"
    parts = {}
    for src in ("a", "b", "c"):
        for eps in ("1", "inf"):
            s, y, pred = read_eval(eval_of(tmp_path, src, eps, t))
            parts[src, eps] = macro_jack(s, y, pred["patient_group"].to_numpy())

    def drop(eps):
        on, off = parts["b", eps], [parts["a", eps], parts["c", eps]]
        loo = on[1] - (off[0][1] + off[1][1]) / 2
        return on[0] - (off[0][0] + off[1][0]) / 2, loo, min(on[2], off[0][2], off[1][2])

    (d1, l1, f1), (d0, l0, f0) = drop("1"), drop("inf")
    want = inference.infer_t(d1 - d0, inference.jackknife_variance(l1 - l0), min(f1, f0),
                             ci=0.95, margin=EV.equivalence_margin, worse_if="higher")  # fmt: skip
    row = one(df, endpoint="primary", target=t)
    assert row["delta"] == pytest.approx(want.estimate, abs=1e-12)
    assert (row["delta_lo"], row["delta_hi"], row["tost_lo"], row["tost_hi"]) == pytest.approx(
        (want.lo, want.hi, want.tost_lo, want.tost_hi), abs=1e-12)  # fmt: skip
    assert row["p_tost"] == pytest.approx(want.p_tost) and row["df"] == pytest.approx(want.df)
    assert row["margin_confirmable"] == pytest.approx(max(-want.tost_lo, want.tost_hi))
    assert row["tost_half_width"] == pytest.approx((want.tost_hi - want.tost_lo) / 2)


def test_primary_endpoint_holm_per_site_iut_every_site_and_bh_families(three_sites):
    tmp_path, df = three_sites
    primary = df[df["endpoint"] == "primary"]
    assert len(primary) == 3  # one per test site (one DP epsilon, one model)
    assert set(primary["quantity"]) == {"drop"}
    assert set(primary["label"]) == {"macro"} and set(primary["subgroup"]) == {"all"}
    primary = primary.sort_values("target")
    alpha = inference.alpha_of(EV.ci)
    for col in ("p_tost", "p_value", "p_noninf"):  # every p a per-site verdict can rest on
        assert primary[f"{col}_holm"].tolist() == inference.holm(primary[col].tolist())
        assert df.loc[df["endpoint"] != "primary", f"{col}_holm"].isna().all()
    for _, r in primary.iterrows():  # the verdict reads the adjusted p's, first match wins
        expected = (
            "equivalent within ±m" if r["p_tost_holm"] <= alpha
            else "different" if r["p_value_holm"] <= alpha
            else "non-inferior" if r["p_noninf_holm"] <= alpha
            else "inconclusive"
        )  # fmt: skip
        assert r["verdict"] == expected
    # every site at once: the intersection-union test, the largest unadjusted TOST p
    assert (primary["p_tost_iut"] == primary["p_tost"].max()).all()
    assert (primary["n_sites"] == 3).all() and primary["q_value"].isna().all()
    # exploratory: BH within (comparison, quantity), across labels, subgroups, sites, eps
    explo = df[(df["endpoint"] == "exploratory") & df["p_value"].notna()]
    for fam, rows in explo.groupby("q_family"):
        comparison, quantity = fam.split(", ")
        assert (rows["comparison"] == comparison).all() and (rows["quantity"] == quantity).all()
        assert rows["q_value"].tolist() == pytest.approx(inference.bh(rows["p_value"].tolist()))
        want = [math.nan if v is None else v for v in inference.bh(rows["p_tost"].tolist())]
        assert rows["q_tost"].tolist() == pytest.approx(want, nan_ok=True)
    fam = explo[explo["q_family"] == "paired_delta, delta_auc"]
    assert fam["label"].nunique() == len(LABELS) + 1 and fam["subgroup"].nunique() >= 5
    for _, r in fam.iterrows():  # the exploratory verdicts read the q-values
        want = inference.verdict(inference.Inference(
            r["delta"], r["delta_lo"], r["delta_hi"], r["q_value"], 0, r["margin"], r["worse_if"],
            r["tost_lo"], r["tost_hi"], r["q_tost"], r["q_noninf"]), alpha)  # fmt: skip
        assert r["verdict"] == want
    assert ((fam["verdict"] == "different") <= (fam["q_value"] <= alpha)).all()


def _strength(auc: float) -> float:
    """The score separation of conftest.scores_for that gives a model this AUC: scores are
    strength * y + a patient error (SD 0.7) + an image error (SD 1), so a random positive
    beats a random negative of another patient with probability Phi(strength / sqrt(2 x
    1.49))."""
    return float(stats.norm.ppf(auc) * math.sqrt(2 * 1.49))


def _scenario(tmp_path, dp_cost_on: float, dp_cost_off: float):
    """Three sites; non-DP AUC 0.85 on-domain and 0.75 off-domain; DP loses the given AUC
    on- and off-domain. DP and non-DP models of a source share their noise (one draw), so
    the comparison isolates the cost."""

    def strength(source, target, eps, seed):
        base = 0.85 if source == target else 0.75
        if math.isfinite(eps):
            base -= dp_cost_on if source == target else dp_cost_off
        return _strength(base)

    keys = build_output(tmp_path, n=900, strength=strength, share_noise=True)
    _, _ = results.aggregate(tmp_path, keys, "scenario")
    tables = comparisons.compute_all(tmp_path, keys, EV)
    comparisons.write_all(tmp_path, tables)
    return tables.comparisons, report.write_report(tmp_path, figures=False)


@pytest.mark.slow
def test_the_primary_endpoint_measures_the_drop_not_the_off_domain_cost(tmp_path):
    """Finding 1 of the statistics review, both ways. DP costs 0.04 AUC everywhere: each
    side's own drop is unchanged, so DP costs nothing in transfer (equivalent), while the
    off-domain cost alone (the old primary quantity) says DP is worse. DP costs 0.04
    on-domain only: DP's own drop is 0.04 smaller (different), which the off-domain cost
    alone would have called equivalent."""
    everywhere, md = _scenario(tmp_path / "everywhere", 0.04, 0.04)
    primary = everywhere[everywhere["endpoint"] == "primary"]
    assert len(primary) == 3 and (primary["delta"].abs() < 0.01).all()
    assert (primary["verdict"] == "equivalent within ±m").all()
    assert (primary["p_tost_iut"] <= 0.05).all()  # equivalent at every site at once
    off = everywhere[(everywhere["quantity"] == "off_domain_auc") & (everywhere["label"] == "macro")
                     & (everywhere["subgroup"] == "all")]  # fmt: skip
    assert (off["delta"] < -0.03).all() and (off["verdict"] == "different").all()
    assert "### Primary: ε = 1 vs non-DP" in md and "Δdrop [90% CI]" in md
    assert "on-domain ΔAUC (cost) [95% CI]" in md and "off-domain ΔAUC (cost) [95% CI]" in md
    assert "**equivalent within ±0.02 at every site**" in md
    assert "| AUC drop, drop(DP) vs drop(non-DP) |" in md
    assert "equivalent within ±0.02" in md.split("## 2.")[0]

    home, md = _scenario(tmp_path / "home", 0.04, 0.0)
    primary = home[home["endpoint"] == "primary"]
    assert (primary["delta"] < -0.025).all()
    assert (primary["verdict"] == "different").all()
    assert "different (DP's drop smaller)" in md and "at every site**" not in md
    assert "not shown" in md.split("## 2.")[0]
    off = home[(home["quantity"] == "off_domain_auc") & (home["label"] == "macro")
               & (home["subgroup"] == "all")]  # fmt: skip
    assert (off["delta"].abs() < 0.01).all()  # the old quantity saw nothing


# ------------------------------------------------------------------------------ seeds


def test_across_seeds_pools_the_seeds_with_a_t_interval_and_a_secondary_t_test(tmp_path):
    seeds = (0, 1, 2)
    keys = build_output(tmp_path, domains=("a", "b"), seeds=seeds, n=160)
    df = compute(tmp_path, keys)
    where = {"source": "a", "target": "b", "label": "macro", "subgroup": "all", "epsilon": 1.0}
    per_seed = df[(df["comparison"] == "paired_delta") & (df["quantity"] == "delta_auc")]
    for k, v in where.items():
        per_seed = per_seed[per_seed[k] == v]
    assert sorted(per_seed["seed"]) == [0, 1, 2] and not per_seed["is_summary"].any()
    # by hand: per-seed paired macro deltas with their leave-one-out values, then pooled
    deltas, x, y, dfs = [], [], [], []
    for seed in seeds:
        sa, lab, pred = read_eval(eval_of(tmp_path, "a", "1", "b", seed))
        sb, _, _ = read_eval(eval_of(tmp_path, "a", "inf", "b", seed))
        groups = pred["patient_group"].to_numpy()
        (pa_, la, fa), (pb_, lb, fb) = macro_jack(sa, lab, groups), macro_jack(sb, lab, groups)
        deltas.append(la - lb)
        x.append(pa_)
        y.append(pb_)
        dfs.append(min(fa, fb))
    x, y = np.array(x), np.array(y)
    pooled = inference.pool_seeds(x - y, np.stack(deltas), ci=0.95, margin=EV.equivalence_margin,
                                  worse_if="lower", jackknife=True, df_test=min(dfs))  # fmt: skip
    row = one(df, comparison="across_seeds", quantity="delta_auc", **where)
    assert row["is_summary"] and row["n_seeds"] == 3 and pd.isna(row["seed"])
    assert row["test"].startswith("t interval over seeds")
    assert row["delta"] == pytest.approx((x - y).mean(), abs=1e-12)
    assert (row["delta_lo"], row["delta_hi"]) == pytest.approx((pooled.lo, pooled.hi), abs=1e-12)
    assert row["p_value"] == pytest.approx(pooled.p_value, abs=1e-12)
    assert row["p_tost"] == pytest.approx(pooled.p_tost, abs=1e-12)
    assert row["value_dp"] == pytest.approx(x.mean()) and row["sd_dp"] == pytest.approx(
        x.std(ddof=1)
    )
    assert row["delta_sd"] == pytest.approx((x - y).std(ddof=1))
    t, p = evaluation.paired_t_test(x, y)
    assert row["t_stat"] == pytest.approx(t) and row["p_t"] == pytest.approx(p)
    assert "CONDITIONAL on this test set" in quantities.COLUMNS["p_t"][1]
    # the seed level widens the interval compared with any one seed's patient-only CI
    assert (
        row["delta_hi"] - row["delta_lo"]
        >= 0.5 * (per_seed["delta_hi"] - per_seed["delta_lo"]).min()
    )
    nondp = one(
        df, comparison="across_seeds", quantity="drop", target="a", label="macro",
        subgroup="all", epsilon=math.inf,
    )  # fmt: skip
    assert nondp["n_seeds"] == 3 and pd.isna(nondp["delta"]) and nondp["value_nondp_lo"] < 1
    primary = df[df["endpoint"] == "primary"]
    assert set(primary["comparison"]) == {"across_seeds"} and (primary["n_seeds"] == 3).all()


# ------------------------------------------------------------------------------ fairness


def test_fairness_gaps_leave_out_patients_jointly_across_subgroups(tmp_path):
    keys = build_output(tmp_path, domains=("a", "b"), n=300)
    df = compute(tmp_path, keys)
    s_dp, y, pred = read_eval(eval_of(tmp_path, "b", "1", "a"))
    s_nd, _, _ = read_eval(eval_of(tmp_path, "b", "inf", "a"))
    masks = evaluation.subgroup_masks(pred["sex"], pred["age"], AGE_BINS)
    codes, p = metrics.cluster_codes(pred["patient_group"].to_numpy(), len(y))
    f, m = masks["sex=F"], masks["sex=M"]
    ok = (
        metrics.label_support(y[f], EV.min_positives, EV.min_negatives, codes[f]).ok
        & metrics.label_support(y[m], EV.min_positives, EV.min_negatives, codes[m]).ok
    )

    def gap(s):
        sides = []
        for mask in (f, m):  # leave-one-out over ALL the test set's patients
            jk = resampling.jackknife_auc(s[mask], y[mask], codes[mask], n_units=p)
            sides.append((jk.point[ok].mean(), jk.loo[ok].mean(axis=0)))
        return sides[0][0] - sides[1][0], sides[0][1] - sides[1][1]

    (g_dp, l_dp), (g_nd, l_nd) = gap(s_dp), gap(s_nd)
    row = one(df, comparison="fairness_gap", quantity="auc_gap_sex", source="b", target="a",
              epsilon=1.0)  # fmt: skip
    assert row["subgroup"] == "sex=F - sex=M" and row["label"] == "macro"
    assert row["value_dp"] == pytest.approx(g_dp, abs=1e-12)
    assert row["value_nondp"] == pytest.approx(g_nd, abs=1e-12)
    var_dp, var_d = inference.jackknife_variance(l_dp), inference.jackknife_variance(l_dp - l_nd)
    half = (row["value_dp_hi"] - row["value_dp_lo"]) / 2
    assert half == pytest.approx(stats.t.ppf(0.975, row["df"]) * math.sqrt(var_dp), rel=0.3)
    assert (row["delta_hi"] - row["delta_lo"]) / 2 == pytest.approx(
        stats.t.ppf(0.975, row["df"]) * math.sqrt(var_d), rel=1e-9)  # fmt: skip
    assert row["n_labels"] == ok.sum() and pd.isna(row["worse_if"])
    assert row["verdict"] != "non-inferior"  # a gap has no "worse" direction
    # nobody is 70 or older: the age gap is null, and the row says why
    age = df[(df["quantity"] == "auc_gap_age") & (df["target"] == "a")]
    assert age["delta"].isna().all() and age["null_reason"].str.contains("age=").all()


# ------------------------------------------------------------------------------ nulls


def test_subgroups_without_positives_or_members_give_nulls_with_reasons(two_sites):
    tmp_path, df = two_sites
    young = df[(df["subgroup"] == "age=[0,40)") & (df["label"] == LABELS[0])]
    assert len(young) > 0 and (young["n_pos"].dropna() == 0).all()
    value_cols = ["value_dp", "value_nondp", "delta", "delta_lo", "p_value", "verdict"]
    assert young[value_cols].isna().all().all()
    assert (
        young["null_reason"].str.startswith("0 positive patient(s), fewer than min_positives").all()
    )
    old = df[df["subgroup"] == "age=[70,inf)"]
    assert len(old) > 0 and (old["n"].dropna() == 0).all()
    assert old[value_cols + ["auc_on", "auc_off_mean"]].isna().all().all()
    assert old["null_reason"].notna().all()
    # the young macro is still defined, over the labels that qualify there
    row = one(df, comparison="paired_delta", quantity="delta_auc", source="a", target="a",
              label="macro", subgroup="age=[0,40)")  # fmt: skip
    assert 0 < row["n_labels"] < len(LABELS) and not pd.isna(row["p_value"])


def test_old_evaluations_without_patient_groups_resample_images(tmp_path):
    keys = build_output(tmp_path, domains=("a", "b"), n=150, patient_groups=False)
    df = compute(tmp_path, keys)
    assert set(df["resampling_unit"]) == {"image"}
    row = one(df, comparison="paired_delta", quantity="delta_auc", source="a", target="a",
              label="macro", subgroup="all")  # fmt: skip
    assert row["n_patients"] == 150 and row["test"].startswith("paired image jackknife")


def test_domains_without_patient_ids_resample_images(tmp_path):
    """VinDr-like: every image is its own group and eval.json says resampling_unit = image."""
    keys = build_output(tmp_path, domains=("a", "b"), n=150)
    assert folders.reseal_evaluations(tmp_path, resampling_unit="image") == 8
    df = compute(tmp_path, keys)
    assert set(df["resampling_unit"]) == {"image"}
    row = one(df, comparison="paired_delta", quantity="delta_auc", source="b", target="a",
              label="macro", subgroup="all")  # fmt: skip
    assert row["n_patients"] == 150


# ------------------------------------------------------------------------------ tables


def test_tables_are_aggregates_without_paths_or_ids(tmp_path):
    keys = build_output(tmp_path, domains=("a", "b"), n=150)
    tables = comparisons.compute_all(tmp_path, keys, EV)
    paths = comparisons.write_all(tmp_path, tables)
    assert paths == [tmp_path / "comparisons.parquet", tmp_path / "reliability.parquet"]
    table = pq.read_table(paths[0])
    assert table.schema.equals(quantities.SCHEMA)
    assert list(quantities.COLUMNS) == quantities.SCHEMA.names  # every column documented
    assert pq.read_table(paths[1]).schema.equals(quantities.RELIABILITY_SCHEMA)
    forbidden = {"path", "patient_id", "patient_group", "row", "file", "key", "trial_key"}
    for path in paths:
        df = pd.read_parquet(path)
        assert not forbidden & set(df.columns)
        text = df.select_dtypes(exclude="number").astype(str)
        assert not text.apply(lambda c: c.str.contains("/|\\\\|fpa|fpb", regex=True)).any().any()
    assert not list(tmp_path.glob(".*.parquet.*"))  # atomic writes left no temp file
    pd.testing.assert_frame_equal(comparisons.load(tmp_path), pd.read_parquet(paths[0]))
    assert set(tables.comparisons["comparison"]) == {"paired_delta", "auc_drop", "fairness_gap"}
    # the reliability bins add up to the known image-label pairs of each model and target
    rel = comparisons.load_reliability(tmp_path)
    pooled = rel[(rel["label"] == "pooled") & (rel["source"] == "a") & (rel["target"] == "b")]
    _, y, _ = read_eval(eval_of(tmp_path, "a", "1", "b"))
    assert pooled[pooled["epsilon"] == 1.0]["n"].sum() == int((~np.isnan(y)).sum())
    assert rel["observed"].dropna().between(0, 1).all()


def test_reads_only_finished_trials_and_complete_evaluations(tmp_path):
    keys = build_output(tmp_path, domains=("a", "b"), n=120, skip=(("b", 1.0, 0, "a"),))
    test = make_testset(120, seed=10)
    unfinished = write_trial(
        tmp_path,
        source="c",
        epsilon=math.inf,
        seed=0,
        evals={"a": ("fpa", test, scores_for(test, 1.0, 5))},
        done=False,
    )
    # an evaluation the store replaced (kept aside under a hidden name) is never read
    aside = eval_of(tmp_path, "a", "inf", "a").path
    replaced = aside.with_name(f".{aside.name}.replaced-1")
    replaced.mkdir()
    atomic.write_json(replaced / "eval.json", {"target": "a", "fingerprint": "old"})
    with pytest.warns(ComparisonWarning) as caught:
        df = compute(tmp_path, [*keys, unfinished])
    assert [str(w.message) for w in caught if "off-domain sources differ" in str(w.message)]
    assert not [w for w in caught if "several test sets" in str(w.message)]
    assert "c" not in set(df["source"].dropna())
    pairs = df[df["comparison"] == "paired_delta"]
    assert set(zip(pairs["source"], pairs["target"], strict=True)) == {
        ("a", "a"),
        ("a", "b"),
        ("b", "b"),
    }  # b (eps 1) -> a was never completed: no pair, not a fake one
    drop = one(df, comparison="auc_drop", quantity="drop", target="a", epsilon=1.0,
               label="macro", subgroup="all")  # fmt: skip
    assert drop["n_off"] == 0 and pd.isna(drop["value_dp"])  # no off-domain model: kept, missing


def test_mismatched_labels_on_same_fingerprint_are_skipped_with_warning(tmp_path):
    test = make_testset(100, seed=4)
    other = {**test, "y": test["y"].copy()}
    other["y"][:10, 1] = 1.0 - np.nan_to_num(other["y"][:10, 1])
    keys = [
        write_trial(tmp_path, source="a", epsilon=1.0, seed=0,
                    evals={"a": ("fpa", test, scores_for(test, 1.0, 1))}),
        write_trial(tmp_path, source="a", epsilon=math.inf, seed=0,
                    evals={"a": ("fpa", other, scores_for(other, 1.0, 2))}),
    ]  # fmt: skip
    with pytest.warns(ComparisonWarning, match="labels differ"):
        df = compute(tmp_path, keys)
    assert (df["comparison"] != "paired_delta").all()
    assert comparisons.compute(tmp_path, []).empty


def test_equivalence_is_declared_for_identical_models_and_refused_for_costly_transfer(tmp_path):
    """The primary endpoint end to end: DP models identical to their non-DP partners are
    equivalent at every site; DP models whose drop is much larger are not."""
    same = build_output(
        tmp_path / "same", strength=lambda s, t, e, seed: 1.5 if s == t else 1.0, share_noise=True
    )
    df = compute(tmp_path / "same", same)
    primary = df[df["endpoint"] == "primary"]
    assert len(primary) == 3 and (primary["delta"] == 0).all()
    assert (primary["verdict"] == "equivalent within ±m").all()

    def costly(source, target, eps, seed):  # DP transfers badly: costs 0.8 off-domain only
        return (1.5 if source == target else 1.0) - (0.8 if math.isfinite(eps) and
                                                     source != target else 0.0)  # fmt: skip

    worse = build_output(tmp_path / "worse", strength=costly)
    primary = compute(tmp_path / "worse", worse).query("endpoint == 'primary'")
    assert (primary["delta"] > 2 * EV.equivalence_margin).all()
    assert (primary["verdict"] == "different").all()


def test_grid_validates_the_statistics_settings(tmp_path):
    import yaml

    from privdom_ray.config import GridError
    from privdom_ray.grid import load_grid

    grid = {
        "name": "t",
        "output": "out",
        "domains": [{"name": "a", "kind": "synthetic", "root": "data/a", "options": {"site": "a"}}],
        "epsilons": [1, "inf"],
        "seeds": [0],
        "evaluation": {"equivalence_margin": 0.03, "min_positives": 5, "min_negatives": 8},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    ev = load_grid(path).evaluation
    assert (ev.equivalence_margin, ev.min_positives, ev.min_negatives) == (0.03, 5, 8)
    bad = {"equivalence_margin": 0, "min_positives": 0, "min_negatives": -1,
           "calibration_bins": 1}  # fmt: skip
    path.write_text(yaml.safe_dump({**grid, "evaluation": bad}))
    with pytest.raises(GridError) as info:
        load_grid(path)
    assert len(info.value.errors) == 4
    assert all(any(f"evaluation.{k}" in e for e in info.value.errors) for k in bad)


def test_a_site_without_its_own_non_dp_model_voids_the_every_site_claim(tmp_path):
    """Site c's non-DP model never evaluated on c: c has no primary estimate, so no
    every-site claim over a and b alone (p_tost_iut null, n_sites counts c), said in the
    rows and a warning; c's drop row says why its difference is null."""
    keys = build_output(tmp_path, n=120, skip=(("c", math.inf, 0, "c"),))
    with pytest.warns(ComparisonWarning, match="no every-site claim"):
        df = compute(tmp_path, keys)
    prim = df[df["endpoint"] == "primary"]
    assert set(prim["target"]) == {"a", "b"} and (prim["n_sites"] == 3).all()
    assert prim["p_tost_iut"].isna().all() and prim["p_tost"].notna().all()
    assert prim["null_reason"].str.contains("no primary estimate at test site(s) c",
                                            regex=False).all()  # fmt: skip
    c = one(df, comparison="auc_drop", quantity="drop", target="c", epsilon=1.0,
            label="macro", subgroup="all")  # fmt: skip
    assert pd.isna(c["delta"]) and c["value_dp"] > -1
    assert c["null_reason"].startswith("no non-DP AUC drop on c")
    on = one(df, comparison="auc_drop", quantity="on_domain_auc", target="c", epsilon=1.0,
             label="macro", subgroup="all")  # fmt: skip
    assert on["null_reason"].startswith("no non-DP on-domain AUC on c")


def test_a_source_without_non_dp_models_keeps_the_on_domain_difference_unflagged(tmp_path):
    """Source c has no non-DP model at all: on a and b the off-domain means differ in their
    sources (no drop difference, said so), but the on-domain difference is a real pair and
    carries no note that it is missing."""
    skip = tuple(("c", math.inf, 0, t) for t in ("a", "b", "c"))
    keys = build_output(tmp_path, n=120, skip=skip)
    with pytest.warns(ComparisonWarning, match="off-domain sources differ"):
        df = compute(tmp_path, keys)
    for t in ("a", "b"):
        kw = dict(comparison="auc_drop", target=t, epsilon=1.0, label="macro", subgroup="all")
        on = one(df, quantity="on_domain_auc", **kw)
        assert on["delta"] == pytest.approx(on["value_dp"] - on["value_nondp"])
        assert pd.isna(on["null_reason"])
        for q in ("drop", "off_domain_auc"):
            r = one(df, quantity=q, **kw)
            assert pd.isna(r["delta"]) and "off-domain sources" in r["null_reason"]
