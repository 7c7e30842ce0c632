"""The clip-only control: DP-SGD's clipping and Poisson sampling without noise (epsilon =
inf), which separates the effect of clipping from the effect of noise (opacus #308, #573)."""

from __future__ import annotations

import math
from collections.abc import Iterator

from privdom_ray.config import TrialSpec
from privdom_ray.kinds import PlanContext, TrialKind, register
from privdom_ray.kinds.standard import single_site


def plan(ctx: PlanContext) -> Iterator[TrialSpec]:
    if "clip_only" not in ctx.spec.controls:
        return
    for source in ctx.spec.sources:
        for seed in ctx.spec.seeds:
            yield single_site(ctx, source, math.inf, seed, "clip_only")


class ClipOnly(TrialKind):
    name = "clip_only"
    description = "control: clipping and Poisson sampling, no noise"
    in_matrices = False
    released = False

    def plan(self, ctx: PlanContext) -> Iterator[TrialSpec]:
        return plan(ctx)


register(ClipOnly())
