"""``launch.py evaluate`` reads each finished trial as often as it must, and no more.

Certifying reads are verified reads (the store checks every byte against ``done``), so a
read that is repeated costs a full hash of the model each time. A process verifies a trial
once and uses the bytes it verified: the driver checks a trial (read-only) and tidies it
(``TrialStore.usable``), planning does not check it a third time; an evaluation (which may run
in another process than its cell) reads the record and the weights in one verified read. The
counts come from a counting wrapper around ``integrity.read_verified``, the one function
every verified read of the store goes through (it still does the real check).
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import write_cache
from helpers.trials import EV, tiny_ledger, tiny_spec
from test_store import damage, grid, mark_done

from privdom_ray import integrity, planning
from privdom_ray.cell import TargetRef
from privdom_ray.grid import parse_grid
from privdom_ray.kinds import plan_trials
from privdom_ray.manifest import LABELS
from privdom_ray.models import build_model
from privdom_ray.records import RunRecord
from privdom_ray.store import DamagedRecord, TrialStore
from privdom_ray.sweep import checked_trials
from privdom_ray.trial.evaluation import evaluate_stored


@pytest.fixture
def verified(monkeypatch) -> collections.Counter:
    """File name -> how many times the store verified it (the real check still runs)."""
    counts: collections.Counter = collections.Counter()
    real = integrity.read_verified

    def counting(path: Path, expected: integrity.FileSum) -> bytes:
        counts[Path(path).name] += 1
        return real(path, expected)

    monkeypatch.setattr(integrity, "read_verified", counting)
    return counts


@pytest.fixture
def hashed(monkeypatch) -> collections.Counter:
    """Byte count -> how many times bytes of that length were hashed (the real hash runs)."""
    counts: collections.Counter = collections.Counter()
    real = integrity.digest

    def counting(data: bytes) -> str:
        counts[len(data)] += 1
        return real(data)

    monkeypatch.setattr(integrity, "digest", counting)
    return counts


def trained(output: Path) -> str:
    """A trial with real (untrained) smallcnn weights, committed through the store."""
    spec = tiny_spec("a", math.inf, 0, model="smallcnn")
    state = build_model("smallcnn", num_outputs=len(LABELS)).state_dict()
    TrialStore(output).write_trained(
        spec.key, state_dict=state, ledger=tiny_ledger(math.inf), history=[],
        thresholds=[0.5] * len(LABELS), labels=LABELS, spec=spec,
        record=RunRecord.make(best_epoch=1, train_seconds=1.0, val_macro_auc=0.5),
    )  # fmt: skip
    return spec.key


def evaluate(output: Path, key: str, target: TargetRef) -> None:
    evaluate_stored(output=str(output), key=key, model_name="smallcnn", target=target,
                    evaluation=EV)  # fmt: skip


def test_an_evaluation_verifies_the_model_once_and_names_it(tmp_path, verified, hashed):
    out = tmp_path / "out"
    key = trained(out)
    target = TargetRef("c", "fp-c", str(write_cache(tmp_path / "cache" / "c")), "patient")
    size = (TrialStore(out).folder(key) / "model.pt").stat().st_size
    verified.clear()
    hashed.clear()
    evaluate(out, key, target)
    assert verified["model.pt"] == 1  # was 2: store.read, then store.model read it again
    assert hashed[size] == 1  # was 4: two reads, each hashing to check and again to name it
    assert verified["trial.json"] == verified["thresholds.json"] == 1
    store = TrialStore(out)
    ev = store.evaluation(key, "c", "fp-c")
    assert ev is not None and ev.model == store.model_digest(key)
    # the one read gives what the two gave
    record, weights = store.read_with_model(key)
    assert record == store.read(key)
    assert weights.digest == record.model_digest == store.model_digest(key)
    assert all(np.array_equal(weights.state[n], t) for n, t in store.model(key).state.items())


def test_an_evaluation_of_a_damaged_model_writes_nothing(tmp_path):
    out = tmp_path / "out"
    key = trained(out)
    target = TargetRef("c", "fp-c", str(write_cache(tmp_path / "cache" / "c")), "patient")
    damage(TrialStore(out).folder(key) / "model.pt", "zero-filled")  # same size: the checksum
    with pytest.raises(DamagedRecord, match="model.pt"):
        evaluate(out, key, target)
    assert TrialStore(out).evaluation(key, "c", "fp-c") is None


def test_evaluate_planning_does_not_verify_what_the_driver_just_checked(tmp_path, verified):
    """sweep.prepare (train=False) verifies each trial once (was: a read-only check, then
    the store's tidying verified it again) and tidies it; plan_cells then uses those records
    and reasons (was: a third full verification per trial). A trial the driver found unusable
    is still named, with its reason."""
    fps = {"a": "fpa", "b": "fpb"}
    spec = parse_grid(grid(tmp_path), base=tmp_path)
    trials = plan_trials(spec, fps, {"a": 100, "b": 100})
    for t in trials:
        mark_done(tmp_path, t, {"a": "fpa"})  # b is a new target: every trial evaluates it
    store, caches = TrialStore(spec.output), {n: str(tmp_path / "cache" / n) for n in "ab"}
    broken = trials[0]
    damage(store.folder(broken.key) / "ledger.json", "truncated")
    verified.clear()
    # what sweep.prepare does with train=False: one check per trial, then the store's tidying
    records, unusable = checked_trials(store, trials, train=False, log=lambda _m: None)
    # trial.json is every check's first file: each trial verified once
    assert verified["trial.json"] == len(trials)
    assert verified["model.pt"] == len(trials) - 1  # the broken one stops at its ledger
    assert set(unusable) == {broken.key} and broken.key not in records
    assert store.folder(broken.key).is_dir()  # evaluate names it, never moves it
    verified.clear()
    lines: list[str] = []
    plan = planning.plan_cells(spec, trials, store, caches, fps, train=False, records=records,
                               unusable=unusable, log=lines.append)  # fmt: skip
    # the driver's checks are used, not made again (only the evaluations found are read)
    assert verified["trial.json"] == verified["model.pt"] == verified["ledger.json"] == 0
    assert len(plan.unusable) == 1 and plan.unusable[0].startswith(f"{broken.name}: ledger.json")
    # without the driver's reasons, planning still verifies the trial it was not told about
    verified.clear()
    again = planning.plan_cells(spec, trials, store, caches, fps, train=False, records=records,
                                log=lines.append)  # fmt: skip
    assert verified["trial.json"] == 1 and again.unusable == plan.unusable
    assert sorted(c.spec.key for c in plan.cells) == sorted(t.key for t in trials[1:])
    assert all([t.name for t in c.targets] == ["b"] for c in plan.cells)


def test_the_sweep_verifies_each_trial_once_and_sets_damage_aside(tmp_path, verified):
    """sweep.prepare (training): one verification per trial, whether ``plan_trials`` asked
    about it first (a kept trial: its inspection is passed on) or not; a damaged trial is
    still set aside to be trained again, an intact one kept."""
    fps = {"a": "fpa", "b": "fpb"}
    spec = parse_grid(grid(tmp_path), base=tmp_path)
    trials = plan_trials(spec, fps, {"a": 100, "b": 100})
    for t in trials:
        mark_done(tmp_path, t, fps)
    store = TrialStore(spec.output)
    broken, kept = trials[0], trials[1]
    damage(store.folder(broken.key) / "model.pt", "truncated")
    verified.clear()
    found = {kept.key: store.inspect(kept.key)}  # as prepare's ``finished`` does
    assert verified["trial.json"] == 1
    lines: list[str] = []
    records, unusable = checked_trials(store, trials, found, train=True, log=lines.append)
    assert verified["trial.json"] == len(trials)  # the kept one not verified again
    assert unusable == {} and records[broken.key] is None
    assert all(records[t.key] is not None for t in trials[1:])
    assert not store.folder(broken.key).exists() and "set_aside" in lines[0]
