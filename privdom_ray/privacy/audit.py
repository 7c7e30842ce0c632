"""Auditing a privacy ledger: its epsilon recomputed from its mechanisms, and the ledger the
run should have written compared with the one it wrote.

Owns the audit row (:class:`AuditRow`, :func:`audit_ledger`), the independent PLD accountant
and the cached recomputations (:func:`pld_epsilon`, :func:`cached_calibration`), the expected
ledger of a run (:class:`ExpectedRun`, :func:`expected_ledger`) and the field-by-field
differences (:func:`ledger_differences`, :func:`check_epsilon`). Separate from
``privacy.ledger`` (the ledger, its mechanisms and the calibration a training run uses)
because this is the checking side, read by the audit and the export; it builds on
``privacy.ledger`` (never the reverse), and ``privdom_ray.privacy`` re-exports every name.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from privdom_ray.numeric import parse_number
from privdom_ray.privacy.ledger import (
    MECHANISM_VERSION,
    SECRET_RANDOMNESS,
    Ledger,
    Mechanism,
    NoisePlan,
    calibrate,
    epsilon_of,
    poisson_rate,
    steps_per_epoch,
)

# ------------------------------------------------------------------------------------ audit


@dataclass(frozen=True)
class AuditRow:
    """One DP ledger's reported epsilon next to the epsilon recomputed from its mechanisms."""

    reported: float
    recomputed: float
    recomputed_rdp: float
    target: float
    accountant: str
    problem: str  # "" when the ledger is consistent

    @property
    def ok(self) -> bool:
        return not self.problem


def ledger_mechanisms(ledger: Mapping[str, Any]) -> list[Mechanism]:
    """A ledger's mechanisms; ledgers written before the list existed hold DP-SGD alone."""
    if ledger.get("mechanisms"):
        return [Mechanism(**m) for m in ledger["mechanisms"]]
    return [
        Mechanism(
            "dp_sgd",
            float(ledger["noise_multiplier"]),
            float(ledger["sample_rate"]),
            int(ledger["steps"]),
        )
    ]


def audit_ledger(ledger: Mapping[str, Any], *, rel_tol: float = 1e-6) -> AuditRow:
    """Recompute epsilon from the ledger's mechanisms with the ledger's accountant.

    A problem is reported when the ledger is void (trained before secret randomness), when
    the stored epsilon is below the recomputed one (the cost was understated), when it is
    above the target (the run spent more than it was allowed), or when the DP-SGD columns
    disagree with the mechanism list.
    """
    acc = ledger["accountant"]
    delta = float(ledger["delta"])
    mechs = ledger_mechanisms(ledger)
    recomputed, _ = epsilon_of(acc, mechs, delta)
    rdp, _ = epsilon_of("rdp", mechs, delta)
    reported = parse_number(ledger["epsilon_spent"])
    target = parse_number(ledger["epsilon_target"])
    sgd = [m for m in mechs if m.name == "dp_sgd"]
    columns = (
        float(ledger["noise_multiplier"]),
        float(ledger["sample_rate"]),
        int(ledger["steps"]),
    )
    problem = ""
    if int(ledger.get("mechanism_version", 0)) < MECHANISM_VERSION:
        problem = (
            "void: trained before noise and Poisson sampling were secret (they followed the "
            "published seed), so this model has no valid guarantee; re-run the sweep to retrain it"
        )
    elif len(sgd) != 1 or sgd[0].as_tuple() != columns:
        problem = f"the DP-SGD columns {columns} disagree with the mechanisms {mechs}"
    elif reported < recomputed * (1 - rel_tol):
        problem = f"reported epsilon {reported:.6g} is below the recomputed {recomputed:.6g}"
    elif reported > target * (1 + rel_tol):
        problem = f"reported epsilon {reported:.6g} exceeds its target {target:.6g}"
    return AuditRow(reported, recomputed, rdp, target, acc, problem)


# ------------------------------------------------------------------- recomputing a ledger


#: The independent accountant the audit and the export compose with: Google's dp-accounting
#: PLD accountant (pessimistic discretisation, so its epsilon is an upper bound; 1e-3 agrees
#: with 1e-4 to 1e-4 relative at our sizes and takes ~0.1-0.5 s instead of ~2 s).
PLD = "pld"
PLD_INTERVAL = 1e-3
#: PRV's reported epsilon is an upper estimate about 1% above PLD's (its eps_error); a ledger
#: more than this far BELOW the PLD recomputation understates its cost.
INDEPENDENT_TOL = 0.01


def pld_epsilon(mechanisms: Sequence[Mechanism], delta: float) -> float:
    """Epsilon at ``delta`` of the composition of every mechanism listed (several releases
    of one dataset: one list), by Google's dp-accounting PLD accountant: an accountant that
    shares no code with Opacus's, so a bug in one does not repeat in the other."""
    return _pld_cached(tuple(m.as_tuple() for m in mechanisms if m.steps > 0), float(delta))


