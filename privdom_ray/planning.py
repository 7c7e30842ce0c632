"""Which cells of a grid still need work: pure planning, no Ray, no writes.

Given the planned trials, the trial store (read only) and where each domain's cache is,
decide per trial whether to train it, which targets to evaluate, or nothing. The resume
rules live here, in one place, and are tested without a cluster:

- a trial trained, readable and valid is never trained again; only targets without a current
  evaluation (new target, changed target data, older evaluation protocol) are evaluated;
- a damaged trial folder, or a DP trial whose guarantee is void, is retrained (the driver has
  set it aside before planning: ``TrialStore.usable``, the store's job; planning moves nothing);
- an evaluation counts only when it names the checksum of the model now on disk, so a trial
  trained again (e.g. after its ``done`` was deleted) never keeps an older model's evaluations;
- ``evaluate`` (train=False) never trains and never sets a trial aside: a trial it cannot use
  is named (``CellPlan.unusable``) and the command fails, instead of losing its rows quietly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from privdom_ray.cell import Cell, TargetRef
from privdom_ray.config import SweepSpec, TrialSpec
from privdom_ray.kinds import kind_of
from privdom_ray.store import TrialRecord, TrialStore

Log = Callable[[str], None]


@dataclass(frozen=True)
class CellPlan:
    trials: list[TrialSpec]  # every planned trial, pretraining first
    cells: list[Cell]  # only those with work left
    targets: tuple[TargetRef, ...]
    # evaluate only: trials whose record is damaged or void, "name: why" (never moved)
    unusable: tuple[str, ...] = ()
    done: int = 0  # trials trained and evaluated on every target: nothing left to do


def resampling_unit(spec: SweepSpec, domain: str) -> str:
    """What a domain's evaluations resample: patients, or images where it has no patient ids."""
    from privdom_ray.domains import REGISTRY

    return REGISTRY[spec.domain(domain).kind].resampling_unit


def target_refs(
    spec: SweepSpec,
    fingerprints: Mapping[str, str],
    caches: Mapping[str, str],
    data: Mapping[str, str] | None = None,
) -> tuple[TargetRef, ...]:
    """The grid's targets: data version (manifest fingerprint), cache, resampling unit and
    ``data``, the checksum of each test split's decoded images (evaluations are bound to it)."""
    data = data or {}
    return tuple(
        TargetRef(t, fingerprints[t], caches[t], resampling_unit(spec, t), data.get(t, ""))
        for t in spec.targets
    )


def plan_cells(
    spec: SweepSpec,
    trials: Sequence[TrialSpec],
    store: TrialStore,
    caches: Mapping[str, str],
    fingerprints: Mapping[str, str],
    *,
    train: bool = True,
    run_id: str = "",
    slots: int = 1,
    fence: int = 0,
    data: Mapping[str, str] | None = None,
    log: Log = print,
    records: Mapping[str, TrialRecord | None] | None = None,
    unusable: Mapping[str, str] | None = None,
) -> CellPlan:
    """The cells with work left. ``caches`` maps a domain name (and the pretraining trial's
    name) to its cache folder; ``slots`` is how many per-trial slots the cluster holds;
    ``fence`` is the driver's lease token, carried by every cell to its writes; ``data`` the
    checksum of each target's decoded test images. ``records``: each trial's usable record
    as the driver found it after tidying the folder (``TrialStore.usable``); default: the
    store's read-only ``valid`` (a damaged or void trial is then planned again, not moved).
    A trial in ``records`` is not verified again here (the driver just did), nor one in
    ``unusable`` (evaluate: the reason the driver found it unusable, by key)."""
    targets = target_refs(spec, fingerprints, caches, data)
    init_path = ""
    pre = next((t for t in trials if kind_of(t).stage == 0), None)
    if pre is not None and spec.training.init == "pretrain":
        init_path = str(store.model_path(pre.key))
    elif spec.init_path is not None:
        init_path = str(spec.init_path)
    cells, named, done = [], [], 0
    for t in trials:
        kind = kind_of(t)
        checked = records is not None and t.key in records  # the driver found it usable
        if not train and not checked and (why := _unusable(store, t.key, unusable)):
            named.append(f"{t.name}: {why}")
            log(
                f"[evaluate] {t.name} ({t.key}): {why}; not evaluated (the sweep, launch.py "
                "--grid, sets it aside and trains it again)"
            )
            continue
        record = records[t.key] if records is not None else store.valid(t.key)
        init = init_path if t.init != "scratch" else ""
        source = {"source": caches.get(t.source, ""), "own": caches.get(t.name, "")}.get(
            kind.data, ""
        )  # a federation's data is its sites'
        if not kind.evaluated:  # pretraining, audit twins: trained, never tested on targets
            if record is None and train:
                cells.append(_cell(spec, t, caches, source, (), init, run_id, slots))
            done += record is not None
            continue
        missing = tuple(store.missing_targets(t.key, targets)) if record else targets
        if record is not None and not missing:
            done += 1
            continue
        if not train and record is None:
            log(
                f"[evaluate] {t.name} has no trained model yet; skipped (run the sweep to train it)"
            )
            continue
        cells.append(_cell(spec, t, caches, source, missing, init, run_id, slots))
    cells = [dataclasses.replace(c, fence=fence) for c in cells]
    return CellPlan(list(trials), cells, targets, tuple(named), done)


def _unusable(store: TrialStore, key: str, known: Mapping[str, str] | None) -> str:
    """Why a trial cannot be used: the driver's reason when it checked the trial, else the
    store's (read-only) verification."""
    if known is not None and key in known:
        return known[key]
    return store.unusable_reason(key)


def _cell(
    spec: SweepSpec,
    t: TrialSpec,
    caches: Mapping[str, str],
    source: str,
    targets: tuple[TargetRef, ...],
    init: str,
    run_id: str,
    slots_cap: int,
) -> Cell:
    kind = kind_of(t)
    # a federation's members: their data, and the task slots they train in
    sites = tuple(TargetRef(s.name, s.data_fingerprint, caches[s.name]) for s in kind.members(t))
    slots, cpu, gpu = kind.slots(spec, t, slots_cap)
    device = "cuda" if spec.resources.gpu > 0 else "cpu"
    fmt = spec.resources.memory_format
    return Cell(
        spec=t,
        output=str(spec.output),
        source_cache=source,
        targets=targets,
        evaluation=spec.evaluation,
        threads=max(1, int(spec.resources.cpu)),
        device=device,
        checkpoint_every=spec.ray.checkpoint_every,
        run_id=run_id,
        init_path=init,
        memory_budget_mb=spec.resources.memory_budget_mb,
        cpu=cpu,
        gpu=gpu,
        sites=sites,
        site_slots=slots,
        slot_share=cpu / spec.resources.cpu,  # a federation's sites may split the slots
        channels_last=fmt == "channels_last" or (fmt == "auto" and device == "cuda"),
    )
