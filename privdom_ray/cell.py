"""A cell of the sweep as it travels to Ray: the trial spec, where its data is, its resources.

Torch-free (like ``grid`` and ``results``), so Tune's coordinating process, which only follows
a cell's task, starts without importing torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from privdom_ray.config import EvaluationConfig, TrialSpec


@dataclass(frozen=True)
class TargetRef:
    """A target domain's cached test split, identified by the domain name and data fingerprint."""

    name: str
    fingerprint: str
    cache_path: str
    # what the evaluation's bootstrap resamples: "patient", or "image" where the domain has no
    # patient ids (domains.Adapter.patient_ids)
    unit: str = "patient"
    # checksum of the test split's decoded images (cache.CacheEntry.test_digest): an
    # evaluation names it, and is done again when the images change ("": not checked)
    data: str = ""


@dataclass(frozen=True)
class Cell:
    spec: TrialSpec
    output: str
    source_cache: str
    targets: tuple[TargetRef, ...]
    evaluation: EvaluationConfig
    threads: int = 1
    device: str = "cpu"
    checkpoint_every: int = 1
    run_id: str = ""
    init_path: str = ""  # weights to start from (a pretraining trial's model.pt or a user file)
    memory_budget_mb: int = 0  # 0 = the trial's share of its device (train.memory_budget_mb)
    cpu: float = 1.0  # per task: a single-site trial, or one site of a federation
    gpu: float = 0.0
    sites: tuple[TargetRef, ...] = ()  # a federation's member sites (their cached data)
    site_slots: int = 1  # sites of a federation that train at once (reserved task slots)
    slot_share: float = 1.0  # the part of one per-trial slot (resources.cpu/gpu) a task holds
    channels_last: bool = False  # NHWC activations (resources.memory_format, resolved)
    fence: int = 0  # the driver's lease token: every write of the cell checks it (store, lease)

    def to_config(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["spec"] = self.spec.to_json()
        return d

    @classmethod
    def from_config(cls, d: Mapping[str, Any]) -> Cell:
        return cls(
            spec=TrialSpec.from_json(d["spec"]),
            output=d["output"],
            source_cache=d["source_cache"],
            targets=tuple(TargetRef(**t) for t in d["targets"]),
            evaluation=EvaluationConfig(
                **{**d["evaluation"], "age_bins": tuple(d["evaluation"]["age_bins"])}
            ),
            threads=d.get("threads", 1),
            device=d.get("device", "cpu"),
            checkpoint_every=d.get("checkpoint_every", 1),
            run_id=d.get("run_id", ""),
            init_path=d.get("init_path", ""),
            memory_budget_mb=d.get("memory_budget_mb", 0),
            cpu=d.get("cpu", 1.0),
            gpu=d.get("gpu", 0.0),
            sites=tuple(TargetRef(**t) for t in d.get("sites", ())),
            site_slots=d.get("site_slots", 1),
            slot_share=d.get("slot_share", 1.0),
            channels_last=d.get("channels_last", False),
            fence=d.get("fence", 0),
        )


class TrialTimedOut(RuntimeError):
    """Raised for a cell whose earlier attempt in this run hit the per-trial time limit."""
