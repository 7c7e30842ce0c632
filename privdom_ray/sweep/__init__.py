"""Run a sweep on Ray: connect or start a cluster, build caches, schedule cells with Tune, aggregate.

The driver's side of the Ray edge; ``trainable`` is the side that runs in Tune's trial
process, and with ``launch.py`` they are the only modules that know Ray and Tune. Resumption
is ours, not Tune's: every run plans the full grid, skips cells whose model and evaluations are
done (content-hashed trial folders with ``done`` markers), and hands only the rest to a fresh
Tune run.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from privdom_ray import (
    atomic,
    cache,
    grid,
    integrity,
    kinds,
    lease,
    planning,
    ray_decode,
    report,
)
from privdom_ray.cell import Cell, TargetRef
from privdom_ray.checks import Inputs, Log, _log, check_decoded_sizes, check_inputs
from privdom_ray.config import SweepSpec, TrialSpec
from privdom_ray.folder import (
    COMPARISONS,
    OUTPUTS,
    RELIABILITY,
    TABLES,
    TRANSFER,
    Plan,
    PlannedCell,
    PlannedTarget,
    SweepFolder,
)
from privdom_ray.report.view import ReportView
from privdom_ray.stats import comparisons, results
from privdom_ray.stats.study import study_of
from privdom_ray.store import Inspection, TrialRecord, TrialStore
from privdom_ray.sweep.cluster import (
    _use_cluster_token,
    check_resources,
    cluster_slots,
    init_ray,
    warm_workers,
)
from privdom_ray.trainable import privdom_trial, trial_resources

# Under `uv run`, Ray would start every worker through `uv run` again (a re-sync per worker);
# our interpreter already is the project's environment, so workers use it as is. Ray reads
# this when it is first imported, so it is set before any `import ray` below.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Our trial folders hold the per-trial records; Tune's auto TensorBoard/CSV loggers would only
# duplicate them (and warn about every non-scalar config value). Its JSON logger stays (added
# in run_cells): Tune's result grid reads result.json.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


@dataclass(frozen=True)
class Prepared:
    """Everything the driver knows before scheduling: per-domain data and the planned cells."""

    spec: SweepSpec
    fingerprints: dict[str, str]
    n_train: dict[str, int]
    caches: dict[str, cache.CacheEntry]
    trials: list[TrialSpec]
    cells: list[Cell]  # only the cells with work left
    targets: tuple[TargetRef, ...] = ()
    done: int = 0  # planned trials with nothing left to do
    unusable: tuple[str, ...] = ()  # evaluate: trials it cannot use, "name: why"


def build_caches(
    spec: SweepSpec, inputs: Inputs, log: Log = _log, guard: Callable[[], None] = lambda: None
) -> dict[str, cache.CacheEntry]:
    """Verify (or build, or rebuild) every cache entry the grid reads; needs ``ray.init`` for
    a build. The pretraining domain gets its own entry under the pretraining trial's name.
    ``guard``: the driver's fence, checked before every write."""
    manifests, fps = inputs.manifests, inputs.fingerprints
    caches: dict[str, cache.CacheEntry] = {}
    own = {t.name: t for t in kinds.own_data_trials(spec, fps)}  # the pretraining trial's
    wanted = [(t.name, t.source, t.preprocessing) for t in own.values()]
    wanted += [
        (d.name, d.name, spec.preprocessing)
        for d in spec.domains
        if d.name in spec.trained_domains or d.name in spec.targets
    ]
    trained: dict[str, cache.CacheEntry] = {}  # what trials train on, by domain
    for name, domain, prep in wanted:
        caches[name] = entry = cache.build(
            domain, manifests[domain], fps[domain], prep, spec.cache_dir,
            decode=ray_decode.decode_into, log=log, guard=guard,
        )  # fmt: skip
        if entry.built_seconds:
            how = f"built in {entry.built_seconds:.1f}s"
        else:
            how = f"reused, every checksum verified in {entry.verify_seconds:.1f}s"
        if name in own or domain in spec.trained_domains:
            trained[domain] = entry
        label = f"{domain} (for {name})" if name in own else domain
        log(f"[cache] {label}: {entry.n_images} images decoded, {entry.n_skipped} skipped ({how})")
    check_decoded_sizes(spec, trained)
    return caches


