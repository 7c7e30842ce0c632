"""One stated guarantee per training set for everything a sweep hands out.

Every DP training is a release of its training images: the weights and everything computed
from them (metrics, comparisons, bins) are covered by its epsilon. Several releases of the
same images compose: a sweep trains each source at several epsilons and seeds, a federation
trains on each member's images again, and an audit twin is a second DP training on the same
images whose canary results (the ``audit_*`` columns) are computed from it. So the honest
number for a training set is the composition of every DP release of it that the shareable
set contains, which this module computes with Google's PLD accountant (an upper bound,
independent of Opacus's accountants), per site, at the site's delta.

A tuned cell's release (kinds/tuning: the best of K secret candidates) has no PLD: its bound
is a Renyi-DP curve (Papernot and Steinke 2022 on one candidate's curve, the label counts on
top). A site with such a release is composed in RDP instead: the curves of every release of
the site add up at each order (DP-SGD as the subsampled Gaussian, the label counts as a
Gaussian, the tuned release's Papernot-Steinke curve recomputed from its ledger's
``selection`` entry, never its stored epsilon), converted to (epsilon, delta) at the site's
delta; the site's accountant then reads "rdp". Sites without one are composed by PLD as
before (the same numbers).

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

import numpy as np

from privdom_ray.privacy import PLD, Mechanism, pld_epsilon
from privdom_ray.selection import rdp
from privdom_ray.selection.tuning import TuningPlan, ValidationNoise, tuned_rdp
from privdom_ray.store import TrialRecord

#: The accountant of a site with a tuned release (its sum of RDP curves, converted at delta).
RDP = rdp.ACCOUNTANT

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
    # a tuned release: its ledger's ``selection`` entry (the plan its bound is recomputed
    # from; ``mechanisms`` are the released model's own, which the plan must cover)
    selection: Mapping[str, Any] | None = None
    # an untuned DP trial's releases on the site's validation split (the ledger's
    # ``validation`` entry: the DP epoch choice and thresholds), or None
    validation: Mapping[str, Any] | None = None


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
    # the accountant of ``epsilon``: "pld"; "rdp" for a site with a tuned release, or whose
    # validation releases (untuned DP trials' epoch and thresholds) compose to more
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
            out.append(Release(record.spec.name, site, led.delta, led.privacy_unit, mechs, twin,
                               led.selection, led.validation))  # fmt: skip
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
        how = accountant(mine + theirs)  # both totals by one accountant
        alone, every = composition(mine, delta, how), composition(mine + theirs, delta, how)
        eps_models, eps_all = alone.epsilon, every.epsilon
        how = (every if audit_included else alone).accountant  # the stated one's
        unit = ", ".join(sorted({r.privacy_unit for r in mine + theirs})) or "image"
        eps = eps_all if audit_included else eps_models
        out.append(SiteGuarantee(
            site, unit, delta, len(mine), eps_models, len(theirs), eps_all, audit_included, eps,
            non_dp.get(site, 0), how,
            statement(site, unit, delta, eps, len(mine), len(theirs) if audit_included else 0,
                      non_dp.get(site, 0), how,
                      sum(r.validation is not None for r in mine)),
        ))  # fmt: skip
    return out


def accountant(parts: Sequence[Release]) -> str:
    """How ``parts`` compose: "rdp" when one is a tuned release (its bound is an RDP curve),
    else "pld"."""
    return RDP if any(r.selection is not None for r in parts) else PLD


@dataclass(frozen=True)
class Composition:
    """Both compositions of a set of releases at one delta, computed once: the trainings'
    (by ``how``) and the validation releases' (RDP). A unit is in the training split or the
    validation split, never both, so the guarantee is the larger of the two."""

    training: float
    validation: float
    how: str

    @property
    def epsilon(self) -> float:
        return max(self.training, self.validation)

    @property
    def accountant(self) -> str:
        """The accountant of :attr:`epsilon`: ``how``, or "rdp" when validation is larger."""
        return RDP if self.validation > self.training else self.how


def composition(parts: Sequence[Release], delta: float, how: str | None = None) -> Composition:
    """Every release of ``parts`` composed at ``delta`` (0 when there is none), by ``how``
    (default: :func:`accountant`): PLD over their mechanisms, or the sum of their RDP curves
    (:func:`release_rdp`) converted at ``delta``; and :func:`compose_validation`."""
    how = how or accountant(parts)
    return Composition(compose_training(parts, delta, how), compose_validation(parts, delta), how)


def compose(parts: Sequence[Release], delta: float, how: str | None = None) -> float:
    """Epsilon of every release of ``parts`` composed at ``delta``: :func:`composition`'s."""
    return composition(parts, delta, how).epsilon


def compose_training(parts: Sequence[Release], delta: float, how: str | None = None) -> float:
    """The training releases' part of :func:`composition` (0 when there is none)."""
    if not parts:
        return 0.0
    if (how or accountant(parts)) == PLD:
        return pld_epsilon([m for r in parts for m in r.mechanisms], delta)
    orders = rdp.as_orders()
    total = np.sum([release_rdp(r, orders) for r in parts], axis=0)
    return float(rdp.rdp_to_epsilon(total, delta, orders)[0])


