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
from conftest import AGE_BINS, EV, N_BOOT, build_output, make_testset, scores_for, write_trial

from privdom_ray import comparisons, inference, integrity, metrics, results
from privdom_ray.comparisons import ComparisonWarning
from privdom_ray.config import format_epsilon
from privdom_ray.manifest import LABELS
from privdom_ray.store import TrialStore


def compute(output: Path, keys: list[str], **kw) -> pd.DataFrame:
    return comparisons.compute(output, keys, EV, **kw)


def edir_of(
    output: Path, keys: list[str], source: str, epsilon: str, target: str, seed: int = 0
) -> Path:
    """The evaluation folder of trial (source, epsilon, seed) on ``target`` (from the store)."""
    store = TrialStore(output)
    for key in keys:
        spec = store.read(key).spec
        if (spec.source, format_epsilon(spec.epsilon), spec.seed) == (source, epsilon, seed):
            return store.evaluation(key, target, f"fp{target}").path
    raise KeyError((source, epsilon))


def read_eval(edir: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(scores, labels, predictions frame) of one evaluation folder."""
    df = pd.read_parquet(edir / "predictions.parquet")
    s = df[[f"score_{lab}" for lab in LABELS]].to_numpy(np.float64)
    y = df[[f"label_{lab}" for lab in LABELS]].to_numpy(np.float64)
    return s, y, df


def one(df: pd.DataFrame, **where) -> pd.Series:
    sel = df
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, (where, len(sel))
    return sel.iloc[0]


def macro_boot(s: np.ndarray, y: np.ndarray, rs: metrics.Resampler) -> tuple[float, np.ndarray]:
    """Macro AUC over the fixed label set and its resamples, computed with metrics directly."""
    bs = metrics.bootstrap_stats(s, y, rs)
    point = np.array([metrics.auc(s[:, j], y[:, j]) for j in range(y.shape[1])])
    units = None if rs.identity else rs.codes
    ok = metrics.label_support(y, EV.min_positives, EV.min_negatives, units).ok
    return metrics.macro_over(point, bs.auc, bs.valid, ok)


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
    # all resamples at 0: both one-sided TOST p's are 1/(B+1), so equivalence is shown
    assert (defined["p_tost"] == 1 / (defined["n_valid_boot"] + 1)).all()
    assert (defined["verdict"] == "equivalent within ±m").all()
    assert (defined["margin"] == EV.equivalence_margin).all()
    assert (defined["resampling_unit"] == "patient").all()
    assert (defined["test"] == "paired patient bootstrap (shared resamples of the test set)").all()


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
    assert row["p_value"] == pytest.approx(inference.p_floor(row["n_valid_boot"]))
    assert row["verdict"] == "different" and row["worse_if"] == "lower"
    assert row["delta"] == pytest.approx(row["value_dp"] - row["value_nondp"], abs=1e-12)
    assert row["epsilon_spent"] == pytest.approx(1.98) and row["accountant"] == "prv"
    assert row["n"] == 300 and row["n_boot"] == N_BOOT
    assert row["n_patients"] == int(test["group"].max()) + 1


def test_paired_delta_equals_metrics_paired_auc_difference(tmp_path):
    """Shared patient resamples give exactly what metrics.paired_auc_difference gives."""
    keys = build_output(tmp_path, domains=("a", "b"), n=200)
    df = compute(tmp_path, keys)
    sa, y, pred = read_eval(edir_of(tmp_path, keys, "a", "1", "b"))
    sb, _, _ = read_eval(edir_of(tmp_path, keys, "a", "inf", "b"))
    groups = pred["patient_group"].to_numpy()
    masks = {"all": np.ones(len(y), bool)}
    masks.update(metrics.subgroup_masks(pred["sex"], pred["age"], AGE_BINS))
    for g in ("all", "sex=F", "age=[40,70)"):
        m = masks[g]
        rs = metrics.make_resampler(int(m.sum()), N_BOOT, metrics.subgroup_seed(0, g), groups[m])
        expect = metrics.paired_auc_difference(
            sa[m], sb[m], y[m], rs.draws, 0.95, label_names=LABELS, clusters=groups[m],
            min_positives=EV.min_positives, min_negatives=EV.min_negatives,
        )  # fmt: skip
        for res in expect:
            row = one(
                df,
                comparison="paired_delta",
                quantity="delta_auc",
                source="a",
                target="b",
                subgroup=g,
                label=res.label,
            )
            assert (row["n"], row["n_pos"]) == (res.n, res.n_pos)
            if res.delta is None:
                assert pd.isna(row["delta"]) and pd.isna(row["p_value"])
                continue
            assert row["delta"] == res.delta and row["p_value"] == res.p_value
            assert row["delta_lo"] == res.delta_lo and row["delta_hi"] == res.delta_hi
            assert row["n_valid_boot"] == res.n_valid_boot


def test_model_cis_are_the_transfer_tables_cis(tmp_path):
    """Every model's AUC CI in a comparison row is the one metrics.evaluate wrote for the
    transfer table: same patient resamples, same order-statistic rule."""
    keys = build_output(tmp_path, domains=("a", "b"), n=200)
    df = compute(tmp_path, keys)
    rows = df[(df["comparison"] == "paired_delta") & (df["quantity"] == "delta_auc")]
    checked = 0
    for side, eps in (("dp", "1"), ("nondp", "inf")):
        for (source, target), sel in rows.groupby(["source", "target"]):
            mt = pd.read_parquet(edir_of(tmp_path, keys, source, eps, target) / "metrics.parquet")
            merged = sel.merge(mt, on=["label", "subgroup"])
            assert len(merged) == len(sel)
            for col, ref in (("", "auc"), ("_lo", "auc_lo"), ("_hi", "auc_hi")):
                got, want = merged[f"value_{side}{col}"], merged[ref]
                assert (got.isna() == want.isna()).all()
                assert (got[got.notna()] == want[want.notna()]).all()
            checked += int(merged["auc_lo"].notna().sum())
    assert checked > 40


# ------------------------------------------------------------------------------ AUC drop


def test_auc_drop_equals_hand_computation(tmp_path):
    keys = build_output(tmp_path)
    df = compute(tmp_path, keys)

    def auc(source, target, eps, label="macro"):
        mt = pd.read_parquet(edir_of(tmp_path, keys, source, eps, target) / "metrics.parquet")
        return float(one(mt, label=label, subgroup="all")["auc"])

    domains = ("a", "b", "c")
    for label in ("macro", LABELS[1]):
        for t in domains:
            off = [s for s in domains if s != t]
            drop = {e: auc(t, t, e, label) - np.mean([auc(s, t, e, label) for s in off])
                    for e in ("1", "inf")}  # fmt: skip
            abstract_dp = auc(t, t, "inf", label) - np.mean([auc(s, t, "1", label) for s in off])
            common = {"comparison": "auc_drop", "target": t, "label": label, "subgroup": "all"}
            r_inf = one(df, **common, quantity="drop", epsilon=math.inf)
            r_dp = one(df, **common, quantity="drop", epsilon=1.0)
            r_abs = one(df, **common, quantity="drop_vs_nondp_ondomain", epsilon=1.0)
            assert r_inf["value_nondp"] == pytest.approx(drop["inf"], abs=1e-12)
            assert pd.isna(r_inf["value_dp"]) and pd.isna(r_inf["delta"])
            assert r_dp["value_dp"] == pytest.approx(drop["1"], abs=1e-12)
            assert r_abs["value_dp"] == pytest.approx(abstract_dp, abs=1e-12)
            for r in (r_dp, r_abs):
                assert r["value_nondp"] == pytest.approx(drop["inf"], abs=1e-12)
                assert r["n_off"] == 2 and pd.isna(r["source"]) and pd.isna(r["on_domain"])
                assert r["value_dp_lo"] <= r["value_dp"] <= r["value_dp_hi"]
                assert r["worse_if"] == "higher" and r["verdict"] in {
                    "equivalent within ±m", "different", "non-inferior", "inconclusive"
                }  # fmt: skip
            assert r_dp["auc_on"] == pytest.approx(auc(t, t, "1", label), abs=1e-12)
            assert r_abs["auc_on"] == pytest.approx(auc(t, t, "inf", label), abs=1e-12)
            assert r_dp["auc_off_mean"] == pytest.approx(
                np.mean([auc(s, t, "1", label) for s in off]), abs=1e-12
            )
            assert r_dp["delta"] == pytest.approx(drop["1"] - drop["inf"], abs=1e-12)
            assert r_abs["delta"] == pytest.approx(abstract_dp - drop["inf"], abs=1e-12)
            assert 0 < r_dp["p_value"] <= 1
    # one seed: no across_seeds rows; the per-seed rows are the summaries
    assert not (df["comparison"] == "across_seeds").any() and df["is_summary"].all()


def test_primary_endpoint_is_holm_adjusted_and_the_rest_gets_bh_q_values(tmp_path):
    keys = build_output(tmp_path)
    df = compute(tmp_path, keys)
    primary = df[df["endpoint"] == "primary"]
    assert len(primary) == 3  # one per test site (one DP epsilon, one model)
    assert set(primary["quantity"]) == {"drop_vs_nondp_ondomain"}
    assert set(primary["label"]) == {"macro"} and set(primary["subgroup"]) == {"all"}
    primary = primary.sort_values("target")
    alpha = inference.alpha_of(EV.ci)
    for col in ("p_tost", "p_value", "p_noninf"):  # every p a verdict can rest on
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
    fam = df[(df["comparison"] == "paired_delta") & (df["quantity"] == "delta_auc")]
    fam = fam[(fam["label"] == "macro") & (fam["subgroup"] == "all")]
    assert fam["q_value"].tolist() == pytest.approx(inference.bh(fam["p_value"].tolist()))
    assert (fam["q_value"] >= fam["p_value"]).all()


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
    # by hand: per-seed paired macro deltas on the shared patient resamples, then pooled
    deltas, x, y = [], [], []
    for seed in seeds:
        sa, lab, pred = read_eval(edir_of(tmp_path, keys, "a", "1", "b", seed))
        sb, _, _ = read_eval(edir_of(tmp_path, keys, "a", "inf", "b", seed))
        rs = metrics.make_resampler(len(lab), N_BOOT, 0, pred["patient_group"].to_numpy())
        (pa_, ba), (pb_, bb) = macro_boot(sa, lab, rs), macro_boot(sb, lab, rs)
        deltas.append(ba - bb)
        x.append(pa_)
        y.append(pb_)
    x, y = np.array(x), np.array(y)
    pooled = inference.pool_seeds(x - y, np.stack(deltas), ci=0.95, margin=EV.equivalence_margin,
                                  worse_if="lower")  # fmt: skip
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
    t, p = metrics.paired_t_test(x, y)
    assert row["t_stat"] == pytest.approx(t) and row["p_t"] == pytest.approx(p)
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


# ------------------------------------------------------------------------------ fairness


def test_fairness_gaps_resample_patients_jointly_across_subgroups(tmp_path):
    keys = build_output(tmp_path, domains=("a", "b"), n=300)
    df = compute(tmp_path, keys)
    s_dp, y, pred = read_eval(edir_of(tmp_path, keys, "b", "1", "a"))
    s_nd, _, _ = read_eval(edir_of(tmp_path, keys, "b", "inf", "a"))
    masks = metrics.subgroup_masks(pred["sex"], pred["age"], AGE_BINS)
    rs = metrics.make_resampler(len(y), N_BOOT, 0, pred["patient_group"].to_numpy())
    f, m = masks["sex=F"], masks["sex=M"]
    ok = (
        metrics.label_support(y[f], EV.min_positives, EV.min_negatives, rs.codes[f]).ok
        & metrics.label_support(y[m], EV.min_positives, EV.min_negatives, rs.codes[m]).ok
    )

    def gap(s):
        sides = []
        for mask in (f, m):
            bs = metrics.bootstrap_stats(s[mask], y[mask], rs.subset(mask))
            point = np.array([metrics.auc(s[mask, j], y[mask, j]) for j in range(len(LABELS))])
            sides.append(metrics.macro_over(point, bs.auc, bs.valid, ok))
        return sides[0][0] - sides[1][0], sides[0][1] - sides[1][1]

    (g_dp, b_dp), (g_nd, b_nd) = gap(s_dp), gap(s_nd)
    row = one(df, comparison="fairness_gap", quantity="auc_gap_sex", source="b", target="a",
              epsilon=1.0)  # fmt: skip
    assert row["subgroup"] == "sex=F - sex=M" and row["label"] == "macro"
    assert row["value_dp"] == pytest.approx(g_dp, abs=1e-12)
    assert row["value_nondp"] == pytest.approx(g_nd, abs=1e-12)
    assert (row["value_dp_lo"], row["value_dp_hi"]) == inference.order_ci(b_dp)
    assert (row["delta_lo"], row["delta_hi"]) == inference.order_ci(b_dp - b_nd)
    assert row["n_labels"] == ok.sum() and pd.isna(row["worse_if"])
    assert row["verdict"] != "non-inferior"  # a gap has no "worse" direction
    # nobody is 70 or older: the age gap is null, and the row says why
    age = df[(df["quantity"] == "auc_gap_age") & (df["target"] == "a")]
    assert age["delta"].isna().all() and age["null_reason"].str.contains("age=").all()


# ------------------------------------------------------------------------------ nulls


def test_subgroups_without_positives_or_members_give_nulls_with_reasons(tmp_path):
    keys = build_output(tmp_path, domains=("a", "b"), n=200)
    df = compute(tmp_path, keys)
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
    assert row["n_patients"] == 150 and row["test"].startswith("paired image bootstrap")


def test_domains_without_patient_ids_resample_images(tmp_path):
    """VinDr-like: every image is its own group and eval.json says resampling_unit = image."""
    keys = build_output(tmp_path, domains=("a", "b"), n=150)
    for path in tmp_path.glob("trials/*/eval/*/eval.json"):  # sealed again: a deliberate edit
        path.write_bytes(integrity.seal({**integrity.unseal(path), "resampling_unit": "image"}))
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
    assert table.schema.equals(comparisons.SCHEMA)
    assert list(comparisons.COLUMNS) == comparisons.SCHEMA.names  # every column documented
    assert pq.read_table(paths[1]).schema.equals(comparisons.RELIABILITY_SCHEMA)
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
    _, y, _ = read_eval(edir_of(tmp_path, keys, "a", "1", "b"))
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
    aside = edir_of(tmp_path, keys, "a", "inf", "a")
    replaced = aside.with_name(f".{aside.name}.replaced-1")
    replaced.mkdir()
    results.write_json(replaced / "eval.json", {"target": "a", "fingerprint": "old"})
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


def test_equivalence_is_declared_for_identical_models_and_refused_for_costly_dp(tmp_path):
    """The primary endpoint end to end: DP models identical to their non-DP partners are
    equivalent at every site; DP models much worse off-domain are not."""
    same = build_output(
        tmp_path / "same", strength=lambda s, t, e, seed: 1.5 if s == t else 1.0, share_noise=True
    )
    df = compute(tmp_path / "same", same)
    primary = df[df["endpoint"] == "primary"]
    assert len(primary) == 3 and (primary["delta"] == 0).all()
    assert (primary["verdict"] == "equivalent within ±m").all()

    def costly(source, target, eps, seed):
        return (1.5 if source == target else 1.0) - (0.8 if math.isfinite(eps) else 0.0)

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