def checked_trials(
    store: TrialStore,
    trials: Sequence[TrialSpec],
    found: Mapping[str, Inspection] | None = None,
    *,
    train: bool = True,
    log: Log = _log,
) -> tuple[dict[str, TrialRecord | None], dict[str, str]]:
    """The store's writes before planning (planning is pure), from one verification of each
    trial's folder (a full hash of its model: not repeated): the records the sweep may use,
    damaged or void trials set aside (``TrialStore.usable``), legacy folders sealed; evaluate
    (``train=False``) moves nothing and returns instead why each unusable trial is ("name:
    why" is planning's). ``found``: inspections already made (``plan_trials``' kept trials)."""
    records: dict[str, TrialRecord | None] = {}
    unusable: dict[str, str] = {}
    for t in trials:
        inspection = found.get(t.key) if found else None
        inspection = store.inspect(t.key) if inspection is None else inspection
        if not train and (why := store.unusable_reason(t.key, inspection)):
            unusable[t.key] = why
            continue
        records[t.key] = store.usable(t.key, log, inspection)
    return records, unusable


def prepare(
    spec: SweepSpec,
    inputs: Inputs,
    log: Log = _log,
    *,
    train: bool = True,
    run_id: str = "",
    fence: int = 0,
) -> Prepared:
    """Caches (Ray Data) and the plan (pure: ``planning.plan_cells``). Requires ``ray.init``.

    With ``train=False`` only finished models get cells (evaluation of missing targets).
    ``fence``: the driver's lease token (0: unfenced), checked before every write.
    """
    fps, n_train = inputs.fingerprints, inputs.n_train
    store = TrialStore(spec.output, fence=fence)
    store.guard()
    spec.output.mkdir(parents=True, exist_ok=True)
    caches = build_caches(spec, inputs, log, store.guard)
    found: dict[str, Inspection] = {}  # each trial's folder, verified once

    def finished(key: str) -> bool:  # kept trials: read, never trained
        found[key] = store.inspect(key)
        return store.valid(key, found[key]) is not None

    trials = kinds.plan_trials(
        spec, fps, n_train,
        init_file_hash=inputs.init_file_hash, public_pos_weight=inputs.public_pos_weight,
        finished=finished,
    )  # fmt: skip
    records, unusable = checked_trials(store, trials, found, train=train, log=log)
    plan = planning.plan_cells(
        spec, trials, store, {k: str(e.path) for k, e in caches.items()}, fps,
        train=train, run_id=run_id, slots=cluster_slots(spec), fence=fence,
        data={k: e.test_digest for k, e in caches.items()}, log=log, records=records,
        unusable=unusable,
    )  # fmt: skip
    store.guard()
    out = SweepFolder(spec.output)
    out.write_plan(
        Plan(
            sweep=spec.name,
            run_id=run_id,
            cells=tuple(PlannedCell(t.key, t.name, kinds.kind_of(t).evaluated) for t in trials),
            targets=tuple(PlannedTarget(r.name, r.fingerprint, r.data) for r in plan.targets),
            # relative to the output folder when inside it (the folder may be moved)
            caches={name: out.relative(entry.path) for name, entry in caches.items()},
        )
    )
    return Prepared(
        spec, fps, n_train, caches, trials, plan.cells, plan.targets, plan.done, plan.unusable
    )


def _progress_callback(names: dict[str, str], log: Log, held: lease.Lease | None = None):
    from ray import tune

    class Progress(tune.Callback):
        """One line per epoch and per finished trial (Tune's own table is too noisy), and each
        trial's scheduling-to-finish wall time, for measuring per-trial overhead."""

        def __init__(self) -> None:
            self.finished = 0
            self.t0 = time.perf_counter()
            self.started: dict[str, float] = {}
            self.wall: dict[str, float] = {}

        def _key(self, trial) -> str:
            return trial.config["cell"]["spec"]["key"]

        def on_step_begin(self, iteration, trials, **info) -> None:
            """Before Tune's loop writes anything (its state, results): the lease still ours."""
            if held is not None:
                try:
                    held.check()
                except lease.Fenced as exc:
                    _lost(exc)

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self.started.setdefault(self._key(trial), time.perf_counter())

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            if result.get("phase") == "train":
                eps = result.get("epsilon", -1.0)
                unit = "round" if result.get("round") else "epoch"  # federations: rounds
                # DP trials send no training loss (an un-noised training statistic)
                loss = result.get("train_loss", math.nan)
                loss_text = f"loss {loss:.3f}" if math.isfinite(loss) else "loss stays private"
                log(
                    f"[trial] {names[self._key(trial)]} {unit} {result['epoch']}: {loss_text}, "
                    f"val macro AUC {result['val_macro_auc']:.3f}"
                    + (f", epsilon {eps:.2f}" if eps >= 0 else "")
                )

        def _finish(self, trial) -> None:
            key = self._key(trial)
            self.finished += 1
            self.wall[key] = time.perf_counter() - self.started.get(key, self.t0)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._finish(trial)
            log(
                f"[sweep] {self.finished}/{len(names)} cells done ({names[self._key(trial)]}), "
                f"{time.perf_counter() - self.t0:.0f}s elapsed"
            )

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._finish(trial)
            log(f"[sweep] {names[self._key(trial)]} FAILED; see {trial.local_path or trial.path}")

    return Progress()


