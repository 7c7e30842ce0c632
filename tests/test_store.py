"""The trial store and the pure planning on top of it: records, damage, resume rules.

Trials are written through the store by conftest's builder (synthetic scores, no training);
``planning.plan_cells`` decides what a sweep would train and evaluate, without Ray.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import pytest
from conftest import make_testset, scores_for, write_trial

from privdom_ray import planning, results
from privdom_ray.grid import parse_grid
from privdom_ray.kinds import plan_trials
from privdom_ray.store import DriverLock, LockHeld, TrialStore


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    fingerprint: str


def finished(output: Path, *, epsilon: float = 1.0, seed: int = 0) -> str:
    test = make_testset(80, seed=3)
    return write_trial(output, source="a", epsilon=epsilon, seed=seed,
                       evals={"a": ("fpa", test, scores_for(test, 1.0, 1))})  # fmt: skip


RECORDS = [
    "trial.json",
    "ledger.json",
    "thresholds.json",
    "history.json",
    "model.pt",
    "eval/a-fpa/eval.json",
    "eval/a-fpa/metrics.parquet",
    "eval/a-fpa/predictions.parquet",
]


@pytest.mark.parametrize("record", RECORDS)
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_record_is_named_and_its_trial_redone(tmp_path, record, damage):
    key = finished(tmp_path)
    store = TrialStore(tmp_path)
    path = store.folder(key) / record
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
    else:
        path.unlink()
    state, detail = store.status(key, [Target("a", "fpa")])
    if record.endswith("eval.json") and damage == "missing":
        assert state == "evaluating"  # eval.json is written last: a half-written evaluation
    else:
        assert state == "damaged" and record.split("/")[-1] in detail
    if record.startswith("eval/"):  # the model is fine: only the evaluation is redone
        assert store.valid(key) is not None
        assert store.missing_targets(key, [Target("a", "fpa")]) == [Target("a", "fpa")]
        return
    assert store.valid(key) is None  # never used by tables or reports
    lines = []
    assert store.usable(key, lines.append) is None  # the driver sets it aside, to retrain
    assert not store.folder(key).exists() and record.split("/")[-1] in lines[0]
    (aside,) = (tmp_path / "set_aside").iterdir()
    assert aside.name.startswith(f"{key}-damaged-") and (aside / "SET_ASIDE.txt").is_file()


def grid(tmp_path: Path, **changes) -> dict:
    return {
        "output": str(tmp_path / "out"),
        "domains": [
            {"name": n, "kind": "synthetic", "root": str(tmp_path / n), "options": {"site": n}}
            for n in ("a", "b")
        ],
        "epsilons": [1, "inf"],
        "training": {"epochs": 2, "logical_batch": 32, "physical_batch": 16},
        **changes,
    }


def plan(tmp_path: Path, fps: dict, **changes):
    spec = parse_grid(grid(tmp_path, **changes), base=tmp_path)
    trials = plan_trials(spec, fps, {"a": 100, "b": 100})
    caches = {n: str(tmp_path / "cache" / n) for n in ("a", "b")}
    store = TrialStore(spec.output)
    return trials, planning.plan_cells(spec, trials, store, caches, fps, log=lambda _m: None)


def mark_done(tmp_path: Path, trial, targets: dict[str, str]) -> None:
    """Write ``trial`` as finished and evaluated on ``targets`` (name -> fingerprint)."""
    test = make_testset(60, seed=1)
    out = tmp_path / "out"
    key = write_trial(out, source=trial.source, epsilon=trial.epsilon, seed=trial.seed,
                      evals={t: (fp, test, scores_for(test, 1.0, 2)) for t, fp in targets.items()})  # fmt: skip
    store = TrialStore(out)  # the builder's spec is generic: file it under the planned key
    store.folder(key).rename(store.folder(trial.key))
    info = json.loads((store.folder(trial.key) / "trial.json").read_text())
    info["spec"] = trial.to_json()
    results.write_json(store.folder(trial.key) / "trial.json", info)


def test_planning_skips_done_work_and_runs_only_what_is_new(tmp_path):
    fps = {"a": "fpa", "b": "fpb"}
    trials, first = plan(tmp_path, fps)
    assert len(first.cells) == len(trials) == 4  # nothing done yet
    for t in trials:
        mark_done(tmp_path, t, fps)
    assert plan(tmp_path, fps)[1].cells == []  # resume: all done, nothing runs
    # a new epsilon: only its cells
    _, more = plan(tmp_path, fps, epsilons=[1, 8, "inf"])
    assert sorted(c.spec.name for c in more.cells) == ["a_eps8_seed0", "b_eps8_seed0"]
    # a new target: finished models are evaluated on it, not retrained
    c = {"name": "c", "kind": "synthetic", "root": str(tmp_path / "c"), "options": {"site": "c"}}
    g = grid(tmp_path)
    spec = parse_grid({**g, "domains": [*g["domains"], c], "sources": ["a", "b"]}, base=tmp_path)
    caches = {n: str(tmp_path / "cache" / n) for n in "abc"}
    fps3 = {**fps, "c": "fpc"}
    cells = planning.plan_cells(spec, plan_trials(spec, fps3, {"a": 100, "b": 100}),
                                TrialStore(spec.output), caches, fps3).cells  # fmt: skip
    assert len(cells) == 4 and all([t.name for t in c.targets] == ["c"] for c in cells)
    # a target's data changed: evaluated again on the new version, models kept
    _, changed = plan(tmp_path, {"a": "fpa", "b": "fpb2"})
    by_source = {s: [c for c in changed.cells if c.spec.source == s] for s in "ab"}
    # b's models are new trials (their key hashes b's data): trained, tested everywhere
    assert len(by_source["b"]) == 2 and not any(TrialStore(tmp_path / "out").is_trained(
        c.spec.key) for c in by_source["b"])  # fmt: skip
    # a's finished models only meet b's new test split: evaluated, not retrained
    assert len(by_source["a"]) == 2
    assert all([(t.name, t.fingerprint) for t in c.targets] == [("b", "fpb2")]
               for c in by_source["a"])  # fmt: skip


def test_one_evaluation_per_trial_and_target_in_the_table(tmp_path):
    """When a target's data changes, the table holds the current version's rows only (and
    says which); the older evaluation stays on disk."""
    test = make_testset(60, seed=1)
    key = write_trial(tmp_path, source="b", epsilon=math.inf, seed=0,
                      evals={"a": ("fpa", test, scores_for(test, 1.0, 2))})  # fmt: skip
    store = TrialStore(tmp_path)
    assert store.missing_targets(key, [Target("a", "fpa2")]) == [Target("a", "fpa2")]
    newer = make_testset(50, seed=2)
    write_trial(tmp_path, source="b", epsilon=math.inf, seed=0,
                evals={"a": ("fpa2", newer, scores_for(newer, 1.0, 3))})  # fmt: skip
    _, df = results.aggregate(tmp_path, [key], "s", [Target("a", "fpa2")])
    assert set(df["data_fingerprint"]) == {"fpa2"}
    assert not df.duplicated(["trial_key", "target", "label", "subgroup"]).any()
    assert df[(df["label"] == "macro") & (df["subgroup"] == "all")]["n"].iloc[0] == 50
    assert store.evaluation(key, "a", "fpa") is not None  # kept on disk


def test_an_evaluation_of_an_older_protocol_is_redone(tmp_path):
    key = finished(tmp_path)
    store = TrialStore(tmp_path)
    ev_json = store.folder(key) / "eval" / "a-fpa" / "eval.json"
    old = json.loads(ev_json.read_text())
    old.pop("protocol")  # written before predictions carried patient groups
    ev_json.write_text(json.dumps(old))
    assert store.missing_targets(key, [Target("a", "fpa")]) == [Target("a", "fpa")]


def test_one_driver_per_output_folder(tmp_path):
    with DriverLock(tmp_path, "run-1"), pytest.raises(LockHeld, match="another driver .* run-1"):
        DriverLock(tmp_path, "run-2").acquire()
    DriverLock(tmp_path, "run-3").acquire()  # released: free again
    # a dead driver's lock (its process is gone) is taken over
    lock = tmp_path / "driver.lock"
    lock.write_text(json.dumps({"host": DriverLock(tmp_path, "x").holder["host"], "pid": 2**22 + 7,
                                "run_id": "dead", "updated": time.time()}))  # fmt: skip
    DriverLock(tmp_path, "run-4").acquire()
    assert json.loads(lock.read_text())["run_id"] == "run-4"
    # a silent one (another host, no heartbeat for longer than the limit) too
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "run_id": "gone",
                                "updated": time.time() - 600}))  # fmt: skip
    DriverLock(tmp_path, "run-5").acquire()
    assert json.loads(lock.read_text())["run_id"] == "run-5"
