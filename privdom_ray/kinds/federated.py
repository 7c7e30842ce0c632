"""A federation: its sites train one model together with FedAvg, each with its own DP-SGD
guarantee; one trial per (federation, epsilon, seed)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from privdom_ray.config import (
    Federation,
    FederationConfig,
    Resources,
    Site,
    SweepSpec,
    TrialSpec,
    content_key,
    format_epsilon,
)
from privdom_ray.kinds import (
    BatchFit,
    Checker,
    PlanContext,
    ReportSection,
    TrialKind,
    register,
    resolve_delta,
)
from privdom_ray.markdown import num
from privdom_ray.records import typed

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

    def member_runs(self, part: Any) -> Mapping[str, SiteRun]:
        return {s.name: s for s in part.sites} if isinstance(part, FederatedRun) else {}

    def slots(self, sweep: SweepSpec, spec: TrialSpec, cap: int) -> tuple[int, float, float]:
        assert spec.federation is not None, spec.name
        fed = next(f for f in sweep.federations if f.name == spec.source)
        return site_slots(fed, spec.federation, sweep.resources, cap)

    record_keys = ("sites",)

    def record_part(self, data: Mapping[str, Any]) -> FederatedRun | None:
        return None if data.get("sites") is None else FederatedRun.of(data["sites"])

    def record_json(self, part: FederatedRun) -> dict[str, Any]:
        return part.to_json()

    def report_sections(self) -> tuple[ReportSection, ...]:
        return (ReportSection("federated", "", federated_text, part_of="other"),)


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


# --------------------------------------------------------------------------------------------
# Its part of the run record: the members as the run recorded them
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteRun:
    """One member of a federation as its run recorded it."""

    name: str
    weight: float
    n_train: int | None = None  # training images: what the audit recomputes q from
    steps: int | None = None  # counted by the site's accountant

    @classmethod
    def of(cls, d: Mapping[str, Any] | SiteRun) -> SiteRun:
        """A member from trial.json's entry (a SiteRun a writer passed is kept)."""
        if isinstance(d, SiteRun):
            return d
        return cls(
            name=typed("str", d["name"]),
            weight=typed("float", d["weight"]),
            n_train=typed("int | None", d.get("n_train")),
            steps=typed("int | None", d.get("steps")),
        )

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class FederatedRun:
    """A federation's part of its run record (trial.json's ``sites``)."""

    sites: tuple[SiteRun, ...] = ()

    @classmethod
    def of(cls, sites: Sequence[Any]) -> FederatedRun:
        try:
            return cls(tuple(SiteRun.of(s) for s in sites))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"sites: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        return {"sites": [s.to_json() for s in self.sites]} if self.sites else {}


# --------------------------------------------------------------------------------------------
# Its part of the report: federated vs single-site models (opens the "other" section)
# --------------------------------------------------------------------------------------------


def federated_text(view: Any) -> str:
    """Federated vs single-site models: mean macro AUC on member sites and on held-out sites.
    ``view``: the report's ``ReportView`` (its tables ``full``, ``df`` and its selections)."""
    full = view.full
    fed = full[view.is_federated(full)]
    if fed.empty:
        return ""
    single = view.df
    out = [
        "### Federated vs single-site training (macro AUC, mean over targets and seeds)",
        "",
        "| epsilon | model | on member sites | on held-out sites |",
        "|---|---|---|---|",
    ]
    macro = fed[(fed["label"] == "macro") & (fed["subgroup"] == "all")]
    ref_all = single[(single["label"] == "macro") & (single["subgroup"] == "all")]
    for eps in view.epsilons(fed):
        for name in sorted(fed["source"].unique()):
            sel = macro[(macro["source"] == name) & (macro["epsilon_target"] == eps)]
            if sel.empty:
                continue
            sites = set(sel["training_sites"].iloc[0].split(","))
            member = sel["target"].isin(sites)
            on, off = sel.loc[member, "auc"].mean(), sel.loc[~member, "auc"].mean()
            out.append(f"| {format_epsilon(eps)} | federated {name} | {num(on)} | {num(off)} |")
            ref = ref_all[(ref_all["epsilon_target"] == eps) & ref_all["source"].isin(sites)]
            if len(ref):
                own = ref["source"] == ref["target"]
                out.append(
                    f"| {format_epsilon(eps)} | single-site ({', '.join(sorted(sites))}) | "
                    f"{num(ref.loc[own, 'auc'].mean())} (own site) | "
                    f"{num(ref.loc[~own, 'auc'].mean())} (other sites) |"
                )
    out.append("")
    out.append(
        "Federated epsilons are per site: every member site's data is protected at the row's "
        "epsilon or better (see each trial's ledger.json, `sites`)."
    )
    out += ["", FEDERATION_TRUST]
    return "\n".join(out) + "\n"


#: The federation's trust model, as the report states it (docs/federated.md).
FEDERATION_TRUST = (
    "**Trust model: a trusted coordinator.** The coordinator (here the sweep's own trial "
    "process) draws every site's secret key and keeps all of them in its private checkpoint; "
    "the sites' noise and Poisson sampling derive from those keys. Each site's ε therefore "
    "holds against everyone who sees the released model, these tables and this report, but "
    "NOT against the coordinator: with the keys it can regenerate a site's noise, subtract "
    "it from the site's update and read the clipped gradient sums and which images each step "
    "used. An untrusted coordinator could also hand out keys it chose (replayable noise), "
    "send crafted global models whose updates leak inputs, ask for other (sigma, q, steps) "
    "than the plan, or skip the noise; a deployment that does not trust it draws each key at "
    "its site and never sends it, has every site check the plan against its own budget, and "
    "aggregates with secure aggregation. Besides its noised weights and step counts (covered "
    "by its ε) and its noised label counts, each site sends per round its validation macro "
    "AUC and k-anonymous validation-score histograms (every released bin holds at least 10 "
    "images, on a public 0.02 grid; labels with fewer images send nothing), computed from "
    "validation images without noise: outside the guarantee, like a single-site model's "
    "threshold."
)
