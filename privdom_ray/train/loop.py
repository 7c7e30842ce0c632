"""``run_trial()``: the resumable single-site training loop, model selection on the source's
validation split, checkpoints and the trial's privacy ledger.

Separate from ``epochs`` because this is the single-site driver: what federated sites share
stops at one epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from privdom_ray.cache import SplitData
from privdom_ray.config import TrialSpec
from privdom_ray.lossweights import LossWeights
from privdom_ray.models import build_model
from privdom_ray.privacy import (
    Ledger,
    NoisePlan,
    epsilon_of,
    make_ledger,
)
from privdom_ray.train.data import _unwrap, macro_auc, predict
from privdom_ray.train.epochs import (
    CheckpointStore,
    Instrument,
    Randomness,
    Training,
    check_accounting,
    loss_weights,
    noise_plan,
    prepare_training,
    privacy_units,
    train_epoch,
)
from privdom_ray.train.patients import _sample_rate
from privdom_ray.train.selection import DPSelection, better, plan_state


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]
    ledger: Ledger
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    val_scores: np.ndarray | None = None
    train_seconds: float = 0.0
    resumed_from_epoch: int = 0  # 0 = trained from scratch
    units: int = 0  # privacy units the sampler drew from: images, or patients
    # DP selection (``dp_selection``): the thresholds released on V (else None: the caller
    # computes exact Youden thresholds, outside the guarantee)
    thresholds: list[float] | None = None


@dataclass
class _Progress:
    """What the epoch loop carries (and a checkpoint restores)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_auc: float = -math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    steps: int = 0
    epoch: int = 0
    # DP selection: the running maximum of the noisy utilities and the plan (train.selection);
    # None: exact selection (non-DP runs, and a DP run resumed from a checkpoint of the code
    # before, which selected its first epochs exactly)
    best_noisy: float = -math.inf
    selection: dict[str, Any] | None = None

    NAMES = ("history", "best_auc", "best_epoch", "best_state", "steps", "epoch")
    OPTIONAL = ("best_noisy", "selection")  # absent from checkpoints of the code before

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any] | None) -> _Progress:
        if state is None:
            return cls()
        return cls(**{n: state[n] for n in (*cls.NAMES, *cls.OPTIONAL) if n in state})

    def as_dict(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in (*self.NAMES, *self.OPTIONAL)}

    def select(self, epoch: int, val_auc: float, model: nn.Module) -> None:
        """Keep the epoch with the best validation macro AUC (a NaN AUC never wins)."""
        if self.best_state is None or val_auc > self.best_auc:
            self.best_auc = -math.inf if math.isnan(val_auc) else float(val_auc)
            self.best_epoch = epoch
            self.best_state = copy.deepcopy(_unwrap(model).state_dict())

    def select_noisy(self, epoch: int, noisy: float, model: nn.Module) -> None:
        """Keep the epoch with the largest noisy utility (report-noisy-max, train.selection)."""
        if self.best_state is None or better(noisy, self.best_noisy):
            self.best_noisy = -math.inf if math.isnan(noisy) else float(noisy)
            self.best_epoch = epoch
            self.best_state = copy.deepcopy(_unwrap(model).state_dict())


