"""A site's guarantee with untuned DP trials that chose their epoch and thresholds by DP
releases on the site's validation split (the ledger's ``validation`` entry). A unit is in the
training split or the validation split, never both, so the site's guarantee is the larger of
two compositions: the trainings' (PLD, as before) and the validation releases' (their RDP
curves summed). Each trial's releases fit within its own training epsilon, but several trials
of one site compose on its validation units: the site's number must not leave them out.
Real calibration and accountants; the Gaussian part recomputed with dp-accounting."""

from __future__ import annotations

import dataclasses

import numpy as np
from dp_accounting import GaussianDpEvent
from dp_accounting.rdp import RdpAccountant
from helpers.trials import tiny_ledger, tiny_spec
from helpers.tuning import record

from privdom_ray import guarantee
from privdom_ray.privacy import pld_epsilon
from privdom_ray.selection import rdp
from privdom_ray.selection.untuned import validation_entry, validation_noise

DELTA = 1e-5
INTEGER_ORDERS = tuple(range(2, 65)) + (80, 96, 128, 256, 512)


def with_validation(source: str, epsilon: float, seed: int, fitted_to: float):
    """An untuned DP trial (tiny_ledger's DP-SGD) whose validation releases were fitted to a
    training epsilon of ``fitted_to`` (the calibration of kinds.standard, real)."""
    noise = validation_noise(fitted_to, DELTA)
    entry = validation_entry(noise, epsilon_train=fitted_to, delta=DELTA, bound=1.0, bins=20,
                             n_labels=5)  # fmt: skip
    ledger = dataclasses.replace(tiny_ledger(epsilon), validation=entry)
    return record(tiny_spec(source, epsilon, seed), ledger), noise


def validation_by_hand(noises, delta: float) -> float:
    """The validation releases' composition at integer orders: the histograms' Gaussians by
    dp-accounting, the epoch choice's bounded-range curve by selection.rdp; summed, then
    dp-accounting's conversion."""
    orders = list(INTEGER_ORDERS)
    acc = RdpAccountant(orders=orders)
    for n in noises:
        acc.compose(GaussianDpEvent(n.histogram_noise_multiplier))
    curve = np.array(acc._rdp, dtype=float)  # noqa: SLF001 - its curve, before conversion
    for n in noises:
        curve = curve + rdp.exponential_rdp(n.checkpoint_epsilon, orders)
    return rdp.rdp_to_epsilon(curve, delta, np.array(orders, dtype=float))[0]


def site_a(records):
    """Site a's guarantee, its releases, and its trainings' PLD composition by hand."""
    (site,) = guarantee.site_guarantees(records, audit_included=False)
    parts = [rel for r in records for rel in guarantee.releases(r)]
    return site, parts, pld_epsilon([m for p in parts for m in p.mechanisms], DELTA)


def test_a_sites_validation_releases_compose_and_count_when_larger():
    # three trials of site a whose validation releases were fitted to epsilon 8 each, while
    # their trainings (tiny_ledger: 8 steps at sigma 1) compose to much less
    made = [with_validation("a", 8.0, seed, fitted_to=8.0) for seed in range(3)]
    records = [r for r, _ in made]
    site, parts, training = site_a(records)
    validation = guarantee.compose_validation(parts, DELTA)
    assert validation > training  # the case that matters: the old number left it out
    assert site.epsilon == site.epsilon_models == validation
    assert site.accountant == "rdp"
    assert "validation" in site.statement and f"{validation:.4g}" in site.statement
    # the curve the site's number comes from is the one recomputed by hand at the integer
    # orders (so the number, over more orders, can only be tighter, never below the truth)
    noises = [n for _, n in made]
    ours = np.sum([n.rdp(INTEGER_ORDERS) for n in noises], axis=0)
    at_integers = rdp.rdp_to_epsilon(ours, DELTA, np.array(INTEGER_ORDERS, dtype=float))[0]
    assert np.isclose(at_integers, validation_by_hand(noises, DELTA), rtol=1e-9)
    assert validation <= at_integers + 1e-9
    # and one trial's own releases stay within its own epsilon target (the calibration)
    one = guarantee.compose_validation(guarantee.releases(records[0]), DELTA)
    assert one <= 8.0 + 1e-9


def test_a_site_whose_trainings_dominate_keeps_its_pld_number():
    made = [with_validation("a", 8.0, seed, fitted_to=0.5) for seed in range(2)]
    records = [r for r, _ in made]
    site, parts, training = site_a(records)
    assert guarantee.compose_validation(parts, DELTA) < training
    assert site.epsilon == training and site.accountant == "pld"


def test_trials_without_the_entry_give_todays_numbers():
    records = [record(tiny_spec("a", e, 0), tiny_ledger(e)) for e in (1.0, 8.0)]
    site, parts, training = site_a(records)
    assert guarantee.compose_validation(parts, DELTA) == 0.0
    assert site.epsilon == training
    assert "validation" not in site.statement and site.accountant == "pld"
