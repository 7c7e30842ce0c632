"""What a site releases about a global model: its validation macro AUC and, per label,
k-anonymous histograms of its images' scores (no per-image score leaves a site).

Separate from the update because it is outside the DP guarantee and has its own disclosure rule
(k-anonymity, ``MIN_BIN_IMAGES``), checked on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from privdom_ray.cache import SplitData, load_split
from privdom_ray.config import TrialSpec
from privdom_ray.federated.site import TaskTiming, _clock
from privdom_ray.train.data import load_model, macro_auc, predict

HIST_BINS = 1000  # validation-score histogram bins on [0, 1]: the pooled threshold's resolution
# k of the k-anonymous validation summaries: no released bin describes fewer images. 10 is the
# evaluation's own floor (a label needs min_positives = min_negatives = 10 before any metric is
# reported) and sits within the 5-11 of common small-cell suppression rules; a smaller k shows
# scores more finely, a larger one blurs the pooled threshold on small validation splits.
MIN_BIN_IMAGES = 10
# the public grid the k-anonymous bins are merged on (edges at multiples of 1/50): what the
# pooled threshold can resolve in a federation, and how finely a merged bin's edge can place
# the group of scores below it
SUMMARY_CELLS = 50


@dataclass(frozen=True)
class SiteValidation:
    """What a site sends about a global model: its validation macro AUC, its number of
    validation images, and per label the k-anonymous histograms of the positive and of the
    negative images' scores (:func:`k_anonymous`: each merged bin's count spread evenly over
    the HIST_BINS bins it covers, so the coordinator sums sites bin by bin). Computed from the
    site's validation images without noise (outside the DP guarantee); no per-image score."""

    name: str
    macro_auc: float
    n: int
    hist_pos: np.ndarray  # (L, HIST_BINS) float64: positive images, k-anonymous
    hist_neg: np.ndarray  # (L, HIST_BINS) float64: negative images; masked labels left out
    timing: TaskTiming = field(default_factory=TaskTiming)


def score_histograms(
    scores: np.ndarray, labels: np.ndarray, bins: int = HIST_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """Per-label counts of positive and negative images' scores in ``bins`` equal bins on
    [0, 1]. Bin k holds scores s with k/bins <= s < (k+1)/bins (the last bin includes 1), so
    ``s >= edge k`` exactly when s lies in a bin >= k."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    known = ~np.isnan(labels)
    if np.isnan(scores[known]).any():
        raise ValueError("scores must not be NaN where the label is known")
    edges = _edges(bins)
    idx = np.searchsorted(edges[1:-1], np.nan_to_num(scores), side="right")
    n_labels = labels.shape[1]
    hist_pos = np.zeros((n_labels, bins), dtype=np.int64)
    hist_neg = np.zeros((n_labels, bins), dtype=np.int64)
    for j in range(n_labels):
        hist_pos[j] = np.bincount(idx[known[:, j] & (labels[:, j] == 1), j], minlength=bins)
        hist_neg[j] = np.bincount(idx[known[:, j] & (labels[:, j] == 0), j], minlength=bins)
    return hist_pos, hist_neg


def _edges(bins: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, bins + 1)


def k_anonymous(
    hist: np.ndarray, k: int = MIN_BIN_IMAGES, cells: int = SUMMARY_CELLS
) -> np.ndarray:
    """Each row of ``hist`` (counts per fine bin) as a site may send it: the fine bins summed
    into ``cells`` equal public cells, adjacent cells merged from the lowest score up until
    every merged bin holds at least ``k`` images (a short remainder joins the bin below), and
    each merged count spread evenly over the fine bins it covers. A row with fewer than ``k``
    images in all becomes zeros (not sent). Otherwise row totals are kept, and a threshold at
    the edge of a merged bin counts exactly the images above it. The merged bins' edges lie on
    the public cell grid, so an edge locates a group of at least k scores to within one cell,
    not one image's score."""
    hist = np.asarray(hist)
    bins = hist.shape[-1]
    if k < 1 or bins % cells:
        raise ValueError(f"need k >= 1 and cells dividing {bins}, got k={k}, cells={cells}")
    width = bins // cells
    rows = hist.reshape(-1, bins)
    out = np.zeros(rows.shape, dtype=np.float64)
    for j, row in enumerate(rows):
        if row.sum() < k:
            continue
        coarse = row.reshape(cells, width).sum(axis=1)
        cuts = _merge_points(np.cumsum(coarse), k)
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            out[j, lo * width : hi * width] = coarse[lo:hi].sum() / ((hi - lo) * width)
    return out.reshape(hist.shape)


def _merge_points(cumulative: np.ndarray, k: int) -> list[int]:
    """Cell indices where merged bins start (and the end), each merged bin >= k images."""
    cuts, last = [0], 0
    for i, c in enumerate(cumulative):
        if c - last >= k:
            cuts.append(i + 1)
            last = c
    cuts[-1] = len(cumulative)  # a remainder below k joins the last full bin
    return cuts


def validate_site(
    spec: TrialSpec,
    name: str,
    global_state: Mapping[str, Tensor],
    val: SplitData,
    *,
    device: str = "cpu",
) -> SiteValidation:
    """Score the global model on this site's validation split; return only what the site
    sends (:class:`SiteValidation`): its macro AUC and k-anonymous score histograms."""
    started, t0, c0 = _clock()
    model = load_model(spec.model, dict(global_state), num_outputs=val.labels.shape[1])
    scores = predict(model.to(device), val.images, device=device)
    hist_pos, hist_neg = score_histograms(scores, val.labels)
    return SiteValidation(
        name,
        macro_auc(scores, val.labels),
        len(val),
        k_anonymous(hist_pos),
        k_anonymous(hist_neg),
        timing=TaskTiming.since(started, t0, c0),
    )


def site_validate_from_cache(
    spec: TrialSpec,
    name: str,
    cache_path: str,
    global_state: Mapping[str, Tensor],
    *,
    device: str = "cpu",
    threads: int = 1,
) -> SiteValidation:
    """:func:`validate_site` on the site's cached validation split."""
    torch.set_num_threads(max(1, threads))
    return validate_site(spec, name, global_state, load_split(cache_path, "val"), device=device)