def run_trial(
    spec: TrialSpec,
    train: SplitData,
    val: SplitData,
    *,
    device: str = "cpu",
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    checkpoint: CheckpointStore | None = None,
    checkpoint_every: int = 1,
    init_state: dict[str, torch.Tensor] | None = None,
    memory_budget_mb: int = 2048,
    channels_last: bool = False,
    randomness: Randomness | None = None,
    instrument: Instrument | None = None,
    dp_selection: bool = False,
) -> TrainResult:
    """Train ``spec`` on ``train``; select the epoch with the best validation macro AUC, or,
    with ``dp_selection`` (a DP trial whose model is released), by the DP releases of
    ``train.selection`` (epoch and thresholds inside epsilon, recorded in the ledger).

    DP trials: noise calibrated for the exact steps (plus any label-count release), Poisson
    sampling and noise from secret generators (:class:`Randomness`), logical batches split
    into physical ones by BatchMemoryManager; epsilon covers all steps taken, not only up to
    the selected epoch.

    With a ``checkpoint`` store the state after every ``checkpoint_every`` epochs (model,
    optimizer, accountant history, noise plan, loss weights, generator states) is saved and a
    saved state is resumed exactly: the same noise and batches follow, sigma is restored and
    never re-calibrated. ``init_state`` (pretrained weights) is the starting point of a fresh
    run. ``randomness`` injects generators (tests); by default they are drawn fresh.
    ``instrument`` (an audit twin's canaries) joins the run and its checkpoints.
    """
    t0 = time.perf_counter()
    state = _resumable(checkpoint, spec)
    t, rng, plan, weights = _setup(
        spec, train, state, device=device, init_state=init_state, randomness=randomness,
        memory_budget_mb=memory_budget_mb, channels_last=channels_last, instrument=instrument,
    )  # fmt: skip
    progress = _Progress.from_checkpoint(state)
    if state is None and dp_selection and spec.is_private and plan is not None:
        progress.selection = plan_state(epsilon_so_far(spec, plan, plan.steps), spec.delta)
    selector = DPSelection.of(progress.selection, val) if progress.selection else None
    if progress.history:  # wall-clock time keeps counting across a resume
        t0 -= progress.history[-1]["seconds"]
    first_epoch = progress.epoch + 1
    for epoch in range(first_epoch, spec.training.epochs + 1):
        record = _train_one_epoch(spec, t, val, plan, progress, epoch, device, t0, selector)
        last = epoch == spec.training.epochs
        if checkpoint is not None and (epoch % checkpoint_every == 0 or last):
            saved = _checkpoint_state(spec, t, rng, plan, weights, progress)
            if instrument is not None:
                saved["instrument"] = instrument.state_dict()
            checkpoint.save(saved)
        if on_epoch is not None:
            on_epoch(record)
    if plan is not None:
        check_accounting(t, plan, progress.steps)
    final = _unwrap(t.model)
    assert progress.best_state is not None
    final.load_state_dict(progress.best_state)
    ledger = trial_ledger(spec, plan, weights, t, progress.steps, secret=rng.secret)
    val_scores = predict(final, val.images, device=device)
    thresholds = None
    if selector is not None:
        thresholds = selector.thresholds(val_scores, val.labels)
        entry = selector.entry(spec.delta, val.labels.shape[1])
        ledger = dataclasses.replace(ledger, validation=entry)
    return TrainResult(  # weights stored NCHW whatever the training layout
        state_dict={k: v.detach().cpu().contiguous() for k, v in progress.best_state.items()},
        ledger=ledger,
        history=progress.history,
        best_epoch=progress.best_epoch,
        val_scores=val_scores,
        thresholds=thresholds,
        train_seconds=time.perf_counter() - t0,
        resumed_from_epoch=first_epoch - 1,
        units=privacy_units(spec, train),
    )


def _setup(
    spec: TrialSpec,
    train: SplitData,
    state: dict[str, Any] | None,
    *,
    device: str,
    init_state: dict[str, torch.Tensor] | None,
    randomness: Randomness | None,
    memory_budget_mb: int,
    channels_last: bool,
    instrument: Instrument | None = None,
) -> tuple[Training, Randomness, NoisePlan | None, LossWeights]:
    """Model, optimizer, generators, noise plan and loss weights: fresh, or as checkpointed.
    Plan, weights and the sample rate come from ``train`` itself, never from what an
    ``instrument`` adds to the loader's split."""
    dev = torch.device(device)
    torch.manual_seed(spec.seed)  # the initialisation follows the public seed
    model = build_model(spec.model, num_outputs=train.labels.shape[1]).to(dev)
    optimizer = torch.optim.NAdam(model.parameters(), lr=spec.training.lr)
    rng = randomness or Randomness.for_trial(spec.seed, dev, secret=spec.is_private)
    if state is None:
        if init_state is not None:
            model.load_state_dict(init_state)
        plan = noise_plan(spec, privacy_units(spec, train))
        counts_sigma = plan.count_noise_multiplier if plan is not None else 0.0
        weights = loss_weights(spec, train, rng.release, counts_sigma)
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.restore(state["randomness"])
        torch.set_rng_state(state["torch_rng"])
        plan = NoisePlan(**state["noise_plan"]) if state["noise_plan"] else None
        weights = LossWeights(**{**state["loss_weights"]})
    loader_split = train
    if instrument is not None:
        if state is not None and "instrument" in state:
            instrument.load_state_dict(state["instrument"])
        loader_split = instrument.prepare(train, rng.audit)
    t = prepare_training(
        spec, model, optimizer, loader_split, randomness=rng, weights=weights.tensor(),
        noise_multiplier=plan.noise_multiplier if plan is not None else None, device=device,
        memory_budget_mb=memory_budget_mb, channels_last=channels_last,
        sample_rate=plan.sample_rate if plan is not None else None,
    )  # fmt: skip
    if instrument is not None:
        rate = plan.sample_rate if plan is not None else spec.training.logical_batch / len(train)
        instrument.attach(t.optimizer, rate)
    if plan is not None and not math.isclose(_sample_rate(t.loader), plan.sample_rate):
        raise ValueError(
            f"sample rate {_sample_rate(t.loader)} differs from the plan's {plan.sample_rate}; "
            "the training data changed since the checkpoint, refusing to resume"
        )
    if t.engine is not None and state is not None:
        t.engine.accountant.history = [tuple(h) for h in state["accountant_history"]]
    return t, rng, plan, weights


