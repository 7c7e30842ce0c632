"""A federation in a real Ray Tune sweep: sites train as Ray tasks, rows land in the table."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from conftest import ROOT, launch, launch_here
from helpers import folders, sweeps

from privdom_ray.privacy import epsilon_of, ledger_mechanisms

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def fed_sweep(tmp_path_factory, worker_id) -> sweeps.Sweep:
    """The shared sweep (helpers/sweeps.py: sources a and b, the federation ab of sites a and b,
    a held-out target c, epsilon 1 and inf), read-only."""
    return sweeps.trained_sweep(tmp_path_factory, worker_id)


@pytest.fixture(scope="module")
def tampered(tmp_path_factory, fed_sweep) -> sweeps.Sweep:
    """A copy of the shared sweep for the tests that rewrite a ledger for the length of a
    ``with`` block (``folders.rewritten`` writes the original back)."""
    return sweeps.copy_of(fed_sweep, tmp_path_factory.mktemp("fed-tampered") / "work")


def test_federated_rows_are_in_the_table(fed_sweep):
    work = fed_sweep.work
    assert "ab_eps1_seed0 round 2" in fed_sweep.stdout  # rounds are reported as they finish
    df = pd.read_parquet(work / "out" / "transfer.parquet")
    assert set(df["source"]) == {"a", "b", "ab"}
    fed = df[df["source"] == "ab"]
    assert fed["trial_key"].nunique() == 2  # epsilon 1 and inf
    assert set(fed["target"]) == {"a", "b", "c"}  # members and the held-out site
    assert (fed["training_sites"] == "a,b").all()
    assert (fed["on_domain"] == fed["target"].isin(["a", "b"])).all()
    assert set(fed["privacy_scope"]) == {"site"}
    assert (df.loc[df["source"] != "ab", "privacy_scope"] == "trial").all()
    assert (fed["epochs"] == 2).all()  # rounds x local epochs (the grid's training epochs: 1)
    macro = fed[(fed["label"] == "macro") & (fed["subgroup"] == "all")]
    assert macro["auc"].between(0, 1).all()
    # membership inference ran at each site of the non-private federation only (it reads
    # training images); the row reports the worst site; a DP federation's sites send none
    for key in fed["trial_key"].unique():
        info = folders.info(work / "out", key)
        rows = fed[fed["trial_key"] == key]
        if rows["epsilon_target"].iloc[0] == 1:
            assert info["mia_sites"] == [] and rows["mia_auc"].isna().all()
            continue
        assert [a["site"] for a in info["mia_sites"]] == ["a", "b"]
        assert info["mia_auc"] == max(a["mia_auc"] for a in info["mia_sites"])
        assert (rows["mia_auc"] == info["mia_auc"]).all()


def test_site_ledgers_reproduce_their_epsilons(fed_sweep):
    work = fed_sweep.work
    dp = pd.read_parquet(work / "out" / "transfer.parquet")
    dp = dp[(dp["source"] == "ab") & (dp["epsilon_target"] == 1)]
    ledger = folders.ledger(work / "out", dp["trial_key"].iloc[0])
    sites = ledger["sites"]
    assert set(sites) == {"a", "b"}
    for name, site in sites.items():
        assert site["scope"] == "site" and site["site"] == name
        assert site["poisson_sampling"] and site["steps"] > 0
        eps, _ = epsilon_of(site["accountant"], ledger_mechanisms(site), site["delta"])
        assert eps == pytest.approx(site["epsilon_spent"], rel=1e-6)
        assert site["epsilon_spent"] <= 1 + 1e-6
    # the row reports the largest site epsilon
    assert dp["epsilon_spent"].iloc[0] == pytest.approx(
        max(s["epsilon_spent"] for s in sites.values())
    )
    audit = launch_here("audit", "out", cwd=work)  # reads only
    assert "0 problem(s)" in audit.stdout and "ab_" not in audit.stdout  # keys, not names
    (nondp_key,) = (
        pd.read_parquet(work / "out" / "transfer.parquet")
        .query("source == 'ab' and epsilon_target == inf")["trial_key"]
        .unique()
    )
    nondp = folders.ledger(work / "out", nondp_key)
    assert all(math.isinf(s["epsilon_spent"]) for s in nondp["sites"].values())


@pytest.mark.parametrize("tamper", ["understated summary", "missing site ledger"])
def test_audit_covers_a_federations_summary_and_every_trained_site(tampered, tamper):
    work = tampered.work
    df = pd.read_parquet(work / "out" / "transfer.parquet")
    key = df[(df["source"] == "ab") & (df["epsilon_target"] == 1)]["trial_key"].iloc[0]

    def edit(ledger: dict) -> dict:
        if tamper == "understated summary":
            return {**ledger, "epsilon_spent": 0.05}
        return {**ledger, "sites": {n: s for n, s in ledger["sites"].items() if n != "b"}}

    # a faulty writer: the edit is sealed (the checksums guard against damage, not this)
    with folders.rewritten(work / "out", key, "ledger.json", edit):
        proc = launch_here("audit", "out", cwd=work, expect=1)
    assert (
        "summary" if tamper == "understated summary" else "no ledger for this site"
    ) in proc.stdout


def test_report_compares_federated_with_single_site(fed_sweep):
    assert "Federated vs single-site" in fed_sweep.stdout
    report = (fed_sweep.out / "report.md").read_text()
    assert "federated ab" in report


def test_rerun_skips_the_finished_federation(fed_sweep, tmp_path):
    work = sweeps.copy_of(fed_sweep, tmp_path / "work").work
    before = folders.model_stamps(work / "out")
    proc = launch("--grid", "grid.yaml", cwd=work)
    # 2 sources x (eps 1, inf, clip-only), the audit twin, the federation x (eps 1, inf)
    assert "9 already done, 0 to train, 0 trained" in proc.stdout
    assert folders.model_stamps(work / "out") == before


def test_sweep_timing_feeds_the_efficiency_benchmark(fed_sweep):
    """runs.jsonl and each federation's site-task intervals give benchmarks/bench_sweep.py a
    compute between the share-weighted lower bound and the slots the sites held."""
    import runpy

    out = fed_sweep.out
    bench = runpy.run_path(str(ROOT / "benchmarks" / "bench_sweep.py"))
    (run,) = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    feds = [t for t in run["trials"] if t["name"].startswith("ab_")]
    assert len(run["trials"]) == 9 and len(feds) == 2
    for t in feds:
        info = folders.info(out, t["key"])
        tasks, held = info["site_tasks"], info["site_slots"] * info["slot_share"]
        # rounds x sites x (train, validate), + 2 membership attacks when non-private
        audits = 0 if "eps1" in t["name"] else 2
        assert len(tasks) == 2 * 2 * 2 + audits
        assert all(start < end for start, end in tasks)
        busy = bench["busy_slot_seconds"](tasks, held)
        weighted = info["slot_share"] * sum(end - start for start, end in tasks)
        span = max(end for _, end in tasks) - min(start for start, _ in tasks)
        assert weighted - 1e-9 <= busy <= held * span + 1e-9
        compute, _, slots = bench["trial_compute"](out, t["key"])
        assert compute > busy and slots == held  # evaluations come on top
        assert compute / slots <= t["wall_seconds"]  # no more compute than the trial's time
