"""What a grid will cost, before it runs (``launch.py plan``): no Ray, no training.

Per domain: the manifest's usable images per split and the cache's size at the grid's image
size. For the grid: trainings and evaluations by trial kind (and how many an existing output
folder already holds), the memory of one trial's step, and the compute: images processed
(epochs x training images per trial, summed over a federation's sites) at a training rate
that is measured here on this machine's device (a few steps of the grid's model) or given by
the user for the device the sweep will run on.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from privdom_ray import kinds
from privdom_ray.config import SweepSpec, TrialSpec
from privdom_ray.store import TrialStore

EVAL_SPEEDUP = 3.0  # inference images/s relative to training (no backward pass): an estimate


@dataclass(frozen=True)
class DomainCost:
    name: str
    splits: dict[str, int]
    image_size: int

    @property
    def images(self) -> int:
        return sum(self.splits.values())

    @property
    def cache_bytes(self) -> int:
        return self.images * self.image_size**2


@dataclass(frozen=True)
class Rate:
    """Training images per second of one trial slot, plain and with DP-SGD clipping."""

    plain: float
    dp: float
    how: str  # "measured on <device>" or "given"


@dataclass
class GridCost:
    domains: list[DomainCost]
    trainings: Counter = field(default_factory=Counter)  # by kind
    trainings_done: int = 0
    evaluations: int = 0
    evaluations_done: int = 0
    train_images: dict[str, float] = field(default_factory=dict)  # "plain"/"dp" -> images
    eval_images: float = 0.0
    step_bytes: int = 0  # peak memory of one training step at the physical batch
    step_device: str = "cpu"
    rate: Rate | None = None
    slots: int = 1

    @property
    def compute_seconds(self) -> float:
        if self.rate is None:
            return math.nan
        train = self.train_images.get("plain", 0) / self.rate.plain
        train += self.train_images.get("dp", 0) / self.rate.dp
        return train + self.eval_images / (self.rate.plain * EVAL_SPEEDUP)


def estimate(
    spec: SweepSpec,
    splits: dict[str, dict[str, int]],
    fingerprints: dict[str, str],
    *,
    rate: Rate | None = None,
    slots: int = 1,
    **plan_args: Any,
) -> GridCost:
    """The cost of ``spec``; ``splits`` = per domain, images per split (from the manifests);
    ``plan_args`` go to ``kinds.plan_trials`` (the weights file's hash, public weights)."""
    sizes = {d.name: spec.preprocessing.image_size for d in spec.domains}
    if spec.pretrain is not None and spec.pretrain.image_size:
        sizes[spec.pretrain.domain] = spec.pretrain.image_size
    used = set(spec.trained_domains) | set(spec.targets)
    used |= {spec.pretrain.domain} if spec.pretrain else set()
    cost = GridCost([DomainCost(n, splits[n], sizes[n]) for n in sizes if n in used], slots=slots)
    n_train = {n: s.get("train", 0) for n, s in splits.items()}
    trials = kinds.plan_trials(spec, fingerprints, n_train, **plan_args)
    store = TrialStore(spec.output)
    targets = [_Target(t, fingerprints[t]) for t in spec.targets]
    for t in trials:
        _count(cost, t, store, targets, n_train, splits)
    cost.rate = rate
    return cost


def _count(cost: GridCost, t: TrialSpec, store: TrialStore, targets, n_train, splits) -> None:
    kind = kinds.kind_of(t)
    cost.trainings[kind.name] += 1
    trained = store.valid(t.key) is not None
    cost.trainings_done += trained
    sites = [s.name for s in t.federation.sites if s.weight > 0] if t.federation else [t.source]
    if not trained:
        images = t.training.epochs * sum(n_train[s] for s in sites)
        key = "dp" if t.clips else "plain"
        cost.train_images[key] = cost.train_images.get(key, 0) + images
    if not kind.evaluated:
        return
    missing = store.missing_targets(t.key, targets) if trained else targets
    cost.evaluations += len(targets)
    cost.evaluations_done += len(targets) - len(missing)
    cost.eval_images += sum(splits[m.name].get("test", 0) for m in missing)


@dataclass(frozen=True)
class _Target:
    name: str
    fingerprint: str


def measure(spec: SweepSpec, device: str, *, steps: int = 3) -> tuple[Rate, int]:
    """Training images/s of one slot (plain and DP; ``steps`` 0: not measured) and the peak
    memory of one DP step at the physical batch, measured with a few steps of the grid's model
    on ``device`` (memory: two small probe batches, extrapolated)."""
    import warnings

    from privdom_ray import dpstep

    warnings.filterwarnings("ignore", message="Secure RNG turned off")  # no secure_mode here
    cfg = spec.training
    size = spec.preprocessing.image_size
    mode = cfg.grad_sample_mode
    mode = dpstep.fastest_correct_mode(spec.model) if mode == "auto" else mode
    batch = cfg.physical_batch or min(cfg.logical_batch, 32)
    rates = {"plain": math.nan, "dp": math.nan}
    for name, m in (("plain", "nondp"), ("dp", mode)) if steps else ():
        step = dpstep.build_step(spec.model, size, m, batch, device)
        step.run()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            step.run()
        rates[name] = steps * batch / (time.perf_counter() - t0)
    peak = dpstep.memory_model(spec.model, size, mode, device, probe=(2, 4)).peak(batch)
    return Rate(rates["plain"], rates["dp"], f"measured on {device}"), int(peak)


def render(cost: GridCost, spec: SweepSpec) -> str:
    lines = [f"# plan of sweep {spec.name!r} (nothing was run)", ""]
    lines += [
        "| domain | images | train | val | test | cache (at px) |",
        "|---|---|---|---|---|---|",
    ]
    for d in cost.domains:
        s = d.splits
        lines.append(
            f"| {d.name} | {d.images} | {s.get('train', 0)} | {s.get('val', 0)} | "
            f"{s.get('test', 0)} | {_bytes(d.cache_bytes)} ({d.image_size}) |"
        )
    total = sum(cost.trainings.values())
    by_kind = ", ".join(f"{n} {k}" for k, n in sorted(cost.trainings.items()))
    lines += [
        "",
        f"trainings: {total} ({by_kind}); {cost.trainings_done} already done, "
        f"{total - cost.trainings_done} to run",
        f"evaluations: {cost.evaluations} (trained models x targets); {cost.evaluations_done} "
        f"already done, {cost.evaluations - cost.evaluations_done} to run",
        f"images to process: {cost.train_images.get('plain', 0):,.0f} plain training, "
        f"{cost.train_images.get('dp', 0):,.0f} DP training, {cost.eval_images:,.0f} evaluation",
    ]
    if cost.step_bytes:
        lines.append(
            f"memory per trial: {_bytes(cost.step_bytes)} for one training step on "
            f"{cost.step_device} at physical batch {spec.training.physical_batch or 'auto'} "
            "(the cached images are read in place, not held)"
        )
    if cost.rate is not None:
        seconds = cost.compute_seconds
        lines.append(
            f"compute: {_duration(seconds)} of one slot at {cost.rate.plain:,.1f} (plain) / "
            f"{cost.rate.dp:,.1f} (DP) training images/s per slot ({cost.rate.how}); about "
            f"{_duration(seconds / cost.slots)} on {cost.slots} slot(s)"
        )
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 60:,.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover
