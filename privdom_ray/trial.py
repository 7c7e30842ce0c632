"""One cell of a sweep on disk: train the model if it is not done, evaluate every missing target.

Idempotent, because Ray Tune is at-least-once: a finished model is never retrained, a finished
evaluation never recomputed, and every file is written atomically with the ``done`` marker
last. No Ray here: the caller (``sweep``) passes a ``report`` callback.
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
from typing import Any

import numpy as np
import pandas as pd
import torch

from privdom_ray import federated, metrics, results
from privdom_ray.cache import SplitData, load_split, split_sizes
from privdom_ray.cell import Cell, TargetRef, TrialTimedOut
from privdom_ray.grid import EvaluationConfig
from privdom_ray.manifest import LABELS
from privdom_ray.train import load_model, predict, run_trial

Report = Callable[[dict[str, Any]], None]


class Executor:
    """Runs a batch of independent calls (site updates, target evaluations) and returns their
    results in call order. This one runs them here, one after another; ``sweep`` provides one
    that runs them as named Ray tasks in the trial's reserved resources."""

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

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    if not commit:
        return __version__
    return f"{__version__}+g{commit}" + (".dirty" if dirty else "")


class FileCheckpoint:
    """A trial's checkpoint file, written atomically and loaded with ``weights_only=True``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        return torch.load(self.path, weights_only=True)

    def save(self, state: dict[str, Any]) -> None:
        results.atomic_write(self.path, lambda p: torch.save(state, p))


def run_cell(
    cell: Cell,
    report: Report | None = None,
    *,
    node: str = "",
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Train (if needed) and evaluate (missing targets); returns a small summary for the caller.

    Leaves ``running.json`` (heartbeat, with the last epoch's record) while working and
    ``failed.json`` (with the error's last lines) when it raises, so ``launch.py status`` and
    the sweep's progress lines can follow a cell. ``executor`` runs a federation's site work
    and target evaluations (default: here, serially).
    """
    torch.set_num_threads(max(1, cell.threads))
    spec = cell.spec
    tdir = results.trial_dir(Path(cell.output), spec.key)
    tdir.mkdir(parents=True, exist_ok=True)
    failed = tdir / "failed.json"
    if failed.is_file():
        earlier = results.read_json(failed)
        if earlier.get("run_id") == cell.run_id and earlier.get("reason") == "timeout":
            raise TrialTimedOut(earlier["error"])  # do not let Tune's retries run it again
    node = node or socket.gethostname()
    results.heartbeat(tdir, cell.run_id, node, phase="starting")
    try:
        summary = _run_cell(cell, tdir, report, node, executor or Executor())
    except BaseException as exc:
        results.record_failure(
            tdir, cell.run_id, reason=type(exc).__name__, error=traceback.format_exc()
        )
        raise
    (tdir / "running.json").unlink(missing_ok=True)
    failed.unlink(missing_ok=True)
    return summary


def _run_cell(
    cell: Cell, tdir: Path, report: Report | None, node: str, executor: Executor
) -> dict[str, Any]:
    spec = cell.spec
    trained_now = False
    if not results.is_trained(tdir):
        train = _train_federated if spec.federation is not None else _train
        train(cell, tdir, report, node, executor)
        trained_now = True
    info = results.read_json(tdir / "trial.json")
    missing = [
        t
        for t in cell.targets
        if not results.is_evaluated(results.eval_dir(tdir, t.name, t.fingerprint))
    ]
    common = dict(tdir=str(tdir), model_name=spec.model, evaluation=cell.evaluation)
    common.update(device=cell.device, threads=cell.threads)
    executor.map(evaluate_stored, [(f"eval/{t.name}", dict(common, target=t)) for t in missing])
    summary: dict[str, Any] = {"trained_now": trained_now, "evaluated": [t.name for t in missing]}
    ledger = results.read_json(tdir / "ledger.json")
    summary.update(
        epsilon_spent=ledger["epsilon_spent"],
        train_seconds=info["train_seconds"],
        val_macro_auc=info["val_macro_auc"],
    )
    return summary


