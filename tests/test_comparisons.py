"""DP-vs-non-DP comparisons from real trial folders (written with the results helpers).

``build_output`` writes what ``trial.py`` writes for a finished trial (trial.json, ledger.json,
done, eval/<target>-<fp>/{predictions,metrics}.parquet + eval.json) from synthetic scores, so
the tests need no torch, no Ray and no earlier sweep on the machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from privdom_ray import comparisons, metrics, results
from privdom_ray.comparisons import ComparisonWarning
from privdom_ray.grid import content_key, format_epsilon
from privdom_ray.manifest import LABELS

N_BOOT = 200
AGE_BINS = (0.0, 40.0, 70.0, math.inf)


# ------------------------------------------------------------------------------ builder


def make_testset(n: int, seed: int) -> dict[str, np.ndarray]:
    """A target's test split: labels (some unknown), sex, age in [20, 70) only.

    Cardiomegaly is never positive under 40, so "age=[0,40)" has no positives for it, and
    nobody is 70 or older, so "age=[70,inf)" is empty.
    """
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 69.9, n)
    y = (rng.random((n, len(LABELS))) < 0.35).astype(float)
    y[age < 40, 0] = 0.0
    y[rng.random((n, len(LABELS))) < 0.05] = np.nan
    sex = rng.choice(np.array(["F", "M", "U"]), n, p=[0.45, 0.45, 0.1])
    return {"y": y, "sex": sex, "age": age}


def scores_for(test: dict[str, np.ndarray], strength: float, seed: int) -> np.ndarray:
    """Scores separating the classes by ``strength`` standard deviations."""
    rng = np.random.default_rng(seed)
    return np.nan_to_num(test["y"], nan=0.0) * strength + rng.normal(size=test["y"].shape)


def write_trial(
    output: Path,
    *,
    source: str,
    epsilon: float,
    seed: int,
    evals: dict[str, tuple[str, dict[str, np.ndarray], np.ndarray]],
    spent: float | None = None,
    accountant: str = "prv",
    done: bool = True,
    incomplete: tuple[str, ...] = (),
) -> str:
    """A trial folder like trial.py writes it; ``evals`` maps target -> (fingerprint, test, scores).

    Targets in ``incomplete`` get an eval folder without eval.json (a half-written evaluation).
    """
    private = math.isfinite(epsilon)
    spec = {
        "source": source,
        "data_fingerprint": f"fp-{source}",
        "epsilon": format_epsilon(epsilon),
        "delta": 1e-5,
        "seed": seed,
        "model": "resnet9",
        "training": {"epochs": 2, "logical_batch": 32, "physical_batch": 16, "lr": 1e-3},
        "preprocessing": {"image_size": 32, "geometry": "stretch", "equalize": True},
    }
    key = content_key(spec)
    spec["key"] = key
    tdir = results.trial_dir(output, key)
    results.write_json(
        tdir / "trial.json",
        {
            "spec": spec,
            "name": f"{source}_eps{format_epsilon(epsilon)}_seed{seed}",
            "best_epoch": 2,
            "val_macro_auc": 0.7,
            "train_seconds": 1.0,
            "node": "test",
            "versions": {"python": "3"},
        },
    )
    results.write_json(
        tdir / "ledger.json",
        {
            "epsilon_target": epsilon,
            "epsilon_spent": (spent if spent is not None else 0.99 * epsilon)
            if private
            else math.inf,
            "epsilon_rdp": 1.1 * epsilon if private else math.inf,
            "delta": 1e-5 if private else 0.0,
            "noise_multiplier": 1.0 if private else 0.0,
            "sample_rate": 0.1,
            "steps": 10,
            "max_grad_norm": 1.5 if private else math.inf,
            "accountant": accountant if private else "none",
            "accountant_requested": accountant if private else "none",
            "poisson_sampling": private,
            "privacy_unit": "image",
        },
    )
    for target, (fp, test, scores) in evals.items():
        edir = results.eval_dir(tdir, target, fp)
        pred = pd.DataFrame({"row": np.arange(len(scores))})
        for j, label in enumerate(LABELS):
            pred[f"score_{label}"] = scores[:, j].astype(np.float32)
            pred[f"label_{label}"] = test["y"][:, j].astype(np.float32)
        pred["sex"] = test["sex"].astype(str)
        pred["age"] = test["age"]
        results.write_parquet(edir / "predictions.parquet", pred)
        rows = metrics.evaluate(
            pred[[f"score_{lab}" for lab in LABELS]].to_numpy(np.float64),
            test["y"],
            np.zeros(len(LABELS)),
            LABELS,
            groups=metrics.subgroup_masks(test["sex"], test["age"], AGE_BINS),
            n_boot=N_BOOT,
            seed=0,
        )
        results.write_parquet(edir / "metrics.parquet", pd.DataFrame([r.as_dict() for r in rows]))
        if target not in incomplete:
            results.write_json(
                edir / "eval.json",
                {
                    "target": target,
                    "fingerprint": fp,
                    "n_test": len(scores),
                    "n_boot": N_BOOT,
                    "eval_seconds": 0.1,
                },
            )
    if done:
        results.mark_done(tdir)
    return key


Strength = Callable[[str, str, float, int], float]


def default_strength(source: str, target: str, epsilon: float, seed: int) -> float:
    """Models are better on-domain and without DP; a seed shifts every model a little."""
    base = 1.6 if source == target else 0.9
    dp = -0.35 if math.isfinite(epsilon) else 0.0
    return base + dp + 0.05 * seed


def build_output(
    output: Path,
    *,
    domains: tuple[str, ...] = ("a", "b", "c"),
    epsilons: tuple[float, ...] = (1.0, math.inf),
    seeds: tuple[int, ...] = (0,),
    n: int = 240,
    strength: Strength = default_strength,
    skip: tuple[tuple[str, float, int, str], ...] = (),
) -> list[str]:
    """A finished sweep: every (source, epsilon, seed) trained and evaluated on every domain.

    ``skip`` lists (source, epsilon, seed, target) evaluations left half-written.
    """
    tests = {d: make_testset(n, seed=10 + i) for i, d in enumerate(domains)}
    keys = []
    for si, source in enumerate(domains):
        for ei, eps in enumerate(epsilons):
            for seed in seeds:
                evals = {
                    t: (
                        f"fp{t}",
                        tests[t],
                        scores_for(
                            tests[t],
                            strength(source, t, eps, seed),
                            1000 * seed + 100 * si + 10 * ei + ti,
                        ),
                    )
                    for ti, t in enumerate(domains)
                }
                incomplete = tuple(t for (s, e, sd, t) in skip if (s, e, sd) == (source, eps, seed))
                keys.append(
                    write_trial(
                        output,
                        source=source,
                        epsilon=eps,
                        seed=seed,
                        evals=evals,
                        incomplete=incomplete,
                    )
                )
    return keys


def compute(output: Path, keys: list[str]) -> pd.DataFrame:
    return comparisons.compute(output, keys, n_boot=N_BOOT, seed=0, ci=0.95, age_bins=AGE_BINS)


def edir_of(output: Path, keys: list[str], source: str, epsilon: str, target: str) -> Path:
    """The evaluation folder of trial (source, epsilon) on ``target``."""
    for key in keys:
        tdir = results.trial_dir(output, key)
        spec = results.read_json(tdir / "trial.json")["spec"]
        if (spec["source"], spec["epsilon"]) == (source, epsilon):
            return results.eval_dir(tdir, target, f"fp{target}")
    raise KeyError((source, epsilon))


def one(df: pd.DataFrame, **where) -> pd.Series:
    sel = df
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, (where, len(sel))
    return sel.iloc[0]


# ------------------------------------------------------------------------------ paired delta


def test_identical_models_give_zero_delta_and_p_one(tmp_path):
    test = make_testset(200, seed=1)
    s = scores_for(test, 1.0, seed=2)
    keys = [
        write_trial(tmp_path, source="a", epsilon=eps, seed=0, evals={"a": ("fpa", test, s)})
        for eps in (1.0, math.inf)
    ]
    df = compute(tmp_path, keys)
    pd_rows = df[df["comparison"] == "paired_delta"]
    assert len(pd_rows) == (len(LABELS) + 1) * 6  # 5 labels + macro, "all" + 5 subgroups
    defined = pd_rows[pd_rows["delta_auc"].notna()]
    assert len(defined) > 20
    assert (defined["delta_auc"] == 0).all()
    assert (defined["delta_lo"] == 0).all() and (defined["delta_hi"] == 0).all()
    assert (defined["p_value"] == 1.0).all()
    assert (defined["auc_dp"] == defined["auc_nondp"]).all()


def test_clearly_better_dp_model_is_significant(tmp_path):
    test = make_testset(300, seed=3)
    keys = [
        write_trial(
            tmp_path,
            source="a",
            epsilon=eps,
            seed=0,
            evals={"a": ("fpa", test, scores_for(test, strength, seed=int(strength * 10)))},
        )
        for eps, strength in ((2.0, 2.5), (math.inf, 0.3))
    ]
    df = compute(tmp_path, keys)
    row = one(df, comparison="paired_delta", label="macro", subgroup="all")
    assert row["epsilon"] == 2.0 and row["on_domain"] and row["source"] == row["target"] == "a"
    assert row["delta_auc"] > 0.2
    assert row["delta_lo"] > 0 and row["delta_hi"] >= row["delta_auc"] >= row["delta_lo"]
    assert row["p_value"] < 0.01
    assert row["delta_auc"] == pytest.approx(row["auc_dp"] - row["auc_nondp"], abs=1e-12)
    assert row["epsilon_spent"] == pytest.approx(1.98) and row["accountant"] == "prv"
    assert row["n"] == 300 and row["n_boot"] == N_BOOT


def test_paired_delta_equals_metrics_paired_auc_difference(tmp_path):
    """Shared per-model resamples give exactly what metrics.paired_auc_difference gives."""
    keys = build_output(tmp_path, domains=("a", "b"), n=200)
    df = compute(tmp_path, keys)
    pa_, pb_ = (
        pd.read_parquet(edir_of(tmp_path, keys, "a", eps, "b") / "predictions.parquet")
        for eps in ("1", "inf")
    )
    cols = [f"score_{lab}" for lab in LABELS]
    y = pa_[[f"label_{lab}" for lab in LABELS]].to_numpy(np.float64)
    for g in ("all", "sex=F", "age=[40,70)"):
        mask = (
            np.ones(len(y), bool)
            if g == "all"
            else metrics.subgroup_masks(pa_["sex"], pa_["age"], AGE_BINS)[g]
        )
        idx = metrics.bootstrap_indices(int(mask.sum()), N_BOOT, metrics.subgroup_seed(0, g))
        expect = metrics.paired_auc_difference(
            pa_[cols].to_numpy(np.float64)[mask],
            pb_[cols].to_numpy(np.float64)[mask],
            y[mask],
            idx,
            0.95,
            label_names=LABELS,
        )
        for res in expect:
            row = one(
                df,
                comparison="paired_delta",
                source="a",
                target="b",
                subgroup=g,
                label=res.label,
            )
            assert row["delta_auc"] == res.delta
            assert row["delta_lo"] == res.delta_lo and row["delta_hi"] == res.delta_hi
            assert row["p_value"] == res.p_value
            assert row["n"] == res.n and row["n_pos"] == res.n_pos


# ------------------------------------------------------------------------------ AUC drop


def test_auc_drop_equals_hand_computation_from_transfer_table(tmp_path):
    keys = build_output(tmp_path)
    _, transfer = results.aggregate(tmp_path, keys, "test")
    df = compute(tmp_path, keys)

    def auc(source, target, eps, label="macro"):
        sel = transfer[
            (transfer["source"] == source)
            & (transfer["target"] == target)
            & (transfer["epsilon_target"] == eps)
            & (transfer["label"] == label)
            & (transfer["subgroup"] == "all")
        ]
        assert len(sel) == 1
        return float(sel["auc"].iloc[0])

    domains = ("a", "b", "c")
    for label in ("macro", LABELS[1]):
        for t in domains:
            off = [s for s in domains if s != t]
            drop = {
                eps: auc(t, t, eps, label) - np.mean([auc(s, t, eps, label) for s in off])
                for eps in (1.0, math.inf)
            }
            abstract_dp = auc(t, t, math.inf, label) - np.mean([auc(s, t, 1.0, label) for s in off])
            common = {"comparison": "auc_drop", "target": t, "label": label, "subgroup": "all"}
            r_inf = one(df, **common, quantity="drop", epsilon=math.inf)
            r_dp = one(df, **common, quantity="drop", epsilon=1.0)
            r_abs = one(df, **common, quantity="drop_vs_nondp_ondomain", epsilon=1.0)
            assert r_inf["drop"] == pytest.approx(drop[math.inf], abs=1e-12)
            assert r_dp["drop"] == pytest.approx(drop[1.0], abs=1e-12)
            assert r_abs["drop"] == pytest.approx(abstract_dp, abs=1e-12)
            for r in (r_inf, r_dp, r_abs):
                assert r["drop_nondp"] == pytest.approx(drop[math.inf], abs=1e-12)
                assert r["n_off"] == 2 and pd.isna(r["source"]) and pd.isna(r["on_domain"])
                assert r["drop_lo"] <= r["drop"] <= r["drop_hi"]
            assert r_dp["auc_on"] == pytest.approx(auc(t, t, 1.0, label), abs=1e-12)
            assert r_abs["auc_on"] == pytest.approx(auc(t, t, math.inf, label), abs=1e-12)
            assert r_dp["auc_off_mean"] == pytest.approx(
                np.mean([auc(s, t, 1.0, label) for s in off]), abs=1e-12
            )
            assert r_dp["delta_auc"] == pytest.approx(drop[1.0] - drop[math.inf], abs=1e-12)
            assert r_abs["delta_auc"] == pytest.approx(abstract_dp - drop[math.inf], abs=1e-12)
            assert 0 < r_dp["p_value"] <= 1 and pd.isna(r_inf["p_value"])
            # one seed: the across-seeds summary is there, with SD and p null
            s = one(df, **{**common, "comparison": "across_seeds"}, quantity="drop", epsilon=1.0)
            assert s["n_seeds"] == 1 and s["mean_dp"] == pytest.approx(r_dp["drop"])
            assert pd.isna(s["sd_dp"]) and pd.isna(s["p_value"]) and pd.isna(s["t_stat"])
            assert pd.isna(s["test"])


# ------------------------------------------------------------------------------ across seeds


def test_across_seeds_mean_sd_and_paired_t(tmp_path):
    keys = build_output(tmp_path, domains=("a", "b"), seeds=(0, 1, 2), n=160)
    df = compute(tmp_path, keys)
    where = {"source": "a", "target": "b", "label": "macro", "subgroup": "all", "epsilon": 1.0}
    seeds = df[(df["comparison"] == "paired_delta")]
    for k, v in where.items():
        seeds = seeds[seeds[k] == v]
    seeds = seeds.sort_values("seed")
    assert list(seeds["seed"]) == [0, 1, 2]
    x, y = seeds["auc_dp"].to_numpy(float), seeds["auc_nondp"].to_numpy(float)
    d = x - y
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    p = 1 - abs(t) / math.sqrt(t * t + 2)  # two-sided Student t tail with 2 degrees of freedom
    row = one(df, comparison="across_seeds", quantity="delta_auc", **where)
    assert row["n_seeds"] == 3 and pd.isna(row["seed"])
    assert row["mean_dp"] == pytest.approx(x.mean()) and row["sd_dp"] == pytest.approx(
        x.std(ddof=1)
    )
    assert row["mean_nondp"] == pytest.approx(y.mean())
    assert row["sd_nondp"] == pytest.approx(y.std(ddof=1))
    assert row["delta_auc"] == pytest.approx(d.mean())
    assert row["delta_sd"] == pytest.approx(d.std(ddof=1))
    assert row["t_stat"] == pytest.approx(t) and row["p_value"] == pytest.approx(p, rel=1e-9)
    assert row["test"] == "paired Student t test across seeds"

    drops = df[(df["comparison"] == "auc_drop") & (df["quantity"] == "drop")]
    drops = drops[(drops["target"] == "a") & (drops["label"] == "macro")]
    drops = drops[drops["subgroup"] == "all"]
    dp = drops[drops["epsilon"] == 1.0].sort_values("seed")["drop"].to_numpy(float)
    nondp = drops[drops["epsilon"] == math.inf].sort_values("seed")["drop"].to_numpy(float)
    row = one(
        df,
        comparison="across_seeds",
        quantity="drop",
        target="a",
        label="macro",
        subgroup="all",
        epsilon=1.0,
    )
    tt, pp = metrics.paired_t_test(dp, nondp)
    assert row["mean_dp"] == pytest.approx(dp.mean()) and row["mean_nondp"] == pytest.approx(
        nondp.mean()
    )
    assert row["t_stat"] == pytest.approx(tt) and row["p_value"] == pytest.approx(pp)
    nondp_row = one(
        df,
        comparison="across_seeds",
        quantity="drop",
        target="a",
        label="macro",
        subgroup="all",
        epsilon=math.inf,
    )
    assert nondp_row["mean_nondp"] == pytest.approx(nondp.mean())
    assert nondp_row["sd_nondp"] == pytest.approx(nondp.std(ddof=1))
    assert pd.isna(nondp_row["mean_dp"]) and pd.isna(nondp_row["p_value"])


# ------------------------------------------------------------------------------ nulls, hygiene


def test_subgroups_without_positives_or_members_give_nulls(tmp_path):
    keys = build_output(tmp_path, domains=("a", "b"), n=200)
    df = compute(tmp_path, keys)
    young = df[(df["subgroup"] == "age=[0,40)") & (df["label"] == LABELS[0])]
    assert len(young) > 0 and (young["n_pos"].dropna() == 0).all()
    value_cols = ["auc_dp", "auc_nondp", "delta_auc", "delta_lo", "delta_hi", "p_value", "drop"]
    assert young[young["comparison"] != "across_seeds"][value_cols].isna().all().all()
    old = df[df["subgroup"] == "age=[70,inf)"]
    assert len(old) > 0 and (old["n"].dropna() == 0).all()
    assert old[value_cols + ["auc_on", "auc_off_mean", "mean_dp"]].isna().all().all()
    # the young macro is still defined from the other labels
    row = one(
        df, comparison="paired_delta", source="a", target="a", label="macro", subgroup="age=[0,40)"
    )
    assert row["delta_auc"] is not None and not pd.isna(row["p_value"])


def test_table_is_an_aggregate_without_paths_or_ids(tmp_path):
    keys = build_output(tmp_path, domains=("a", "b"), n=150)
    df = compute(tmp_path, keys)
    path = comparisons.write(tmp_path, df)
    assert path == tmp_path / "comparisons.parquet"
    table = pq.read_table(path)
    assert table.schema.equals(comparisons.SCHEMA)
    assert list(comparisons.COLUMNS) == comparisons.SCHEMA.names  # every column documented
    for col in table.column_names:
        assert not any(w in col for w in ("path", "patient", "row", "file", "dir", "key", "image"))
    text = pd.read_parquet(path).select_dtypes(exclude="number").astype(str)
    assert not text.apply(lambda c: c.str.contains("/|\\\\|fpa|fpb", regex=True)).any().any()
    assert not list(tmp_path.glob(".comparisons.parquet.*"))  # atomic write left no temp file
    back = comparisons.load(tmp_path)
    pd.testing.assert_frame_equal(back, pd.read_parquet(path))
    assert set(df["comparison"]) == {"paired_delta", "auc_drop", "across_seeds"}


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
    with pytest.warns(ComparisonWarning, match="off-domain sources differ"):
        df = compute(tmp_path, [*keys, unfinished])
    assert "c" not in set(df["source"].dropna())
    pairs = df[df["comparison"] == "paired_delta"]
    assert set(zip(pairs["source"], pairs["target"], strict=True)) == {
        ("a", "a"),
        ("a", "b"),
        ("b", "b"),
    }  # b (eps 1) -> a was never completed: no pair, not a fake one
    drop = one(
        df,
        comparison="auc_drop",
        quantity="drop",
        target="a",
        epsilon=1.0,
        label="macro",
        subgroup="all",
    )
    assert drop["n_off"] == 0 and pd.isna(drop["drop"])  # no off-domain model: missing, kept
    assert not df.empty


def test_mismatched_labels_on_same_fingerprint_are_skipped_with_warning(tmp_path):
    test = make_testset(100, seed=4)
    other = {**test, "y": test["y"].copy()}
    other["y"][:10, 1] = 1.0 - np.nan_to_num(other["y"][:10, 1])
    keys = [
        write_trial(
            tmp_path,
            source="a",
            epsilon=1.0,
            seed=0,
            evals={"a": ("fpa", test, scores_for(test, 1.0, 1))},
        ),
        write_trial(
            tmp_path,
            source="a",
            epsilon=math.inf,
            seed=0,
            evals={"a": ("fpa", other, scores_for(other, 1.0, 2))},
        ),
    ]
    with pytest.warns(ComparisonWarning, match="labels differ"):
        df = compute(tmp_path, keys)
    assert (df["comparison"] != "paired_delta").all()
    assert comparisons.compute(tmp_path, []).empty
