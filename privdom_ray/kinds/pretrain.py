"""Non-private pretraining on a domain that is public by declaration; trials with
``training.init: pretrain`` start from its weights (never in a ledger: public data)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

from privdom_ray.config import PretrainConfig, SweepSpec, TrainingConfig, TrialSpec
from privdom_ray.kinds import BatchFit, Checker, PlanContext, TrialKind, register


def plan(ctx: PlanContext) -> Iterator[TrialSpec]:
    """The pretraining trial (non-private, seed 0, on the public domain), if the grid has one."""
    spec, p = ctx.spec, ctx.spec.pretrain
    if p is None:
        return
    yield TrialSpec(
        source=p.domain,
        data_fingerprint=ctx.fingerprints[p.domain],
        epsilon=math.inf,
        delta=0.0,
        seed=0,
        model=spec.model,
        training=TrainingConfig(
            epochs=p.epochs,
            logical_batch=p.logical_batch,
            physical_batch=min(p.physical_batch, p.logical_batch),
            lr=p.lr,
        ),
        preprocessing=dataclasses.replace(
            spec.preprocessing, image_size=p.image_size or spec.preprocessing.image_size
        ),
        variant="pretrain",
    )


def pretraining_trial(spec, fingerprints) -> TrialSpec | None:
    """The grid's pretraining trial (key set), or None: the driver decodes its domain with
    its own preprocessing before anything else."""
    trial = next(plan(PlanContext(spec, fingerprints, {})), None)
    return trial.with_key() if trial is not None else None


def parse_section(c: Checker, raw: Mapping) -> PretrainConfig | None:
    """``pretrain:`` the public domain, its epochs, batch sizes and learning rate."""
    if not raw.get("pretrain"):
        return None
    pretrain = c.section(raw, "pretrain", PretrainConfig)
    declared = [d.get("name") for d in raw.get("domains") or [] if isinstance(d, Mapping)]
    if pretrain.domain not in declared:  # declared, not only valid: no cascading error
        c.add("pretrain.domain", pretrain.domain, f"the name of a domain in this grid: {declared}")
    if pretrain.epochs <= 0 or pretrain.logical_batch <= 0 or pretrain.physical_batch <= 0:
        c.add("pretrain", dict(raw["pretrain"]), "positive epochs and batch sizes")
    if not pretrain.lr > 0:
        c.add("pretrain.lr", pretrain.lr, "a positive learning rate")
    return pretrain


class Pretrain(TrialKind):
    name = "pretrain"
    description = "non-private pretraining on the public domain, run before its dependents"
    data = "own"
    evaluated = False
    in_matrices = False
    released = False
    stage = 0
    section = "pretrain"
    section_phase = "before-names"  # its domain is neither a source nor a target by default
    section_help = "non-private pretraining on a public domain (domain, epochs, lr, ...)"

    def plan(self, ctx: PlanContext) -> Iterator[TrialSpec]:
        return plan(ctx)

    def parse_section(self, c: Checker, raw: Mapping, common: Mapping[str, Any]) -> Any:
        return parse_section(c, raw)

    def batch_fits(
        self, sweep: SweepSpec, n_train: Mapping[str, int], n_patients: Mapping[str, int] | None
    ) -> Iterator[BatchFit]:
        """Its public domain's images (pretraining is non-private: no patient sampling)."""
        pre = sweep.pretrain
        if pre is not None and pre.domain in n_train:
            where = f"pretraining domain {pre.domain!r}"
            yield BatchFit("pretrain.logical_batch", pre.logical_batch, n_train[pre.domain],
                           "images", where)  # fmt: skip


register(Pretrain())
