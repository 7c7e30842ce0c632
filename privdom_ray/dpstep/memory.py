"""One synthetic DP step (benchmarks, memory probing) and its memory: phase peaks, a fitted
memory model and the largest physical batch that fits a budget.

Separate from the clipping code: nothing here changes what a trial computes; it chooses the
physical batch (BatchMemoryManager splits logical batches into it) and feeds the cost model.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, TensorDataset

from privdom_ray.dpstep.bookkeeping import privatize
from privdom_ray.dpstep.modes import MaskedBCELoss
from privdom_ray.models import build_model


@dataclass
class Step:
    """A training step on a fixed synthetic batch, in two phases: ``backward()`` (zero_grad,
    forward, loss, backward; per-sample clipping for ghost/bk) and ``update()``
    (``optimizer.step()``: clipping for hooks/functorch/ew, noise, NAdam). ``run()`` does both."""

    backward: Callable[[], None]
    update: Callable[[], None]
    module: nn.Module
    optimizer: torch.optim.Optimizer
    inputs: tuple[torch.Tensor, ...] = ()

    def run(self) -> None:
        self.backward()
        self.update()


def synthetic_batch(
    batch: int, image_size: int, device: str | torch.device, *, labels: int = 5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A reproducible batch in the training core's format: float images in [0, 1], 0/1/NaN labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, image_size, image_size, generator=gen)
    y = (torch.rand(batch, labels, generator=gen) < 0.3).float()
    y[torch.rand(batch, labels, generator=gen) < 0.05] = math.nan
    return x.to(device), y.to(device)


def memory_format(channels_last: bool) -> torch.memory_format:
    """NHWC (``channels_last``: cuDNN's tensor-core convolutions prefer it) or PyTorch's NCHW."""
    return torch.channels_last if channels_last else torch.contiguous_format


def build_step(
    model_name: str,
    image_size: int,
    mode: str,
    batch: int,
    device: str | torch.device = "cpu",
    *,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    lr: float = 1e-3,
    seed: int = 0,
    channels_last: bool = False,
) -> Step:
    """One optimizer step of ``model_name`` on a fixed batch: ``mode`` is ``"nondp"`` (plain
    NAdam, mean loss, like the training core's epsilon = inf path) or one of ``DP_MODES``
    (forward, backward, per-sample clipping, noise, NAdam step)."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    fmt = memory_format(channels_last)
    model = build_model(model_name).to(dev, memory_format=fmt)
    optimizer: torch.optim.Optimizer = torch.optim.NAdam(model.parameters(), lr=lr)
    x, y = synthetic_batch(batch, image_size, dev, seed=seed)
    x = x.contiguous(memory_format=fmt)
    criterion = MaskedBCELoss(torch.ones(y.shape[1], device=dev)).to(dev)
    if mode == "nondp":

        def backward() -> None:
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()

        return Step(backward, optimizer.step, model, optimizer, (x, y))
    loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=batch)
    module, dp_opt, dp_criterion, _ = privatize(
        PrivacyEngine(accountant="rdp"),
        mode=mode,
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        criterion=criterion,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        noise_generator=torch.Generator(device=dev).manual_seed(seed + 1),
    )

    def dp_backward() -> None:
        dp_opt.zero_grad(set_to_none=True)
        dp_criterion(module(x), y).backward()

    return Step(dp_backward, dp_opt.step, module, dp_opt, (x, y))


# --------------------------------------------------------------------------------------------
# Memory of one step
# --------------------------------------------------------------------------------------------


class _TensorBytes(TorchDispatchMode):
    """Live and peak bytes of tensor storages created on ``device`` while active.

    The CPU counterpart of CUDA's allocator statistics: every op's outputs are registered by
    storage (views and in-place results are not counted twice) and subtracted when the storage
    is freed (a weak reference on the storage object, which torch keeps alive exactly as long
    as the storage). Not counted: kernels' internal scratch buffers and malloc overhead.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device_type = device.type
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}
        self._refs: list[weakref.ref[Any]] = []

    def _free(self, key: int, nbytes: int, _ref: Any = None) -> None:
        if self._seen.pop(key, None) is not None:
            self.live -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in self._seen:
                continue
            nbytes = st.nbytes()
            self._seen[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self._refs.append(weakref.ref(st, functools.partial(self._free, key, nbytes)))
        return out


def _state_bytes(step: Step) -> int:
    """Bytes of the tensors that live across steps: parameters, optimizer state, the batch."""
    optimizer = getattr(step.optimizer, "original_optimizer", step.optimizer)
    state = [v for s in optimizer.state.values() for v in s.values()]
    seen: set[int] = set()
    total = 0
    for t in [*step.module.parameters(), *state, *step.inputs]:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def step_phase_peaks(
    step: Step, device: str | torch.device = "cpu", *, warmup: int = 1
) -> tuple[int, int]:
    """Peak memory (bytes) of one step's two phases: ``(backward phase, update phase)``.

    Each is persistent state (parameters, optimizer state and the batch, walked after
    ``warmup`` steps so NAdam's moments exist) plus the phase's peak of new tensors: on CUDA
    ``max_memory_allocated() - memory_allocated()`` (reset between the phases); on CPU the
    peak of live tensor bytes created since the step began, tracked by a dispatch mode
    (:class:`_TensorBytes`). What the backward phase leaves (per-sample gradients, ``p.grad``)
    counts in the update phase too. The phases are kept apart because they grow differently:
    activations and per-sample gradients with the batch, the optimizer's temporaries not.
    """
    dev = torch.device(device)
    for _ in range(warmup):
        step.run()
    step.optimizer.zero_grad(set_to_none=True)
    state = _state_bytes(step)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step.backward()
        torch.cuda.synchronize(dev)
        first = torch.cuda.max_memory_allocated(dev) - before
        torch.cuda.reset_peak_memory_stats(dev)
        step.update()
        torch.cuda.synchronize(dev)
        second = torch.cuda.max_memory_allocated(dev) - before
        return state + first, state + second
    with _TensorBytes(dev) as tracker:
        step.backward()
        first = tracker.peak
        tracker.reset_peak()
        step.update()
        second = tracker.peak
    return state + first, state + second


def step_peak_bytes(step: Step, device: str | torch.device = "cpu", *, warmup: int = 1) -> int:
    """Peak memory of one whole step (bytes): the larger of :func:`step_phase_peaks`."""
    return max(step_phase_peaks(step, device, warmup=warmup))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@dataclass(frozen=True)
class MemoryModel:
    """Peak bytes of one step as ``max(a1 + s1 * batch, a2 + s2 * batch)`` (the two phases of
    :func:`step_phase_peaks`, each a line through two probe batches)."""

    lines: tuple[tuple[float, float], tuple[float, float]]

    def peak(self, batch: int) -> float:
        return max(a + s * batch for a, s in self.lines)

    def max_batch(self, budget_bytes: float) -> int:
        """Largest batch with ``peak(batch) <= budget_bytes`` (0 if none; huge if flat)."""
        best = math.inf
        for a, s in self.lines:
            if a > budget_bytes:
                return 0
            if s > 0:
                best = min(best, (budget_bytes - a) / s)
        return math.floor(best) if math.isfinite(best) else 2**31 - 1


def memory_model(
    model_name: str,
    image_size: int,
    mode: str,
    device: str | torch.device = "cpu",
    *,
    probe: tuple[int, int] = (8, 16),
) -> MemoryModel:
    """Fit :class:`MemoryModel` from one-step peaks measured at the two ``probe`` batches.
    Activations and per-sample gradients (and their temporaries) scale linearly with the
    batch; parameters and optimizer state are the intercept."""
    b1, b2 = probe
    peaks = []
    for b in (b1, b2):
        with _quiet():
            step = build_step(model_name, image_size, mode, b, device)
            peaks.append(step_phase_peaks(step, device))
        del step
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    lines = []
    for phase in range(2):
        slope = (peaks[1][phase] - peaks[0][phase]) / (b2 - b1)
        lines.append((peaks[0][phase] - slope * b1, slope))
    return MemoryModel((lines[0], lines[1]))


def max_physical_batch(
    model_name: str,
    image_size: int,
    mode: str,
    budget_bytes: int,
    device: str | torch.device = "cpu",
    *,
    probe: tuple[int, int] = (8, 16),
    limit: int | None = None,
) -> int:
    """Largest physical batch whose one-step peak memory fits ``budget_bytes``.

    Method: the peak of one full step (forward, backward, per-sample clipping, noise, NAdam
    step; :func:`step_phase_peaks`, per phase) is measured at two small batches ``probe`` and
    extrapolated linearly (:class:`MemoryModel`); takes about two small steps. ``mode`` is
    ``"nondp"`` or one of ``DP_MODES``; ``limit`` caps the answer (e.g. the logical batch).
    Raises ``ValueError`` when not even one sample fits.

    The physical batch only bounds memory. Privacy accounting must depend on the *logical*
    batch alone (the Poisson sample rate and the noise scale use the expected logical batch
    size): split logical batches with Opacus's ``BatchMemoryManager``, which clips every
    sample and adds noise once per logical step, so any physical batch gives the same
    epsilon and the same noise. Never derive the sample rate or sigma from this number.
    """
    model = memory_model(model_name, image_size, mode, device, probe=probe)
    fit = model.max_batch(budget_bytes)
    if fit < 1:
        raise ValueError(
            f"{model_name} at {image_size}px ({mode}) needs {model.peak(1) / 2**20:.0f} MiB "
            f"for one sample; the budget is {budget_bytes / 2**20:.0f} MiB"
        )
    return min(fit, limit) if limit is not None else fit
