"""One stated guarantee per training set for everything a sweep hands out.

Every DP training is a release of its training images: the weights and everything computed
from them (metrics, comparisons, bins) are covered by its epsilon. Several releases of the
same images compose: a sweep trains each source at several epsilons and seeds, a federation
trains on each member's images again, and an audit twin is a second DP training on the same
images whose canary results (the ``audit_*`` columns) are computed from it. So the honest
number for a training set is the composition of every DP release of it that the shareable
set contains, which this module computes with Google's PLD accountant (an upper bound,
independent of Opacus's accountants), per site, at the site's delta.

What it counts, for site s:
- every DP model whose values are in the shareable set and that trained on s's images
  (a single-site trial of s; a federation with s as an active member: s's own ledger);
- with the audit columns (``export --with-audit``, or the data owner's own folder), the audit
  twin of every exported DP cell of s;
- each mechanism of each ledger (DP-SGD steps and the label-count release).
Values computed from s's images without DP (non-private models, the clip-only control, a
non-private audit twin's columns) carry no guarantee at all; they are counted and named, so
the statement for s says so instead of printing a number that does not cover them.

Pure: trial records in, dataclasses out; no files, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from privdom_ray.privacy import PLD, Mechanism, pld_epsilon
from privdom_ray.store import TrialRecord

NO_GUARANTEE = "no guarantee: trained without DP"


@dataclass(frozen=True)
class Release:
    """One DP training on one site's images: its mechanisms as its ledger lists them."""

    trial: str  # the trial's name (e.g. a_eps1_seed0, fed_abc_eps1_seed0)
    site: str
    delta: float
    privacy_unit: str
    mechanisms: tuple[Mechanism, ...]
    twin: bool = False  # an audit twin (its canary results, not its model)


@dataclass(frozen=True)
class SiteGuarantee:
    """What the shareable set guarantees for one training set (a row of guarantees.parquet)."""

    training_site: str
    privacy_unit: str
    delta: float
    dp_models: int  # DP trainings whose model values are included
    epsilon_models: float  # their composition (PLD)
    audit_twins: int  # DP audit twins of those cells
    epsilon_with_audit: float  # models and twins composed (PLD)
    audit_included: bool  # whether this set holds the audit columns
    epsilon: float  # the one that applies: with audit if included, else models only
    non_dp_models: int  # trainings without DP whose values are included
    accountant: str
    statement: str


def releases(record: TrialRecord, *, twin: bool = False) -> list[Release]:
    """The DP releases one trained trial made, one per training site (a federation: each
    active member's own ledger). Empty for a trial without DP."""
    if not record.spec.is_private:  # the spec decides, not what a ledger claims
        return []
    per_site = record.site_ledgers or {record.spec.source: record.ledger}
    out = []
    for site, led in per_site.items():
        mechs = tuple(m for m in led.accounted_mechanisms if m.steps > 0)
        if mechs:
            out.append(Release(record.spec.name, site, led.delta, led.privacy_unit, mechs, twin))
    return out


def site_guarantees(
    records: Iterable[TrialRecord],
    twins: Iterable[TrialRecord] = (),
    *,
    audit_included: bool,
) -> list[SiteGuarantee]:
    """The guarantee of each training set of ``records`` (the trials whose values are in the
    set) and ``twins`` (the audit twins of those cells), composed per site."""
    records, twins = list(records), list(twins)
    models = [r for rec in records for r in releases(rec)]
    twin_releases = [r for rec in twins for r in releases(rec, twin=True)]
    # twins count for the stated epsilon only when their columns are in the set; both totals
    # are reported either way
    non_dp = _non_dp_counts(records, twins if audit_included else [])
    sites = sorted({r.site for r in models + twin_releases} | set(non_dp))
    out = []
    for site in sites:
        mine = [r for r in models if r.site == site]
        theirs = [r for r in twin_releases if r.site == site]
        delta = max((r.delta for r in mine + theirs), default=math.nan)
        eps_models = compose(mine, delta)
        eps_all = compose(mine + theirs, delta)
        unit = ", ".join(sorted({r.privacy_unit for r in mine + theirs})) or "image"
        eps = eps_all if audit_included else eps_models
        out.append(SiteGuarantee(
            site, unit, delta, len(mine), eps_models, len(theirs), eps_all, audit_included, eps,
            non_dp.get(site, 0), PLD,
            statement(site, unit, delta, eps, len(mine), len(theirs) if audit_included else 0,
                      non_dp.get(site, 0)),
        ))  # fmt: skip
    return out


def compose(parts: Sequence[Release], delta: float) -> float:
    """PLD epsilon of every mechanism of ``parts`` composed (0 when there is none)."""
    if not parts:
        return 0.0
    return pld_epsilon([m for r in parts for m in r.mechanisms], delta)


def statement(
    site: str, unit: str, delta: float, eps: float, models: int, twins: int, non_dp: int
) -> str:
    """The sentence a reader gets for one training set."""
    what = f"{models} DP model(s)" + (f" and {twins} audit twin(s)" if twins else "")
    if not models and not twins:
        return (
            f"{NO_GUARANTEE}: every value here computed from {site}'s training {unit}s comes "
            "from a training without DP"
        )
    dp = (f"({eps:.4g}, {delta:g})-DP for each training {unit} of {site}: {what} composed by "
          f"the PLD accountant")  # fmt: skip
    if not non_dp:
        return dp
    return (
        f"none for the set as a whole: it also holds values of {non_dp} training(s) on {site} "
        f"without DP (marked '{NO_GUARANTEE}'); the DP releases alone are {dp}"
    )


def _non_dp_counts(records: Sequence[TrialRecord], twins: Sequence[TrialRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rec in [*records, *twins]:
        if not rec.spec.is_private:
            for site in rec.training_sites:
                counts[site] = counts.get(site, 0) + 1
    return counts


def release_epsilon(record: TrialRecord, twin: TrialRecord | None = None) -> float:
    """PLD epsilon of one trial's own releases (with its audit twin's when given): the largest
    over its training sites; inf without DP."""
    mine = releases(record)
    if not mine:
        return math.inf
    extra = releases(twin, twin=True) if twin is not None else []
    if twin is not None and not extra:
        return math.inf  # a non-private twin's values carry no guarantee
    return max(compose([r for r in mine + extra if r.site == s.site], s.delta) for s in mine)


def as_rows(guarantees: Sequence[SiteGuarantee]) -> list[dict[str, Any]]:
    import dataclasses

    return [dataclasses.asdict(g) for g in guarantees]


def by_site(guarantees: Sequence[SiteGuarantee]) -> Mapping[str, SiteGuarantee]:
    return {g.training_site: g for g in guarantees}
