"""Trial kinds: what a trial is for, as a registry like domain kinds.

A kind declares how its trials are planned from a grid, which function trains them, what
its key holds beyond the common fields, and how its results are used (evaluated on targets?
rows in the transfer matrices? weights released?). Adding a kind is adding one module to this
folder that calls :func:`register`; nothing else branches on the kind. Torch-free: trainers
are named (``"module:function"``) and imported only where a trial runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from privdom_ray.config import DEFAULT_DELTA, GridError, SweepSpec, TrialSpec


@dataclass(frozen=True)
class PlanContext:
    """What a kind's planner may use: the grid and what is known of its data."""

    spec: SweepSpec
    fingerprints: Mapping[str, str]
    n_train: Mapping[str, int]
    init: str = "scratch"  # the resolved initialisation of trained-from-grid trials
    public_pos_weight: tuple[float, ...] = ()  # training.pos_weight "public", resolved


@dataclass(frozen=True)
class TrialKind:
    name: str
    plan: Callable[[PlanContext], Iterator[TrialSpec]]
    trainer: str  # "module:function" that trials of this kind are trained with
    description: str = ""
    # where its training data is: "source" (its domain's cache), "own" (a cache entry of its
    # own, under the trial's name: other preprocessing), or "sites" (a federation's members)
    data: str = "source"
    evaluated: bool = True  # tested on the grid's targets
    in_matrices: bool = True  # its rows are the models of the transfer matrices and comparisons
    released: bool = True  # its weights are part of the shareable set (with a valid guarantee)
    stage: int = 1  # stages run in order (0: pretraining, which others start from)
    coordinator: bool = False  # coordinates its own tasks from Tune's trial process
    # trials the grid no longer asks for but whose finished results are still read (never
    # trained: ``plan_trials`` takes them only when finished), e.g. twins of cells not chosen
    kept: Callable[[PlanContext], Iterator[TrialSpec]] | None = None
    # a line for ``launch.py plan`` about this kind's trials ("" for none)
    note: Callable[[SweepSpec, Sequence[TrialSpec]], str] | None = None

    def train(self) -> Callable[..., Any]:
        module, _, function = self.trainer.partition(":")
        return getattr(importlib.import_module(module), function)


REGISTRY: dict[str, TrialKind] = {}


def register(kind: TrialKind) -> TrialKind:
    if kind.name in REGISTRY:
        raise RuntimeError(f"trial kind {kind.name!r} registered twice")
    REGISTRY[kind.name] = kind
    return kind


def kind_of(spec: TrialSpec) -> TrialKind:
    """A trial's kind: a federation's, else the one its ``variant`` names."""
    return REGISTRY["federated" if spec.federation is not None else spec.variant]


def plan_trials(
    spec: SweepSpec,
    fingerprints: Mapping[str, str],
    n_train: Mapping[str, int],
    *,
    init_file_hash: str = "",
    public_pos_weight: tuple[float, ...] = (),
    finished: Callable[[str], bool] | None = None,
) -> list[TrialSpec]:
    """Every trial of the grid, stage by stage (pretraining first), keys set; then the kinds'
    ``kept`` trials for which ``finished(key)`` holds (none without ``finished``).

    ``init_file_hash`` identifies a user-supplied weights file (``training.init: <path>``).
    """
    ctx = PlanContext(spec, fingerprints, n_train, public_pos_weight=public_pos_weight)
    early = [t.with_key() for k in _kinds(stage=0) for t in k.plan(ctx)]
    pre = next((t for t in early if t.variant == "pretrain"), None)
    if spec.training.init == "pretrain":
        assert pre is not None
        init = f"pretrain:{pre.key}"
    elif spec.init_path is not None:
        init = f"file:{init_file_hash}"
    else:
        init = "scratch"
    ctx = dataclasses.replace(ctx, init=init)
    trials = early + [t.with_key() for k in _kinds(stage=1) for t in k.plan(ctx)]
    if finished is None:
        return trials
    planned = {t.key for t in trials}
    kept = [t.with_key() for k in REGISTRY.values() if k.kept for t in k.kept(ctx)]
    return trials + [t for t in kept if t.key not in planned and finished(t.key)]


def plan_notes(spec: SweepSpec, trials: Sequence[TrialSpec]) -> list[str]:
    """The kinds' lines for ``launch.py plan`` (e.g. which cells the audit twins cover)."""
    notes = (k.note(spec, trials) for k in REGISTRY.values() if k.note is not None)
    return [n for n in notes if n]


def _kinds(stage: int) -> list[TrialKind]:
    return [k for k in REGISTRY.values() if k.stage == stage]


def resolve_delta(spec: SweepSpec, source: str, n_train: int) -> float:
    """The delta a source trains with: per-domain, else the grid's, else min(1e-5, 1/(10 N)).

    A delta >= 1/N_train permits a mechanism that publishes one whole record outright, so it
    is refused rather than silently weakened (checked by ``check_deltas`` before any trial).
    """
    d = spec.domain(source).delta or spec.delta
    return d if d is not None else min(DEFAULT_DELTA, 1.0 / (10 * max(n_train, 1)))


def check_deltas(spec: SweepSpec, n_train: Mapping[str, int]) -> None:
    if spec.allow_large_delta:
        return
    errors = []
    for s in spec.trained_domains:
        delta = resolve_delta(spec, s, n_train[s])
        if delta >= 1.0 / n_train[s] and any(math.isfinite(e) for e in spec.epsilons):
            errors.append(
                f"domains[{s}].delta: {delta:g} is not allowed; expected below 1/N_train = "
                f"1/{n_train[s]} = {1.0 / n_train[s]:.3g} for source {s!r} (a delta that large "
                "allows publishing a whole record; set allow_large_delta: true to accept it)"
            )
    if errors:
        raise GridError(str(spec.grid_path), errors)


def _import_kinds() -> None:
    """Import every module of this package so each kind registers itself, in a fixed order."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_kinds()
