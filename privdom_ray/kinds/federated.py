"""A federation: its sites train one model together with FedAvg, each with its own DP-SGD
guarantee; one trial per (federation, epsilon, seed)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

from privdom_ray.config import (
    Federation,
    FederationConfig,
    Resources,
    Site,
    SweepSpec,
    TrialSpec,
    content_key,
)
from privdom_ray.kinds import (
    BatchFit,
    Checker,
    PlanContext,
    TrialKind,
    register,
    resolve_delta,
)

FEDERATION_KEYS = ("name", "sites", "weights", "rounds", "local_epochs", "parallel_sites")


def parse_section(
    c: Checker, raw: Any, private: list[str], names: list[str]
) -> list[FederationConfig]:
    """``federations:`` named groups of (non-pretraining) domains, their FedAvg weights,
    rounds and local epochs; ``names``: every domain's (a federation's name is none of them)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        c.add("federations", raw, "a list of {name, sites, weights, rounds, local_epochs}")
        return []
    out: list[FederationConfig] = []
    for i, f in enumerate(raw):
        named = c.named("federations", i, f, FEDERATION_KEYS, "name, sites")
        if named is None:
            continue
        name, key = named
        if name in names or name in [o.name for o in out]:
            c.add(f"{key}.name", name, "a name used by no domain and no other federation")
            continue
        sites = f.get("sites")
        if not isinstance(sites, list) or not sites or len(set(map(str, sites))) != len(sites):
            c.add(
                f"{key}.sites", sites, f"a non-empty list of distinct domain names from {private}"
            )
            continue
        unknown = [s for s in sites if s not in private]
        if unknown:
            c.add(f"{key}.sites", unknown, f"names of (non-pretraining) domains: {private}")
            continue
        weights = _weights(c, key, f.get("weights"), sites)
        if weights is False:
            continue
        out.append(FederationConfig(name=name, sites=tuple(sites), weights=weights,
                                    **_rounds(c, key, f)))  # fmt: skip
    return out


def _weights(c: Checker, key: str, w_raw: Any, sites: list) -> tuple[float, ...] | None | bool:
    """A federation's ``weights`` (None: by training-set size; False: refused)."""
    if w_raw is None:
        return None
    ok = isinstance(w_raw, Mapping) and set(w_raw) == set(sites)
    try:
        weights = tuple(float(w_raw[s]) for s in sites) if ok else None
    except (TypeError, ValueError):
        weights = None
    if weights is None or any(not w >= 0 or math.isinf(w) for w in weights):
        c.add(f"{key}.weights", w_raw, f"a mapping of every site {sites} to a number >= 0")
        return False
    if sum(weights) <= 0:
        c.add(f"{key}.weights", w_raw, "at least one site with a positive weight")
        return False
    return weights


def _rounds(c: Checker, key: str, f: Mapping) -> dict[str, int]:
    """A federation's integer settings (an invalid one is reported and its default kept)."""
    ints = {}
    for k, default, least in (("rounds", 5, 1), ("local_epochs", 1, 1), ("parallel_sites", 0, 0)):
        v = f.get(k, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            c.add(f"{key}.{k}", v, f"an integer >= {least}")
            v = default
        ints[k] = v
    return ints


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
    section = "federations"
    section_phase = "after-names"
    section_help = "federated sources: list of {name, sites, weights, rounds, local_epochs}"
    sourceless = True

    def parse_section(self, c: Checker, raw: Mapping, common: Mapping[str, Any]) -> Any:
        return tuple(parse_section(c, raw.get("federations"), common["private"], common["names"]))

    def check_training(self, c: Checker, section: Any, training: Any) -> None:
        if section and training.privacy_unit == "patient":
            c.add(
                "training.privacy_unit",
                "patient",
                "'image' when the grid has federations (federated training protects images; "
                "patient-level federated DP is not implemented)",
            )

    def batch_fits(
        self, sweep: SweepSpec, n_train: Mapping[str, int], n_patients: Mapping[str, int] | None
    ) -> Iterator[BatchFit]:
        """Each site's: a site samples images (federations refuse ``privacy_unit: patient``)."""
        for fed in sweep.federations:
            for site in fed.sites:
                if site in n_train:
                    where = f"site {site!r} of federation {fed.name!r}"
                    batch = sweep.training.logical_batch
                    yield BatchFit("training.logical_batch", batch, n_train[site], "images", where)

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
