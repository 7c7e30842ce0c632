"""A study: the finished trials' models and each test set's per-image predictions.

:func:`study_of` builds them from the trials ``results.load_finished`` read once through the
trial store (the transfer table is built from the same load), for the comparisons
(:mod:`privdom_ray.stats.comparisons`) and the reliability table.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from privdom_ray.kinds import kind_of
from privdom_ray.stats import results
from privdom_ray.stats.quantities import _warn
from privdom_ray.store import TrialRecord

# ============================================================================ loading


@dataclass(frozen=True)
class ModelInfo:
    """What a comparison needs to know about one finished trial."""

    key: str
    source: str
    epsilon: float
    seed: int
    model: str
    epsilon_spent: float | None
    accountant: str | None
    sites: tuple[str, ...]  # the domains whose data trained the model

    @property
    def single_site(self) -> bool:
        return self.sites == (self.source,)


@dataclass
class TestSet:
    """One target's test split as every compared model saw it (same rows, same labels)."""

    target: str
    fingerprint: str
    labels: tuple[str, ...]
    y: np.ndarray  # (n, L), NaN = unknown
    sex: np.ndarray
    age: np.ndarray
    clusters: np.ndarray | None  # patient group per row; None = image level
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # model key -> (n, L)

    @property
    def unit(self) -> str:
        return "image" if self.clusters is None else "patient"


@dataclass
class Study:
    models: dict[str, ModelInfo]
    tests: list[TestSet]


def load_study(output: Path, keys: Sequence[str], targets: Sequence[Any] | None = None) -> Study:
    """The study of the valid trials ``keys`` (read through the trial store by
    ``results.load_finished``). ``targets`` (name, fingerprint) default to the last plan's;
    without one, each target's most common data version is used."""
    return study_of(results.load_finished(Path(output), keys, targets))


def study_of(finished: results.Finished) -> Study:
    """Valid trials of the kinds that enter the matrices (one per cell) and their current
    evaluations, grouped into test sets of one data version per target (reads only the
    per-image predictions; the records were read by ``load_finished``)."""
    models: dict[str, ModelInfo] = {}
    cells: dict[tuple, str] = {}
    evals: dict[str, dict[tuple[str, str], Any]] = {}
    for key in sorted(finished.records):
        record = finished.records[key]
        if not kind_of(record.spec).in_matrices:
            continue  # controls (clip-only), pretraining and audit twins are not compared
        info = _model_info(record)
        cell = (info.source, info.epsilon, info.seed, info.model)
        if cell in cells:
            _warn(f"trials {cells[cell]} and {info.key} are the same cell {cell}; using the first")
            continue
        cells[cell], models[info.key] = info.key, info
        evals[key] = {(ev.target, ev.fingerprint): ev for ev in finished.evaluations[key]}
    tests = []
    for target, fp in _chosen_fingerprints(evals):
        ts = None
        for key in sorted(k for k in evals if (target, fp) in evals[k]):
            ev = evals[key][(target, fp)]
            ts = _add_predictions(ts, target, fp, key, ev.predictions(), ev.resampling_unit)
        if ts is not None:
            tests.append(ts)
    return Study(models, tests)


def _model_info(record: TrialRecord) -> ModelInfo:
    spec, ledger = record.spec, record.ledger
    return ModelInfo(
        key=record.key,
        source=spec.source,
        epsilon=spec.epsilon,
        seed=spec.seed,
        model=spec.model,
        epsilon_spent=ledger.epsilon_spent,
        accountant=ledger.accountant,
        sites=record.training_sites,
    )


def _chosen_fingerprints(evals: dict[str, dict[tuple[str, str], Any]]) -> list[tuple[str, str]]:
    """Per target, the data version most models were evaluated on (warn about the others)."""
    by_target: dict[str, Counter] = defaultdict(Counter)
    for per_model in evals.values():
        for target, fp in per_model:
            by_target[target][fp] += 1
    out = []
    for target in sorted(by_target):
        counts = by_target[target]
        fp = sorted(counts, key=lambda f: (-counts[f], f))[0]
        if len(counts) > 1:
            others = ", ".join(f for f in sorted(counts) if f != fp)
            _warn(
                f"target {target!r} was evaluated on several test sets; comparing on "
                f"fingerprint {fp} ({counts[fp]} models), ignoring {others}"
            )
        out.append((target, fp))
    return out


def _add_predictions(
    ts: TestSet | None, target: str, fp: str, key: str, df: pd.DataFrame, unit: str
) -> TestSet:
    """Add one model's predictions to the test set (the first one defines it). Without a
    ``patient_group`` column (older evaluations) or with resampling unit "image" (domains
    without patient ids) the rows are resampled as images."""
    if "row" in df.columns and not np.array_equal(df["row"].to_numpy(), np.arange(len(df))):
        df = df.sort_values("row", kind="stable")
    labels = tuple(c[len("score_") :] for c in df.columns if c.startswith("score_"))
    y = df[[f"label_{lab}" for lab in labels]].to_numpy(dtype=np.float64)
    scores = df[[f"score_{lab}" for lab in labels]].to_numpy(dtype=np.float64)
    groups = None
    if "patient_group" in df and unit != "image":
        groups = df["patient_group"].to_numpy(np.int64)
    if ts is None:
        ts = TestSet(
            target, fp, labels, y,
            sex=df["sex"].to_numpy(dtype=object) if "sex" in df else np.full(len(df), "", object),
            age=df["age"].to_numpy(np.float64) if "age" in df else np.full(len(df), np.nan),
            clusters=groups,
        )  # fmt: skip
    elif labels != ts.labels or y.shape != ts.y.shape or not np.array_equal(y, ts.y, True):
        _warn(
            f"trial {key} on {target}-{fp}: the test labels differ from the other models' on "
            "the same fingerprint; left out of the comparisons"
        )
        return ts
    elif (groups is None) != (ts.clusters is None) or (
        groups is not None and not np.array_equal(groups, ts.clusters)
    ):
        _warn(f"trial {key} on {target}-{fp}: patient groups differ; resampling images")
        ts.clusters = None
    ts.scores[key] = scores
    return ts
