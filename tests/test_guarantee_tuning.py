"""A site's guarantee with a tuned DP cell (issue 26): the site is composed in RDP (the tuned
release's Papernot-Steinke curve plus every other release's curve), recomputed here from the
papers with dp-accounting's RDP accountant and a direct sum; sites without a tuned release keep
their PLD numbers exactly. Real calibration, real accountants, records built in memory."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
from dp_accounting.rdp import RdpAccountant
from helpers.trials import tiny_ledger, tiny_spec
from helpers.tuning import record, tuned_cell

from privdom_ray import guarantee
from privdom_ray.privacy import Ledger, Mechanism, pld_epsilon
from privdom_ray.selection import rdp
from privdom_ray.selection.runs import TruncatedNegativeBinomial
from privdom_ray.selection.tuning import TuningPlan
from privdom_ray.store import TrialRecord

INTEGER_ORDERS = tuple(range(2, 65)) + (80, 96, 128, 192, 256, 512)
DELTA = 1e-5


def untuned(source: str, epsilon: float, seed: int, mechanisms=()) -> TrialRecord:
    """An untuned DP cell (tiny_ledger: DP-SGD sigma 1.0, q 0.25, 8 steps) or with
    ``mechanisms`` listed (DP-SGD and the label counts)."""
    ledger = dataclasses.replace(tiny_ledger(epsilon), mechanisms=tuple(mechanisms))
    return record(tiny_spec(source, epsilon, seed), ledger)


# ------------------------------------------------------------------ independent computations


def sgm_curve(sigma: float, q: float, steps: int, orders) -> np.ndarray:
    """dp-accounting's own subsampled-Gaussian RDP (q = 1: the plain Gaussian)."""
    acc = RdpAccountant(orders=list(orders))
    acc.compose(SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps))
    return np.array(acc._rdp, dtype=float)  # noqa: SLF001 - its curve, before conversion


def papernot_steinke(orders, curve, eta: float, gamma: float) -> np.ndarray:
    """Theorem 2 (arXiv 2110.03620v2) at each order, lambda-hat minimised over the orders,
    then monotonicity in the order; E[K] by its closed form."""
    mean = eta * (1 - gamma) / (gamma * (1 - gamma**eta))
    best = min(
        (1 + eta) * (1 - 1 / lh) * eh + (1 + eta) * math.log(1 / gamma) / lh
        for lh, eh in zip(orders, curve, strict=True)
    )
    out = [eps + best + math.log(mean) / (lam - 1) for lam, eps in zip(orders, curve, strict=True)]
    return np.array([min(v for a, v in zip(orders, out, strict=True) if a >= lam)
                     for lam in orders])  # fmt: skip


def epsilon_by_hand(orders, curve, delta: float) -> float:
    """Balle et al. 2020, Theorem 21."""
    return min(
        r + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
        for a, r in zip(orders, curve, strict=True)
    )


def tuned_curve_by_hand(rec: TrialRecord, orders) -> np.ndarray:
    sel = rec.ledger.selection
    dist = TruncatedNegativeBinomial(sel["runs"]["eta"], sel["runs"]["gamma"])
    a = np.asarray(orders, dtype=float)
    train = np.max([sgm_curve(c["noise_multiplier"], c["sample_rate"], c["steps"], a)
                    for c in sel["candidates"]], axis=0)  # fmt: skip
    v = sel["validation"]
    val = a / (2 * v["score_noise_multiplier"] ** 2) + a / (
        2 * v["histogram_noise_multiplier"] ** 2
    )
    eps_cp = v["checkpoint_epsilon"]
    val = val + np.minimum(a * eps_cp**2 / 8, eps_cp)
    run = np.maximum(train, val)  # training and validation in parallel
    fixed = sum(sgm_curve(s, q, int(n), a) for s, q, n in sel["fixed"])
    return papernot_steinke(a, run, dist.eta, dist.gamma) + fixed


# ------------------------------------------------------------------------------------ tests