@functools.lru_cache(maxsize=256)
def _pld_cached(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    if not history:
        return 0.0
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_INTERVAL)
    for sigma, q, steps in history:
        if sigma <= 0:
            return math.inf  # no noise: no guarantee
        gauss = dp_event.GaussianDpEvent(sigma)
        acc.compose(gauss if q >= 1 else dp_event.PoissonSampledDpEvent(q, gauss), int(steps))
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def cached_calibration(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    count_fraction: float,
) -> NoisePlan:
    """:func:`calibrate` once per distinct spec (a PRV calibration takes seconds; sites of equal
    size and audit twins share their cell's)."""
    return calibrate(
        epsilon=epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
        accountant=accountant, count_fraction=count_fraction,
    )  # fmt: skip


@functools.lru_cache(maxsize=256)
def _epsilon_cached(accountant: str, history: tuple, delta: float) -> tuple[float, str]:
    return epsilon_of(accountant, list(history), delta)


@dataclass(frozen=True)
class ExpectedRun:
    """What one DP ledger must say, from the trial's spec and the run's recorded training-set
    size alone: never from the ledger itself (``audit`` recomputes, it does not trust)."""

    epsilon_target: float
    delta: float
    units: int  # training images, or patients (privacy_unit "patient"): what Poisson drew from
    logical_batch: int
    epochs: int  # a federation's: rounds x local epochs
    max_grad_norm: float
    accountant: str  # the grid's
    count_fraction: float  # the label-count release's budget share; 0 = no release
    loss_weights: str  # lossweights source: dp_counts, public, none, fixed
    # the loss weights used: known for public/none/fixed; None for dp_counts (noised values)
    pos_weight: tuple[float, ...] | None
    n_labels: int
    privacy_unit: str = "image"
    initialization: str = "scratch"
    scope: str = "trial"
    site: str = ""
    active: bool = True  # a federation's site with weight 0 trained nothing, released nothing
    # single-site trials account with the calibration's accountant (a PRV failure falls back
    # to RDP), federation sites with the grid's (federated.site_ledger)
    federated: bool = False


def expected_ledger(run: ExpectedRun) -> Ledger:
    """The ledger the trainer writes for ``run``: the same calibration (``calibrate`` on the
    exact step count, the count release's sigma from its budget share) and the same
    accounting, recomputed here."""
    q = poisson_rate(run.units, run.logical_batch)
    steps = run.epochs * steps_per_epoch(q) if run.active else 0
    if run.active:
        plan = cached_calibration(
            run.epsilon_target, run.delta, q, steps, run.accountant, run.count_fraction
        )
    else:
        plan = NoisePlan(0.0, q, 0)
    accountant = run.accountant if run.federated else plan.accountant
    eps, used = _epsilon_cached(accountant, tuple(m.as_tuple() for m in plan.mechanisms), run.delta)
    rdp, _ = _epsilon_cached("rdp", tuple(m.as_tuple() for m in plan.mechanisms), run.delta)
    ledger = Ledger(
        epsilon_target=run.epsilon_target, epsilon_spent=eps, epsilon_rdp=rdp, delta=run.delta,
        noise_multiplier=plan.noise_multiplier, sample_rate=q, steps=steps,
        max_grad_norm=run.max_grad_norm, accountant=used, accountant_requested=accountant,
        poisson_sampling=True, privacy_unit=run.privacy_unit, initialization=run.initialization,
        scope=run.scope, site=run.site, loss_weights=run.loss_weights,
        pos_weight=run.pos_weight or (), mechanisms=plan.mechanisms, randomness=SECRET_RANDOMNESS,
        mechanism_version=MECHANISM_VERSION,
    )  # fmt: skip
    if not run.active:  # federated.site_ledger: nothing released, not even the counts
        ledger = dataclasses.replace(
            ledger, epsilon_spent=0.0, epsilon_rdp=0.0, mechanisms=(), loss_weights="",
            pos_weight=(),
        )  # fmt: skip
    return ledger


#: Fields whose expected value comes out of a calibration or an accountant (floating point):
#: compared to a relative tolerance; every other field must be equal.
_COMPUTED = ("epsilon_spent", "epsilon_rdp", "noise_multiplier")


def ledger_differences(
    found: Mapping[str, Any], expected: Ledger, *, rel_tol: float = 1e-9
) -> list[str]:
    """Every field where the stored ledger ``found`` differs from the recomputed one, named
    (``noise_multiplier 4 (recomputed 2.13)``, ``mechanisms[label_counts].steps 0 ...``).
    A field missing from an older ledger counts as its default (as ``Ledger.from_dict``
    reads it); a field the Ledger does not know is named too."""
    known = {f.name: f for f in dataclasses.fields(Ledger)}
    out = [f"unknown field {k!r}" for k in found if k not in known and k != "sites"]
    for name, field_ in known.items():
        want = getattr(expected, name)
        if name not in found:
            if field_.default is dataclasses.MISSING or field_.default != want:
                out.append(f"{name} missing (recomputed {want!r})")
            continue
        have = found[name]
        if name == "mechanisms":
            out += _mechanism_differences(have, want, rel_tol)
        elif name == "pos_weight":
            out += _pos_weight_differences(have, want, found.get("loss_weights"))
        elif not _same(have, want, rel_tol if name in _COMPUTED else 1e-12):
            out.append(f"{name} {have!r} (recomputed {want!r})")
    return out