def evaluate_stored(
    *,
    tdir: str,
    model_name: str,
    target: TargetRef,
    evaluation: EvaluationConfig,
    device: str = "cpu",
    threads: int = 1,
) -> None:
    """Evaluate a trial's stored model on one target (a unit of work an executor can ship)."""
    torch.set_num_threads(max(1, threads))
    path = Path(tdir)
    thresholds = np.array(results.read_json(path / "thresholds.json")["youden_val"], dtype=float)
    state = torch.load(path / "model.pt", weights_only=True)
    model = load_model(model_name, state, num_outputs=len(LABELS))
    edir = results.eval_dir(path, target.name, target.fingerprint)
    evaluate_target(model, target, thresholds, evaluation, edir, device=device)


def _epoch_callback(cell: Cell, tdir: Path, report: Report | None, node: str, writer: Any):
    """Per epoch (or federated round): heartbeat with the record, TensorBoard curves, report."""

    def on_epoch(record: dict[str, Any]) -> None:
        record = {k: v for k, v in record.items() if k != "site_tasks"}  # numbers only
        results.heartbeat(tdir, cell.run_id, node, phase="train", **record)
        for name in ("train_loss", "val_macro_auc", "epsilon"):
            if math.isfinite(record[name]):
                writer.add_scalar(name, record[name], record["epoch"])
        writer.flush()
        if report is not None:
            report({**record, "phase": "train"})

    return on_epoch


def _tensorboard(tdir: Path) -> Any:
    if not (tdir / "checkpoint.pt").is_file():  # a fresh start: drop curves of a lost attempt
        shutil.rmtree(tdir / "tensorboard", ignore_errors=True)
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(tdir / "tensorboard"))


def _train(cell: Cell, tdir: Path, report: Report | None, node: str, _executor: Executor) -> None:
    spec = cell.spec
    train = load_split(cell.source_cache, "train")
    val = load_split(cell.source_cache, "val")
    if len(train) == 0 or len(val) == 0:
        raise ValueError(
            f"source {spec.source!r} has {len(train)} train and {len(val)} val images; both splits "
            "need images"
        )

    writer = _tensorboard(tdir)
    on_epoch = _epoch_callback(cell, tdir, report, node, writer)
    try:
        result = run_trial(
            spec,
            train,
            val,
            device=cell.device,
            on_epoch=on_epoch,
            checkpoint=FileCheckpoint(tdir / "checkpoint.pt"),
            checkpoint_every=cell.checkpoint_every,
            init_state=torch.load(cell.init_path, weights_only=True) if cell.init_path else None,
            memory_budget_mb=cell.memory_budget_mb,
            channels_last=cell.channels_last,
        )
    finally:
        writer.close()
    mia_auc, mia_tpr, mia_n = membership_audit(
        load_model(spec.model, result.state_dict, num_outputs=len(LABELS)),
        train,
        load_split(cell.source_cache, "test"),
        seed=spec.seed,
        device=cell.device,
    )
    thresholds = [
        metrics.youden_threshold(result.val_scores[:, j], val.labels[:, j])
        for j in range(len(LABELS))
    ]
    results.write_parquet(
        tdir / "val_predictions.parquet", _prediction_frame(result.val_scores, val)
    )
    _write_trained(
        cell,
        tdir,
        node,
        state_dict=result.state_dict,
        ledger=dataclasses.replace(result.ledger, initialization=spec.init).as_dict(),
        history=result.history,
        thresholds=thresholds,
        record={
            "best_epoch": result.best_epoch,
            "val_macro_auc": result.history[result.best_epoch - 1]["val_macro_auc"],
            "selection": "best validation macro AUC (source val split); epsilon covers all epochs",
            "train_seconds": result.train_seconds,
            "resumed_from_epoch": result.resumed_from_epoch,
            "mia_auc": mia_auc,
            "mia_tpr_at_1fpr": mia_tpr,
            "mia_n": mia_n,
            "n_train": len(train),
            "n_val": len(val),
        },
    )


