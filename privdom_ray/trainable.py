"""What runs inside Ray Tune's trial process: follow one cell's work and report it to Tune.

Kept apart from ``sweep`` (the driver) so Tune's coordinating process imports only Ray, the
torch-free cell description and the trial-folder helpers: a single-site cell's coordinator
then starts in about a second instead of importing torch, Ray Data and the report stack.
The work itself runs in named Ray tasks inside the bundles Tune reserved for the trial.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from privdom_ray import folder as sweep_folder
from privdom_ray.cell import Cell, TrialTimedOut
from privdom_ray.kinds import kind_of
from privdom_ray.store import DamagedRecord, TrialStore


def trial_resources(config: dict[str, Any]):
    """What Tune reserves for a trial: an empty head bundle (the trainable only coordinates)
    and one bundle per task slot; a federation gets one per site training at once."""
    from ray import tune

    cell = config["cell"]
    bundle = {"CPU": cell["cpu"], "GPU": cell["gpu"]}
    return tune.PlacementGroupFactory([{}] + [bundle] * cell.get("site_slots", 1))


class RayExecutor:
    """Runs a trial's work as named Ray tasks in the bundles Tune reserved for it, so the work
    shows up by name in the Ray dashboard (``site_a_eps1_seed0``, ``fed_eps1_seed0/site_b/round3``)
    and cannot wait for resources another trial holds. Enforces the trial's time limit."""

    def __init__(self, cell: Cell, timeout_s: float, poll=None) -> None:
        import ray

        self.cell = cell
        self.pg = ray.util.get_current_placement_group()
        self.deadline = time.monotonic() + timeout_s if timeout_s else math.inf
        self.timeout_s = timeout_s
        self.poll = poll  # called about once a second while waiting (progress forwarding)

    def map(self, fn: Callable[..., Any], calls) -> list:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        shared: dict[int, Any] = {}  # an argument passed to every call is shipped once

        def arg(value: Any) -> Any:
            if len(calls) < 2 or not isinstance(value, dict):
                return value
            if id(value) not in shared:
                shared[id(value)] = ray.put(value)
            return shared[id(value)]

        refs = []
        slots = self.cell.site_slots
        for i, (label, kwargs) in enumerate(calls):
            name = self.cell.spec.name if label == "" else f"{self.cell.spec.name}/{label}"
            options: dict[str, Any] = dict(
                name=name, num_cpus=self.cell.cpu, num_gpus=self.cell.gpu, max_retries=0
            )
            if self.cell.gpu > 0:
                options["max_calls"] = 0  # keep the worker (and its CUDA context) for reuse
            if self.pg is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=i % slots
                )
            refs.append(
                _run_task.options(**options).remote(fn, **{k: arg(v) for k, v in kwargs.items()})
            )
        return self._wait(refs)

    def _wait(self, refs: list) -> list:
        import ray

        pending = list(refs)
        while pending:
            left = self.deadline - time.monotonic()
            if left <= 0:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise self._timed_out()
            _done, pending = ray.wait(pending, num_returns=len(pending), timeout=min(1.0, left))
            if self.poll is not None:
                self.poll()
        return ray.get(refs)

    def _timed_out(self) -> TrialTimedOut:
        cell = self.cell
        message = f"{cell.spec.name}: timeout after {self.timeout_s:g}s (ray.trial_timeout_s)"
        TrialStore(cell.output, fence=cell.fence).record_failure(
            cell.spec.key, cell.run_id, reason="timeout", error=message
        )
        print(f"[trial] {message}; stopping it", flush=True)
        return TrialTimedOut(message)


def _remote_task():
    import ray

    @ray.remote
    def run_task(fn: Callable[..., Any], **kwargs: Any) -> Any:
        _quiet_known_warnings()
        return fn(**kwargs)

    return run_task


_run_task = None  # bound lazily: importing this module must not import Ray


def warm_up() -> None:
    """Import what a trial's tasks run (torch, Opacus, the training core) in this worker.

    Ray keeps idle workers for later tasks, so a worker warmed while the driver prepares
    data and Tune starts saves a trial's first task seconds of imports.
    """
    import privdom_ray.trial  # noqa: F401


def _cell_task(*, config: dict[str, Any]) -> dict[str, Any]:
    """A single-site cell, run inside its named task (on the trial's reserved resources)."""
    import ray

    from privdom_ray.trial import run_cell  # torch: imported by the task's worker only

    cell = Cell.from_config(config)
    try:
        return run_cell(cell, node=ray.get_runtime_context().get_node_id())
    finally:
        if cell.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()  # the worker is reused: hand cached GPU memory back


