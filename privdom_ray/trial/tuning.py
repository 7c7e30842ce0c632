"""A tuned cell's coordinator (kinds/tuning.py): K and the K configurations are drawn once,
from OS entropy, and written to the cell's private checkpoint before any candidate starts, so
a resume never redraws them (a redraw would be a second, unaccounted selection).

What stands today: the draw, its checkpoint and the privacy plan (per-run-shape sigma, the
validation noise). Training the candidates, scoring them (``selection.validation``) and
releasing the winner are the next step; until then the trainer stops after the draw with an
error that says so (docs/tuning-design.md, "One cell, K candidates, one released model").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from privdom_ray.config import TrainingConfig, TrialSpec
from privdom_ray.kinds import tuning as tuned
from privdom_ray.selection.runs import secret_generator
from privdom_ray.train.epochs import CheckpointStore

DRAW_VERSION = 1  # what a checkpoint's draw holds; a resume refuses another version


@dataclass(frozen=True)
class Draw:
    """A tuned cell's private draw: K, one configuration per candidate, the privacy plan (a
    ``TuningPlan.as_dict()``; None for a non-DP cell). Never in a shareable file."""

    k: int
    configurations: tuple[TrainingConfig, ...]
    plan: Mapping[str, Any] | None
    version: int = DRAW_VERSION

    def as_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "configurations": [dataclasses.asdict(c) for c in self.configurations],
            "plan": dict(self.plan) if self.plan is not None else None,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Draw:
        if d.get("version") != DRAW_VERSION:
            raise ValueError(f"a tuned cell's draw of version {d.get('version')!r}; this code "
                             f"reads version {DRAW_VERSION}")  # fmt: skip
        configs = tuple(TrainingConfig(**_tuples(c)) for c in d["configurations"])
        if len(configs) != int(d["k"]):
            raise ValueError(f"a draw of K = {d['k']} holds {len(configs)} configurations")
        return cls(int(d["k"]), configs, d["plan"], DRAW_VERSION)


def _tuples(c: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}


def draw(spec: TrialSpec, units: int, rng: np.random.Generator | None = None) -> Draw:
    """K from the section's distribution and K configurations from its space, both from OS
    entropy (``rng``: tests only), with the cell's privacy plan (calibrated for ``units``
    training units). Poisson's K = 0 is kept: the cell then releases nothing."""
    assert spec.tuning is not None, spec.name
    g = secret_generator(rng)
    k = tuned.runs_of(spec.tuning).draw(g)
    configs = tuple(tuned.sample_configuration(spec.tuning, spec.training, g) for _ in range(k))
    plan = tuned.tuning_plan(spec, units)
    return Draw(k, configs, plan.as_dict() if plan is not None else None)


def load_or_draw(
    checkpoint: CheckpointStore, spec: TrialSpec, units: int, rng: np.random.Generator | None = None
) -> Draw:
    """The checkpoint's draw, or a new one saved before it is returned: a crash after this
    point resumes with the same K and configurations."""
    state = checkpoint.load()
    if state is not None and "tuning_draw" in state:
        return Draw.from_dict(state["tuning_draw"])
    new = draw(spec, units, rng)
    checkpoint.save({**(state or {}), "tuning_draw": new.as_dict()})
    return new


def train_tuned(cell: Any, store: Any, report: Any, node: str, executor: Any) -> None:
    """A tuned cell: draw (or resume the draw), then train, score and select the candidates.
    Candidate training is not wired yet: this stops after the draw, and says so."""
    from privdom_ray.cache import split_sizes

    spec = cell.spec
    units = split_sizes(cell.source_cache).get("train", 0)
    load_or_draw(store.checkpoint(spec.key), spec, units)
    raise NotImplementedError(
        f"{spec.name}: tuned cells (the grid's tuning section) draw K and their candidates' "
        "configurations, but candidate training and selection are not implemented yet "
        "(issue 26); remove the tuning section to run this grid"
    )