def _resumable(checkpoint: CheckpointStore | None, spec: TrialSpec) -> dict[str, Any] | None:
    """The saved state to resume, or None. A checkpoint written before generator states were
    kept (older code, whose noise followed the public seed) is never resumed: the run starts
    over with secret randomness."""
    state = checkpoint.load() if checkpoint is not None else None
    if state is None:
        return None
    if state.get("key") != spec.key:
        raise ValueError(f"checkpoint belongs to trial {state.get('key')!r}, not {spec.key!r}")
    if "randomness" not in state:
        return None
    return state


def _train_one_epoch(spec, t, val, plan, progress: _Progress, epoch, device, t0, selector) -> dict:
    losses = train_epoch(t)
    progress.steps = t.accounted_steps() if t.engine is not None else progress.steps + len(t.loader)
    val_scores = predict(_unwrap(t.model), val.images, device=device)
    val_auc = macro_auc(val_scores, val.labels)
    epsilon = math.inf
    if spec.is_private and plan is not None:
        epsilon = epsilon_so_far(spec, plan, progress.steps)
    record = {  # plain Python numbers: checkpoints load with weights_only=True
        "epoch": epoch,
        "train_loss": float(np.mean(losses)) if losses else math.nan,
        "val_macro_auc": float(val_auc),
        "steps": int(progress.steps),
        "epsilon": epsilon,
        "seconds": time.perf_counter() - t0,
    }
    progress.history.append(record)
    progress.epoch = epoch
    if selector is not None:  # the val AUC above stays in the private history only
        progress.select_noisy(epoch, selector.noisy_utility(val_scores, val.labels), t.model)
    else:
        progress.select(epoch, val_auc, t.model)
    return record


def epsilon_so_far(spec: TrialSpec, plan: NoisePlan, steps: int) -> float:
    """Epsilon spent after ``steps`` DP-SGD steps (and the count release, made up front)."""
    partial = dataclasses.replace(plan, steps=steps)
    return float(epsilon_of(plan.accountant, partial.mechanisms, spec.delta)[0])


def _checkpoint_state(spec, t: Training, rng: Randomness, plan, weights, progress) -> dict:
    """Everything a resume needs, generator states included: the file is private, and it is
    deleted when the trial is done (nothing left can replay the noise or the batches)."""
    history = t.engine.accountant.history if t.engine is not None else []
    return {
        "key": spec.key,
        "model": _unwrap(t.model).state_dict(),
        "optimizer": getattr(t.optimizer, "original_optimizer", t.optimizer).state_dict(),
        "noise_plan": dataclasses.asdict(plan) if plan is not None else None,
        "loss_weights": dataclasses.asdict(weights),
        "accountant_history": [(float(s), float(q), int(n)) for s, q, n in history],
        "randomness": rng.state(),
        "torch_rng": torch.get_rng_state(),
        **progress.as_dict(),
    }


def trial_ledger(
    spec: TrialSpec,
    plan: NoisePlan | None,
    weights: LossWeights,
    t: Training,
    steps: int,
    *,
    secret: bool = True,
) -> Ledger:
    """The ledger of a finished run: its plan's mechanisms and the loss weights it used."""
    common = dict(
        loss_weights=weights.source,
        pos_weight=weights.values,
        privacy_unit="patient" if t.by_patient else "image",
    )
    if plan is None:
        rate = spec.training.logical_batch / max(len(t.train), 1)
        return Ledger.non_private(steps=steps, sample_rate=rate, **common)
    if not spec.is_private:
        return Ledger.clip_only(
            steps=steps,
            sample_rate=plan.sample_rate,
            max_grad_norm=spec.training.max_grad_norm,
            **common,
        )
    return make_ledger(
        epsilon_target=spec.epsilon,
        delta=spec.delta,
        plan=plan,
        max_grad_norm=spec.training.max_grad_norm,
        accountant=plan.accountant,
        steps=steps,
        secret=secret,
        **common,
    )
