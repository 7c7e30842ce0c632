"""The shared test helpers build folders the store itself calls finished, and their reads and
edits go through its checksums: otherwise every test built on them would test a fiction."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from helpers import folders
from helpers.trials import make_testset, scores_for, tiny_spec, write_trial

from privdom_ray.manifest import LABELS
from privdom_ray.store import DamagedRecord, TrialStore


@dataclass(frozen=True)
class Target:
    name: str
    fingerprint: str


def test_a_written_trial_is_finished_valid_and_read_back_value_for_value(tmp_path):
    test = make_testset(60, seed=1)
    scores = scores_for(test, 1.2, seed=2)
    key = write_trial(tmp_path, source="a", epsilon=2.0, seed=0,
                      evals={"a": ("fpa", test, scores)})  # fmt: skip
    store = TrialStore(tmp_path)
    assert key == tiny_spec("a", 2.0, 0).key and folders.trained_keys(tmp_path) == [key]
    assert store.status(key, [Target("a", "fpa")]) == ("done", "")
    assert store.valid(key) is not None and not store.unusable_reason(key)
    assert folders.find(tmp_path, "a", 2.0) == key
    assert folders.ledger(tmp_path, key)["epsilon_spent"] == pytest.approx(1.98)
    assert folders.info(tmp_path, key)["spec"]["key"] == key
    assert list(folders.model_state(tmp_path, key)) == ["w"]
    pred = folders.predictions(tmp_path, key, "a")
    assert pred[f"score_{LABELS[0]}"].to_numpy() == pytest.approx(scores[:, 0])
    assert len(folders.metrics(tmp_path, key, "a", "fpa")) > 0


def test_unfinished_and_half_written_trials_are_what_the_store_calls_them(tmp_path):
    test = make_testset(40, seed=3)
    evals = {t: (f"fp{t}", test, scores_for(test, 1.0, seed=4)) for t in "ab"}
    half = write_trial(tmp_path, source="a", epsilon=math.inf, seed=0, evals=evals,
                       incomplete=("b",))  # fmt: skip
    crashed = write_trial(tmp_path, source="b", epsilon=math.inf, seed=0, evals=evals, done=False)
    store = TrialStore(tmp_path)
    targets = [Target("a", "fpa"), Target("b", "fpb")]
    assert store.status(half, targets)[0] == "damaged"  # eval.json of b gone
    assert store.status(crashed, targets)[0] == "pending"
    assert folders.trained_keys(tmp_path) == [half]


def test_rewritten_is_a_sealed_edit_undone_afterwards_and_raw_damage_is_refused(tmp_path):
    test = make_testset(40, seed=5)
    key = write_trial(tmp_path, source="a", epsilon=1.0, seed=0,
                      evals={"a": ("fpa", test, scores_for(test, 1.0, seed=6))})  # fmt: skip
    before = TrialStore(tmp_path).verified_bytes(key, "ledger.json")
    with folders.rewritten(tmp_path, key, "ledger.json", lambda led: {**led, "steps": 99}):
        assert folders.ledger(tmp_path, key)["steps"] == 99  # sealed: a valid record
    assert TrialStore(tmp_path).verified_bytes(key, "ledger.json") == before
    # an edit that is not sealed is damage, even one that still parses
    (TrialStore(tmp_path).folder(key) / "ledger.json").write_bytes(before + b" ")
    with pytest.raises(DamagedRecord, match="ledger.json"):
        folders.ledger(tmp_path, key)
