"""A real Ray Tune sweep on an embedded local cluster, through the command line, read back."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml
from conftest import launch, launch_here
from helpers import folders, sweeps
from helpers.grids import synthetic_domain

from privdom_ray.manifest import LABELS
from privdom_ray.store import TrialStore

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, worker_id) -> sweeps.Sweep:
    """The shared sweep (helpers/sweeps.py), read-only."""
    return sweeps.trained_sweep(tmp_path_factory, worker_id)


@pytest.fixture(scope="module")
def tampered(tmp_path_factory, tiny_sweep) -> sweeps.Sweep:
    """One copy of the shared sweep for this module's tests that rewrite a ledger for the length
    of a ``with`` block (``folders.rewritten`` writes the original back) or export it."""
    return sweeps.copy_of(tiny_sweep, tmp_path_factory.mktemp("tampered") / "work")


def test_table_has_one_row_per_trial_target_label_subgroup(tiny_sweep):
    df = pd.read_parquet(tiny_sweep.out / "transfer.parquet")
    # 2 sources x (eps 1, inf, clip-only) + the federation ab x (eps 1, inf); the audit twin
    # has no rows of its own
    assert df["trial_key"].nunique() == 8
    assert set(df["source"]) == {"a", "b", "ab"}
    assert set(df["target"]) == {"a", "b", "c"}
    assert set(df["label"]) == {*LABELS, "macro"}
    keys = ["trial_key", "target", "label", "subgroup"]
    assert not df.duplicated(keys).any()
    assert len(df[df["subgroup"] == "all"]) == 8 * 3 * (len(LABELS) + 1)
    single = df[df["source"] != "ab"]  # the federation's members: test_federated_sweep
    assert (single["on_domain"] == (single["source"] == single["target"])).all()
    aucs = df["auc"].dropna()
    assert len(aucs) > 0 and aucs.between(0, 1).all()


def test_privacy_ledger_columns(tiny_sweep):
    df = pd.read_parquet(tiny_sweep.out / "transfer.parquet")
    dp = df[df["epsilon_target"] == 1.0]
    assert set(dp["source"]) == {"a", "b", "ab"}
    assert (dp["epsilon_spent"] <= 1.0 + 1e-6).all() and (dp["epsilon_spent"] > 0).all()
    assert (dp["noise_multiplier"] > 0).all() and (dp["steps"] > 0).all()
    assert set(dp["accountant"]) <= {"prv", "rdp"}
    assert dp["sample_rate"].between(0, 1).all() and (dp["max_grad_norm"] == 1.5).all()
    nondp = df[df["epsilon_target"].map(math.isinf)]
    assert nondp["epsilon_spent"].map(math.isinf).all()
    assert set(nondp["accountant"]) == {"none"}
    clip = df[df["variant"] == "clip_only"]
    assert clip["trial_key"].nunique() == 2 and (clip["noise_multiplier"] == 0).all()
    assert (clip["max_grad_norm"] == 1.5).all() and clip["sample_rate"].between(0, 1).all()
    assert set(df[df["variant"] == "standard"]["epsilon_target"]) == {1.0, math.inf}
    trials = df.drop_duplicates("trial_key")
    private = trials["accountant"] != "none"
    # the membership attack reads training images: shared for non-private trials only
    assert trials.loc[~private, "mia_auc"].between(0, 1).all()
    assert trials.loc[~private, "mia_tpr_at_1fpr"].between(0, 1).all()
    assert trials.loc[private, "mia_auc"].isna().all()
    assert set(trials.loc[private, "loss_weights"]) == {"dp_counts"}
    assert set(trials.loc[~private, "loss_weights"]) == {"exact"}


def test_every_dp_epsilon_matches_an_independent_pld_accountant(tiny_sweep):
    """Google's dp-accounting PLD accountant, composing the label-count release with the
    Poisson-subsampled Gaussian steps, recomputes every single-site DP epsilon of the table
    (a federation's per-site ledgers: test_federated_sweep): ours is never more than 1% below
    it and never above the target."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    out = tiny_sweep.out
    df = pd.read_parquet(out / "transfer.parquet")
    dp = df[(df["accountant"] != "none") & (df["source"] != "ab")].drop_duplicates("trial_key")
    assert len(dp) == 2
    for row in dp.itertuples():
        ledger = folders.ledger(out, row.trial_key)
        pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
        names = []
        for m in ledger["mechanisms"]:
            names.append(m["name"])
            gauss = dp_event.GaussianDpEvent(m["noise_multiplier"])
            event = (
                gauss
                if m["sample_rate"] == 1
                else dp_event.PoissonSampledDpEvent(m["sample_rate"], gauss)
            )
            pld.compose(event, m["steps"])
        assert names == ["label_counts", "dp_sgd"]
        assert m["steps"] == row.steps and m["sample_rate"] == row.sample_rate
        independent = pld.get_epsilon(row.delta)
        assert row.epsilon_spent >= 0.99 * independent, (row.epsilon_spent, independent)
        assert row.epsilon_spent <= row.epsilon_target


def test_the_audit_twin_bounds_its_cells_epsilon_and_stays_out_of_the_matrices(tiny_sweep):
    work = tiny_sweep.work
    df = pd.read_parquet(tiny_sweep.out / "transfer.parquet")
    audited = df[df["audit_epsilon_lower"].notna()]
    assert set(audited["source"]) == {"a"} and set(audited["epsilon_target"]) == {1.0}
    assert audited["trial_key"].nunique() == 1 and (audited["audit_canaries"] == 200).all()
    lower, spent = audited["audit_epsilon_lower"].iloc[0], audited["epsilon_spent"].iloc[0]
    assert 0 <= lower <= spent
    assert "a_eps1_seed0_audit" in tiny_sweep.stdout  # trained as a trial of its own
    report = (tiny_sweep.out / "report.md").read_text()
    assert "Canary audit" in report and "What this epsilon covers" in report
    assert (tiny_sweep.out / "figures" / "audit_epsilon.png").is_file()
    assert "0 problem(s)" in launch_here("audit", "out", cwd=work).stdout  # reads only


def test_finished_trial_folders_hold_no_generator_state(tiny_sweep):
    """The checkpoint (with the secret sampling and noise states) is gone once a trial is done;
    what is left cannot replay the noise or the batches."""
    import torch

    out = tiny_sweep.out
    store = TrialStore(out)
    assert folders.trained_keys(out) == store.trial_keys() != []  # every folder is finished
    assert len(store.trial_keys()) == 9  # the 8 cells of the table and the audit twin
    for key in store.trial_keys():
        assert not store.has_checkpoint(key)
        state = folders.model_state(out, key)
        assert all(isinstance(v, torch.Tensor) and not k.startswith("_") for k, v in state.items())
        for path in store.folder(key).rglob("*.json"):  # every file, whatever its name
            text = path.read_text()
            assert "rng" not in text and "site_keys" not in text, path
        ledger = folders.ledger(out, key)
        if ledger["accountant"] != "none":
            assert ledger["randomness"] == "os-entropy" and ledger["mechanism_version"] == 2


@pytest.mark.parametrize("table", ["transfer.parquet", "comparisons.parquet"])
def test_tables_hold_no_identifiers_paths_or_per_image_rows(tiny_sweep, table):
    df = pd.read_parquet(tiny_sweep.out / table)
    assert not {"path", "patient_id", "row", "age", "sex"} & set(df.columns)
    text = [str(v) for v in df.select_dtypes(exclude="number").to_numpy().ravel() if v is not None]
    assert text  # the scan saw the string columns
    patients = set(
        pd.read_csv(tiny_sweep.work / "data" / "a" / "labels.csv")["patient_id"].astype(str)
    )
    assert not any(("/" in v and "data" in v) or v.endswith(".png") or v in patients for v in text)
    # aggregates: fewer rows than 10 per trial (8), target (3) and label (8); a per-image table
    # would have one per test image (27 or more a site)
    assert len(df) < 10 * 8 * 3 * len(LABELS)


def test_output_names_trials_and_prints_matrices(tiny_sweep):
    out = tiny_sweep.stdout
    assert "dashboard: http://127.0.0.1:" in out
    assert "a_eps1_seed0" in out and "b_epsinf_seed0" in out
    assert "### epsilon = 1" in out and "### epsilon = inf" in out
    assert "control: clip_only" in out and "Membership inference" in out
    assert "transfer.parquet" in out


def test_rerun_skips_done_cells_retrains_a_void_one_and_runs_only_new_cells(tiny_sweep, tmp_path):
    """On a copy of the shared sweep, a grid with a new epsilon (and no federation):

    - ``plan`` counts what the sweep then runs;
    - a DP trial trained before noise was secret (its ledger has no mechanism version) has no
      valid guarantee: status says void, audit exits 1;
    - the rerun sets the void trial aside (kept, never deleted) and retrains it, trains the new
      epsilon's cells, and leaves every other finished model (the audit twin and the
      federation's too) untouched;
    - an export then releases only the DP models with rows in the new tables."""
    work = sweeps.copy_of(tiny_sweep, tmp_path / "work").work
    out = work / "out"
    grid = {**sweeps.single_site(sweeps.GRID), "epsilons": [1, 8, "inf"]}
    (work / "grid2.yaml").write_text(yaml.safe_dump(grid))
    plan = launch_here("plan", "grid2.yaml", "--images-per-s", "50", cwd=work).stdout
    assert "trainings: 9 (1 audit, 2 clip_only, 6 standard); 7 already done, 2 to run" in plan
    assert "evaluations: 24 (trained models x targets); 18 already done, 6 to run" in plan

    # a DP trial of the grid the last command ran (status follows its plan)
    key = folders.key_named(out, "a_eps1_seed0")
    folders.rewrite_record(out, key, "ledger.json", lambda ledger: {
        k: v for k, v in ledger.items()
        if k not in ("mechanisms", "mechanism_version", "randomness")
    })  # fmt: skip
    assert "void" in launch_here("status", "out", cwd=work).stdout
    assert "void" in launch_here("audit", "out", cwd=work, expect=1).stdout

    before = folders.model_stamps(out)
    assert len(before) == 9  # the 8 cells of the shared sweep and its audit twin
    proc = launch("--grid", "grid2.yaml", cwd=work)
    assert f"trial {key}" in proc.stdout and "set_aside" in proc.stdout, "void trial set aside"
    # the audit twin is done too; to train: the void trial and the 2 epsilon-8 cells
    assert "6 already done, 3 to train, 0 trained" in proc.stdout
    after = folders.model_stamps(out)
    assert after[key] != before[key], "the void trial is trained again"
    assert {k: after[k] for k in before if k != key} == {
        k: v for k, v in before.items() if k != key
    }, "finished models untouched"
    assert len(after) == 11  # and the 2 epsilon-8 cells
    assert list((out / "set_aside").glob(f"{key}-void-*/model.pt"))  # kept, never deleted
    df = pd.read_parquet(out / "transfer.parquet")
    assert df["trial_key"].nunique() == 8  # 2 sources x (eps 1, 8, inf, clip-only)
    assert not df.duplicated(["trial_key", "target", "label", "subgroup"]).any()
    assert launch_here("audit", "out", cwd=work).returncode == 0
    report = launch_here("report", "out", cwd=work)
    assert "### ε = 8" in report.stdout and (out / "report.md").is_file()
    # released: the DP models with rows in the last aggregation; the federation's epsilon-1
    # model is on disk, but this grid has no rows of it
    launch_here("export", "out", "--to", str(tmp_path / "shared"), cwd=work)
    released = {p.name.split("-")[0] for p in (tmp_path / "shared" / "models").iterdir()}
    assert released == {"a_eps1_seed0", "a_eps8_seed0", "b_eps1_seed0", "b_eps8_seed0"}


def test_added_target_is_evaluated_without_training(tiny_sweep, tmp_path):
    work = sweeps.copy_of(tiny_sweep, tmp_path / "work").work
    out = work / "out"
    before = folders.model_stamps(out)
    old = pd.read_parquet(out / "transfer.parquet")
    grid = sweeps.single_site(sweeps.GRID)
    grid["domains"] = [*grid["domains"], synthetic_domain("d", "d")]
    (work / "grid3.yaml").write_text(yaml.safe_dump(grid))
    proc = launch("evaluate", "out", "--grid", "grid3.yaml", cwd=work)
    assert "epoch" not in proc.stdout  # no training progress at all
    after = folders.model_stamps(out)
    assert after == before
    new = pd.read_parquet(out / "transfer.parquet")
    # exactly the new target's rows were added for the grid's (epsilon 1, inf, clip-only) trials
    assert set(new["target"]) == {"a", "b", "c", "d"}
    keys = ["trial_key", "target", "label", "subgroup"]
    old_part = new[new["target"] != "d"].sort_values(keys)
    ref = old[old["trial_key"].isin(new["trial_key"])].sort_values(keys)
    assert len(old_part) == len(ref) > 0
    assert old_part["auc"].tolist() == pytest.approx(ref["auc"].tolist(), nan_ok=True)
    assert new[new["target"] == "d"]["trial_key"].nunique() == 6


def test_trial_record_reproduces_key_and_predictions(tiny_sweep):
    from privdom_ray.cache import load_split
    from privdom_ray.config import TrialSpec
    from privdom_ray.train import load_model, predict

    work, out = tiny_sweep.work, tiny_sweep.out
    store = TrialStore(out)
    key = next(
        k for k, r in folders.records(out).items() if r.spec.audit is None and r.spec.source == "a"
    )
    config = yaml.safe_load(store.config_text(key) or "")  # the record written for people
    spec = TrialSpec.from_json(config["spec"])
    assert spec.with_key().key == key == config["spec"]["key"]
    assert {"torch", "opacus", "ray"} <= set(config["versions"]) and config["code_version"]
    assert list(store.tensorboard_dir(key).glob("events.out.tfevents.*"))
    model = load_model(spec.model, folders.model_state(out, key), num_outputs=len(LABELS))
    stored = folders.predictions(out, key, spec.source)
    cache_path = next((out / "cache").glob(f"{spec.source}-*"))
    scores = predict(model, load_split(cache_path, "test").images)
    assert scores == pytest.approx(stored[[f"score_{lab}" for lab in LABELS]].to_numpy(), abs=1e-6)
    show = launch_here("show", "out", f"{spec.source}/{config['spec']['epsilon']}/0", cwd=work)
    assert key in show.stdout and "epsilon_spent" in show.stdout


def test_audit_recomputes_ledgers_and_catches_tampering(tampered):
    work, out = tampered.work, tampered.out
    ok = launch_here("audit", "out", cwd=work)
    assert "0 problem(s)" in ok.stdout
    key = folders.key_named(out, "a_eps1_seed0")  # a single-site DP trial

    def more_noise(ledger: dict) -> dict:  # claims more noise than the epsilon it reports
        ledger["noise_multiplier"] *= 0.5
        for m in ledger["mechanisms"]:
            if m["name"] == "dp_sgd":
                m["noise_multiplier"] *= 0.5
        return ledger

    # a faulty writer: the ledger is rewritten and sealed
    with folders.rewritten(out, key, "ledger.json", more_noise):
        bad = launch_here("audit", "out", cwd=work, expect=1)
    # named: the sigma that the trial's spec recomputes, and the epsilon of the claimed sigma
    assert "noise_multiplier" in bad.stdout and "1 problem(s)" in bad.stdout


@pytest.mark.parametrize(
    "tamper,problem",
    [
        (lambda led: {**led, "epsilon_target": 10.0}, "epsilon_target"),
        (lambda led: {**led, "max_grad_norm": 3.0}, "max_grad_norm"),
        (lambda led: {**led, "accountant": "none"}, "claims no accountant"),
        (
            lambda led: {
                **led,
                "mechanisms": [
                    *led["mechanisms"],
                    {**led["mechanisms"][0], "noise_multiplier": 1000.0},
                ],
            },
            "1 problem(s)",
        ),  # fmt: skip
    ],
    ids=["target", "clipping bound", "no accountant", "extra count release"],
)
def test_audit_checks_each_ledger_against_its_trial_spec(tampered, tamper, problem):
    work, out = tampered.work, tampered.out
    key = folders.key_named(out, "b_eps1_seed0")
    with folders.rewritten(out, key, "ledger.json", tamper):  # a faulty writer: sealed
        proc = launch_here("audit", "out", cwd=work, expect=1)
    assert problem in proc.stdout


def test_patient_level_privacy_end_to_end(tmp_path):
    grid = {
        **sweeps.single_site(sweeps.GRID),
        "domains": sweeps.GRID["domains"][:1],
        "sources": ["a"],
        "epsilons": [2],
        "controls": [],
        # 29 training patients: a batch of 32 would be refused (q = 32/29 > 1)
        "training": {**sweeps.GRID["training"], "privacy_unit": "patient", "logical_batch": 16},
        "audit": {"canaries": 200, "epsilons": [2]},  # canaries are units too: one per patient
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    launch("--grid", "grid.yaml", cwd=tmp_path)
    df = pd.read_parquet(tmp_path / "out" / "transfer.parquet")
    assert set(df["privacy_unit"]) == {"patient"} and (df["epsilon_spent"] <= 2 + 1e-6).all()
    n_patients = pd.read_parquet(next((tmp_path / "out" / "cache").glob("a-*")) / "rows.parquet")
    n_train_patients = n_patients[(n_patients["split"] == "train") & n_patients["ok"]][
        "patient_id"
    ].nunique()
    assert df["sample_rate"].iloc[0] == pytest.approx(1 / math.ceil(n_train_patients / 16))


def test_export_writes_exactly_the_shareable_set(tampered):
    import pyarrow.parquet as pq

    work = tampered.work
    proc = launch_here("export", "out", "--to", "shared", cwd=work)
    files = sorted(
        str(p.relative_to(work / "shared")) for p in (work / "shared").rglob("*") if p.is_file()
    )
    tables = {
        "transfer.parquet", "comparisons.parquet", "reliability.parquet", "guarantees.parquet",
        "report.md", "report.html", "PRIVACY.md",
    }  # fmt: skip
    assert tables <= set(files), files
    models = [f for f in files if f.startswith("models/")]
    # the released models: the DP trials with rows in the table only (the federation's too;
    # controls, audit twins and non-private weights stay home)
    assert sorted({f.split("/")[1].split("-")[0] for f in models}) == [
        "a_eps1_seed0",
        "ab_eps1_seed0",
        "b_eps1_seed0",
    ]
    assert {f.split("/")[-1] for f in models} == {"model.pt", "ledger.json", "card.json"}
    leftover = [f for f in files if f not in tables and not f.startswith(("models/", "figures/"))]
    assert leftover == []
    forbidden = ("checkpoint", "history", "tensorboard", "predictions", "running", "failed", "plan")
    assert not [f for f in files if any(w in f for w in forbidden)]
    schema = pq.read_schema(work / "shared" / "transfer.parquet")
    classes = {f.name: f.metadata[b"privacy"].decode() for f in schema}
    assert classes["auc"] == "test" and classes["threshold"] == "validation"
    assert classes["epsilon_spent"] == "ledger" and classes["trial_key"] == "release_id"
    # computed from training images (the membership attack), timing, the audit twins: home
    assert not {"mia_auc", "train_seconds", "audit_epsilon_lower"} & set(classes)
    # identifiers that hash the data (trial keys, fingerprints) never leave: release ids only
    assert "data_fingerprint" not in classes
    shared = pd.read_parquet(work / "shared" / "transfer.parquet")
    internal = pd.read_parquet(work / "out" / "transfer.parquet")
    assert not set(shared["trial_key"]) & set(internal["trial_key"])
    assert shared["trial_key"].nunique() == internal["trial_key"].nunique()
    cards = [f for f in files if f.endswith("card.json")]
    text = "".join((work / "shared" / f).read_text() for f in cards)
    assert not any(k in text for k in internal["trial_key"]) and "data_fingerprint" not in text
    assert "exported" in proc.stdout
    assert (
        launch_here("export", "out", "--to", "shared", cwd=work, expect=2).returncode == 2
    )  # not empty


def test_ray_session_files_are_private_and_dp_trials_send_tune_no_training_loss(tiny_sweep):
    """Tune writes what trials report to result.json files: DP trials report no training loss
    and no training time; those files and Ray's session folder are owner-only (0700), the
    session folder linked from <output>/ray_session."""
    import json
    import stat

    session = (tiny_sweep.out / "ray_session").resolve()
    results_dir = tiny_sweep.out / "ray_results"
    for folder in (session, results_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert list(session.glob("ray/session_*/logs"))  # Ray makes ray/ 0777: 0700 above it
    seen = {"dp": 0, "nondp": 0}
    for path in [*results_dir.rglob("result.json"), *session.rglob("result.json")]:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        name = path.parent.name
        if "_eps1_" in name:
            seen["dp"] += 1
            assert not [
                r for r in records if {"train_loss", "train_seconds", "seconds"} & set(r)
            ], path
            assert any("val_macro_auc" in r for r in records)
        elif "_epsinf_" in name and any("train_loss" in r for r in records):
            seen["nondp"] += 1
    assert seen["dp"] and seen["nondp"]
