"""Everything one epoch needs, and the epoch itself: the run's random generators, the memory
budget and physical batch, the loaders, loss weights, the noise plan, :func:`prepare_training`
and :func:`train_epoch`.

Separate from the loop (``loop``) because federated sites train through the same functions
without the single-site loop, its checkpoints or its model selection.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from privdom_ray import dpstep, lossweights
from privdom_ray.cache import SplitData
from privdom_ray.config import TrialSpec
from privdom_ray.lossweights import LossWeights
from privdom_ray.privacy import (
    NoisePlan,
    calibrate,
    poisson_rate,
    steps_per_epoch,
)
from privdom_ray.train.data import SplitDataset, _as_input, augment
from privdom_ray.train.patients import (
    _patient_epoch,
    _patient_loader,
    _sample_rate,
    noise_only_step,
)


@dataclass
class Randomness:
    """The random generators of one training run, and which of them must stay secret.

    ``sampling`` (which examples each step sees), ``noise`` (DP-SGD's Gaussian noise) and
    ``release`` (the label-count release) are the DP mechanism's randomness: the guarantee
    assumes nobody can replay them, so for DP trials they are seeded from OS entropy, never
    from the published seed, and their states live only in the private checkpoint (deleted
    when the trial is done). So is ``augment``: its draws are consumed in batch order, so with
    a known stream one example's presence would change how every later example is augmented
    (its clipped gradient sum would move by more than C); a secret i.i.d. stream keeps the
    sensitivity bound. The initialisation follows the public seed (torch's global generator).
    Non-private trials and the clip-only control have no guarantee: all their streams follow
    the public seed (reproducible).
    Tests inject fixed generators through ``run_trial(randomness=...)``; a sweep never does.
    """

    sampling: torch.Generator
    noise: torch.Generator
    release: torch.Generator
    augment: torch.Generator
    secret: bool
    # an audit twin's coins and canary draws: always from OS entropy (the auditor must not be
    # able to derive them), whatever the trial
    audit: torch.Generator = field(default_factory=lambda: _entropy_generator())

    STREAMS = ("sampling", "noise", "release", "augment", "audit")

    @classmethod
    def for_trial(cls, seed: int, device: str | torch.device, *, secret: bool) -> Randomness:
        """Fresh generators: OS entropy for the mechanism's streams when ``secret``."""
        import secrets

        def seed_of(offset: int) -> int:
            return secrets.randbits(63) if secret else seed + offset

        return cls(
            sampling=torch.Generator().manual_seed(seed_of(0)),
            noise=torch.Generator(device=torch.device(device)).manual_seed(seed_of(1)),
            release=torch.Generator().manual_seed(seed_of(2)),
            augment=torch.Generator().manual_seed(seed_of(3)),
            secret=secret,
        )

    def state(self) -> dict[str, Any]:
        """Generator states for the (private) checkpoint."""
        return {"secret": self.secret, **{n: getattr(self, n).get_state() for n in self.STREAMS}}

    def restore(self, state: dict[str, Any]) -> None:
        for name in self.STREAMS:
            if name in state:
                getattr(self, name).set_state(state[name])
        self.secret = bool(state["secret"])


def _entropy_generator() -> torch.Generator:
    import secrets

    return torch.Generator().manual_seed(secrets.randbits(63))


class Instrument(Protocol):
    """What a run may carry besides training (an audit twin's canaries, canaries.instrument): it may
    change the training split before the loader is built, hooks into the optimizer, and has
    private state that checkpoints keep."""

    def prepare(self, train: SplitData, generator: torch.Generator) -> SplitData: ...

    def attach(self, optimizer: torch.optim.Optimizer, sample_rate: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


CPU_BUDGET_MB = 2048
GPU_MARGIN = 0.1  # of a trial's GPU share: CUDA context, allocator fragmentation, evaluation


def memory_budget_mb(requested: int, device: str, gpu_share: float = 1.0) -> int:
    """The memory a trial may plan its physical batch for. ``requested`` (MiB) wins; 0 means
    the trial's share of its device: ``gpu_share`` (resources.gpu, e.g. 0.5 = two trials per
    GPU) of the device's total memory less a margin, not whatever happens to be free when it
    starts (with fractional GPUs that depends on who started first); 2048 MiB on a CPU."""
    if requested:
        return int(requested)
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return int(total * min(1.0, gpu_share) * (1 - GPU_MARGIN) / 2**20)
    return CPU_BUDGET_MB


def auto_physical_batch(spec: TrialSpec, device: str, budget_mb: int) -> int:
    """The largest physical batch whose measured step fits ``budget_mb`` on this device.

    Only memory depends on it: the sample rate and noise come from the logical batch
    (BatchMemoryManager).
    """
    cfg = spec.training
    mode = "nondp"
    if spec.clips:
        mode = cfg.grad_sample_mode
        mode = dpstep.fastest_correct_mode(spec.model) if mode == "auto" else mode
    return dpstep.max_physical_batch(
        spec.model,
        spec.preprocessing.image_size,
        mode,
        budget_mb * 2**20,
        device,
        limit=cfg.logical_batch,
    )


class CheckpointStore(Protocol):
    """Where a trial's checkpoints live; ``trial.py`` provides a file-backed one."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...


@dataclass
class Training:
    """A model, optimizer, loss and loader ready for :func:`train_epoch`.

    Built by :func:`prepare_training`, so single-site trials and federated sites share one
    training path: Opacus wrapping (Poisson sampling, clipping, noise) when the run clips,
    augmentation, masked BCE with the given loss weights, and physical batches.
    """

    model: nn.Module  # Opacus's GradSampleModule when ``engine`` is set
    optimizer: torch.optim.Optimizer
    criterion: Callable[..., Any]
    loader: DataLoader
    engine: PrivacyEngine | None
    train: SplitData
    inputs: Callable[[torch.Tensor], torch.Tensor]  # uint8 batch -> (augmented) model input
    physical: int
    device: torch.device
    by_patient: bool = False  # patient-level DP: Poisson sampling and clipping per patient
    patient_rows: list[np.ndarray] = field(default_factory=list)  # image rows of each patient
    per_sample_grads: bool = False  # an Opacus per-sample mode (hooks, functorch, ew)

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
    randomness: Randomness,
    weights: torch.Tensor,
    noise_multiplier: float | None,
    device: str,
    memory_budget_mb: int,
    channels_last: bool = False,
    sample_rate: float | None = None,
) -> Training:
    """Wrap ``model`` and ``optimizer`` for training on ``train``.

    ``noise_multiplier`` is ``None`` for plain (non-clipping) training, else DP-SGD's sigma
    (0 for the clip-only control), calibrated beforehand for every step the run will take.
    ``weights`` is the loss's pos_weight, obtained beforehand from a source that reads no
    private statistic unaccounted (lossweights.py): nothing here looks at the training labels
    except per example. ``channels_last`` converts the model's conv weights (in place: the
    optimizer keeps its parameters) and the batches to NHWC. ``sample_rate``: the DP loader's
    Poisson rate (default 1/ceil(N/B), Opacus's own rule): a run's noise plan fixes it.
    """
    cfg = spec.training
    dev = torch.device(device)
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model {spec.model!r} is not Opacus-compatible: {errors}")
    private = noise_multiplier is not None
    by_patient = private and cfg.privacy_unit == "patient"
    loader, patient_rows = _loader(spec, train, randomness, dev, private, by_patient, sample_rate)
    engine: PrivacyEngine | None = None
    criterion: Callable[..., Any] = dpstep.MaskedBCELoss(weights.to(dev))
    mode = cfg.grad_sample_mode
    if mode == "auto":
        mode = dpstep.fastest_correct_mode(spec.model, opacus_only=by_patient)
    if channels_last and private and mode not in dpstep.NHWC_MODES:
        channels_last = False  # this mode would clip wrong per-sample gradients in NHWC
        warnings.warn(
            f"grad_sample_mode {mode!r} is not correct with channels_last activations; "
            f"training in NCHW (NHWC-safe modes: {', '.join(dpstep.NHWC_MODES)})",
            stacklevel=2,
        )
    fmt = dpstep.memory_format(channels_last)
    model.to(memory_format=fmt)  # before Opacus wraps it
    if private:
        engine = PrivacyEngine(accountant=cfg.accountant)
        model, optimizer, criterion, loader = dpstep.privatize(
            engine, mode=mode, module=model, optimizer=optimizer, data_loader=loader,
            criterion=criterion, max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=False,  # the loader already Poisson-samples (images or patients)
            noise_generator=randomness.noise, noise_multiplier=noise_multiplier,
        )  # fmt: skip

    def inputs(x: torch.Tensor) -> torch.Tensor:
        batch = _as_input(x, dev)
        if cfg.augment and len(batch):
            batch = augment(batch, generator=randomness.augment)
        return batch.contiguous(memory_format=fmt)

    return Training(
        model=model,
        optimizer=optimizer,
        criterion=criterion,
        loader=loader,
        engine=engine,
        train=train,
        inputs=inputs,
        physical=cfg.physical_batch
        or auto_physical_batch(spec, device, memory_budget_mb or CPU_BUDGET_MB),
        device=dev,
        by_patient=by_patient,
        patient_rows=patient_rows,
        per_sample_grads=private and mode in ("hooks", "functorch", "ew"),
    )


def _loader(spec, train, randomness, dev, private: bool, by_patient: bool, sample_rate):
    """(loader, image rows of each patient): Poisson sampling over patients or images at the
    planned rate with the secret generator for DP runs, shuffled batches otherwise."""
    cfg = spec.training
    pin = dev.type == "cuda"  # page-locked batches: asynchronous host-to-GPU copies
    if by_patient:
        return _patient_loader(train, cfg.logical_batch, randomness.sampling)
    if private:
        rate = sample_rate or poisson_rate(len(train), cfg.logical_batch)
        loader = DPDataLoader(
            SplitDataset(train), sample_rate=rate, generator=randomness.sampling, pin_memory=pin
        )
        return loader, []
    loader = DataLoader(
        SplitDataset(train),
        batch_size=cfg.logical_batch,
        shuffle=True,
        generator=randomness.sampling,
        pin_memory=pin,
    )
    return loader, []


def train_epoch(t: Training) -> list[float]:
    """One pass over ``t.loader``; returns the loss of every physical batch.

    DP runs step once per Poisson-sampled logical batch (BatchMemoryManager splits it into
    physical batches; an empty one still takes a noise-only step); plain runs accumulate the
    physical batches' gradients into one step per logical batch.
    """
    model, optimizer, dev = t.model, t.optimizer, t.device
    model.train()
    if t.by_patient:
        return _patient_epoch(
            model, optimizer, t.criterion, t.loader, t.patient_rows, t.train, t.inputs,
            t.physical, dev,
        )  # fmt: skip
    losses: list[float] = []
    if t.engine is not None:
        params = [p for p in model.parameters() if p.requires_grad]
        with BatchMemoryManager(
            data_loader=t.loader, max_physical_batch_size=t.physical, optimizer=optimizer
        ) as batches:
            for x, y in batches:
                if len(x) == 0 and t.per_sample_grads:
                    noise_only_step(optimizer, params)
                    continue
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
            loss = t.criterion(model(t.inputs(xs)), ys.to(dev))
            (loss * (len(xs) / len(x))).backward()
            losses.append(loss.item())
        optimizer.step()
    return losses


def loss_weights(
    spec: TrialSpec,
    train: SplitData,
    generator: torch.Generator,
    count_noise_multiplier: float = 0.0,
) -> LossWeights:
    """The pos_weight ``spec`` trains with, from the source it names (lossweights.py).

    For ``dp_counts`` this IS a DP release (``generator`` must be secret), accounted in the
    trial's ledger; for DP trials no other source reads the private training labels.
    """
    source = spec.loss_weight_source
    if source == "dp_counts":
        units = train.patient if spec.training.privacy_unit == "patient" else None
        values = lossweights.release_counts(train.labels, units, count_noise_multiplier, generator)
        return LossWeights("dp_counts", tuple(map(float, values)), count_noise_multiplier)
    if source == "exact":
        if spec.is_private:
            raise ValueError("a DP trial must not weight its loss by exact private label counts")
        return lossweights.fixed(lossweights.exact_pos_weight(train.labels), "exact")
    if source == "public":
        return lossweights.fixed(spec.public_pos_weight, "public")
    if source == "none":
        return lossweights.fixed(np.ones(train.labels.shape[1]), "none")
    return lossweights.fixed(spec.training.pos_weight, "fixed")


def privacy_units(spec: TrialSpec, train: SplitData) -> int:
    """Images, or distinct patients for patient-level privacy: what Poisson sampling draws."""
    if spec.clips and spec.training.privacy_unit == "patient":
        if train.patient is None:
            raise ValueError("privacy_unit: patient needs patient ids in the training split")
        return len(np.unique(train.patient.astype(str)))
    return len(train)


def noise_plan(spec: TrialSpec, units: int) -> NoisePlan | None:
    """sigma for EXACTLY the steps the loader will take (epochs x int(1/q)), composed with the
    label-count release when there is one; None for plain training, sigma 0 for clip-only."""
    if not spec.clips:
        return None
    cfg = spec.training
    q = poisson_rate(units, cfg.logical_batch)
    steps = cfg.epochs * steps_per_epoch(q)
    if not spec.is_private:
        return NoisePlan(0.0, q, steps, accountant="none")
    budget = cfg.pos_weight_budget if spec.loss_weight_source == "dp_counts" else 0.0
    return calibrate(
        epsilon=spec.epsilon,
        delta=spec.delta,
        sample_rate=q,
        steps=steps,
        accountant=cfg.accountant,
        count_fraction=budget,
    )


def check_accounting(t: Training, plan: NoisePlan, steps_done: int) -> None:
    """Raise unless the sampler used q and the accountant saw exactly sigma for the steps
    taken: the ledger reports the plan, so the run must have followed it."""
    assert t.engine is not None
    rate = _sample_rate(t.loader)
    seen = [(float(s), int(n)) for s, _, n in t.engine.accountant.history]
    drifted = not math.isclose(rate, plan.sample_rate, rel_tol=1e-12)
    drifted |= sum(n for _, n in seen) != steps_done
    drifted |= any(s != plan.noise_multiplier for s, _ in seen)
    if drifted:
        raise RuntimeError(
            f"accounting drifted from the plan: sampled at {rate} (planned {plan.sample_rate}), "
            f"accountant saw {seen} for {steps_done} steps at sigma {plan.noise_multiplier}"
        )
