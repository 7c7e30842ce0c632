"""The trial store and the pure planning on top of it: records, damage, resume rules.

Trials are written through the store by conftest's builder (synthetic scores, no training);
``planning.plan_cells`` decides what a sweep would train and evaluate, without Ray.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers.trials import make_testset, scores_for, tiny_federation, write_trained, write_trial

from privdom_ray import lease, planning
from privdom_ray.config import TrialSpec
from privdom_ray.grid import parse_grid
from privdom_ray.kinds import kind_of, plan_trials
from privdom_ray.lease import Fenced, Lease, LockHeld
from privdom_ray.manifest import LABELS
from privdom_ray.stats import results
from privdom_ray.store import DamagedRecord, TrialStore


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
    "config.yaml",
    "model.pt",
    "done",
    "eval/a-fpa/eval.json",
    "eval/a-fpa/metrics.parquet",
    "eval/a-fpa/predictions.parquet",
]
LOGS = ("history.json", "config.yaml")


def damage(path: Path, how: str) -> None:
    """Truncate, zero-fill a block inside (size and parse may survive), or delete ``path``."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: max(1, len(data) // 2)])
    elif how == "zero-filled":
        block = min(4096, max(1, len(data) // 3))
        start = len(data) // 2 - block // 2
        path.write_bytes(data[:start] + b"\0" * block + data[start + block :])
    else:
        path.unlink()


def old_config(store: TrialStore, key: str) -> str:
    """Give a trial the config.yaml today's main writes beside trial.json (the record plus the
    ledger), sealed in its ``done`` as that main seals it; returns its text."""
    import yaml

    tdir = store.folder(key)
    record = json.loads((tdir / "trial.json").read_text())
    ledger = json.loads((tdir / "ledger.json").read_text())
    text = yaml.safe_dump({**record, "ledger": ledger}, sort_keys=False)
    store.rewrite(key, "config.yaml", text.encode())
    return text


def test_each_fact_is_written_once_and_old_config_yaml_still_reads(tmp_path):
    """A new trial has no config.yaml (trial.json and ledger.json hold every fact once);
    ``show`` renders the same text from them; a folder that has one still verifies and reads."""
    key = finished(tmp_path)
    store = TrialStore(tmp_path)
    assert not (store.folder(key) / "config.yaml").exists()
    rendered = store.config_text(key)
    old = old_config(store, key)
    assert rendered == old  # what people read is unchanged
    found = store.inspect(key)
    assert found.record is not None and found.damage is None and found.logs == ()
    assert store.status(key, [Target("a", "fpa")])[0] == "done"
    assert store.config_text("0" * 12) is None  # not trained


@pytest.mark.parametrize("record", RECORDS)
@pytest.mark.parametrize("how", ["truncated", "zero-filled", "missing"])
def test_a_damaged_record_is_named_and_redone_or_set_aside(tmp_path, record, how):
    key = finished(tmp_path)
    store = TrialStore(tmp_path)
    if record == "config.yaml":  # only folders written before each fact was written once
        old_config(store, key)
    damage(store.folder(key) / record, how)
    name = record.split("/")[-1]
    state, detail = store.status(key, [Target("a", "fpa")])
    if record == "done" and how == "missing":  # no commit record: a trial not trained yet
        assert state == "pending" and store.valid(key) is None
        return
    assert state == "damaged" and name in detail, (state, detail)
    if record.startswith("eval/"):  # the model is fine: only the evaluation is redone
        assert store.valid(key) is not None
        assert store.missing_targets(key, [Target("a", "fpa")]) == [Target("a", "fpa")]
        return
    lines: list[str] = []
    if record in LOGS:  # a training log: set aside alone, the model and evaluations kept
        assert store.valid(key) is not None
        assert store.usable(key, lines.append) is not None and name in lines[0]
        assert store.status(key, [Target("a", "fpa")])[0] == "done"
        assert store.missing_targets(key, [Target("a", "fpa")]) == []
        if record == "config.yaml":  # derived from the record: set aside, rendered instead
            assert not (store.folder(key) / "config.yaml").exists()
            assert "ledger" in store.config_text(key) and "lost" not in store._commit(key)
        else:
            assert how == "missing" or list((tmp_path / "set_aside").glob(f"{key}-{name}-*"))
            with pytest.raises(DamagedRecord, match="set aside"):
                store.history(key)
        return
    assert store.valid(key) is None  # never used by tables or reports
    assert store.usable(key, lines.append) is None  # the driver sets it aside, to retrain
    assert not store.folder(key).exists() and name in lines[0]
    (aside,) = (tmp_path / "set_aside").iterdir()
    assert aside.name.startswith(f"{key}-damaged-") and (aside / "SET_ASIDE.txt").is_file()


def test_an_evaluation_of_another_model_is_never_current(tmp_path):
    """A trial trained again (its ``done`` deleted, new noise) never keeps the evaluations of
    the model it replaced: each names the checksum of the model it came from."""
    key = finished(tmp_path)
    store = TrialStore(tmp_path)
    target = [Target("a", "fpa")]
    assert store.missing_targets(key, target) == []
    old = store.evaluation(key, "a", "fpa")
    assert old is not None and old.model == store.model_digest(key)
    record = store.read(key)
    store.write_trained(
        key, state_dict={"w": torch.ones(1)}, ledger=record.ledger, history=[],
        thresholds=list(record.thresholds), labels=LABELS, record=record.info, spec=record.spec,
    )  # fmt: skip
    assert store.model_digest(key) != old.model
    assert store.missing_targets(key, target) == target  # evaluated again, never kept
    assert store.evaluations(key) == []


def test_an_evaluation_of_other_test_images_is_never_current(tmp_path):
    """An evaluation also names the checksum of its target's decoded test images: replaced
    image files (a rebuilt cache with other pixels) mean it is evaluated again."""
    key = finished(tmp_path)
    store = TrialStore(tmp_path)
    old = store.evaluation(key, "a", "fpa")
    store.write_eval(
        key, "a", "fpa", metrics=old.metrics(), predictions=old.predictions(),
        info={"n_test": old.n_test, "n_boot": old.n_boot}, model=old.model, data="b2:images1",
    )  # fmt: skip
    same = planning.TargetRef("a", "fpa", "", data="b2:images1")
    other = planning.TargetRef("a", "fpa", "", data="b2:images2")
    assert store.missing_targets(key, [same]) == []
    assert store.missing_targets(key, [other]) == [other]
    assert store.missing_targets(key, [Target("a", "fpa")]) == []  # not checked when unknown


def test_a_folder_written_before_checksums_is_parsed_then_sealed(tmp_path):
    """Upgrades: a finished trial of an older privdom-ray (``done`` = "done", evaluations of
    protocol 3) is read after a full parse, sealed by the driver, and only re-evaluated."""
    key = finished(tmp_path)
    store = TrialStore(tmp_path)
    tdir = store.folder(key)
    write_legacy(tdir)
    target = [Target("a", "fpa")]
    assert store.inspect(key).legacy and store.valid(key) is not None
    assert "before checksums" in store.status(key, target)[1]
    assert store.missing_targets(key, target) == target  # no model checksum to bind to yet
    lines: list[str] = []
    assert store.usable(key, lines.append) is not None and "sealed" in lines[0]
    assert not store.inspect(key).legacy
    model = store.model(key)
    assert model.digest == store.model_digest(key) and set(model.state) == {"w"}
    assert store.missing_targets(key, target) == target  # protocol 3: evaluated again
    # a damaged legacy record is caught by the full parse
    key2 = finished(tmp_path, seed=1)
    write_legacy(store.folder(key2))
    damage(store.folder(key2) / "model.pt", "truncated")
    assert store.status(key2, target)[0] == "damaged" and store.valid(key2) is None


def write_legacy(tdir: Path) -> None:
    """Turn a trial folder into what privdom-ray wrote before checksums (commit 10482de)."""
    (tdir / "done").write_text("done\n")
    for ev in (tdir / "eval").glob("*/eval.json"):
        body = json.loads(ev.read_text())
        for k in ("checksum", "files", "model"):
            body.pop(k)
        body["protocol"] = 3
        ev.write_text(json.dumps(body))


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
    write_trial(tmp_path / "out", source=trial.source, epsilon=trial.epsilon, seed=trial.seed,
                spec=trial,  # filed under the planned key
                evals={t: (fp, test, scores_for(test, 1.0, 2)) for t, fp in targets.items()})  # fmt: skip


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_planning_writes_nothing_the_driver_sets_damage_aside(tmp_path):
    """Planning is pure: a damaged trial is planned for training again but left where it is,
    and not one file of the output folder changes; the driver's store step
    (``TrialStore.usable``, called by ``sweep.prepare``) is what sets it aside."""
    fps = {"a": "fpa", "b": "fpb"}
    trials, _ = plan(tmp_path, fps)
    for t in trials:
        mark_done(tmp_path, t, fps)
    out, broken = tmp_path / "out", trials[0]
    damage(TrialStore(out).folder(broken.key) / "model.pt", "truncated")
    before = _tree(out)
    _, again = plan(tmp_path, fps)
    assert [c.spec.key for c in again.cells] == [broken.key]  # trained again, the rest kept
    assert _tree(out) == before and not (out / "set_aside").exists()
    store = TrialStore(out)
    records = {t.key: store.usable(t.key, lambda _m: None) for t in trials}
    assert records[broken.key] is None and list((out / "set_aside").glob(f"{broken.key}-*"))
    assert all(records[t.key] is not None for t in trials[1:])


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
    for k in ("protocol", "checksum", "files", "model"):  # before patient groups, checksums
        old.pop(k)
    ev_json.write_text(json.dumps(old))
    ev = store.evaluation(key, "a", "fpa")
    assert ev is not None and ev.protocol == 1 and not ev.model  # read, not damaged
    assert store.missing_targets(key, [Target("a", "fpa")]) == [Target("a", "fpa")]


def test_one_driver_per_output_folder(tmp_path):
    held = Lease.acquire(tmp_path, "run-1")
    with pytest.raises(LockHeld, match="another driver .* run-1"):
        Lease.acquire(tmp_path, "run-2")
    held.release()
    Lease.acquire(tmp_path, "run-3").release()  # released: free again
    # a dead driver's lease (its process is gone) is taken over at once
    gone = Lease.acquire(tmp_path, "dead")
    body = json.loads(gone.path.read_text())
    gone.path.write_text(json.dumps({**body, "pid": 2**22 + 7}))
    took = Lease.acquire(tmp_path, "run-4")
    assert took.took_over is not None and took.took_over.run_id == "dead"
    with pytest.raises(Fenced, match="taken over"):
        gone.check()  # the old holder may write nothing more
    # a silent one (another host, not renewed for longer than its lease) too
    body = json.loads(took.path.read_text())
    took.path.write_text(json.dumps({**body, "host": "elsewhere"}))
    os.utime(took.path, (time.time() - 600, time.time() - 600))
    with pytest.raises(Fenced, match="not renewed"):
        took.check()  # its writers stopped before anyone could take over
    assert Lease.acquire(tmp_path, "run-5").run_id == "run-5"
    assert lease.current(tmp_path).run_id == "run-5"


def test_a_fenced_store_writes_nothing_once_its_driver_lost_the_lease(tmp_path):
    key = finished(tmp_path)
    held = Lease.acquire(tmp_path, "run-1", lease_s=60)
    store = TrialStore(tmp_path, fence=held.token)
    store.heartbeat(key, "run-1", "node")  # ours: allowed
    os.utime(held.path, (0, 0))  # released (a second driver may take over at once)
    Lease.acquire(tmp_path, "run-2")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    for write in (
        lambda: store.heartbeat(key, "run-1", "node"),
        lambda: store.record_failure(key, "run-1", reason="x", error="y"),
        lambda: store.checkpoint(key).save({"w": torch.zeros(1)}),
        lambda: store.set_aside(key, "damaged"),
        lambda: store.write_eval(key, "b", "fpb", metrics=pd.DataFrame({"x": [1]}),
                                 predictions=pd.DataFrame({"x": [1]}), info={}, model="m"),
    ):  # fmt: skip
        with pytest.raises(Fenced):
            write()
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def _race(args: tuple[str, int, float]) -> bool:
    """One contender of a round: wait for the start time, try to take the lease."""
    output, i, start = args
    time.sleep(max(0.0, start - time.time()))
    try:
        Lease.acquire(Path(output), f"c{i}", lease_s=30)
    except LockHeld:
        return False
    return True


def test_many_processes_racing_for_a_stale_lease_have_one_winner_every_round(tmp_path):
    """The takeover that was read-then-delete-then-create let 2 processes win in 30 of 200
    rounds; an atomic link of the next token lets exactly one win, every round."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(8) as pool:
        for round_ in range(40):
            out = tmp_path / f"r{round_}"
            if round_ % 2:  # a dead driver's lease to take over, not a free folder
                Lease.acquire(out, "dead", lease_s=30)
                holder = lease.current(out)
                os.utime(holder.path, (time.time() - 100, time.time() - 100))
            start = time.time() + 0.2
            won = pool.map(_race, [(str(out), i, start) for i in range(8)])
            assert sum(won) == 1, (round_, won)


LEGACY = Path(__file__).parent / "fixtures" / "legacy_output"


def test_an_output_folder_of_the_code_before_checksums_is_used_without_retraining(tmp_path):
    """Upgrades: trials written by commit 10482de (``done`` = "done", evaluations of protocol
    3, no checksums anywhere) are read after a full parse, sealed by the driver, never
    trained again, and only evaluated again (nothing proves which model an old evaluation
    came from: today's main can keep evaluations of a model it replaced)."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(LEGACY, out)
    store = TrialStore(out)
    target = [Target("a", "fpa")]
    keys = store.trial_keys()
    assert len(keys) == 2
    models = {k: (store.folder(k) / "model.pt").read_bytes() for k in keys}
    for key in keys:
        found = store.inspect(key)
        assert found.legacy and found.damage is None and store.valid(key) is not None
        assert store.status(key, target)[0] == "done"
        assert store.missing_targets(key, target) == target
        lines: list[str] = []
        record = store.usable(key, lines.append)  # the driver: parsed in full, then sealed
        assert record is not None and "sealed" in lines[-1]
        assert not store.inspect(key).legacy
        assert store.model(key).digest == store.model_digest(key) == record.model_digest
        assert store.missing_targets(key, target) == target  # evaluated again, not trained
        assert (store.folder(key) / "model.pt").read_bytes() == models[key]
        assert store.verify_file(key, "ledger.json").startswith("b2:")
    # an old evaluation is replaced by one bound to the model; the table reads it
    key = keys[0]
    old = store.evaluation(key, "a", "fpa")
    assert old is not None and old.protocol == 3 and not old.model
    store.write_eval(
        key, "a", "fpa", metrics=old.metrics(), predictions=old.predictions(),
        info={"n_test": old.n_test, "n_boot": old.n_boot}, model=store.model_digest(key),
    )  # fmt: skip
    assert store.missing_targets(key, target) == []
    _, df = results.aggregate(out, keys, "legacy", target)
    assert set(df["trial_key"]) == {key}


def test_a_failed_run_keeps_a_larger_table_only_while_every_row_still_stands(tmp_path):
    """Aggregation safety: a run with failed cells never replaces a table by a smaller one,
    unless a row of the old one no longer stands on the model on disk (then the smaller,
    true table replaces it)."""
    from helpers.trials import build_output

    from privdom_ray.sweep import _still_better

    keys = build_output(tmp_path, domains=("a", "b"))
    _, df = results.aggregate(tmp_path, keys, "s")
    store = TrialStore(tmp_path)
    assert _still_better(tmp_path, store, len(df) - 36) == len(df)  # all rows still stand
    assert _still_better(tmp_path, store, len(df)) == 0  # not larger: the new table goes
    record = store.read(keys[0])  # a model replaced since the table was written
    store.rewrite(keys[0], "model.pt", (store.folder(keys[0]) / "model.pt").read_bytes() + b"x")
    assert store.read(keys[0]).model_digest != record.model_digest
    assert _still_better(tmp_path, store, len(df) - 36) == 0


def test_a_cell_of_a_driver_that_is_gone_is_interrupted_not_running(tmp_path):
    key = finished(tmp_path)
    store = TrialStore(tmp_path)
    (store.folder(key) / "done").unlink()  # at work again (e.g. retrained)
    store.heartbeat(key, "run-1", "node-1", epoch=2)
    state, detail = store.status(key, [Target("a", "fpa")], driver_run="run-1")
    assert state == "running" and "epoch 2" in detail
    state, detail = store.status(key, [Target("a", "fpa")], driver_run="")  # no live driver
    assert state == "interrupted" and "run-1" in detail
    state, _ = store.status(key, [Target("a", "fpa")], driver_run="run-2")  # another run's
    assert state == "interrupted"


def test_the_store_takes_and_returns_typed_records_and_keeps_unknown_keys(tmp_path):
    """A Ledger (a federation's members beside it), a RunRecord and the spec in; the same
    typed objects out (the members as the federated kind's typed part); record keys this
    version does not name survive the round trip."""
    from privdom_ray.kinds.federated import FederatedRun, SiteRun
    from privdom_ray.records import RunRecord

    key = write_trained(tmp_path, tiny_federation("fed_a", 1.0, 0))
    store = TrialStore(tmp_path)
    record = store.read(key)
    run = RunRecord.make(
        name=record.spec.name, best_epoch=3, val_macro_auc=0.7, train_seconds=2.5, n_train=40,
        sites=(SiteRun("a", 1.0, 40, 8),), versions={"opacus": "1.5"},
        site_tasks=[[0.0, 1.0]], from_a_newer_writer={"x": 1},
    )  # fmt: skip
    site = dataclasses.replace(record.ledger, scope="site", site="a")
    store.write_trained(
        key, state_dict={"w": torch.ones(1)}, ledger=record.ledger, site_ledgers={"a": site},
        history=[], thresholds=list(record.thresholds), labels=LABELS, record=run,
        spec=record.spec,
    )  # fmt: skip
    back = store.read(key)
    assert back.info == dataclasses.replace(
        run, extra={k: v for k, v in run.extra.items() if k != "sites"},
        part=FederatedRun((SiteRun("a", 1.0, 40, 8),)),
    ) and back.spec == record.spec  # fmt: skip
    # the kind names its members' runs (audit recomputes each member's ledger from them)
    assert kind_of(record.spec).member_runs(back.info.part) == {"a": SiteRun("a", 1.0, 40, 8)}
    assert back.info.extra == {"site_tasks": [[0.0, 1.0]], "from_a_newer_writer": {"x": 1}}
    assert back.ledger == record.ledger and back.site_ledgers == {"a": site}
    assert back.ledgers == (record.ledger, site)
    stored = store.ledger_document(key)  # what the audit compares: the document as written
    assert stored["sites"]["a"]["scope"] == "site" and stored["epsilon_spent"] == 0.99
    trial = json.loads((store.folder(key) / "trial.json").read_text())
    assert TrialSpec.from_json(trial["spec"]) == record.spec and trial["from_a_newer_writer"] == {"x": 1}
    assert trial["sites"] == [{"name": "a", "weight": 1.0, "n_train": 40, "steps": 8}]


@pytest.mark.parametrize(
    "name, field, value",
    [("trial.json", "best_epoch", "two"), ("trial.json", "sites", [{"weight": 1}]),
     ("ledger.json", "steps", 8.5), ("ledger.json", "accountant", 3),
     ("ledger.json", "noise_multiplier", None)],
)  # fmt: skip
def test_a_record_field_not_of_its_type_is_damage_named_by_file_and_field(
    tmp_path, name, field, value
):
    """The typed read never guesses: a stored field that is not of its type (or a required
    ledger field that is missing) damages the trial, and status names the file and field
    (``sites``: a federation's, read by its kind)."""
    key = write_trained(tmp_path, tiny_federation("fed_a", 1.0, 0)) if field == "sites" else (
        finished(tmp_path))  # fmt: skip
    store = TrialStore(tmp_path)
    document = json.loads((store.folder(key) / name).read_text())
    if value is None:
        del document[field]
    else:
        document[field] = value
    store.rewrite(key, name, json.dumps(document).encode())  # resealed: a faulty writer
    found = store.inspect(key)
    assert found.record is None and found.damage is not None
    assert found.damage.path.name == name and field in found.damage.reason, found.damage
    assert store.status(key, [Target("a", "fpa")])[0] == "damaged"


def test_a_record_read_and_written_again_keeps_its_bytes_with_the_kinds_parts(tmp_path):
    """The kinds' parts of trial.json (a twin's ``audit``, a federation's ``sites``) are read
    into their kinds' typed parts and written back where they always were: a record read and
    written again through the store is byte for byte the file it was read from."""
    from helpers.trials import write_twin

    from privdom_ray.config import AuditSpec
    from privdom_ray.kinds.audit import TwinRun
    from privdom_ray.kinds.federated import FederatedRun

    cell = finished(tmp_path)
    result = {"kind": "gradient", "m": 200, "epsilon_lower": 0.1, "nested": {"inf": "inf"}}
    twin = write_twin(tmp_path, cell, AuditSpec(200, "gradient", 0), result)
    sites = [{"name": "a", "weight": 1.0, "n_train": 40, "steps": 8}, {"name": "b", "weight": 0.0}]
    fed = write_trained(tmp_path, tiny_federation("fed_ab", 1.0, 0, ("a", "b")), None,
                        {"mia_n": 3, "sites": sites, "node": "n1", "later": 1})  # fmt: skip
    store = TrialStore(tmp_path)
    assert store.read(twin).info.part == TwinRun(result) and store.read(twin).info.audit == result
    assert store.read(fed).info.part == FederatedRun.of(sites)
    for key in (cell, twin, fed):
        path = store.folder(key) / "trial.json"
        before, record = path.read_bytes(), store.read(key)
        store.write_trained(
            key, state_dict={"w": torch.zeros(1)}, ledger=record.ledger, history=[],
            thresholds=list(record.thresholds), labels=LABELS, record=record.info,
            spec=record.spec,
        )  # fmt: skip
        assert path.read_bytes() == before, key
    keys = list(json.loads((store.folder(fed) / "trial.json").read_text()))
    assert keys[keys.index("mia_n") + 1] == "sites" and keys[-1] == "later"
