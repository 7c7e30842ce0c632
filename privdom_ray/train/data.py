"""Data in and out of a model: a split as a Dataset, the training augmentation, the model's
input, prediction, loading a saved model, macro AUC on validation scores.

Separate from training: prediction and loading are what evaluation (trial.py) needs from a
trained model, and none of it depends on DP, the optimizer or the loop.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from privdom_ray.cache import SplitData
from privdom_ray.models import build_model
from privdom_ray.stats.metrics import auc


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


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside Opacus's GradSampleModule (state_dict keys without ``_module.``)."""
    return getattr(model, "_module", model)


def load_model(name: str, state_dict: dict[str, torch.Tensor], num_outputs: int) -> nn.Module:
    model = build_model(name, num_outputs=num_outputs)
    model.load_state_dict(state_dict)
    return model.eval()
