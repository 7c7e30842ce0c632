"""A federation: its sites train one model together with FedAvg, each with its own DP-SGD
guarantee; one trial per (federation, epsilon, seed)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

from privdom_ray.config import (
    Federation,
    FederationConfig,
    Resources,
    Site,
    SweepSpec,
    TrialSpec,
    content_key,
)
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

    def slots(self, sweep: SweepSpec, spec: TrialSpec, cap: int) -> tuple[int, float, float]:
        assert spec.federation is not None, spec.name
        fed = next(f for f in sweep.federations if f.name == spec.source)
        return site_slots(fed, spec.federation, sweep.resources, cap)


def site_slots(
    fed: FederationConfig, federation: Federation, res: Resources, cap: int
) -> tuple[int, float, float]:
    """(task slots, cpu and gpu per slot) of a federated trial.

    ``parallel_sites: N`` reserves N whole slots (cpu, gpu each; sites queue for them). The
    default runs all active sites at once: when the cluster holds fewer whole slots than
    sites, those slots' CPUs and GPUs are split evenly between the sites (3 sites on 2 CPUs:
    3 x 0.6666 CPU), so no slot idles while one site finishes a round alone.
    """
    active = sum(1 for s in federation.sites if s.weight > 0)
    if fed.parallel_sites:
        return max(1, min(fed.parallel_sites, active, cap)), res.cpu, res.gpu
    whole = min(active, cap)
    if whole == active:
        return active, res.cpu, res.gpu
    share = whole / active

    def split(x: float) -> float:  # Ray counts resources in units of 1e-4: round down
        return math.floor(x * share * 10_000) / 10_000

    return active, split(res.cpu), split(res.gpu)


register(Federated())
