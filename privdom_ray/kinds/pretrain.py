"""Non-private pretraining on a domain that is public by declaration; trials with
``training.init: pretrain`` start from its weights (never in a ledger: public data)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

from privdom_ray.config import TrainingConfig, TrialSpec
from privdom_ray.kinds import PlanContext, TrialKind, register


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


class Pretrain(TrialKind):
    name = "pretrain"
    description = "non-private pretraining on the public domain, run before its dependents"
    data = "own"
    evaluated = False
    in_matrices = False
    released = False
    stage = 0

    def plan(self, ctx: PlanContext) -> Iterator[TrialSpec]:
        return plan(ctx)


register(Pretrain())
