"""Black-box input canaries: images with a distinctive pattern and a contradictory label, joined
to the training split by their coins; the score is minus the trained model's loss on each.

Separate from gradient canaries: they need only the cache's images and a trained model, not the
optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from privdom_ray.cache import SplitData, append
from privdom_ray.manifest import LABELS


@dataclass(frozen=True)
class InputCanaries:
    """Black-box canaries: uint8 images (m, S, S) like the cache's and label rows (m, L)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def _pattern(rng: np.random.Generator, size: int, background: np.ndarray | None) -> np.ndarray:
    """A radiograph-like smooth background with 2-4 bright discs or bars on it."""
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    if background is None:
        base = 0.35 + 0.25 * rng.random() * yy + 0.15 * rng.random() * np.sin(math.pi * xx)
        base = base + rng.normal(0.0, 0.03, (size, size))
    else:
        base = background.astype(np.float64) / 255.0
    for _ in range(rng.integers(2, 5)):
        cy, cx = rng.uniform(0.15, 0.85, 2)
        r = rng.uniform(0.05, 0.14)
        if rng.random() < 0.5:
            shape = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        else:
            shape = (np.abs(yy - cy) < r / 3) & (np.abs(xx - cx) < 2 * r)
        base = np.where(shape, rng.uniform(0.9, 1.0), base)
    return np.clip(np.rint(base * 255), 0, 255).astype(np.uint8)


def make_input_canaries(
    count: int,
    image_size: int,
    auditor_seed: int,
    *,
    label_names: Sequence[str] = LABELS,
    background: np.ndarray | None = None,
) -> InputCanaries:
    """``count`` distinctive images with unusual labels, from the public auditor seed.

    Labels: each finding is 1 with probability 1/2 (far above any real prevalence), and
    ``healthy`` (when among ``label_names``) contradicts them: 1 exactly when some finding is
    1. Each canary is thus an individual, hard-to-fit example whose loss drops only when it is
    trained on. ``background``: an optional public uint8 (S, S) image to draw the shapes on.
    """
    if count < 1:
        raise ValueError("need at least one canary")
    if background is not None and background.shape != (image_size, image_size):
        raise ValueError(f"background must be ({image_size}, {image_size})")
    rng = np.random.default_rng(np.random.SeedSequence([auditor_seed, 0x696E_7075]))
    images = np.stack([_pattern(rng, image_size, background) for _ in range(count)])
    labels = (rng.random((count, len(label_names))) < 0.5).astype(np.float32)
    if "healthy" in label_names:
        h = list(label_names).index("healthy")
        findings = np.delete(labels, h, axis=1)
        labels[:, h] = (findings.max(axis=1) if findings.size else 0.0) > 0
    return InputCanaries(images=images, labels=labels)


def with_input_canaries(
    train: SplitData, canaries: InputCanaries, included: np.ndarray
) -> SplitData:
    """``train`` with the included canaries appended (sex "U", age unknown, each its own
    patient ``canary-<i>`` so patient-level sampling treats it as one unit)."""
    included = np.asarray(included, dtype=bool)
    if included.shape != (len(canaries),):
        raise ValueError("one coin per canary")
    if canaries.images.shape[1:] != train.images.shape[1:]:
        raise ValueError(f"canary images {canaries.images.shape[1:]} != {train.images.shape[1:]}")
    idx = np.flatnonzero(included)
    patient = None
    if train.patient is not None:
        ids = np.array([f"canary-{i}" for i in idx], dtype=object)
        patient = np.concatenate([train.patient.astype(object), ids])
    return SplitData(
        images=append(train.images, canaries.images[idx]),  # the split stays in its cache
        labels=np.concatenate([train.labels, canaries.labels[idx].astype(train.labels.dtype)]),
        sex=np.concatenate([train.sex.astype(object), np.full(len(idx), "U", dtype=object)]),
        age=np.concatenate([train.age.astype(np.float64), np.full(len(idx), np.nan)]),
        patient=patient,
    )


@torch.no_grad()
def input_canary_losses(
    model: nn.Module,
    canaries: InputCanaries,
    *,
    device: str = "cpu",
    batch: int = 256,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Per-canary mean BCE-with-logits of the trained model (eval mode, no augmentation, no
    loss weights: the score must not depend on private statistics). ``forward`` maps a uint8
    batch (n, S, S) to logits; by default the training core's input scaling and ``model``."""
    model.eval()
    dev = torch.device(device)

    def default(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(dev).unsqueeze(1).float().div_(255.0))

    run = forward or default
    out = []
    for start in range(0, len(canaries), batch):
        x = torch.from_numpy(np.ascontiguousarray(canaries.images[start : start + batch]))
        y = torch.from_numpy(canaries.labels[start : start + batch]).to(dev)
        logits = run(x).float()
        out.append(F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1).cpu())
    return torch.cat(out).numpy().astype(np.float64)