def test_a_site_without_tuned_releases_keeps_its_pld_numbers():
    sgd = Mechanism("dp_sgd", 1.1, 0.2, 40)
    counts = Mechanism("label_counts", 20.0, 1.0, 1)
    records = [untuned("a", 1.0, 0), untuned("a", 2.0, 1, [sgd, counts]), untuned("b", 1.0, 0)]
    alone = {g.training_site: g for g in guarantee.site_guarantees(records, audit_included=False)}
    a = alone["a"]
    expected = pld_epsilon([Mechanism("dp_sgd", 1.0, 0.25, 8), sgd, counts], DELTA)
    assert a.accountant == "pld" and a.epsilon == expected == a.epsilon_models
    assert "composed by the PLD accountant" in a.statement
    # a tuned cell of another site changes nothing here, value for value
    mixed = guarantee.site_guarantees([*records, tuned_cell("c")], audit_included=False)
    by_site = {g.training_site: g for g in mixed}
    assert by_site["a"] == a and by_site["b"] == alone["b"]
    assert by_site["c"].accountant == "rdp"


def test_a_tuned_site_composes_every_release_in_rdp():
    cell = tuned_cell("a", 2.0, 0)
    sgd = Mechanism("dp_sgd", 1.1, 0.2, 40)
    others = [untuned("a", 1.0, 1), untuned("a", 8.0, 2, [sgd])]
    (site,) = guarantee.site_guarantees([cell, *others], audit_included=False)
    assert site.accountant == "rdp" and site.dp_models == 3
    assert "RDP curves (Papernot-Steinke for a tuned model)" in site.statement
    # at least the tuned cell's own bound, recomputed (never the stored number)
    own = TuningPlan.from_dict(cell.ledger.selection).epsilon_total
    assert site.epsilon >= own and own <= 2.0
    eps, how = guarantee.release_guarantee(cell)
    assert eps == pytest.approx(own, rel=1e-9) and how == "rdp"
    # at least the other releases alone, composed the way the site was before tuning (PLD)
    pld_others = pld_epsilon([m for r in others for m in r.ledger.accounted_mechanisms], DELTA)
    assert site.epsilon >= pld_others
    # recomputed from the papers: dp-accounting's curves, Theorem 2 by hand, a direct sum, at
    # integer orders (dp-accounting's fractional orders are looser or do not converge)
    by_hand = tuned_curve_by_hand(cell, INTEGER_ORDERS) + sum(
        sgm_curve(*m.as_tuple(), INTEGER_ORDERS)
        for r in others for m in r.ledger.accounted_mechanisms
    )  # fmt: skip
    parts = [rel for r in [cell, *others] for rel in guarantee.releases(r)]
    ours = sum(guarantee.release_rdp(rel, INTEGER_ORDERS) for rel in parts)
    assert np.all(ours >= by_hand * (1 - 1e-6))
    assert np.all(ours <= by_hand * (1 + 1e-6))  # the same theorem, not needlessly loose
    # the stated number converts the same sum on the default (finer) orders: never looser
    fine = sum(guarantee.release_rdp(rel) for rel in parts)
    assert site.epsilon == pytest.approx(epsilon_by_hand(rdp.ORDERS, fine, DELTA), rel=1e-9)
    coarse = epsilon_by_hand(INTEGER_ORDERS, by_hand, DELTA)
    assert 0.9 * coarse <= site.epsilon <= coarse * (1 + 1e-6)


def test_a_tuned_release_whose_model_its_plan_does_not_cover_has_no_bound():
    cell = tuned_cell()
    (counts, sgd) = cell.ledger.mechanisms
    for mechanisms in [
        (counts, dataclasses.replace(sgd, noise_multiplier=sgd.noise_multiplier * 0.5)),
        (sgd,),  # the label counts left out
        (counts, sgd, sgd),
    ]:
        bad = dataclasses.replace(cell, ledger=dataclasses.replace(cell.ledger,
                                                                   mechanisms=mechanisms))  # fmt: skip
        with pytest.raises(guarantee.Uncovered):
            guarantee.site_guarantees([bad], audit_included=False)
    broken = dict(cell.ledger.selection)
    del broken["candidates"]
    bad = dataclasses.replace(cell, ledger=dataclasses.replace(cell.ledger, selection=broken))
    with pytest.raises(guarantee.Uncovered, match="cannot be rebuilt"):
        guarantee.release_guarantee(bad)


def test_the_ledger_keeps_a_selection_entry_and_writes_none_for_others():
    cell = tuned_cell()
    doc = cell.ledger.as_dict()
    assert Ledger.from_dict(doc) == cell.ledger and doc["selection"]["accountant"] == "rdp"
    assert "selection" not in tiny_ledger(1.0).as_dict()  # untuned ledgers: unchanged files
    assert Ledger.from_dict(tiny_ledger(1.0).as_dict()).selection is None
    with pytest.raises(TypeError):
        Ledger.from_dict({**doc, "selection": "a string"})
