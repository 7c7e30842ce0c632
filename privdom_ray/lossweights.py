"""The loss's positive-class weights, and where they may come from without breaking DP.

The paper weights each label's BCE by pos_weight = negatives / positives of the training set.
Computed exactly from a private training set, that statistic makes every example's loss
depend on every other example, which voids DP-SGD's sensitivity bound: removing one image that
is not even in the batch changes the clipped gradient sum. So a DP trial takes its weights
from a source the grid names (``training.pos_weight``):

- ``dp_counts`` (what ``auto`` means for DP trials): the source's per-label positive and
  negative counts released once through a Gaussian mechanism, whose cost is composed into the
  trial's accounting (``privacy.calibrate``); the closest honest version of the paper's weights;
- ``public``: exact counts of the pretraining domain (public by declaration);
- ``none``: every weight 1; or a list of five fixed numbers.

Non-private trials (and the clip-only control, which has no guarantee) use the exact counts
(``exact``, what ``auto`` means for them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch only where weights become tensors: grid.py imports this module
    import torch

SETTINGS = ("auto", "dp_counts", "exact", "public", "none")
DEFAULT_BUDGET = 0.05  # fraction of the privacy budget (in mu-GDP terms) the counts take


@dataclass(frozen=True)
class LossWeights:
    """The weights one run trains with, and how they were obtained (recorded in the ledger)."""

    source: str  # exact | dp_counts | public:<domain> | fixed | none
    values: tuple[float, ...]
    count_noise_multiplier: float = 0.0  # dp_counts: noise std / L2 sensitivity of the counts

    def tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        import torch

        return torch.tensor(self.values, dtype=torch.float32, device=device)


def resolve(setting: str | tuple[float, ...], *, private: bool) -> str:
    """The source a trial uses: ``auto`` -> dp_counts (DP) or exact; ``dp_counts`` on a
    non-private trial -> exact (nothing to protect); a tuple -> fixed."""
    if isinstance(setting, tuple | list):
        return "fixed"
    if setting == "auto" or setting == "dp_counts":
        return "dp_counts" if private else "exact"
    return setting


def exact_pos_weight(labels: np.ndarray) -> np.ndarray:
    """(N - P) / P per label over known labels; 1 where a label has no positives."""
    known = ~np.isnan(labels)
    pos = np.nansum(labels, axis=0)
    neg = known.sum(axis=0) - pos
    return np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)


def label_contributions(
    labels: np.ndarray, units: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-label (positives, negatives), each privacy unit contributing at most 1 per label.

    Per image (``units`` None) an image with a known label adds 1 to that label's positives or
    negatives. Per patient (``units`` = a patient index per image) a patient adds the fractions
    of its images that are positive / negative, so adding or removing one unit moves each
    label's (pos, neg) pair by at most 1 in L2: the L2 sensitivity of all L labels is sqrt(L).
    """
    y = np.asarray(labels, dtype=np.float64)
    pos, neg = (y == 1.0).astype(np.float64), (y == 0.0).astype(np.float64)
    if units is None:
        return pos.sum(axis=0), neg.sum(axis=0)
    _, inverse = np.unique(np.asarray(units).astype(str), return_inverse=True)
    per_unit = np.bincount(inverse).astype(np.float64)[inverse][:, None]
    return (pos / per_unit).sum(axis=0), (neg / per_unit).sum(axis=0)


def weights_from_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """negatives / positives with both floored at 1 (released counts can be small or negative)."""
    return np.maximum(neg, 1.0) / np.maximum(pos, 1.0)


def release_counts(
    labels: np.ndarray,
    units: np.ndarray | None,
    noise_multiplier: float,
    generator: torch.Generator,
) -> np.ndarray:
    """pos_weight from counts released by the Gaussian mechanism: each of the 2L counts gets
    N(0, (noise_multiplier * sqrt(L))^2) noise, sqrt(L) being the counts' L2 sensitivity.
    ``generator`` must be secret (drawn from OS entropy): it is part of the mechanism."""
    import torch

    pos, neg = label_contributions(labels, units)
    n_labels = pos.shape[0]
    std = noise_multiplier * np.sqrt(n_labels)
    noise = torch.randn((2, n_labels), generator=generator, dtype=torch.float64).numpy() * std
    return weights_from_counts(pos + noise[0], neg + noise[1])


def fixed(values: tuple[float, ...] | list[float] | np.ndarray, source: str) -> LossWeights:
    return LossWeights(source, tuple(float(v) for v in values))