def compose_validation(parts: Sequence[Release], delta: float) -> float:
    """Epsilon of the untuned trials' validation releases of ``parts`` (their ``validation``
    entries: the DP epoch choice and thresholds on the site's validation split) composed at
    ``delta`` by summing their RDP curves, rebuilt from each entry's noise; 0 without any.
    Each trial's own releases fit within its training epsilon, but several trials of a site
    compose on its validation units as its trainings compose on its training units."""
    entries = [r.validation for r in parts if r.validation is not None]
    if not entries:
        return 0.0
    orders = rdp.as_orders()
    try:
        curves = [ValidationNoise(**dict(e["noise"])).rdp(orders) for e in entries]
    except (KeyError, TypeError, ValueError) as exc:
        raise Uncovered(f"a validation entry cannot be rebuilt ({exc!r})") from None
    return float(rdp.rdp_to_epsilon(np.sum(curves, axis=0), delta, orders)[0])


class Uncovered(ValueError):
    """A tuned release whose model is not one its ``selection`` plan covers: no bound."""


def release_rdp(release: Release, orders: np.ndarray | None = None) -> np.ndarray:
    """One release's RDP curve: its mechanisms' (subsampled Gaussian; the label counts at
    q = 1 are a plain Gaussian), or for a tuned release the Papernot-Steinke curve rebuilt
    from its plan's mechanisms (``TuningPlan.from_dict``: nothing stored is trusted), after
    checking that the plan covers the released model (:class:`Uncovered` otherwise)."""
    a = rdp.as_orders(orders)
    if release.selection is None:
        return rdp.mechanisms_rdp(release.mechanisms, a)
    try:
        plan = TuningPlan.from_dict(release.selection)
    except (KeyError, TypeError, ValueError) as exc:
        raise Uncovered(f"{release.trial}: its selection entry cannot be rebuilt ({exc!r})") from None
    fixed = [m.as_tuple() for m in release.mechanisms if m.name != "dp_sgd"]
    sgd = [m.as_tuple() for m in release.mechanisms if m.name == "dp_sgd"]
    shapes = {c.as_tuple() for c in plan.candidates}
    same = len(fixed) == len(plan.fixed) and all(
        np.allclose(x, y, rtol=1e-9) for x, y in zip(fixed, plan.fixed, strict=False)
    )
    if len(sgd) != 1 or sgd[0] not in shapes or not same:
        raise Uncovered(f"{release.trial}: its mechanisms {release.mechanisms} are not one run "
                        "shape and the once-per-cell releases of its selection plan")  # fmt: skip
    return tuned_rdp(plan.candidates, plan.validation, plan.runs, plan.fixed, a)


def statement(
    site: str,
    unit: str,
    delta: float,
    eps: float,
    models: int,
    twins: int,
    non_dp: int,
    how: str = PLD,
    validation: int = 0,
) -> str:
    """The sentence a reader gets for one training set (``validation``: how many of its DP
    models chose their epoch and thresholds by DP releases on its validation split)."""
    what = f"{models} DP model(s)" + (f" and {twins} audit twin(s)" if twins else "")
    if not models and not twins:
        return (
            f"{NO_GUARANTEE}: every value here computed from {site}'s training {unit}s comes "
            "from a training without DP"
        )
    by = ("the PLD accountant" if how == PLD else "summing their RDP curves (Papernot-Steinke "
          "for a tuned model) and converting at delta")  # fmt: skip
    dp = f"({eps:.4g}, {delta:g})-DP for each training {unit} of {site}: {what} composed by {by}"
    if validation:
        dp += (f", and for each validation {unit}: the epoch and threshold releases of "
               f"{validation} of them composed by summing RDP curves (the larger applies)")
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


def release_guarantee(record: TrialRecord, twin: TrialRecord | None = None) -> tuple[float, str]:
    """Epsilon of one trial's own releases (with its audit twin's when given), the largest over
    its training sites, and the accountant of that site's number; (inf, "none") without DP."""
    mine = releases(record)
    extra = releases(twin, twin=True) if twin is not None else []
    if not mine or (twin is not None and not extra):
        return math.inf, "none"  # a non-private twin's values carry no guarantee either
    per_site = [composition([r for r in mine + extra if r.site == s.site], s.delta) for s in mine]
    worst = max(per_site, key=lambda c: c.epsilon)
    return worst.epsilon, worst.accountant


def composed_by(accountants: Iterable[str], pld: str = "the PLD accountant") -> str:
    """How a set's guarantees were composed, in words, from their ``accountant`` values
    (``pld`` alone when no site has a tuned model: the words it always had)."""
    words = pld
    if RDP in set(accountants):
        words += ("; a site with a tuned model by summing RDP curves (Papernot-Steinke for the "
                  "tuned model), as its line says")  # fmt: skip
    return words


def as_rows(guarantees: Sequence[SiteGuarantee]) -> list[dict[str, Any]]:
    import dataclasses

    return [dataclasses.asdict(g) for g in guarantees]


def by_site(guarantees: Sequence[SiteGuarantee]) -> Mapping[str, SiteGuarantee]:
    return {g.training_site: g for g in guarantees}
