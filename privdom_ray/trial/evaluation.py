"""A trial's evaluation: its stored model predicts on one target's test split.

Owns :func:`evaluate_stored` (the unit of work an executor ships: read the verified model,
evaluate, write the sealed evaluation through the store), :func:`evaluate_target` (predictions,
metrics and intervals on a target's test split), the per-image prediction frame and the
patients the bootstrap resamples (:func:`patient_groups`). Separate from ``privdom_ray.trial``
(a cell's training and its trainers) because evaluating a finished model needs none of the
training code; ``privdom_ray.trial`` re-exports every name here and this module never imports
it.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pandas as pd
import torch

from privdom_ray.cache import SplitData, load_split
from privdom_ray.cell import TargetRef
from privdom_ray.config import EvaluationConfig
from privdom_ray.manifest import LABELS
from privdom_ray.stats.evaluation import evaluate, subgroup_masks
from privdom_ray.store import TrialStore
from privdom_ray.train import load_model, predict


def evaluate_stored(
    *,
    output: str,
    key: str,
    model_name: str,
    target: TargetRef,
    evaluation: EvaluationConfig,
    device: str = "cpu",
    threads: int = 1,
    fence: int = 0,
) -> None:
    """Evaluate a trial's stored model on one target (a unit of work an executor can ship).
    The evaluation names the checksum of the model bytes it was computed from. The trial's
    files are verified here, once (this may be another process than the cell's): the
    thresholds and the weights come from the bytes that read verified."""
    torch.set_num_threads(max(1, threads))
    store = TrialStore(output, fence=fence)
    record, weights = store.read_with_model(key)
    thresholds = np.array([math.nan if t is None else t for t in record.thresholds], dtype=float)
    model = load_model(model_name, weights.state, num_outputs=len(LABELS))
    metrics_df, predictions, info = evaluate_target(
        model, target, thresholds, evaluation, device=device
    )
    store.write_eval(
        key, target.name, target.fingerprint, metrics=metrics_df, predictions=predictions,
        info=info, model=weights.digest, data=target.data,
    )  # fmt: skip


def evaluate_target(
    model: torch.nn.Module,
    target: TargetRef,
    thresholds: np.ndarray,
    evaluation: EvaluationConfig,
    *,
    device: str = "cpu",
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Predict on a target's test split; (metric rows, per-image predictions, eval info)."""
    t0 = time.perf_counter()
    test = load_split(target.cache_path, "test")
    scores = predict(model, test.images, device=device)
    groups = patient_groups(test, target.unit)
    rows = evaluate(
        scores,
        test.labels,
        thresholds,
        LABELS,
        groups=subgroup_masks(test.sex, test.age, evaluation.age_bins),
        n_boot=evaluation.n_boot,
        seed=evaluation.seed,
        ci=evaluation.ci,
        oracle=evaluation.oracle_threshold,
        clusters=None if target.unit == "image" else groups,  # patients are resampled
        min_positives=evaluation.min_positives,
        min_negatives=evaluation.min_negatives,
        calibration_bins=evaluation.calibration_bins,
    )
    predictions = _prediction_frame(scores, test)
    predictions["patient_group"] = groups
    info = {
        "n_test": len(test),
        "n_boot": evaluation.n_boot,
        "resampling_unit": target.unit,
        "eval_seconds": time.perf_counter() - t0,
    }
    return pd.DataFrame([r.as_dict() for r in rows]), predictions, info


def _prediction_frame(scores: np.ndarray, split: SplitData) -> pd.DataFrame:
    """Per-image scores keyed by row position, with labels and demographics; no ids, no paths."""
    df = pd.DataFrame({"row": np.arange(len(scores))})
    for j, label in enumerate(LABELS):
        df[f"score_{label}"] = scores[:, j]
        df[f"label_{label}"] = split.labels[:, j]
    df["sex"] = split.sex.astype(str)
    df["age"] = split.age
    return df


def patient_groups(split: SplitData, unit: str) -> np.ndarray:
    """An opaque per-row patient index (0..P-1 in order of first appearance; never the id), or
    the row itself where the domain has no patient ids: the bootstrap's resampling unit."""
    if unit == "image" or split.patient is None:
        return np.arange(len(split), dtype=np.int64)
    return pd.factorize(pd.Series(split.patient.astype(str)))[0].astype(np.int64)
