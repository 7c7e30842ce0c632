"""One cell of a sweep: train the model if it is not done, evaluate every missing target.

Idempotent, because Ray Tune is at-least-once: a finished model is never retrained, a finished
evaluation never recomputed, and every write goes through the trial store (atomic, ``done``
last). No Ray here: the caller (``trainable``) passes a ``report`` callback and an executor.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import platform
import shutil
import socket
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from privdom_ray import federated
from privdom_ray.cache import SplitData, load_split, split_sizes, take
from privdom_ray.cell import Cell, TrialTimedOut
from privdom_ray.kinds import kind_of
from privdom_ray.kinds.federated import SiteRun
from privdom_ray.manifest import LABELS
from privdom_ray.records import RunRecord
from privdom_ray.selection.untuned import DP_SELECTION, EXACT_SELECTION
from privdom_ray.stats import metrics
from privdom_ray.stats.thresholds import youden_threshold
from privdom_ray.store import TrialStore
from privdom_ray.train import load_model, memory_budget_mb, predict, run_trial
from privdom_ray.trial.evaluation import (  # noqa: F401 (re-exported: the old privdom_ray.trial names)
    _prediction_frame,
    evaluate_stored,
    evaluate_target,
    patient_groups,
)
from privdom_ray.trial.tuning import train_tuned

if TYPE_CHECKING:
    from privdom_ray.canaries import Fault

Report = Callable[[dict[str, Any]], None]


class Executor:
    """Runs a batch of independent calls (site updates, target evaluations) and returns their
    results in call order. This one runs them here, one after another; ``trainable`` provides
    one that runs them as named Ray tasks in the trial's reserved resources."""

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple[str, dict[str, Any]]]) -> list:
        return [fn(**kwargs) for _label, kwargs in calls]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("privdom-ray", "torch", "opacus", "ray", "numpy", "pandas"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            from privdom_ray import __version__

            out[pkg] = __version__ if pkg == "privdom-ray" else "missing"
    return out


def code_version() -> str:
    """The package version plus the git commit of the checkout it runs from, when there is one."""
    from privdom_ray import __version__

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    if not commit:
        return __version__
    return f"{__version__}+g{commit}" + (".dirty" if dirty else "")


def run_cell(
    cell: Cell,
    report: Report | None = None,
    *,
    node: str = "",
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Train (if needed) and evaluate (missing targets); returns a small summary for the caller.

    Leaves a heartbeat (with the last epoch's record) while working and the error's last
    lines when it raises, so ``launch.py status`` and the sweep's progress lines can follow a
    cell. ``executor`` runs a federation's site work and target evaluations (default: here,
    serially).
    """
    torch.set_num_threads(max(1, cell.threads))
    store = TrialStore(cell.output, fence=cell.fence)
    key = cell.spec.key
    store.guard()  # a cell of a driver that lost its lease writes nothing, not even a folder
    store.folder(key).mkdir(parents=True, exist_ok=True)
    earlier = store.failure(key)
    if earlier and earlier.get("run_id") == cell.run_id and earlier.get("reason") == "timeout":
        raise TrialTimedOut(earlier["error"])  # do not let Tune's retries run it again
    node = node or socket.gethostname()
    store.heartbeat(key, cell.run_id, node, phase="starting")
    try:
        summary = _run_cell(cell, store, report, node, executor or Executor())
    except BaseException as exc:
        store.record_failure(
            key, cell.run_id, reason=type(exc).__name__, error=traceback.format_exc()
        )
        raise
    store.finish_attempt(key)
    return summary


def _run_cell(
    cell: Cell, store: TrialStore, report: Report | None, node: str, executor: Executor
) -> dict[str, Any]:
    spec = cell.spec
    trained_now = not store.is_trained(spec.key)
    if trained_now:
        trainer_of(spec)(cell, store, report, node, executor)
    record = store.read(spec.key)
    missing = store.missing_targets(spec.key, cell.targets)
    common = dict(output=cell.output, key=spec.key, model_name=spec.model, fence=cell.fence)
    common.update(evaluation=cell.evaluation, device=cell.device, threads=cell.threads)
    executor.map(evaluate_stored, [(f"eval/{t.name}", dict(common, target=t)) for t in missing])
    return {
        "trained_now": trained_now,
        "evaluated": [t.name for t in missing],
        "epsilon_spent": record.ledger.epsilon_spent,
        "train_seconds": record.info.train_seconds,
        "val_macro_auc": record.info.val_macro_auc,
    }


def _epoch_callback(cell: Cell, store: TrialStore, report: Report | None, node: str, writer: Any):
    """Per epoch (or federated round): heartbeat with the record, TensorBoard curves, report.
    All three are private logs (they carry the training loss)."""

    def on_epoch(record: dict[str, Any]) -> None:
        record = {k: v for k, v in record.items() if k != "site_tasks"}  # numbers only
        store.heartbeat(cell.spec.key, cell.run_id, node, phase="train", **record)
        for name in ("train_loss", "val_macro_auc", "epsilon"):
            if math.isfinite(record[name]):
                writer.add_scalar(name, record[name], record["epoch"])
        writer.flush()
        if report is not None:
            report({**record, "phase": "train"})

    return on_epoch


def _tensorboard(store: TrialStore, key: str) -> Any:
    if not store.has_checkpoint(key):  # a fresh start: drop curves of a lost attempt
        shutil.rmtree(store.tensorboard_dir(key), ignore_errors=True)
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(store.tensorboard_dir(key)))


def _init_state(cell: Cell) -> dict[str, torch.Tensor] | None:
    return torch.load(cell.init_path, weights_only=True) if cell.init_path else None


def train_single_site(
    cell: Cell, store: TrialStore, report: Report | None, node: str, _executor: Executor
) -> None:
    """Train a single-site trial on its source's cached train split (kinds: standard,
    clip_only, pretrain) and run the loss-threshold membership attack on it (private)."""
    spec = cell.spec  # a released DP model: epoch and thresholds by DP releases (train.selection)
    result, train, val, model = _train_on_source(
        cell, store, report, node, dp_selection=spec.is_private
    )
    mia_auc, mia_tpr, mia_n = membership_audit(
        model, train, load_split(cell.source_cache, "test"), seed=spec.seed, device=cell.device
    )
    _write_single_site(
        cell, store, node, result, val,
        # computed from training images without noise: private (never in a shareable table
        # for DP trials; see results.rows_for_trial)
        {"mia_auc": mia_auc, "mia_tpr_at_1fpr": mia_tpr, "mia_n": mia_n, "n_train": len(train)},
    )  # fmt: skip


def train_audit_twin(
    cell: Cell,
    store: TrialStore,
    report: Report | None,
    node: str,
    _executor: Executor,
    *,
    fault: Fault | None = None,
) -> None:
    """Train an audit twin: the audited cell's training with canaries (kinds/audit/), then
    the one-run audit with every attack (the plain scores, and the replay of the noise the
    public seed would give) and its power. The twin keeps only the audit's result; its coins,
    draws and scores were private to its checkpoint, and its model is never released.

    ``fault`` (a ``canaries.Fault``; tests and benchmarks only, no grid reaches it) trains a
    deliberately broken build: scaled noise, or noise drawn from the public seed."""
    from privdom_ray.canaries import CanaryInstrument
    from privdom_ray.config import DEFAULT_DELTA
    from privdom_ray.train import Randomness

    spec = cell.spec
    assert spec.audit is not None
    train = load_split(cell.source_cache, "train")
    randomness = None
    if fault is not None and fault.public_noise:  # the ledger still says "secret"
        randomness = Randomness.for_trial(spec.seed, cell.device, secret=spec.is_private)
        randomness.noise = _public_noise(spec.seed, cell.device)
    instrument = CanaryInstrument(
        count=spec.audit.canaries,
        kind=spec.audit.kind,
        auditor_seed=spec.audit.auditor_seed,
        units=len(train),
        logical_batch=spec.training.logical_batch,
        max_grad_norm=spec.training.max_grad_norm,
        replay_noise=_public_noise(spec.seed, cell.device),
        fault=fault,
    )
    result, train, val, model = _train_on_source(
        cell, store, report, node, instrument, train, randomness=randomness
    )
    # a non-private twin is audited at the grid's default delta, to compare with DP cells
    audit = instrument.result(
        model,
        delta=spec.delta or DEFAULT_DELTA,
        epsilon_spent=result.ledger.epsilon_spent,
        device=cell.device,
    )
    _write_single_site(
        cell, store, node, result, val, {"audit": audit.as_dict(), "n_train": len(train)}
    )


def _public_noise(seed: int, device: str) -> torch.Generator:
    """The noise generator a build that drew its noise from the public seed would have (what
    ``Randomness.for_trial`` gives a non-secret run): the replay attack regenerates it."""
    from privdom_ray.train import Randomness

    return Randomness.for_trial(seed, device, secret=False).noise


def _train_on_source(
    cell: Cell, store: TrialStore, report, node: str, instrument=None, train=None, randomness=None,
    dp_selection: bool = False,
):  # fmt: skip
    """run_trial on the cell's source cache: (result, train split, val split, final model).
    ``randomness``: injected generators (a deliberately broken audit twin only)."""
    spec = cell.spec
    train = train if train is not None else load_split(cell.source_cache, "train")
    val = load_split(cell.source_cache, "val")
    if len(train) == 0 or len(val) == 0:
        raise ValueError(
            f"source {spec.source!r} has {len(train)} train and {len(val)} val images; both splits "
            "need images"
        )
    writer = _tensorboard(store, spec.key)
    try:
        result = run_trial(
            spec,
            train,
            val,
            device=cell.device,
            on_epoch=_epoch_callback(cell, store, report, node, writer),
            checkpoint=store.checkpoint(spec.key),
            checkpoint_every=cell.checkpoint_every,
            init_state=_init_state(cell),
            memory_budget_mb=memory_budget_mb(cell.memory_budget_mb, cell.device, cell.gpu),
            channels_last=cell.channels_last,
            instrument=instrument,
            randomness=randomness,
            dp_selection=dp_selection,
        )
    finally:
        writer.close()
    model = load_model(spec.model, result.state_dict, num_outputs=len(LABELS))
    return result, train, val, model


def _write_single_site(cell: Cell, store: TrialStore, node: str, result, val, extra: dict) -> None:
    spec = cell.spec
    dp = result.thresholds is not None  # DP releases on V (the ledger's validation entry)
    thresholds = result.thresholds if dp else [
        youden_threshold(result.val_scores[:, j], val.labels[:, j])
        for j in range(len(LABELS))
    ]  # fmt: skip
    _write_trained(
        cell,
        store,
        node,
        state_dict=result.state_dict,
        ledger=dataclasses.replace(result.ledger, initialization=spec.init),
        history=result.history,
        thresholds=thresholds,
        val_predictions=_prediction_frame(result.val_scores, val),
        record={
            "best_epoch": result.best_epoch,
            # exact, un-noised: kept only in the private history when the choice is a DP release
            "val_macro_auc": None if dp else result.history[result.best_epoch - 1]["val_macro_auc"],
            "selection": DP_SELECTION if dp else EXACT_SELECTION,
            "train_seconds": result.train_seconds,
            "resumed_from_epoch": result.resumed_from_epoch,
            "n_val": len(val),
            "units": result.units,  # what Poisson sampling drew from: images or patients
            **extra,
        },
    )


def _write_trained(
    cell: Cell,
    store: TrialStore,
    node: str,
    *,
    thresholds: Sequence[float],
    record: dict[str, Any],
    **files: Any,
) -> None:
    """A trained model's files through the store, with the record of how it was made."""
    spec = cell.spec
    run = RunRecord.make(
        name=spec.name,
        **record,
        node=node,
        device=cell.device,
        slot_share=cell.slot_share,
        versions=versions(),
        code_version=code_version(),
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    store.write_trained(
        spec.key,
        spec=spec,
        # +inf is a valid Youden threshold (no cut beats chance: predict negative); NaN = undefined
        thresholds=[None if math.isnan(t) else t for t in thresholds],
        labels=LABELS,
        record=run,
        **files,
    )


def _site_calls(cell: Cell, prefix: str, per_site: Callable[[Any], dict], plans) -> list:
    """One executor call per site: the site's cached data plus its own arguments."""
    common = dict(device=cell.device, threads=cell.threads)
    caches = {s.name: s.cache_path for s in cell.sites}
    return [
        (f"{p.name}/{prefix}", dict(common, cache_path=caches[p.name], **per_site(p)))
        for p in plans
    ]


def train_federated(
    cell: Cell, store: TrialStore, report: Report | None, node: str, executor: Executor
) -> None:
    """FedAvg over the cell's sites: this process coordinates (weights, accounting,
    checkpoints); each site's training and validation run through ``executor`` on the site's
    own cached data, and only model weights and aggregate numbers come back."""
    spec = cell.spec
    sizes = {s.name: split_sizes(s.cache_path) for s in cell.sites}
    empty = [n for n, z in sizes.items() if not z.get("train") or not z.get("val")]
    if empty:
        raise ValueError(
            f"federation {spec.source!r}: sites {empty} lack train or val images; every site "
            "needs both splits"
        )
    plans = federated.plan_sites(spec, {n: z["train"] for n, z in sizes.items()})
    budget = memory_budget_mb(cell.memory_budget_mb, cell.device, cell.gpu)
    memory = dict(memory_budget_mb=budget, channels_last=cell.channels_last)

    def update(round_: int, state: dict, active: list, keys: dict) -> list:
        def args(p):
            return dict(
                spec=spec, plan=p, global_state=state, round=round_, key=keys[p.name], **memory
            )

        calls = _site_calls(cell, f"round{round_}", args, active)
        return executor.map(federated.site_update_from_cache, calls)

    def validate(state: dict, active: list) -> list:
        calls = _site_calls(
            cell, "validate", lambda p: dict(spec=spec, name=p.name, global_state=state), active
        )
        return executor.map(federated.site_validate_from_cache, calls)

    writer = _tensorboard(store, spec.key)
    try:
        result = federated.run_federation(
            spec,
            plans,
            update=update,
            validate=validate,
            checkpoint=store.checkpoint(spec.key),
            init_state=_init_state(cell),
            on_round=_epoch_callback(cell, store, report, node, writer),
        )
    finally:
        writer.close()
    # the membership attack reads training images: only non-private federations run it
    attacked = [p for p in plans if p.active and not spec.is_private]
    audit_args = dict(model_name=spec.model, state=result.state_dict, seed=spec.seed)
    audits = executor.map(
        audit_site,
        _site_calls(cell, "membership", lambda p: dict(name=p.name, **audit_args), attacked),
    )
    _write_trained(
        cell,
        store,
        node,
        state_dict=result.state_dict,
        ledger=dataclasses.replace(result.ledger, initialization=spec.init),
        site_ledgers={name: dataclasses.replace(led, initialization=spec.init)
                      for name, led in result.site_ledgers.items()},  # fmt: skip
        history=result.history,
        thresholds=[float(t) for t in result.thresholds],
        record=_federated_record(cell, result, plans, sizes, audits),
    )


def _federated_record(cell: Cell, result, plans, sizes, audits: list[dict]) -> dict[str, Any]:
    audit_tasks = [a.pop("task") for a in audits]  # timing, kept apart from the audit results
    return {
        "best_epoch": result.best_round,
        "val_macro_auc": result.val_macro_auc,
        "selection": (
            "best weighted mean of the sites' validation macro AUC over rounds; each site's "
            "epsilon covers all rounds"
        ),
        "train_seconds": result.train_seconds,
        "site_compute_seconds": math.fsum(h["site_cpu_seconds"] for h in result.history),
        # every site task (training, validation, membership audit) as [start, end] wall
        # clock, for benchmarks/bench_sweep.py; they ran in site_slots x slot_share slots
        "site_tasks": [t for h in result.history for t in h["site_tasks"]] + audit_tasks,
        "site_slots": cell.site_slots,
        "resumed_from_epoch": result.resumed_from_round,
        # the worst site's attack (each site attacks with its own images, see audit_site)
        "mia_auc": max((a["mia_auc"] for a in audits if a["mia_auc"] is not None), default=None),
        "mia_tpr_at_1fpr": max(
            (a["mia_tpr_at_1fpr"] for a in audits if a["mia_tpr_at_1fpr"] is not None),
            default=None,
        ),
        "mia_n": sum(a["mia_n"] for a in audits),
        "mia_sites": audits,
        "n_train": sum(z["train"] for z in sizes.values()),
        "n_val": sum(z["val"] for z in sizes.values()),
        "sites": tuple(
            # steps: counted from the sites' accountants
            SiteRun(p.name, p.weight, p.n_train, result.site_ledgers[p.name].steps)
            for p in plans
        ),
    }


def audit_site(
    *,
    name: str,
    model_name: str,
    state: dict[str, torch.Tensor],
    cache_path: str,
    seed: int,
    device: str = "cpu",
    threads: int = 1,
) -> dict[str, Any]:
    """A non-private federation member's membership-inference audit, run at the site: its
    training images vs its held-out test images; only the attack's AUC and TPR leave it."""
    t0, started = time.perf_counter(), time.time()
    torch.set_num_threads(max(1, threads))
    model = load_model(model_name, state, num_outputs=len(LABELS))
    auc, tpr, n = membership_audit(
        model,
        load_split(cache_path, "train"),
        load_split(cache_path, "test"),
        seed=seed,
        device=device,
    )
    return {
        "site": name,
        "mia_auc": auc,
        "mia_tpr_at_1fpr": tpr,
        "mia_n": n,
        "task": [started, started + time.perf_counter() - t0],
    }


def membership_audit(
    model: torch.nn.Module,
    train: SplitData,
    holdout: SplitData,
    *,
    seed: int,
    device: str = "cpu",
    max_n: int = 5000,
) -> tuple[float | None, float | None, int]:
    """Loss-threshold membership inference: training images vs held-out images of the source.

    Both sides are subsampled to the same size (at most ``max_n``) so the attack's AUC reads
    against 0.5. Returns (AUC, TPR at 1% FPR, images per side). It reads training images
    without noise, so its numbers are private for DP trials.
    """
    n = min(len(train), len(holdout), max_n)
    if n == 0:
        return None, None, 0
    rng = np.random.default_rng(seed)
    members = np.sort(rng.choice(len(train), n, replace=False))
    outsiders = np.sort(rng.choice(len(holdout), n, replace=False))
    member_loss = metrics.per_image_bce(
        predict(model, take(train.images, members), device=device), train.labels[members]
    )
    outsider_loss = metrics.per_image_bce(
        predict(model, take(holdout.images, outsiders), device=device), holdout.labels[outsiders]
    )
    attack_auc, tpr = metrics.membership_inference(member_loss, outsider_loss)
    return attack_auc, tpr, n


# --------------------------------------------------------------------------------------------
# The trainers, by the name a kind gives (``TrialKind.trainer``). kinds/ is torch-free and sits
# below training, so a kind names its trainer and the training side holds the objects; a new
# kind that trains like an existing one names that trainer (tests/test_kinds.py checks that
# every registered kind resolves here).
# --------------------------------------------------------------------------------------------

TRAINERS: dict[str, Callable[..., None]] = {
    "single_site": train_single_site,
    "federated": train_federated,
    "audit_twin": train_audit_twin,
    "tuning": train_tuned,
}


def trainer_of(spec: Any) -> Callable[..., None]:
    """The function that trains ``spec`` (a TrialSpec): its kind's trainer."""
    return TRAINERS[kind_of(spec).trainer]
