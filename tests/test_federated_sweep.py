"""A federation in a real Ray Tune sweep: sites train as Ray tasks, rows land in the table."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import yaml
from conftest import ROOT, launch
from helpers import folders
from helpers.grids import synthetic_domain

from privdom_ray.privacy import epsilon_of, ledger_mechanisms

pytestmark = pytest.mark.ray


def domain(name: str, site: str) -> dict:
    return synthetic_domain(name, site, n_patients=40)


GRID = {
    "name": "fed",
    "output": "out",
    "domains": [domain("a", "a"), domain("b", "b"), domain("c", "c")],
    "sources": ["a"],
    "federations": [{"name": "ab", "sites": ["a", "b"], "rounds": 2, "local_epochs": 1}],
    "epsilons": [2, "inf"],
    "seeds": [0],
    "training": {"epochs": 2, "logical_batch": 32, "physical_batch": 16},
    "preprocessing": {"image_size": 24},
    "evaluation": {"n_boot": 10, "min_positives": 1, "min_negatives": 1},  # tiny test splits
    "ray": {"num_cpus": 2},
}


@pytest.fixture(scope="module")
def fed_sweep(tmp_path_factory):
    work = tmp_path_factory.mktemp("fed")
    (work / "grid.yaml").write_text(yaml.safe_dump(GRID))
    proc = launch("--grid", "grid.yaml", cwd=work)
    return work, proc


def test_federated_rows_are_in_the_table(fed_sweep):
    work, proc = fed_sweep
    assert "ab_eps2_seed0 round 2" in proc.stdout  # rounds are reported as they finish
    df = pd.read_parquet(work / "out" / "transfer.parquet")
    assert set(df["source"]) == {"a", "ab"}
    fed = df[df["source"] == "ab"]
    assert fed["trial_key"].nunique() == 2  # epsilon 2 and inf
    assert set(fed["target"]) == {"a", "b", "c"}  # members and the held-out site
    assert (fed["training_sites"] == "a,b").all()
    assert (fed["on_domain"] == fed["target"].isin(["a", "b"])).all()
    assert set(fed["privacy_scope"]) == {"site"}
    assert (df.loc[df["source"] == "a", "privacy_scope"] == "trial").all()
    assert (fed["epochs"] == 2).all()  # rounds x local epochs
    macro = fed[(fed["label"] == "macro") & (fed["subgroup"] == "all")]
    assert macro["auc"].between(0, 1).all()
    # membership inference ran at each site of the non-private federation only (it reads
    # training images); the row reports the worst site; a DP federation's sites send none
    for key in fed["trial_key"].unique():
        info = folders.info(work / "out", key)
        rows = fed[fed["trial_key"] == key]
        if rows["epsilon_target"].iloc[0] == 2:
            assert info["mia_sites"] == [] and rows["mia_auc"].isna().all()
            continue
        assert [a["site"] for a in info["mia_sites"]] == ["a", "b"]
        assert info["mia_auc"] == max(a["mia_auc"] for a in info["mia_sites"])
        assert (rows["mia_auc"] == info["mia_auc"]).all()


def test_site_ledgers_reproduce_their_epsilons(fed_sweep):
    work, _ = fed_sweep
    dp = pd.read_parquet(work / "out" / "transfer.parquet")
    dp = dp[(dp["source"] == "ab") & (dp["epsilon_target"] == 2)]
    ledger = folders.ledger(work / "out", dp["trial_key"].iloc[0])
    sites = ledger["sites"]
    assert set(sites) == {"a", "b"}
    for name, site in sites.items():
        assert site["scope"] == "site" and site["site"] == name
        assert site["poisson_sampling"] and site["steps"] > 0
        eps, _ = epsilon_of(site["accountant"], ledger_mechanisms(site), site["delta"])
        assert eps == pytest.approx(site["epsilon_spent"], rel=1e-6)
        assert site["epsilon_spent"] <= 2 + 1e-6
    # the row reports the largest site epsilon
    assert dp["epsilon_spent"].iloc[0] == pytest.approx(
        max(s["epsilon_spent"] for s in sites.values())
    )
    audit = launch("audit", "out", cwd=work)
    assert "0 problem(s)" in audit.stdout and "ab_" not in audit.stdout  # keys, not names
    (nondp_key,) = (
        pd.read_parquet(work / "out" / "transfer.parquet")
        .query("source == 'ab' and epsilon_target == inf")["trial_key"]
        .unique()
    )
    nondp = folders.ledger(work / "out", nondp_key)
    assert all(math.isinf(s["epsilon_spent"]) for s in nondp["sites"].values())


@pytest.mark.parametrize("tamper", ["understated summary", "missing site ledger"])
def test_audit_covers_a_federations_summary_and_every_trained_site(fed_sweep, tamper):
    work, _ = fed_sweep
    df = pd.read_parquet(work / "out" / "transfer.parquet")
    key = df[(df["source"] == "ab") & (df["epsilon_target"] == 2)]["trial_key"].iloc[0]

    def edit(ledger: dict) -> dict:
        if tamper == "understated summary":
            return {**ledger, "epsilon_spent": 0.05}
        return {**ledger, "sites": {n: s for n, s in ledger["sites"].items() if n != "b"}}

    # a faulty writer: the edit is sealed (the checksums guard against damage, not this)
    with folders.rewritten(work / "out", key, "ledger.json", edit):
        proc = launch("audit", "out", cwd=work, expect=1)
    assert (
        "summary" if tamper == "understated summary" else "no ledger for this site"
    ) in proc.stdout


def test_report_compares_federated_with_single_site(fed_sweep):
    work, proc = fed_sweep
    assert "Federated vs single-site" in proc.stdout
    report = (work / "out" / "report.md").read_text()
    assert "federated ab" in report


def test_rerun_skips_the_finished_federation(fed_sweep):
    work, _ = fed_sweep
    proc = launch("--grid", "grid.yaml", cwd=work)
    assert "4 already done, 0 to train, 0 trained" in proc.stdout


def test_sweep_timing_feeds_the_efficiency_benchmark(fed_sweep):
    """runs.jsonl and each federation's site-task intervals give benchmarks/bench_sweep.py a
    compute between the share-weighted lower bound and the slots the sites held."""
    import runpy

    work, _ = fed_sweep
    out = work / "out"
    bench = runpy.run_path(str(ROOT / "benchmarks" / "bench_sweep.py"))
    (run,) = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    feds = [t for t in run["trials"] if t["name"].startswith("ab_")]
    assert len(run["trials"]) == 4 and len(feds) == 2
    for t in feds:
        info = folders.info(out, t["key"])
        tasks, held = info["site_tasks"], info["site_slots"] * info["slot_share"]
        # rounds x sites x (train, validate), + 2 membership attacks when non-private
        audits = 0 if "eps2" in t["name"] else 2
        assert len(tasks) == 2 * 2 * 2 + audits
        assert all(start < end for start, end in tasks)
        busy = bench["busy_slot_seconds"](tasks, held)
        weighted = info["slot_share"] * sum(end - start for start, end in tasks)
        span = max(end for _, end in tasks) - min(start for start, _ in tasks)
        assert weighted - 1e-9 <= busy <= held * span + 1e-9
        compute, _, slots = bench["trial_compute"](out, t["key"])
        assert compute > busy and slots == held  # evaluations come on top
        assert compute / slots <= t["wall_seconds"]  # no more compute than the trial's time
