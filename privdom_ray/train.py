"""Train one model (DP-SGD via Opacus, or plainly for epsilon = inf) and predict with it.

Pure: no Ray, no Tune, no file layout. A GPU benchmark machine with only torch + opacus can
run it. Progress leaves through the ``on_epoch`` callback, so the caller decides whether that
becomes a Tune report, a log line, or nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privdom_ray import dpstep
from privdom_ray.cache import SplitData
from privdom_ray.grid import TrialSpec
from privdom_ray.metrics import auc
from privdom_ray.models import build_model
from privdom_ray.privacy import Ledger, make_ledger


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]
    ledger: Ledger
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    val_scores: np.ndarray | None = None
    train_seconds: float = 0.0
    resumed_from_epoch: int = 0  # 0 = trained from scratch


def pos_weight(labels: np.ndarray) -> torch.Tensor:
    """(N - P) / P per label over known labels; 1 where a label has no positives."""
    known = ~np.isnan(labels)
    pos = np.nansum(labels, axis=0)
    neg = known.sum(axis=0) - pos
    return torch.tensor(np.where(pos > 0, neg / np.maximum(pos, 1), 1.0), dtype=torch.float32)


def masked_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean BCE over the batch, where NaN targets (masked labels) contribute nothing."""
    known = ~torch.isnan(target)
    loss = F.binary_cross_entropy_with_logits(
        logits, torch.nan_to_num(target), pos_weight=weight, reduction="none"
    )
    return (loss * known).sum(dim=1).div(target.shape[1]).mean()


def _as_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device, non_blocking=True).unsqueeze(1).float().div_(255.0)


