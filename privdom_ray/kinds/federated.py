"""A federation: its sites train one model together with FedAvg, each with its own DP-SGD
guarantee; one trial per (federation, epsilon, seed)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

from privdom_ray.config import Federation, Site, TrialSpec, content_key
from privdom_ray.kinds import PlanContext, TrialKind, register, resolve_delta


def plan(ctx: PlanContext) -> Iterator[TrialSpec]:
    spec = ctx.spec
    for fed in spec.federations:
        weights = fed.weights or tuple(float(ctx.n_train[s]) for s in fed.sites)
        for epsilon in spec.epsilons:
            private = math.isfinite(epsilon)
            sites = tuple(
                Site(
                    name=s,
                    data_fingerprint=ctx.fingerprints[s],
                    weight=w,
                    delta=resolve_delta(spec, s, ctx.n_train[s]) if private else 0.0,
                )
                for s, w in zip(fed.sites, weights, strict=True)
            )
            for seed in spec.seeds:
                yield TrialSpec(
                    source=fed.name,
                    data_fingerprint=content_key([s.data_fingerprint for s in sites]),
                    epsilon=epsilon,
                    delta=max(s.delta for s in sites),
                    seed=seed,
                    model=spec.model,
                    training=dataclasses.replace(
                        spec.training, epochs=fed.rounds * fed.local_epochs
                    ),
                    preprocessing=spec.preprocessing,
                    init=ctx.init,
                    federation=Federation(sites, fed.rounds, fed.local_epochs),
                    public_pos_weight=ctx.public_pos_weight,
                )


class Federated(TrialKind):
    name = "federated"
    description = "FedAvg over member sites, each with its own DP-SGD ledger"
    trainer = "federated"
    data = "sites"
    coordinator = True

    def plan(self, ctx: PlanContext) -> Iterator[TrialSpec]:
        return plan(ctx)

    def members(self, spec: TrialSpec) -> tuple[Site, ...]:
        assert spec.federation is not None, spec.name
        return spec.federation.sites


register(Federated())