def _write_trained(
    cell: Cell,
    tdir: Path,
    node: str,
    *,
    state_dict: dict[str, torch.Tensor],
    ledger: dict[str, Any],
    history: list[dict[str, Any]],
    thresholds: Sequence[float],
    record: dict[str, Any],
) -> None:
    """Write a trained model's files, ``done`` last; the checkpoint goes once model.pt holds it."""
    spec = cell.spec
    results.atomic_write(tdir / "model.pt", lambda p: torch.save(state_dict, p))
    results.write_json(tdir / "ledger.json", ledger)
    results.write_json(tdir / "history.json", history)
    results.write_json(
        tdir / "thresholds.json",
        # +inf is a valid Youden threshold (no cut beats chance: predict negative); NaN = undefined
        {"labels": list(LABELS), "youden_val": [None if math.isnan(t) else t for t in thresholds]},
    )
    record = {
        "spec": spec.to_json(),
        "name": spec.name,
        **record,
        "node": node,
        "device": cell.device,
        "slot_share": cell.slot_share,
        "versions": versions(),
        "code_version": code_version(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    results.write_json(tdir / "trial.json", record)
    results.write_yaml(tdir / "config.yaml", {**record, "ledger": ledger})
    results.mark_done(tdir)
    (tdir / "checkpoint.pt").unlink(missing_ok=True)  # model.pt holds the result now


def _train_federated(
    cell: Cell, tdir: Path, report: Report | None, node: str, executor: Executor
) -> None:
    """FedAvg over the cell's sites: this process coordinates (weights, accounting,
    checkpoints); each site's training and validation run through ``executor`` on the site's
    own cached data, and only model weights and aggregate numbers come back."""
    spec = cell.spec
    assert spec.federation is not None
    caches = {s.name: s.cache_path for s in cell.sites}
    sizes = {name: split_sizes(path) for name, path in caches.items()}
    empty = [n for n, z in sizes.items() if not z.get("train") or not z.get("val")]
    if empty:
        raise ValueError(
            f"federation {spec.source!r}: sites {empty} lack train or val images; every site "
            "needs both splits"
        )
    plans = federated.plan_sites(spec, {n: z["train"] for n, z in sizes.items()})
    site_args = dict(device=cell.device, threads=cell.threads)

    def update(round_: int, state: dict, active: list) -> list:
        calls = [
            (
                f"{p.name}/round{round_}",
                dict(
                    site_args,
                    spec=spec,
                    plan=p,
                    cache_path=caches[p.name],
                    global_state=state,
                    round=round_,
                    memory_budget_mb=cell.memory_budget_mb,
                    channels_last=cell.channels_last,
                ),
            )
            for p in active
        ]
        return executor.map(federated.site_update_from_cache, calls)

    def validate(state: dict, active: list) -> list:
        calls = [
            (
                f"{p.name}/validate",
                dict(
                    site_args, spec=spec, name=p.name, cache_path=caches[p.name], global_state=state
                ),
            )
            for p in active
        ]
        return executor.map(federated.site_validate_from_cache, calls)

    writer = _tensorboard(tdir)
    try:
        result = federated.run_federation(
            spec,
            plans,
            update=update,
            validate=validate,
            checkpoint=FileCheckpoint(tdir / "checkpoint.pt"),
            init_state=torch.load(cell.init_path, weights_only=True) if cell.init_path else None,
            on_round=_epoch_callback(cell, tdir, report, node, writer),
        )
    finally:
        writer.close()
    audits = executor.map(
        audit_site,
        [
            (
                f"{p.name}/membership",
                dict(
                    site_args,
                    name=p.name,
                    model_name=spec.model,
                    state=result.state_dict,
                    cache_path=caches[p.name],
                    seed=spec.seed,
                ),
            )
            for p in plans
            if p.active
        ],
    )
    audit_tasks = [a.pop("task") for a in audits]  # timing, kept apart from the audit results
    summary = dataclasses.replace(result.ledger, initialization=spec.init).as_dict()
    summary["sites"] = {
        name: dataclasses.replace(led, initialization=spec.init).as_dict()
        for name, led in result.site_ledgers.items()
    }
    _write_trained(
        cell,
        tdir,
        node,
        state_dict=result.state_dict,
        ledger=summary,
        history=result.history,
        thresholds=[float(t) for t in result.thresholds],
        record={
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
            "mia_auc": max(
                (a["mia_auc"] for a in audits if a["mia_auc"] is not None), default=None
            ),
            "mia_tpr_at_1fpr": max(
                (a["mia_tpr_at_1fpr"] for a in audits if a["mia_tpr_at_1fpr"] is not None),
                default=None,
            ),
            "mia_n": sum(a["mia_n"] for a in audits),
            "mia_sites": audits,
            "n_train": sum(z["train"] for z in sizes.values()),
            "n_val": sum(z["val"] for z in sizes.values()),
            "sites": [{"name": p.name, "weight": p.weight, "n_train": p.n_train} for p in plans],
        },
    )


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
    """A federation member's membership-inference audit, run at the site: its training images
    vs its held-out test images; only the attack's AUC and TPR leave the site."""
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
    against 0.5. Returns (AUC, TPR at 1% FPR, images per side).
    """
    n = min(len(train), len(holdout), max_n)
    if n == 0:
        return None, None, 0
    rng = np.random.default_rng(seed)
    members = np.sort(rng.choice(len(train), n, replace=False))
    outsiders = np.sort(rng.choice(len(holdout), n, replace=False))
    member_loss = metrics.per_image_bce(
        predict(model, train.images[members], device=device), train.labels[members]
    )
    outsider_loss = metrics.per_image_bce(
        predict(model, holdout.images[outsiders], device=device), holdout.labels[outsiders]
    )
    attack_auc, tpr = metrics.membership_inference(member_loss, outsider_loss)
    return attack_auc, tpr, n


def evaluate_target(
    model: torch.nn.Module,
    target: TargetRef,
    thresholds: np.ndarray,
    evaluation: EvaluationConfig,
    edir: Path,
    *,
    device: str = "cpu",
) -> None:
    """Predict on a target's test split, compute metric rows, write them atomically."""
    t0 = time.perf_counter()
    test = load_split(target.cache_path, "test")
    scores = predict(model, test.images, device=device)
    groups = metrics.subgroup_masks(test.sex, test.age, evaluation.age_bins)
    rows = metrics.evaluate(
        scores,
        test.labels,
        np.array([math.nan if t is None else t for t in thresholds], dtype=float),
        LABELS,
        groups=groups,
        n_boot=evaluation.n_boot,
        seed=evaluation.seed,
        ci=evaluation.ci,
        oracle=evaluation.oracle_threshold,
    )
    tmp = edir.with_name(f".{edir.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    results.write_parquet(tmp / "predictions.parquet", _prediction_frame(scores, test))
    results.write_parquet(tmp / "metrics.parquet", pd.DataFrame([r.as_dict() for r in rows]))
    results.write_json(
        tmp / "eval.json",
        {
            "target": target.name,
            "fingerprint": target.fingerprint,
            "n_test": len(test),
            "n_boot": evaluation.n_boot,
            "eval_seconds": time.perf_counter() - t0,
        },
    )
    if edir.exists():  # an earlier at-least-once run finished first; keep its result
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(edir)


def _prediction_frame(scores: np.ndarray, split: SplitData) -> pd.DataFrame:
    """Per-image scores keyed by row position, with labels and demographics; no ids, no paths."""
    df = pd.DataFrame({"row": np.arange(len(scores))})
    for j, label in enumerate(LABELS):
        df[f"score_{label}"] = scores[:, j]
        df[f"label_{label}"] = split.labels[:, j]
    df["sex"] = split.sex.astype(str)
    df["age"] = split.age
    return df