def _same(have: Any, want: Any, rel_tol: float) -> bool:
    if isinstance(want, bool) or not isinstance(want, int | float):
        return have == want
    try:
        have = parse_number(have)
    except (TypeError, ValueError):
        return False
    if isinstance(want, int) and have != want:
        return False
    return math.isclose(have, float(want), rel_tol=rel_tol, abs_tol=0.0)


def _mechanism_differences(have: Any, want: tuple[Mechanism, ...], rel_tol: float) -> list[str]:
    try:
        found = [dict(m) for m in have]
    except (TypeError, ValueError):
        return [f"mechanisms {have!r} (recomputed {[dataclasses.asdict(m) for m in want]})"]
    names = [m.get("name") for m in found]
    if names != [m.name for m in want]:
        return [f"mechanisms {names} (recomputed {[m.name for m in want]})"]
    out = []
    for m, w in zip(found, want, strict=True):
        for key in ("noise_multiplier", "sample_rate", "steps"):
            tol = rel_tol if key == "noise_multiplier" else 1e-12
            if not _same(m.get(key), getattr(w, key), tol):
                out.append(
                    f"mechanisms[{w.name}].{key} {m.get(key)!r} (recomputed {getattr(w, key)!r})"
                )
        extra = set(m) - {"name", "noise_multiplier", "sample_rate", "steps"}
        out += [f"mechanisms[{w.name}] unknown field {k!r}" for k in sorted(extra)]
    return out


def _pos_weight_differences(have: Any, want: tuple[float, ...], source: Any) -> list[str]:
    """Released (dp_counts) weights are noised: only their number and range can be checked;
    other sources' weights are known exactly."""
    try:
        values = [float(v) for v in have]
    except (TypeError, ValueError):
        return [f"pos_weight {have!r} is not a list of numbers"]
    if want or source != "dp_counts":
        return [] if values == list(want) else [f"pos_weight {values} (recomputed {list(want)})"]
    return [] if all(math.isfinite(v) and v > 0 for v in values) else [
        f"pos_weight {values}: released weights are finite and positive"
    ]  # fmt: skip


def check_epsilon(found: Mapping[str, Any]) -> list[str]:
    """Epsilon recomputed from the ledger's OWN mechanisms, with its recorded accountant and
    with the independent PLD accountant: the reported epsilon must be the recorded
    accountant's, at most the target, and not below PLD's by more than the accountants'
    known disagreement; PLD itself must stay within the target."""
    try:
        mechs = ledger_mechanisms(found)
        delta, target = float(found["delta"]), parse_number(found["epsilon_target"])
        reported, accountant = parse_number(found["epsilon_spent"]), str(found["accountant"])
    except (KeyError, TypeError, ValueError) as exc:
        return [f"unreadable ledger ({type(exc).__name__}: {exc})"]
    bad = [
        f"mechanisms[{m.name}] (sigma {m.noise_multiplier}, q {m.sample_rate}, steps {m.steps}) "
        "is no Gaussian mechanism: an accountant cannot recompute it"
        for m in mechs
        if not (m.noise_multiplier > 0 and 0 < m.sample_rate <= 1 and m.steps >= 0)
    ]
    if bad or not 0 < delta < 1:
        return bad or [f"delta {delta} is outside (0, 1)"]
    history = tuple(m.as_tuple() for m in mechs)
    try:
        recomputed, used = _epsilon_cached(accountant, history, delta)
        independent = pld_epsilon(mechs, delta)
    except Exception as exc:  # noqa: BLE001 - the accountants fail in many ways on odd input
        return [f"epsilon cannot be recomputed ({type(exc).__name__}: {exc})"]
    out = []
    if used != accountant or not math.isclose(reported, recomputed, rel_tol=1e-6):
        out.append(f"epsilon_spent {reported:.6g} is not the {accountant} accountant's "
                   f"{recomputed:.6g} for the ledger's mechanisms")  # fmt: skip
    if reported < independent * (1 - INDEPENDENT_TOL):
        out.append(f"epsilon_spent {reported:.6g} is below the independent PLD accountant's "
                   f"{independent:.6g}")  # fmt: skip
    if reported > target * (1 + 1e-9) or independent > target * (1 + 1e-9):
        out.append(f"epsilon {max(reported, independent):.6g} exceeds epsilon_target {target:g}")
    return out
