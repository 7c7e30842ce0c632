"""A sweep's output folder: the one place that names its top-level files and folders, and
the typed :class:`Plan` (``plan.json``) the driver writes and every reader reads.

The trial store owns what lies inside ``trials/<key>/``; this module owns the level above it
(the tables, the report, the plan, the seals, the lease, Tune's and Ray's folders), so that
no module spells a file name of another stage. It sits low in the flow (it knows only
``atomic``): the store, the lease, the tables, the report, audit, export and the driver all
name paths through it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privdom_ray import atomic

# ------------------------------------------------------------------------------ names

PLAN = "plan.json"  # the last plan: cells, targets' data versions, caches (Plan)
TRANSFER = "transfer.parquet"  # the transfer table (stats.results)
COMPARISONS = "comparisons.parquet"  # DP-vs-non-DP comparisons (stats.comparisons)
RELIABILITY = "reliability.parquet"  # calibration bins (stats.comparisons)
GUARANTEES = "guarantees.parquet"  # one row per training set: an export's only
REPORT = "report.md"
HTML = "report.html"
FIGURES = "figures"
OUTPUTS = "outputs.json"  # checksums of the sealed tables (integrity.seal_files)
TRIALS = "trials"  # one folder per trial key (the trial store's)
SET_ASIDE = "set_aside"  # damaged or void trial folders, moved out of the sweep, never deleted
CACHE = "cache"  # the default image cache (a grid's ``cache_dir`` may put it elsewhere)
RAY_RESULTS = "ray_results"  # Tune's experiment folders
RAY_SESSION = "ray_session"  # a link to the embedded cluster's private session files
RUNS = "runs.jsonl"  # one timing record per stage per run (benchmarks read it)
LEASE_DIR = ".driver-lease"  # one driver per folder (lease.py)
LEGACY_LOCK = "driver.lock"  # the lock file of privdom-ray before leases
RELEASE_SALT = ".release_salt"  # the secret behind keyed release ids (stays home)
PRIVACY_NOTE = "PRIVACY.md"  # an export's note on what it holds
MODELS = "models"  # an export's released models

#: The tables the sweep seals in ``outputs.json`` (and an export copies, verified).
TABLES = (TRANSFER, COMPARISONS, RELIABILITY)


def _at(name: str) -> property:
    return property(lambda self: self.root / name, doc=f"``<root>/{name}``")


@dataclass(frozen=True)
class SweepFolder:
    """Paths of one output folder (a data owner's, or an export's: same names)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    plan = _at(PLAN)
    transfer = _at(TRANSFER)
    comparisons = _at(COMPARISONS)
    reliability = _at(RELIABILITY)
    guarantees = _at(GUARANTEES)
    report = _at(REPORT)
    html = _at(HTML)
    figures = _at(FIGURES)
    outputs = _at(OUTPUTS)
    trials = _at(TRIALS)
    set_aside = _at(SET_ASIDE)
    cache = _at(CACHE)
    ray_results = _at(RAY_RESULTS)
    ray_session = _at(RAY_SESSION)
    runs = _at(RUNS)
    lease_dir = _at(LEASE_DIR)
    legacy_lock = _at(LEGACY_LOCK)
    release_salt = _at(RELEASE_SALT)

    def relative(self, path: Path) -> str:
        """``path`` relative to the folder when inside it (the folder may be moved), else as is."""
        path = Path(path)
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def read_plan(self) -> Plan | None:
        """The last plan written here, or None when no sweep has planned in this folder.
        Raises ``PlanDamaged`` for a plan.json that cannot be read."""
        return Plan.read(self.plan) if self.plan.is_file() else None

    def write_plan(self, plan: Plan) -> Path:
        atomic.write_json(self.plan, plan.as_dict())
        return self.plan


# ------------------------------------------------------------------------------ the plan


class PlanDamaged(ValueError):
    """plan.json exists but is not a plan (a partial copy, an edit): the next run rewrites it."""


@dataclass(frozen=True)
class PlannedCell:
    key: str
    name: str
    evaluated: bool = True  # False: trained, never tested on targets (pretraining, audit twins)


@dataclass(frozen=True)
class PlannedTarget:
    """A target at the data version the plan evaluates (``data``: its decoded test images'
    checksum; "" in plans written before checksums)."""

    name: str
    fingerprint: str
    data: str = ""


@dataclass(frozen=True)
class Plan:
    """What ``plan.json`` holds: every planned cell (done or not), the targets' current data
    versions (which evaluations are current) and where each cache entry is."""

    sweep: str = ""
    run_id: str = ""
    cells: tuple[PlannedCell, ...] = ()
    targets: tuple[PlannedTarget, ...] = ()
    caches: Mapping[str, str] = field(default_factory=dict)  # relative to the folder if inside

    def as_dict(self) -> dict[str, Any]:
        return {
            "sweep": self.sweep,
            "run_id": self.run_id,
            "cells": [
                {"key": c.key, "name": c.name, "evaluated": c.evaluated} for c in self.cells
            ],
            "targets": [
                {"name": t.name, "fingerprint": t.fingerprint, "data": t.data}
                for t in self.targets
            ],
            "caches": dict(self.caches),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Plan:
        """Any plan.json written so far: the oldest hold only ``targets`` (no ``data``)."""
        return cls(
            sweep=str(raw.get("sweep", "")),
            run_id=str(raw.get("run_id", "")),
            cells=tuple(
                PlannedCell(str(c["key"]), str(c.get("name", c["key"])),
                            bool(c.get("evaluated", True)))
                for c in raw.get("cells", [])
            ),  # fmt: skip
            targets=tuple(
                PlannedTarget(str(t["name"]), str(t["fingerprint"]), str(t.get("data", "")))
                for t in raw.get("targets", [])
            ),
            caches={str(k): str(v) for k, v in raw.get("caches", {}).items()},
        )

    @classmethod
    def read(cls, path: Path) -> Plan:
        try:
            raw = json.loads(Path(path).read_text())
            return cls.from_dict(raw)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PlanDamaged(f"{path} is damaged ({type(exc).__name__})") from None

    def cache_paths(self, root: Path) -> dict[str, Path]:
        """Each cache entry's folder (a relative entry is inside ``root``)."""
        return {name: Path(root) / path for name, path in self.caches.items()}


__all__ = [
    "PLAN", "TRANSFER", "COMPARISONS", "RELIABILITY", "GUARANTEES", "REPORT", "HTML",
    "FIGURES", "OUTPUTS", "TRIALS", "SET_ASIDE", "CACHE", "RAY_RESULTS", "RAY_SESSION", "RUNS",
    "LEASE_DIR", "LEGACY_LOCK", "RELEASE_SALT", "PRIVACY_NOTE", "MODELS", "TABLES",
    "Plan", "PlanDamaged", "PlannedCell", "PlannedTarget", "SweepFolder",
]  # fmt: skip