def privdom_trial(config: dict[str, Any]) -> None:
    """The Tune function trainable: coordinates one cell and reports its progress to Tune.

    The work runs in named Ray tasks inside the trial's reserved bundles (``RayExecutor``): a
    single-site cell is one task (its epochs are followed through the heartbeat file), a
    federation's coordinator runs here and sends site updates, validations and evaluations
    out as tasks.
    """
    import ray
    from ray import tune

    global _run_task
    if _run_task is None:
        _run_task = _remote_task()
    _quiet_known_warnings()
    cell = Cell.from_config(config["cell"])
    store = TrialStore(cell.output, fence=cell.fence)
    node = ray.get_runtime_context().get_node_id()

    private = cell.spec.is_private

    def report(record: dict[str, Any]) -> None:
        tune.report(tune_record(record, private=private))

    try:
        if kind_of(cell.spec).coordinator:
            from privdom_ray.trial import run_cell  # e.g. a federation's averaging: torch

            executor = RayExecutor(cell, config.get("timeout_s", 0.0))
            summary = run_cell(cell, report=report, node=node, executor=executor)
        else:
            follow = _HeartbeatFollower(store, cell.spec.key, cell.run_id, report)
            executor = RayExecutor(cell, config.get("timeout_s", 0.0), poll=follow)
            (summary,) = executor.map(_cell_task, [("", {"config": config["cell"]})])
            if summary["trained_now"]:
                follow.finish()
    except ray.exceptions.RayTaskError:
        raise  # the task recorded its own failure (failed.json) before raising
    except ray.exceptions.RayError as exc:  # e.g. the task's worker died; Tune retries the trial
        store.record_failure(cell.spec.key, cell.run_id, reason=type(exc).__name__, error=str(exc))
        raise
    tune.report(tune_record({**summary, "phase": "done"}, private=private))


class _HeartbeatFollower:
    """Forwards the epoch records a cell's task leaves in its heartbeat to Tune, once each."""

    def __init__(self, store: TrialStore, key: str, run_id: str, report) -> None:
        self.store = store
        self.key = key
        self.run_id = run_id
        self.report = report
        self.epoch = 0

    KEEP = ("epoch", "train_loss", "val_macro_auc", "steps", "epsilon", "seconds")

    def __call__(self) -> None:
        beat = self.store.last_heartbeat(self.key)
        if beat and beat.get("run_id") == self.run_id and "epoch" in beat:
            self._forward(beat)

    def finish(self) -> None:
        """Epochs the polling missed (the last one ends just before the task does)."""
        try:
            history = self.store.history(self.key)
        except DamagedRecord:
            return
        for record in history:
            self._forward(record)

    def _forward(self, record: dict[str, Any]) -> None:
        if record["epoch"] > self.epoch:
            self.epoch = record["epoch"]
            self.report({"phase": "train", **{k: record[k] for k in self.KEEP if k in record}})


#: What a trial reports to Tune, which writes it to result.json files (under
#: ``<output>/ray_results`` and Ray's session folder, see :func:`private_ray_temp_dir`).
#: Progress (epoch, round, steps), the DP epsilon, and the validation macro AUC: it is
#: computed from the source's validation images through the (DP) model, the same class of
#: value as the thresholds and the selected epoch that leave marked "validation"; it is also
#: what Tune would select on. Non-private trials add their training loss and times. (Tune
#: adds its own iteration times to every result, DP or not; they stay in the owner-only
#: folders of :func:`private_ray_temp_dir`.)
TUNE_KEYS = ("phase", "epoch", "round", "steps", "epsilon", "val_macro_auc", "trained_now",
             "epsilon_spent")  # fmt: skip
#: Computed from training images (or, for times, the secret Poisson batch sizes) without
#: noise: never sent to Tune by a DP trial; they stay in the private trial record.
NON_DP_ONLY = ("train_loss", "train_seconds", "seconds")


def tune_record(record: dict[str, Any], *, private: bool) -> dict[str, Any]:
    """The part of a progress or summary record Tune may see (finite numbers)."""
    keep = TUNE_KEYS if private else (*TUNE_KEYS, *NON_DP_ONLY)
    return {k: _finite(v) for k, v in record.items() if k in keep}


def private_ray_temp_dir(output: str | os.PathLike[str]) -> str:
    """Where an embedded cluster keeps its session files (logs, result.json copies, object
    spill): ``ray/`` inside a fresh owner-only (0700) folder, linked from
    ``<output>/ray_session``.

    Ray's default, /tmp/ray, is shared and its files are world-readable (0644), and Ray makes
    the temp dir it is given 0777 for other users' drivers: the owner-only folder above it is
    what keeps others out. It lies under the system temp dir, because Ray's socket paths must
    stay under 107 bytes. ``<output>/ray_results`` (Tune's storage) is made owner-only too.
    """
    import tempfile

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    results = out / sweep_folder.RAY_RESULTS
    results.mkdir(exist_ok=True)
    results.chmod(0o700)
    private = tempfile.mkdtemp(prefix="privdom-ray-")  # mode 0700
    link = out / sweep_folder.RAY_SESSION
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(private, target_is_directory=True)
    return str(Path(private) / "ray")


def _quiet_known_warnings() -> None:
    """Silence warnings that are expected here and would bury the progress lines."""
    import warnings

    for pattern in (
        "Secure RNG turned off",  # secure_mode needs torchcsprng, which has no torch 2.x build
        "Full backward hook is firing",  # Opacus hooks on the stem: inputs need no grad
        "Optimal order is the largest alpha",  # RDP cross-check at few steps
    ):
        warnings.filterwarnings("ignore", message=pattern)


def _finite(v: Any) -> Any:
    return -1.0 if isinstance(v, float) and math.isinf(v) else v
