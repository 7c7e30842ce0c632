"""Train one model (DP-SGD via Opacus, or plainly for epsilon = inf) and predict with it.

Pure: no Ray, no Tune, no file layout (a checkpoint store is passed in). It needs torch,
Opacus, numpy and the package's own torch-free modules (config, cache, privacy, lossweights),
so a GPU machine without Ray can run it. Progress leaves through the ``on_epoch`` callback,
so the caller decides whether that becomes a Tune report, a log line, or nothing.
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
from opacus.data_loader import DPDataLoader
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from privdom_ray import dpstep, lossweights
from privdom_ray.cache import SplitData
from privdom_ray.config import TrialSpec
from privdom_ray.lossweights import LossWeights
from privdom_ray.models import build_model
from privdom_ray.privacy import (
    Ledger,
    NoisePlan,
    calibrate,
    epsilon_of,
    make_ledger,
    poisson_rate,
    steps_per_epoch,
)
from privdom_ray.stats.metrics import auc


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
    """What a run may carry besides training (an audit twin's canaries, canaries.py): it may
    change the training split before the loader is built, hooks into the optimizer, and has
    private state that checkpoints keep."""

    def prepare(self, train: SplitData, generator: torch.Generator) -> SplitData: ...

    def attach(self, optimizer: torch.optim.Optimizer, sample_rate: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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


def noise_only_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """The step of an empty Poisson batch: no example, only noise (and the accountant counts it).

    Opacus's per-sample modes cannot run a forward pass on zero images (ew and functorch
    crash), so the empty per-sample gradients are set directly and the DP optimizer adds its
    noise to their (zero) clipped sum, as it would for any batch.
    """
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
    optimizer.step()


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
            noise_only_step(optimizer, params)
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


class SplitDataset(Dataset):
    """A split's (image, labels) rows for a DataLoader. A batch is gathered in one read
    (``__getitems__``) from the cache file when the split is cached (cache.CachedImages), so
    a trial never holds its whole split in memory."""

    def __init__(self, split: SplitData) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(np.ascontiguousarray(self.split.images[idx]))
        labels = torch.from_numpy(np.ascontiguousarray(self.split.labels[idx], dtype=np.float32))
        return list(zip(images, labels, strict=True))


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


@dataclass
class _Progress:
    """What the epoch loop carries (and a checkpoint restores)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_auc: float = -math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    steps: int = 0
    epoch: int = 0

    NAMES = ("history", "best_auc", "best_epoch", "best_state", "steps", "epoch")

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any] | None) -> _Progress:
        return cls() if state is None else cls(**{n: state[n] for n in cls.NAMES})

    def as_dict(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self.NAMES}

    def select(self, epoch: int, val_auc: float, model: nn.Module) -> None:
        """Keep the epoch with the best validation macro AUC (a NaN AUC never wins)."""
        if self.best_state is None or val_auc > self.best_auc:
            self.best_auc = -math.inf if math.isnan(val_auc) else float(val_auc)
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
) -> TrainResult:
    """Train ``spec`` on ``train``; select the epoch with the best validation macro AUC.

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
    if progress.history:  # wall-clock time keeps counting across a resume
        t0 -= progress.history[-1]["seconds"]
    first_epoch = progress.epoch + 1
    for epoch in range(first_epoch, spec.training.epochs + 1):
        record = _train_one_epoch(spec, t, val, plan, progress, epoch, device, t0)
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
    return TrainResult(  # weights stored NCHW whatever the training layout
        state_dict={k: v.detach().cpu().contiguous() for k, v in progress.best_state.items()},
        ledger=trial_ledger(spec, plan, weights, t, progress.steps, secret=rng.secret),
        history=progress.history,
        best_epoch=progress.best_epoch,
        val_scores=predict(final, val.images, device=device),
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


def _train_one_epoch(spec, t, val, plan, progress: _Progress, epoch, device, t0) -> dict:
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


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside Opacus's GradSampleModule (state_dict keys without ``_module.``)."""
    return getattr(model, "_module", model)


def load_model(name: str, state_dict: dict[str, torch.Tensor], num_outputs: int) -> nn.Module:
    model = build_model(name, num_outputs=num_outputs)
    model.load_state_dict(state_dict)
    return model.eval()
