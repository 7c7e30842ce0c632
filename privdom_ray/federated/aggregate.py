"""What the coordinator computes from the sites' messages: the FedAvg of their weights and the
pooled Youden thresholds from their k-anonymous histograms.

Separate from the coordinator's loop: pure, deterministic arithmetic on what sites released.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from privdom_ray.federated.validation import SUMMARY_CELLS, _edges


def fedavg(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Weighted average of state dicts, in float64 and cast back to each tensor's dtype.

    Deterministic (fixed order, no randomness). Sites with weight 0 are skipped entirely, so
    they change nothing, bit for bit; non-floating tensors come from the first positive-weight
    site.
    """
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    if any(not w >= 0 or math.isinf(w) for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    active = [(s, float(w)) for s, w in zip(states, weights, strict=True) if w > 0]
    if not active:
        raise ValueError("fedavg needs at least one positive weight")
    keys = list(active[0][0])
    for s, _ in active[1:]:
        if list(s) != keys:
            raise ValueError("state dicts have different keys")
    total = math.fsum(w for _, w in active)
    out: dict[str, Tensor] = {}
    for key in keys:
        first = active[0][0][key]
        if not first.is_floating_point():
            out[key] = first.detach().clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for s, w in active:
            acc += s[key].detach().to(torch.float64) * (w / total)
        out[key] = acc.to(first.dtype)
    return out


def on_public_cells(hist: np.ndarray, cells: int = SUMMARY_CELLS) -> np.ndarray:
    """Pooled k-anonymous histograms summed per public cell: the pooled Youden threshold is
    then chosen among the cells' edges only, where every site's counts are exact (inside a
    merged bin they are spread, and a cut there would only reflect the spreading)."""
    hist = np.asarray(hist)
    return hist.reshape(*hist.shape[:-1], cells, hist.shape[-1] // cells).sum(axis=-1)


def youden_from_histograms(hist_pos: np.ndarray, hist_neg: np.ndarray) -> np.ndarray:
    hist_pos, hist_neg = np.asarray(hist_pos), np.asarray(hist_neg)
    if hist_pos.shape != hist_neg.shape or hist_pos.ndim != 2:
        raise ValueError(f"histograms differ in shape: {hist_pos.shape} vs {hist_neg.shape}")
    bins = hist_pos.shape[1]
    # candidates from the highest threshold down: inf, edge[bins-1], ..., edge[0]
    thresholds = np.r_[np.inf, _edges(bins)[bins - 1 :: -1]]
    out = np.full(hist_pos.shape[0], np.nan)
    for j in range(hist_pos.shape[0]):
        n_pos, n_neg = hist_pos[j].sum(), hist_neg[j].sum()
        if n_pos == 0 or n_neg == 0:
            continue
        tpr = np.r_[0, np.cumsum(hist_pos[j][::-1])] / n_pos
        fpr = np.r_[0, np.cumsum(hist_neg[j][::-1])] / n_neg
        out[j] = thresholds[int(np.argmax(tpr - fpr))]
    return out
