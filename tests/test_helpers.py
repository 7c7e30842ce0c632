"""The shared test helpers build folders the store itself calls finished, and their reads and
edits go through its checksums: otherwise every test built on them would test a fiction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

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


def test_launch_here_answers_as_the_script_does(tmp_path):
    """conftest's in-process ``launch_here`` gives the command line's exit code, stdout and
    stderr: a command that succeeds (``show`` of a written trial), one that refuses (status of
    a folder without a plan, exit 2), a usage error (argparse, exit 2)."""
    from conftest import launch, launch_here

    test = make_testset(60, seed=1)
    write_trial(tmp_path / "out", source="a", epsilon=2.0, seed=0,
                evals={"a": ("fpa", test, scores_for(test, 1.0, 2))})  # fmt: skip
    for args in (("show", "out", "a/2.0/0"), ("status", "nowhere"), ("audit",)):
        script = launch(*args, cwd=tmp_path, expect=None)
        here = launch_here(*args, cwd=tmp_path, expect=None)
        assert script.returncode in (0, 2) and script.stdout + script.stderr
        assert (here.returncode, here.stdout, here.stderr) == (
            script.returncode, script.stdout, script.stderr
        ), args
    assert launch_here("status", "nowhere", cwd=tmp_path, expect=2).stderr.startswith("error:")


def test_built_once_builds_for_the_first_worker_and_hands_the_rest_its_result(tmp_path_factory):
    """helpers.shared.built_once: the second worker of a run reads what the first built (no
    second build); a build that failed leaves no result and the next asker builds again."""
    import uuid

    from helpers.shared import built_once

    name, calls = f"selftest-{uuid.uuid4().hex[:8]}", []

    def build(folder: Path) -> dict:
        calls.append(folder)
        if len(calls) == 1:
            raise RuntimeError("a build that fails")
        (folder / "x").write_text("built")
        return {"folder": str(folder)}

    with pytest.raises(RuntimeError):
        built_once(tmp_path_factory, "gw0", name, build)
    first = built_once(tmp_path_factory, "gw0", name, build)
    second = built_once(tmp_path_factory, "gw1", name, build)
    assert first == second and len(calls) == 2
    assert (Path(first["folder"]) / "x").read_text() == "built"
    assert built_once(tmp_path_factory, "master", name, build) != first  # no xdist: its own
