"""The manifest: one row per usable image of one domain, the contract between adapters and the cache.

Columns: ``path`` (absolute), ``patient_id`` (str), ``split`` (train/val/test, patient-wise and
fixed by the domain, never by a trial seed), ``sex`` (F/M/U), ``age`` (years, NaN when missing),
and the five labels as float 0/1 with NaN where an uncertainty policy masks the label.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

LABELS: tuple[str, ...] = (
    "cardiomegaly",
    "pleural_effusion",
    "pneumonia",
    "atelectasis",
    "healthy",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")
SEXES: tuple[str, ...] = ("F", "M", "U")
COLUMNS: tuple[str, ...] = ("path", "patient_id", "split", "sex", "age", *LABELS)


class ManifestError(ValueError):
    """A domain's files cannot be turned into a usable manifest."""


def patient_split(
    patient_ids: Iterable[str],
    *,
    salt: str,
    test_frac: float = 0.2,
    val_frac: float = 0.1,
) -> dict[str, str]:
    """Assign each patient to train/val/test by a salted hash of its id.

    Hashing (not a seeded shuffle) keeps a patient's split stable when other patients are added
    or removed, and makes the split a property of the domain, not of any trial seed.
    """
    out: dict[str, str] = {}
    for pid in set(map(str, patient_ids)):
        u = _unit_hash(f"{salt}:{pid}")
        out[pid] = "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"
    return out


def carve_val(patient_ids: Iterable[str], *, salt: str, val_frac: float = 0.1) -> set[str]:
    """Patients of an official training split that become validation patients (patient-wise)."""
    return {pid for pid in set(map(str, patient_ids)) if _unit_hash(f"{salt}:val:{pid}") < val_frac}


def _unit_hash(text: str) -> float:
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def finalize(df: pd.DataFrame, *, domain: str) -> pd.DataFrame:
    """Check and normalise an adapter's output to the manifest contract (types, values, order)."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"domain {domain!r}: manifest lacks columns {missing}")
    out = df.loc[:, list(COLUMNS)].copy()
    out["path"] = out["path"].astype(str)
    out["patient_id"] = out["patient_id"].astype(str)
    out["split"] = out["split"].astype(str)
    out["sex"] = out["sex"].fillna("U").astype(str)
    out["age"] = pd.to_numeric(out["age"], errors="coerce").astype("float64")
    for label in LABELS:
        out[label] = pd.to_numeric(out[label], errors="coerce").astype("float32")
    bad_split = sorted(set(out["split"]) - set(SPLITS))
    if bad_split:
        raise ManifestError(
            f"domain {domain!r}: unknown split values {bad_split}; allowed {SPLITS}"
        )
    bad_sex = sorted(set(out["sex"]) - set(SEXES))
    if bad_sex:
        raise ManifestError(f"domain {domain!r}: unknown sex values {bad_sex}; allowed {SEXES}")
    values = out[list(LABELS)].to_numpy()
    if not np.isin(values[~np.isnan(values)], (0.0, 1.0)).all():
        raise ManifestError(f"domain {domain!r}: labels must be 0, 1 or missing")
    leaked = out.groupby("patient_id")["split"].nunique()
    if (leaked > 1).any():
        example = leaked[leaked > 1].index[0]
        raise ManifestError(
            f"domain {domain!r}: patient {example!r} appears in more than one split; "
            "splits must be patient-wise"
        )
    if out.empty:
        raise ManifestError(f"domain {domain!r}: no usable images")
    return out.sort_values(["split", "path"], kind="stable").reset_index(drop=True)


def fingerprint(df: pd.DataFrame, root: str | Path) -> str:
    """Content hash of a manifest: rows, labels, splits, and paths relative to the domain root.

    Part of every trial key and cache key, so changed labels or splits never reuse old results,
    while moving a dataset to another disk (same relative layout) keeps its keys.
    """
    rel = df.loc[:, list(COLUMNS)].copy()
    rel["path"] = [os.path.relpath(p, root) for p in rel["path"]]
    h = hashlib.blake2b(digest_size=8)
    h.update(pd.util.hash_pandas_object(rel, index=False).to_numpy().tobytes())
    return h.hexdigest()
