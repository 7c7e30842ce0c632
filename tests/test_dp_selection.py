"""Untuned DP trials choose their epoch and thresholds by DP releases on the validation split
(issue 26): the exponential mechanism over the epochs and noisy validation histograms, with
noise from OS entropy, recorded in the ledger's ``validation`` entry and recomputed by
``audit``. Trials finished before keep their exact selection (no entry), audit clean and stay
marked outside the guarantee. Real trainings (real Opacus), real trial folders."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from privdom_ray.audit import audit_trial
from privdom_ray.config import TrainingConfig, TrialSpec
from privdom_ray.imaging import Preprocessing
from privdom_ray.selection.untuned import check_validation, validation_epsilon, validation_noise
from privdom_ray.store import TrialStore
from privdom_ray.train.selection import DPSelection, plan_state


def _spec(epsilon: float, source: str = "a") -> TrialSpec:
    return TrialSpec(
        source=source, data_fingerprint="x", epsilon=epsilon,
        delta=1e-5 if math.isfinite(epsilon) else 0.0, seed=0, model="smallcnn",
        training=TrainingConfig(epochs=3, logical_batch=16, physical_batch=16, lr=1e-3),
        preprocessing=Preprocessing(image_size=16),
    ).with_key()  # fmt: skip


def _train_cell(tmp_path, epsilon: float):
    """One standard trial trained by its kind's trainer on a toy cache entry (two images per
    patient, 64 training images), written through the store."""
    from conftest import write_cache

    from privdom_ray.cell import Cell
    from privdom_ray.config import EvaluationConfig
    from privdom_ray.trial import Executor, trainer_of

    cache = tmp_path / "cache" / "a"
    if not cache.exists():
        write_cache(cache, n_train=64)
    spec = _spec(epsilon)
    cell = Cell(spec=spec, output=str(tmp_path / "out"), source_cache=str(cache), targets=(),
                evaluation=EvaluationConfig())  # fmt: skip
    store = TrialStore(cell.output)
    store.folder(spec.key).mkdir(parents=True, exist_ok=True)
    trainer_of(spec)(cell, store, None, "test", Executor())
    return spec, store


def _problems(store: TrialStore, key: str, edit=None) -> list[str]:
    """audit's problems for the trial with its stored ledger edited by ``edit`` (resealed as
    a faulty writer would), put back afterwards."""
    original = store.verified_bytes(key, "ledger.json")
    if edit is not None:
        doc = store.ledger_document(key)
        store.rewrite(key, "ledger.json", json.dumps(edit(dict(doc))).encode())
    try:
        return [line.problem for line in audit_trial(store, store.read(key)) if not line.ok]
    finally:
        store.rewrite(key, "ledger.json", original)


# ------------------------------------------------------------------------- the calibration


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 8.0])
def test_the_validation_releases_alone_fit_within_the_training_epsilon(epsilon):
    noise = validation_noise(epsilon, 1e-5)
    assert noise.score_noise_multiplier is None  # one model: nothing to score
    spent = validation_epsilon(noise, 1e-5)
    # at most the training epsilon (parallel: max = training's); most of it (discrete orders)
    assert 0.9 * epsilon <= spent <= epsilon
    assert noise.checkpoint_epsilon > 0 and noise.histogram_noise_multiplier > 0


def test_check_validation_fails_a_claim_of_less_noise_than_recomputed():
    from privdom_ray.selection.untuned import validation_entry

    noise = validation_noise(1.0, 1e-5)
    entry = validation_entry(noise, epsilon_train=1.0, delta=1e-5, bound=1.0, bins=20, n_labels=5)
    ok = dict(epsilon_train=1.0, epsilon_spent=1.0, delta=1e-5, n_labels=5)
    assert check_validation(entry, **ok) == []
    for name, scale in (("histogram_noise_multiplier", 0.5), ("checkpoint_epsilon", 2.0)):
        bad = {**entry, "noise": {**entry["noise"], name: entry["noise"][name] * scale}}
        found = check_validation(bad, **ok)
        assert any(name in p for p in found), found
    # a training epsilon recounted smaller (e.g. a ledger claiming more budget than it had)
    assert check_validation(entry, **{**ok, "epsilon_train": 0.5})


# ------------------------------------------------------------------------- the randomness


def test_two_releases_on_the_same_inputs_draw_their_noise_independently():
    """The epoch's Gumbel and the histograms' Gaussian come from OS entropy: the same model,
    seed and validation split give different noise each time (never the public seed)."""
    from conftest import toy_split

    val = toy_split(40, seed=1)
    val = dataclasses.replace(val, patient=np.array([f"p{i // 2}" for i in range(40)]))
    probs = np.random.default_rng(0).random(val.labels.shape)
    selector = DPSelection.of(plan_state(1.0, 1e-5), val)
    assert selector.noisy_utility(probs, val.labels) != selector.noisy_utility(probs, val.labels)
    a = selector.thresholds(probs, val.labels)
    b = [selector.thresholds(probs, val.labels) for _ in range(5)]
    assert any(not np.allclose(a, x, equal_nan=True) for x in b)


def test_a_large_epoch_epsilon_picks_the_lowest_validation_loss():
    """The mechanism is the exponential mechanism: with a huge epsilon the best epoch wins."""
    from conftest import toy_split

    val = toy_split(40, seed=1)
    good = np.where(np.isnan(val.labels), 0.5, np.clip(val.labels, 0.05, 0.95))
    bad = np.full(val.labels.shape, 0.5)
    selector = DPSelection.of(plan_state(1.0, 1e-5), val)
    selector = dataclasses.replace(
        selector, noise=dataclasses.replace(selector.noise, checkpoint_epsilon=1e4)
    )
    for _ in range(5):
        assert selector.noisy_utility(good, val.labels) > selector.noisy_utility(bad, val.labels)


# ------------------------------------------------------------------------- the trainer


@pytest.mark.slow
def test_a_dp_trial_releases_epoch_and_thresholds_in_its_ledger_and_audit_recomputes_them(
    tmp_path, one_torch_thread
):
    spec, store = _train_cell(tmp_path, 2.0)
    doc = store.ledger_document(spec.key)
    entry = doc["validation"]
    assert entry["accountant"] == "rdp" and "parallel" in entry["composition"]
    assert entry["epsilon"] <= doc["epsilon_spent"] and doc["accountant"] == "prv"
    assert entry["noise"]["checkpoint_epsilon"] > 0 and entry["noise"]["histogram_noise_multiplier"] > 0
    record = store.read(spec.key)
    assert record.ledger.validation is not None and record.info.best_epoch in (1, 2, 3)
    # the exact validation AUC stays out of the record (private history only)
    assert record.info.val_macro_auc is None
    trial_json = json.loads((store.folder(spec.key) / "trial.json").read_text())
    assert trial_json.get("val_macro_auc") is None and "exponential" in trial_json["selection"]
    assert "val_macro_auc" not in json.dumps(doc)
    assert _problems(store, spec.key) == []
    # a claim of less noise than the spec and N_train give fails
    for name, scale in (("histogram_noise_multiplier", 0.5), ("checkpoint_epsilon", 3.0)):
        def less_noise(d, name=name, scale=scale):
            v = d["validation"]
            return {**d, "validation": {**v, "noise": {**v["noise"], name: v["noise"][name] * scale}}}

        assert any(name in p for p in _problems(store, spec.key, less_noise))
    # the entry dropped while trial.json still names the DP rule: the site's composition would
    # leave the releases out, so audit names the disagreement (a record of the code before,
    # whose trial.json names the exact rule, audits clean: the next test)
    dropped = _problems(store, spec.key, lambda d: {k: v for k, v in d.items() if k != "validation"})
    assert any("no validation entry" in p for p in dropped)


@pytest.mark.slow
def test_non_dp_trials_keep_exact_selection(tmp_path, one_torch_thread):
    spec, store = _train_cell(tmp_path, math.inf)
    record = store.read(spec.key)
    assert record.ledger.validation is None and "validation" not in store.ledger_document(spec.key)
    assert record.info.val_macro_auc is not None and "macro AUC" in record.info.selection


def test_an_old_format_dp_record_is_read_without_retraining_and_audits_clean(tmp_path):
    """A DP trial finished before (the legacy fixture: no validation entry) stays trained,
    its ledger reads without one, and audit finds nothing about validation releases."""
    import shutil
    from pathlib import Path

    from privdom_ray.audit import audit_output

    out = tmp_path / "out"
    shutil.copytree(Path(__file__).parent / "fixtures" / "legacy_output", out)
    store = TrialStore(out)
    dp = [k for k in store.trial_keys() if store.read(k).spec.is_private]
    assert len(dp) == 1
    record = store.read(dp[0])
    assert store.is_trained(dp[0]) and record.ledger.validation is None
    assert record.info.val_macro_auc is not None  # as it was written
    assert not any("validation" in line.problem for line in audit_output(out))


# ------------------------------------------------------------------------- the table and report


def test_the_report_marks_only_rows_without_the_releases_as_outside_the_guarantee(tmp_path):
    """Real trial folders and the sweep's own aggregation: a DP trial whose ledger holds the
    validation releases (new), one without (finished before) and a non-DP one."""
    from helpers.trials import (
        make_testset,
        scores_for,
        tiny_ledger,
        tiny_spec,
        write_evaluation,
        write_trained,
    )

    from privdom_ray.report.guarantees import dp_validation_note
    from privdom_ray.selection.untuned import validation_entry
    from privdom_ray.stats import results

    noise = validation_noise(0.99, 1e-5)
    entry = validation_entry(noise, epsilon_train=0.99, delta=1e-5, bound=1.0, bins=20, n_labels=5)
    new = dataclasses.replace(tiny_ledger(1.0), validation=entry)
    test = make_testset(80, seed=3)
    keys = {}
    for name, spec, ledger in (("new", tiny_spec("a", 1.0, 0), new),
                               ("before", tiny_spec("a", 1.0, 1), tiny_ledger(1.0)),
                               ("nondp", tiny_spec("a", math.inf, 0), None)):  # fmt: skip
        keys[name] = write_trained(tmp_path, spec, ledger)
        write_evaluation(tmp_path, keys[name], "a", "fpa", test, scores_for(test, 2.0, 0))
    target = SimpleNamespace(name="a", fingerprint="fpa")
    results.aggregate(tmp_path, list(keys.values()), "s", [target])
    df = results.load(tmp_path)  # the table as written, as the report reads it
    by_key = df.drop_duplicates("trial_key").set_index("trial_key")["epsilon_validation"]
    assert by_key[keys["new"]] == pytest.approx(entry["epsilon"])
    assert by_key[keys["new"]] <= 0.99
    assert math.isnan(by_key[keys["before"]]) and math.isnan(by_key[keys["nondp"]])
    assert results.privacy_class("epsilon_validation") == "ledger"
    note = dp_validation_note(df.drop_duplicates("trial_key"))
    assert "In 1 untuned DP trial(s)" in note and "finished before this release" in note
    assert "RDP" in note and "parallel" in note
    # a table of trials all finished before says nothing new: every row stays outside
    assert dp_validation_note(df[df["trial_key"] != keys["new"]]) == ""


# ------------------------------------------------------------------------- resumes


def _toy():
    from conftest import toy_split

    train, val = toy_split(64, 16, 0), toy_split(32, 16, 1)
    return train, dataclasses.replace(val, patient=np.array([f"p{i // 2}" for i in range(32)]))


def test_a_resumed_dp_run_keeps_its_selection_plan_and_releases_once(one_torch_thread):
    """The plan and the running noisy maximum live in the private checkpoint: a resume
    continues them (same noise sizes, same ledger) instead of starting a second selection."""
    from test_train import MemoryCheckpoints

    from privdom_ray.train import run_trial

    train, val = _toy()
    spec = _spec(2.0)
    store = MemoryCheckpoints()
    reference = run_trial(spec, train, val, checkpoint=store, dp_selection=True)
    saved = store.saved[1]
    assert saved["selection"]["noise"]["checkpoint_epsilon"] > 0 and math.isfinite(saved["best_noisy"])
    after_first = MemoryCheckpoints()
    after_first.state = saved
    resumed = run_trial(spec, train, val, checkpoint=after_first, dp_selection=True)
    assert resumed.resumed_from_epoch == 1 and resumed.ledger == reference.ledger
    assert resumed.ledger.validation == reference.ledger.validation is not None
    assert resumed.thresholds is not None and len(resumed.thresholds) == val.labels.shape[1]


def test_a_checkpoint_of_the_code_before_resumes_with_exact_selection(one_torch_thread):
    """A DP run checkpointed by the code before (no selection plan: its first epochs were
    chosen exactly) finishes as it started: exact, no validation entry, marked outside."""
    from test_train import MemoryCheckpoints

    from privdom_ray.train import run_trial

    train, val = _toy()
    spec = _spec(2.0)
    store = MemoryCheckpoints()
    run_trial(spec, train, val, checkpoint=store)  # dp_selection off: as before
    old = {k: v for k, v in store.saved[1].items() if k not in ("selection", "best_noisy")}
    before = MemoryCheckpoints()
    before.state = old
    resumed = run_trial(spec, train, val, checkpoint=before, dp_selection=True)
    assert resumed.resumed_from_epoch == 1
    assert resumed.ledger.validation is None and resumed.thresholds is None