@torch.no_grad()
def predict(
    model: nn.Module, images: np.ndarray, *, batch: int = 256, device: str = "cpu"
) -> np.ndarray:
    """Sigmoid probabilities (n, L) for uint8 images (n, S, S)."""
    model.eval()
    dev = torch.device(device)
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch]))
        out.append(torch.sigmoid(model(_as_input(x, dev))).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def _sample_rate(loader: DataLoader) -> float:
    """Poisson rate of a DP loader: Opacus's DPDataLoader, or our patient loader (same sampler)."""
    return float(getattr(loader, "sample_rate", None) or loader.batch_sampler.sample_rate)


def _patient_loader(
    train: SplitData, logical_batch: int, generator: torch.Generator
) -> tuple[DataLoader, list[np.ndarray]]:
    """Poisson sampling over patients (Opacus's UniformWithReplacementSampler, the sampler of its
    DPDataLoader): each step includes each patient independently with q = 1/ceil(P/B), and all
    of a sampled patient's images. Yields tensors of patient indices; returns the image rows of
    each patient too."""
    if train.patient is None:
        raise ValueError("privacy_unit: patient needs patient ids in the training split")
    _, inverse = np.unique(train.patient.astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    rows = np.split(order, np.cumsum(counts)[:-1])
    n_patients = len(rows)
    rate = 1.0 / math.ceil(n_patients / logical_batch)
    sampler = UniformWithReplacementSampler(
        num_samples=n_patients, sample_rate=rate, generator=generator
    )
    loader = DataLoader(
        range(n_patients),
        batch_sampler=sampler,
        collate_fn=lambda idx: torch.as_tensor(idx, dtype=torch.long),
    )
    return loader, rows


def _patient_epoch(model, optimizer, criterion, loader, patient_rows, train, inputs, physical, dev):
    """One epoch of patient-level DP-SGD: per-image per-sample gradients are summed per patient
    before Opacus clips them, so each clipped row is one patient. A logical batch is processed in
    chunks of whole patients (at most ``physical`` images unless one patient has more), with
    Opacus's skip-step accumulation as in BatchMemoryManager; noise is added once per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    for patients in loader:
        chunks: list[list[np.ndarray]] = []
        for pid in patients.tolist():
            rows = patient_rows[pid]
            if not chunks or sum(map(len, chunks[-1])) + len(rows) > physical:
                chunks.append([])
            chunks[-1].append(rows)
        if not chunks:  # an empty Poisson batch still takes a (noise-only) step
            optimizer.zero_grad(set_to_none=True)
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device)
            optimizer.step()
            continue
        for i, chunk in enumerate(chunks):
            optimizer.zero_grad(set_to_none=True)  # keeps the summed clipped grads of skipped steps
            idx = np.concatenate(chunk)
            group = torch.as_tensor(
                np.repeat(np.arange(len(chunk)), [len(r) for r in chunk]), device=dev
            )
            x = torch.from_numpy(np.ascontiguousarray(train.images[idx]))
            y = torch.from_numpy(np.ascontiguousarray(train.labels[idx], dtype=np.float32)).to(dev)
            loss = criterion(model(inputs(x)), y)
            loss.backward()
            for p in params:
                gs = torch.cat(p.grad_sample) if isinstance(p.grad_sample, list) else p.grad_sample
                per_patient = torch.zeros(
                    (len(chunk), *gs.shape[1:]), dtype=gs.dtype, device=gs.device
                )
                p.grad_sample = per_patient.index_add_(0, group, gs)
            optimizer.signal_skip_step(do_skip=i < len(chunks) - 1)
            optimizer.step()
            losses.append(loss.item())
    return losses


def auto_physical_batch(spec: TrialSpec, device: str, budget_mb: int) -> int:
    """The largest physical batch whose measured step fits the budget on this device.

    On a GPU the budget is capped by the memory the device has free. Only memory depends on
    it: the sample rate and noise come from the logical batch (BatchMemoryManager).
    """
    cfg = spec.training
    budget = budget_mb * 2**20
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info()
        budget = min(budget, int(free * 0.9))
    mode = "nondp"
    if spec.clips:
        mode = cfg.grad_sample_mode
        mode = dpstep.fastest_correct_mode(spec.model) if mode == "auto" else mode
    return dpstep.max_physical_batch(
        spec.model, spec.preprocessing.image_size, mode, budget, device, limit=cfg.logical_batch
    )


def augment(batch: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """The paper's training augmentation, per image and batched: horizontal flip with
    probability 0.4 and a rotation uniform in [-8, 8] degrees (one affine resampling)."""
    n = batch.shape[0]
    cpu = torch.device("cpu")
    flip = torch.where(torch.rand(n, generator=generator, device=cpu) < 0.4, -1.0, 1.0)
    angle = (torch.rand(n, generator=generator, device=cpu) * 16 - 8) * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, torch.zeros(n)], 1),
            torch.stack([sin * flip, cos, torch.zeros(n)], 1),
        ],
        1,
    ).to(batch.device)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, align_corners=False, padding_mode="border")


def macro_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    values = [auc(scores[:, j], labels[:, j]) for j in range(labels.shape[1])]
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


class CheckpointStore(Protocol):
    """Where a trial's checkpoints live; ``trial.py`` provides a file-backed one."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...


@dataclass
class Training:
    """A model, optimizer, loss and loader ready for :func:`train_epoch`.

    Built by :func:`prepare_training`, so single-site trials and federated sites share one
    training path: Opacus wrapping (Poisson sampling, clipping, noise) when the run clips,
    augmentation, masked BCE with ``pos_weight`` and physical batches.
    """

    model: nn.Module  # Opacus's GradSampleModule when ``engine`` is set
    optimizer: torch.optim.Optimizer
    criterion: Callable[..., Any]
    loader: DataLoader
    engine: PrivacyEngine | None
    train: SplitData
    weight: torch.Tensor
    inputs: Callable[[torch.Tensor], torch.Tensor]  # uint8 batch -> (augmented) model input
    physical: int
    device: torch.device
    by_patient: bool = False  # patient-level DP: Poisson sampling and clipping per patient
    patient_rows: list[np.ndarray] = field(default_factory=list)  # image rows of each patient

    def accounted_steps(self) -> int:
        """Steps the accountant has recorded (DP runs; restored history included)."""
        assert self.engine is not None
        return sum(n for _, _, n in self.engine.accountant.history)


def prepare_training(
    spec: TrialSpec,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: SplitData,
    *,
    generator: torch.Generator,
    noise_generator: torch.Generator,
    device: str,
    noise: dict[str, Any] | None,
    memory_budget_mb: int,
    channels_last: bool = False,
) -> Training:
    """Wrap ``model`` and ``optimizer`` for training on ``train``.

    ``noise`` is ``None`` for plain (non-clipping) training, otherwise the noise arguments of
    ``dpstep.privatize``: ``{"noise_multiplier": sigma}``, or ``target_epsilon``,
    ``target_delta`` and ``epochs`` to calibrate sigma. ``generator`` drives sampling and
    augmentation, ``noise_generator`` the Gaussian noise. ``channels_last`` converts the
    model's conv weights (in place: the optimizer keeps its parameters) and the batches to NHWC.
    """
    cfg = spec.training
    dev = torch.device(device)
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model {spec.model!r} is not Opacus-compatible: {errors}")
    weight = pos_weight(train.labels).to(dev)
    dataset = TensorDataset(
        torch.from_numpy(np.ascontiguousarray(train.images)),
        torch.from_numpy(np.ascontiguousarray(train.labels, dtype=np.float32)),
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.logical_batch,
        shuffle=True,
        generator=generator,
        pin_memory=dev.type == "cuda",  # page-locked batches: asynchronous host-to-GPU copies
    )
    by_patient = noise is not None and cfg.privacy_unit == "patient"
    patient_rows: list[np.ndarray] = []
    if by_patient:
        loader, patient_rows = _patient_loader(train, cfg.logical_batch, generator)

    engine: PrivacyEngine | None = None
    criterion: Callable[..., Any] = dpstep.MaskedBCELoss(weight)
    mode = cfg.grad_sample_mode
    if mode == "auto":
        mode = dpstep.fastest_correct_mode(spec.model, opacus_only=by_patient)
    if channels_last and noise is not None and mode not in dpstep.NHWC_MODES:
        channels_last = False  # this mode would clip wrong per-sample gradients in NHWC
        warnings.warn(
            f"grad_sample_mode {mode!r} is not correct with channels_last activations; "
            f"training in NCHW (NHWC-safe modes: {', '.join(dpstep.NHWC_MODES)})",
            stacklevel=2,
        )
    fmt = dpstep.memory_format(channels_last)
    model.to(memory_format=fmt)  # before Opacus wraps it
    if noise is not None:
        engine = PrivacyEngine(accountant=cfg.accountant)
        model, optimizer, criterion, loader = dpstep.privatize(
            engine,
            mode=mode,
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=criterion,
            max_grad_norm=cfg.max_grad_norm,
            # per patient, the loader already Poisson-samples patients with Opacus's sampler
            poisson_sampling=not by_patient,
            noise_generator=noise_generator,
            **noise,
        )

    physical = cfg.physical_batch or auto_physical_batch(spec, device, memory_budget_mb)

    def inputs(x: torch.Tensor) -> torch.Tensor:
        batch = _as_input(x, dev)
        batch = augment(batch, generator=generator) if cfg.augment and len(batch) else batch
        return batch.contiguous(memory_format=fmt)

    return Training(
        model=model,
        optimizer=optimizer,
        criterion=criterion,
        loader=loader,
        engine=engine,
        train=train,
        weight=weight,
        inputs=inputs,
        physical=physical,
        device=dev,
        by_patient=by_patient,
        patient_rows=patient_rows,
    )


def train_epoch(t: Training) -> list[float]:
    """One pass over ``t.loader``; returns the loss of every physical batch.

    DP runs step once per Poisson-sampled logical batch (BatchMemoryManager splits it into
    physical batches, an empty one still takes a noise-only step); plain runs accumulate the
    physical batches' gradients into one step per logical batch.
    """
    model, optimizer, dev = t.model, t.optimizer, t.device
    model.train()
    losses: list[float] = []
    if t.by_patient:
        return _patient_epoch(
            model,
            optimizer,
            t.criterion,
            t.loader,
            t.patient_rows,
            t.train,
            t.inputs,
            t.physical,
            dev,
        )
    if t.engine is not None:
        with BatchMemoryManager(
            data_loader=t.loader, max_physical_batch_size=t.physical, optimizer=optimizer
        ) as batches:
            for x, y in batches:
                optimizer.zero_grad(set_to_none=True)
                loss = t.criterion(model(t.inputs(x)), y.to(dev))
                loss.backward()
                optimizer.step()
                if len(x):
                    losses.append(loss.item())
        return losses
    for x, y in t.loader:
        optimizer.zero_grad(set_to_none=True)
        for xs, ys in zip(x.split(t.physical), y.split(t.physical), strict=True):
            loss = masked_bce(model(t.inputs(xs)), ys.to(dev), t.weight)
            (loss * (len(xs) / len(x))).backward()
            losses.append(loss.item())
        optimizer.step()
    return losses


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
) -> TrainResult:
    """Train ``spec`` on ``train``; select the epoch with the best validation macro AUC.

    DP trials use Poisson sampling (Opacus's default, required by the guarantee), logical
    batches split into physical ones by BatchMemoryManager, and report epsilon for all steps
    taken, not only up to the selected epoch.

    With a ``checkpoint`` store, the state after every ``checkpoint_every`` epochs (model,
    optimizer, accountant history, noise multiplier, sampler and noise RNG states) is saved,
    and a saved state is resumed: the noise multiplier is restored, never re-calibrated, and
    the accountant continues from the steps already taken. ``init_state`` (pretrained weights)
    is the starting point of a fresh run; a resumed run continues from its checkpoint instead.
    """
    t0 = time.perf_counter()
    cfg = spec.training
    dev = torch.device(device)
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None and state.get("key") != spec.key:
        raise ValueError(f"checkpoint belongs to trial {state.get('key')!r}, not {spec.key!r}")
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, num_outputs=train.labels.shape[1]).to(dev)
    optimizer = torch.optim.NAdam(model.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(spec.seed)
    noise_generator = torch.Generator(device=dev).manual_seed(spec.seed + 1)
    if state is None and init_state is not None:
        model.load_state_dict(init_state)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["loader_rng"])
        noise_generator.set_state(state["noise_rng"])
        torch.set_rng_state(state["torch_rng"])

    noise: dict[str, Any] | None = None
    if spec.clips and state is not None:
        noise = {"noise_multiplier": state["noise_multiplier"]}
    elif spec.clips and spec.is_private:
        noise = {"target_epsilon": spec.epsilon, "target_delta": spec.delta, "epochs": cfg.epochs}
    elif spec.clips:  # clip-only control: sigma = 0
        noise = {"noise_multiplier": 0.0}
    t = prepare_training(
        spec,
        model,
        optimizer,
        train,
        generator=generator,
        noise_generator=noise_generator,
        device=device,
        noise=noise,
        memory_budget_mb=memory_budget_mb,
        channels_last=channels_last,
    )
    model, optimizer, loader, engine = t.model, t.optimizer, t.loader, t.engine
    if engine is not None and state is not None:
        if not math.isclose(_sample_rate(loader), state["sample_rate"], rel_tol=1e-12):
            raise ValueError(
                f"sample rate changed since the checkpoint ({state['sample_rate']} -> "
                f"{_sample_rate(loader)}); the training data differs, refusing to resume"
            )
        engine.accountant.history = [tuple(h) for h in state["accountant_history"]]

    history: list[dict[str, float]] = list(state["history"]) if state else []
    if history:  # wall-clock time keeps counting across a resume
        t0 -= history[-1]["seconds"]
    best_auc = state["best_auc"] if state else -math.inf
    best_epoch = state["best_epoch"] if state else 0
    best_state = state["best_state"] if state else None
    steps = state["steps"] if state else 0
    first_epoch = state["epoch"] + 1 if state else 1
    for epoch in range(first_epoch, cfg.epochs + 1):
        losses = train_epoch(t)
        steps = t.accounted_steps() if engine is not None else steps + len(loader)
        val_scores = predict(_unwrap(model), val.images, device=device)
        val_auc = macro_auc(val_scores, val.labels)
        record = {  # plain Python numbers: checkpoints load with weights_only=True
            "epoch": epoch,
            "train_loss": float(np.mean(losses)) if losses else math.nan,
            "val_macro_auc": float(val_auc),
            "steps": int(steps),
            "epsilon": float(engine.get_epsilon(spec.delta)) if spec.is_private else math.inf,
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)
        if best_state is None or val_auc > best_auc:  # a NaN AUC (no positives) never wins
            best_auc = -math.inf if math.isnan(val_auc) else float(val_auc)
            best_epoch = epoch
            best_state = copy.deepcopy(_unwrap(model).state_dict())
        if checkpoint is not None and (epoch % checkpoint_every == 0 or epoch == cfg.epochs):
            checkpoint.save(
                {
                    "key": spec.key,
                    "epoch": epoch,
                    "model": _unwrap(model).state_dict(),
                    "optimizer": getattr(optimizer, "original_optimizer", optimizer).state_dict(),
                    "noise_multiplier": float(optimizer.noise_multiplier) if engine else 0.0,
                    "sample_rate": _sample_rate(loader) if engine else 0.0,
                    "accountant_history": [
                        (float(sigma), float(q), int(n))
                        for sigma, q, n in engine.accountant.history
                    ]
                    if engine
                    else [],
                    "loader_rng": generator.get_state(),
                    "noise_rng": noise_generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": history,
                    "steps": steps,
                    "best_auc": best_auc,
                    "best_epoch": best_epoch,
                    "best_state": best_state,
                }
            )
        if on_epoch is not None:
            on_epoch(record)

    final = _unwrap(model)
    assert best_state is not None
    final.load_state_dict(best_state)
    if engine is not None and not spec.is_private:
        ledger = Ledger.clip_only(
            steps=steps, sample_rate=_sample_rate(loader), max_grad_norm=cfg.max_grad_norm
        )
    elif engine is not None:
        ledger = make_ledger(
            epsilon_target=spec.epsilon,
            delta=spec.delta,
            noise_multiplier=float(optimizer.noise_multiplier),
            sample_rate=_sample_rate(loader),
            steps=steps,
            max_grad_norm=cfg.max_grad_norm,
            accountant=cfg.accountant,
        )
    else:
        ledger = Ledger.non_private(steps=steps, sample_rate=cfg.logical_batch / max(len(train), 1))
    if t.by_patient:
        ledger = dataclasses.replace(ledger, privacy_unit="patient")
    return TrainResult(  # weights stored NCHW whatever the training layout
        state_dict={k: v.detach().cpu().contiguous() for k, v in best_state.items()},
        ledger=ledger,
        history=history,
        best_epoch=best_epoch,
        val_scores=predict(final, val.images, device=device),
        train_seconds=time.perf_counter() - t0,
        resumed_from_epoch=first_epoch - 1,
    )


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside Opacus's GradSampleModule (state_dict keys without ``_module.``)."""
    return getattr(model, "_module", model)


def load_model(name: str, state_dict: dict[str, torch.Tensor], num_outputs: int) -> nn.Module:
    model = build_model(name, num_outputs=num_outputs)
    model.load_state_dict(state_dict)
    return model.eval()
