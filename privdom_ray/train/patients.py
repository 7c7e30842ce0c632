"""Patient-level DP: one Poisson draw per patient and one clipped gradient per patient.

Separate from the image-level path because it is its own sampler and step (a patient's images are
one privacy unit); :func:`~privdom_ray.train.epochs.train_epoch` calls it when the run samples
patients.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader

from privdom_ray.cache import SplitData


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