def _record_timing(
    spec: SweepSpec, prep: Prepared, stage: str, wall: float, trial_wall: dict, names: dict
) -> None:
    """Append this stage's timing to ``<output>/runs.jsonl`` (benchmarks/bench_sweep.py reads it)."""
    import json

    import ray

    slots = min(
        ray.cluster_resources().get("CPU", 1) / spec.resources.cpu,
        ray.cluster_resources().get("GPU", 0) / spec.resources.gpu if spec.resources.gpu else 1e9,
    )
    record = {
        "run_id": prep.cells[0].run_id if prep.cells else "",
        "stage": stage,
        "wall_seconds": wall,
        "slots": slots,
        "trials": [{"key": k, "name": names[k], "wall_seconds": w} for k, w in trial_wall.items()],
    }
    with open(SweepFolder(spec.output).runs, "a") as f:
        f.write(json.dumps(record) + "\n")


def run_cells(
    prep: Prepared,
    log: Log = _log,
    cells: list[Cell] | None = None,
    *,
    stage: str = "cells",
    held: lease.Lease | None = None,
) -> list[str]:
    """Schedule cells with work left as Tune trials; returns names of failed cells."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    spec = prep.spec
    cells = prep.cells if cells is None else cells
    if not cells:
        return []
    log(f"[sweep] running {len(cells)} {stage}")
    trainable = tune.with_resources(privdom_trial, trial_resources)
    names = {c.spec.key: c.spec.name for c in cells}
    progress = _progress_callback(names, log, held)
    t0 = time.perf_counter()
    tuner = tune.Tuner(
        trainable,
        param_space={
            "cell": tune.grid_search([c.to_config() for c in cells]),
            "timeout_s": spec.ray.trial_timeout_s,
        },
        tune_config=tune.TuneConfig(
            trial_name_creator=lambda t: names[t.config["cell"]["spec"]["key"]],
            trial_dirname_creator=lambda t: (
                f"{names[t.config['cell']['spec']['key']]}-{t.trial_id}"
            ),
            # a finished trial's worker (torch, opacus imported) runs the next trial: saves
            # the process start and imports per trial; run_cell seeds and sets threads itself
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"{spec.name}-{stage}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(SweepFolder(spec.output).ray_results),
            failure_config=tune.FailureConfig(max_failures=spec.ray.max_failures),
            callbacks=[progress, JsonLoggerCallback()],
            verbose=0,
        ),
    )
    result_grid = tuner.fit()
    if held is not None:
        held.check()
    _record_timing(spec, prep, stage, time.perf_counter() - t0, progress.wall, names)
    by_key = {c.spec.key: c for c in cells}
    failed = []
    for r in result_grid:
        if r.error is None:
            continue
        cell = by_key[r.config["cell"]["spec"]["key"]]
        if _complete_on_disk(cell):  # e.g. the time limit struck after the last write
            log(f"[sweep] {cell.spec.name} reported an error after finishing its work; kept")
            continue
        failed.append(cell.spec.name)
        log(f"[sweep] failed: {failed[-1]}: {str(r.error).splitlines()[-1][:300]}")
    return failed


# DP-SGD's cost per image relative to plain training, for ordering only (bench_dp_step.py:
# clipping 1.2-1.4x per step; noise calibration and per-epoch accounting add to it)
DP_COST = 1.5


def expected_work(cell: Cell, n_train: Mapping[str, int]) -> float:
    """A cell's training work in slot-image-epochs, a scheduling estimate (not a measurement).

    A federation trains every positive-weight site for all its rounds; its site tasks share
    ``site_slots x slot_share`` slots.
    """
    spec = cell.spec
    images = sum(n_train.get(s, 0) for s in kinds.training_sites(spec))
    return images * spec.training.epochs * (DP_COST if spec.clips else 1.0)


def longest_first(cells: Sequence[Cell], n_train: Mapping[str, int]) -> list[Cell]:
    """Cells by expected work, largest first (LPT scheduling; ties keep the grid's order).

    Tune starts trials in the order given. Ending on the shortest trials shortens the tail
    in which the last trial runs while other slots idle, and a federation, which holds every
    slot of a small cluster, runs before single-site trials instead of waiting for all of
    them to drain.
    """
    return sorted(cells, key=lambda c: -expected_work(c, n_train))


def _complete_on_disk(cell: Cell) -> bool:
    store = TrialStore(cell.output)
    return store.valid(cell.spec.key) is not None and not store.missing_targets(
        cell.spec.key, cell.targets
    )


def run(
    grid_path: str | Path,
    *,
    output: str | None = None,
    address: str | None = None,
    train: bool = True,
    log: Log = _log,
) -> Path:
    """The whole sweep: validate, connect/start Ray, prepare data, run cells, aggregate, print.

    ``train=False`` (``launch.py evaluate``) only evaluates stored models on the grid's targets.
    One driver per output folder: a second one is refused (``lease.LockHeld``) naming the
    first; a driver that loses its lease (paused past it) stops with ``lease.Fenced``.
    """
    spec = grid.load_grid(grid_path, output=output)
    inputs = check_inputs(spec, log)
    embedded = not (address or spec.ray.address or os.environ.get("RAY_ADDRESS"))
    if not embedded:
        _use_cluster_token(log)  # before Ray is imported: it reads the mode once
    t0 = time.perf_counter()
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    held = lease.Lease.acquire(spec.output, run_id)
    _owner_only(spec.output, log)
    if held.took_over is not None:
        log(
            f"[sweep] took over the output folder from a silent or gone driver ({held.took_over.describe()})"
        )
    with _fenced(held):
        prep, failed = _run_cells_on_ray(spec, inputs, address, embedded, train, held, log)
        path = _aggregate(spec, prep, log, held.token, failed)
    log(f"[sweep] wall time {time.perf_counter() - t0:.0f}s")
    if prep.unusable:
        raise SweepFailed(
            [u.split(":")[0] for u in prep.unusable],
            "could not be evaluated (damaged or void; run the sweep to train them again)",
        )
    if failed:
        raise SweepFailed(failed)
    return path


_LOST = threading.Lock()


def _owner_only(output: Path, log: Log) -> None:
    """The output folder holds private records (checkpoints, training curves, per-image
    predictions, often the decoded image cache): readable by its owner only. What may be
    shared leaves through ``launch.py export``."""
    try:
        output.chmod(0o700)
    except OSError as exc:  # not ours (a shared folder): say so, never fail the sweep for it
        log(f"[sweep] note: could not make {output} owner-only ({exc}); its records are private")


def _lost(exc: lease.Fenced) -> None:
    """A driver that lost its lease stops at once, writing nothing more (exit 2): not even
    Tune's bookkeeping or Ray's shutdown may touch the folder the new driver owns. (The
    renewal thread, SIGCONT and Tune's loop may all notice at once: one says so.)"""
    if _LOST.acquire(blocking=False):
        print(f"error: {exc}. This driver stops here (exit 2); the driver that holds the lease "
              "carries the sweep on.", file=sys.stderr, flush=True)  # fmt: skip
        os._exit(2)
    time.sleep(60)  # another thread is ending the process


@contextmanager
def _fenced(held: lease.Lease) -> Iterator[None]:
    """Renew the lease while the block runs; stop the process when it is lost (renewal
    thread, and at once on SIGCONT: a driver resumed after Ctrl-Z or SIGSTOP checks first)."""
    stop = held.keep_renewed(_lost)
    main = threading.current_thread() is threading.main_thread()

    def on_continue(_signum: int, _frame: object) -> None:
        try:
            held.check()
        except lease.Fenced as exc:
            _lost(exc)

    previous = signal.signal(signal.SIGCONT, on_continue) if main else None
    try:
        yield
    finally:
        stop()
        if main:
            signal.signal(signal.SIGCONT, previous)
        held.release()


def _run_cells_on_ray(spec, inputs, address, embedded, train, held, log):
    import ray

    init_ray(spec, address, log)
    try:
        check_resources(spec)
        if embedded:
            warm_workers(spec)  # in the background; Ray runs a task whose result is dropped
        prep = prepare(spec, inputs, log, train=train, run_id=held.run_id, fence=held.token)
        store = TrialStore(spec.output)
        evaluate_only = sum(store.is_trained(c.spec.key) for c in prep.cells)
        log(
            f"[sweep] {spec.name}: {len(prep.trials)} cells ({len(spec.sources)} sources"
            + (f" + {len(spec.federations)} federations" if spec.federations else "")
            + " x "
            f"{len(spec.epsilons)} epsilons x {len(spec.seeds)} seeds), {len(spec.targets)} targets; "
            f"{prep.done} already done, {len(prep.cells) - evaluate_only} to train, "
            f"{evaluate_only} trained with evaluations to (re)do"
            + (f", {len(prep.unusable)} unusable" if prep.unusable else "")
        )
        failed = run_stages(prep, log, held)
    finally:
        ray.shutdown()
    return prep, failed


def run_stages(prep: Prepared, log: Log, held: lease.Lease | None = None) -> list[str]:
    """The cells stage by stage (pretraining before the trials that start from it), each
    stage longest first; a failed stage stops the later ones (they depend on it)."""
    stages = sorted({kinds.kind_of(c.spec).stage for c in prep.cells})
    for stage in stages:
        cells = [c for c in prep.cells if kinds.kind_of(c.spec).stage == stage]
        name = "pretraining" if stage == 0 else "cells"
        ordered = longest_first(cells, prep.n_train)
        failed = run_cells(prep, log, ordered, stage=name, held=held)
        if failed:
            if stage != stages[-1]:
                log(f"[sweep] {name} failed: the cells that depend on it are not started")
            return failed
    return []


def _aggregate(
    spec: SweepSpec, prep: Prepared, log: Log, fence: int = 0, failed: Sequence[str] = ()
) -> Path:
    """The tables and the report from the finished trials (current evaluations only), each
    write fenced; then their checksums (``outputs.json``). One pass: the trials are read once
    (``results.load_finished``), the three tables built from that load, and the report
    rendered from the tables in memory. A run with failed or unusable cells never replaces
    tables that are larger and still stand on verified models and evaluations: it keeps them
    and says so."""
    keys = [t.key for t in prep.trials]
    store = TrialStore(spec.output, fence=fence)
    out = SweepFolder(spec.output)
    path = out.transfer
    finished = results.load_finished(out.root, keys, prep.targets)
    table, df = results.table_of(finished, spec.name)
    still = _still_better(spec.output, store, len(df), prep.targets)
    if (failed or prep.unusable) and still:
        log(
            f"[sweep] kept the previous tables ({still} rows, every one still from a verified model "
            f"and evaluation): this run has failed cells and its table would hold {len(df)} rows"
        )
        return path
    tables = comparisons.compute_tables(study_of(finished), spec.evaluation)
    arrow = comparisons.arrow_tables(tables)
    store.guard()
    atomic.write_parquet(path, table)
    store.guard()
    comparisons.write_all(out.root, arrow)
    store.guard()
    view = ReportView.of_tables(out.root, table, arrow[COMPARISONS], arrow[RELIABILITY])
    report.write_report(out.root, view=view)
    store.guard()
    integrity.seal_files(spec.output, list(TABLES))
    log("")
    log(report.transfer_matrices_text(df, tables.comparisons))
    evaluated = [t for t in prep.trials if kinds.kind_of(t).evaluated]  # others have no rows
    missing = len(evaluated) - (df["trial_key"].nunique() if len(df) else 0)
    log(f"[sweep] table: {path} ({len(df)} rows; {missing} cell(s) missing)")
    out = SweepFolder(spec.output)
    log(f"[sweep] comparisons: {out.comparisons}; report: {out.report} (and {out.html.name})")
    return path


def _still_better(
    output: Path, store: TrialStore, new_rows: int, targets: Sequence[TargetRef] = ()
) -> int:
    """The row count of the existing transfer table if it is larger than ``new_rows`` and
    every row of it still stands (its trial valid, its target one of ``targets`` at the same
    data version, its evaluation current: made from the model on disk and the target's test
    images); 0 otherwise (then the new, smaller table is the truth)."""
    import io

    path = Path(output) / TRANSFER
    if not path.is_file():
        return 0
    try:
        try:
            data = integrity.verified_bytes(output, TRANSFER)
        except integrity.Damage:
            data = path.read_bytes() if not (Path(output) / OUTPUTS).exists() else b""
        old = pd.read_parquet(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - an unreadable old table is not worth keeping
        return 0
    if len(old) <= new_rows:
        return 0
    refs = {(t.name, t.fingerprint): t for t in targets}
    for (key, target, fp), _ in old.groupby(["trial_key", "target", "data_fingerprint"]):
        ref = refs.get((target, fp)) if targets else TargetRef(target, fp, "")
        if ref is None or store.valid(key) is None or not store.current(key, [ref]):
            return 0
    return len(old)


class SweepFailed(RuntimeError):
    def __init__(self, names: list[str], why: str = "") -> None:
        super().__init__(
            f"{len(names)} cell(s) {why or 'failed'}: {', '.join(names)}"
            + ("" if why else "; re-run the same command to retry them")
        )
        self.names = names
