"""The standard trial: one source, one epsilon (``inf`` = no DP), one seed."""

from __future__ import annotations

import math
from collections.abc import Iterator

from privdom_ray.config import TrialSpec
from privdom_ray.kinds import PlanContext, TrialKind, register, resolve_delta


def single_site(
    ctx: PlanContext, source: str, epsilon: float, seed: int, variant: str
) -> TrialSpec:
    """A single-site trial of the grid (the standard kind and the controls share this)."""
    spec = ctx.spec
    return TrialSpec(
        source=source,
        data_fingerprint=ctx.fingerprints[source],
        epsilon=epsilon,
        delta=resolve_delta(spec, source, ctx.n_train[source]) if math.isfinite(epsilon) else 0.0,
        seed=seed,
        model=spec.model,
        training=spec.training,
        preprocessing=spec.preprocessing,
        variant=variant,
        init=ctx.init,
        public_pos_weight=ctx.public_pos_weight,
    )


def plan(ctx: PlanContext) -> Iterator[TrialSpec]:
    if ctx.spec.tuning is not None:  # every cell is tuned instead (kinds/tuning.py)
        return
    for source in ctx.spec.sources:
        for epsilon in ctx.spec.epsilons:
            for seed in ctx.spec.seeds:
                yield single_site(ctx, source, epsilon, seed, "standard")


class Standard(TrialKind):
    name = "standard"
    description = "one source, one epsilon, one seed: the transfer matrices' models"

    def plan(self, ctx: PlanContext) -> Iterator[TrialSpec]:
        return plan(ctx)


register(Standard())
