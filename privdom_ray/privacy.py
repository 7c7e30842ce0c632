"""The privacy ledger: what was released, by which mechanisms, and what it costs.

Importing this module is cheap (no torch): the trial store and Tune's coordinating process read
ledgers; Opacus's accountants are imported only to compute an epsilon.

A DP trial releases the outputs of Gaussian mechanisms: every DP-SGD step (Poisson-subsampled
at rate q, noise multiplier sigma) and, when the loss weights come from the private training
labels, one release of the label counts (``lossweights.py``). The ledger lists every such
mechanism, so anyone can recompute epsilon without trusting this tool; epsilon_spent is
their composition under the accountant the grid names. PRV has failed numerically at large
epsilon (opacus #591, #601), so a PRV failure falls back to RDP and the ledger says so; RDP is
always computed as a cross-check.

Noise is calibrated here for the exact composition the run will perform (the steps the
sampler will take, plus any count release), never for an approximate step count.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from privdom_ray.numeric import parse_number

#: Ledgers of DP trials carry this; a DP ledger without it was trained before the noise and
#: the sampling were secret (they followed the published seed): its epsilon is void.
MECHANISM_VERSION = 2
#: How the DP mechanism's randomness (noise, Poisson sampling) was drawn in version 2.
SECRET_RANDOMNESS = "os-entropy"


@dataclass(frozen=True)
class Mechanism:
    """One accounted release: a Gaussian mechanism with noise multiplier ``noise_multiplier``
    (noise std / L2 sensitivity), Poisson-subsampled at ``sample_rate`` (1.0 = applied to the
    whole dataset), composed ``steps`` times."""

    name: str  # "dp_sgd" or "label_counts"
    noise_multiplier: float
    sample_rate: float
    steps: int

    def as_tuple(self) -> tuple[float, float, int]:
        """The (sigma, q, steps) entry of an Opacus accountant's history."""
        return (float(self.noise_multiplier), float(self.sample_rate), int(self.steps))


@dataclass(frozen=True)
class Ledger:
    """One trial's privacy record. Non-private trials have epsilon = inf and sigma = 0."""

    epsilon_target: float
    epsilon_spent: float
    epsilon_rdp: float  # the same mechanisms under RDP: an upper-bound cross-check
    delta: float
    # the DP-SGD mechanism (the table's columns); ``mechanisms`` holds it and any other release
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    accountant: str  # the accountant that produced epsilon_spent ("prv", "rdp", or "none")
    accountant_requested: str
    poisson_sampling: bool
    privacy_unit: str = "image"
    # the starting weights: "scratch", "pretrain:<trial key>" (public data, costs no privacy)
    # or "file:<sha256 prefix>" of a user-supplied state_dict
    initialization: str = "scratch"
    # "trial": one dataset's guarantee; "site": the guarantee of one member (``site``) of a
    # federation, which holds for that site's data alone (each site is accounted separately)
    scope: str = "trial"
    site: str = ""
    # where the loss's pos_weight came from (lossweights.SOURCES) and the values used; for DP
    # trials these are the released (noised) values, covered by epsilon_spent
    loss_weights: str = "exact"
    pos_weight: tuple[float, ...] = ()
    mechanisms: tuple[Mechanism, ...] = ()
    randomness: str = ""  # "os-entropy": noise and sampling were drawn from OS entropy
    mechanism_version: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Ledger:
        """The typed ledger of a stored one (the store's reads): every field converted to its
        type or ``ValueError``/``TypeError``/``KeyError`` (a damaged record). Fields the
        Ledger does not know are left out: ``audit`` reads the stored document itself
        (``TrialStore.ledger_document``) and names them."""
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in d]
        if missing:
            raise KeyError(f"{', '.join(missing)} missing")
        kw = {f.name: _typed(f.name, f.type, d[f.name]) for f in fields if f.name in d}
        kw["mechanisms"] = tuple(
            Mechanism(str(m["name"]), parse_number(m["noise_multiplier"]),
                      parse_number(m["sample_rate"]), _integer(m["steps"]))
            for m in d.get("mechanisms", ())
        )  # fmt: skip
        kw["pos_weight"] = tuple(parse_number(w) for w in d.get("pos_weight", ()))
        return cls(**kw)

    @property
    def is_private(self) -> bool:
        return self.accountant != "none"

    @property
    def accounted_mechanisms(self) -> tuple[Mechanism, ...]:
        """The mechanisms it composes; a ledger written before the list existed holds the
        DP-SGD mechanism of its columns alone."""
        sgd = Mechanism("dp_sgd", self.noise_multiplier, self.sample_rate, self.steps)
        return self.mechanisms or (sgd,)

    @property
    def void(self) -> bool:
        """A DP ledger written before noise and sampling were secret: no valid guarantee."""
        return self.is_private and self.mechanism_version < MECHANISM_VERSION

    @classmethod
    def clip_only(cls, steps: int, sample_rate: float, max_grad_norm: float, **kw: Any) -> Ledger:
        """The clip-only control: clipped, Poisson-sampled steps with no noise (epsilon = inf)."""
        return cls._without_noise(steps, sample_rate, max_grad_norm, poisson_sampling=True, **kw)

    @classmethod
    def non_private(cls, steps: int, sample_rate: float, **kw: Any) -> Ledger:
        return cls._without_noise(steps, sample_rate, math.inf, poisson_sampling=False, **kw)

    @classmethod
    def _without_noise(
        cls,
        steps: int,
        sample_rate: float,
        max_grad_norm: float,
        *,
        poisson_sampling: bool,
        **kw: Any,
    ) -> Ledger:
        return cls(
            epsilon_target=math.inf,
            epsilon_spent=math.inf,
            epsilon_rdp=math.inf,
            delta=0.0,
            noise_multiplier=0.0,
            sample_rate=sample_rate,
            steps=steps,
            max_grad_norm=max_grad_norm,
            accountant="none",
            accountant_requested="none",
            poisson_sampling=poisson_sampling,
            **kw,
        )


def _typed(name: str, kind: Any, value: Any) -> Any:
    """A stored ledger field as the Ledger's annotation says (``from __future__``: a string);
    ValueError naming the field."""
    try:
        if kind == "float":
            return parse_number(value)
        if kind == "int":
            return _integer(value)
        ok = {"bool": bool, "str": str}.get(kind)
        if ok is not None and not isinstance(value, ok):
            raise ValueError(f"{value!r} is not a {kind}")
        return value  # tuples: converted by the caller
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _integer(value: Any) -> int:
    number = parse_number(value)
    if not number.is_integer():
        raise ValueError(f"{value!r} is not a whole number")
    return int(number)


# ------------------------------------------------------------------------------ accounting


def poisson_rate(units: int, logical_batch: int) -> float:
    """The Poisson sample rate of a DP loader: 1/ceil(N/B), as Opacus derives it from a
    DataLoader of batch size B (N = images, or patients for patient-level privacy)."""
    return 1.0 / math.ceil(units / logical_batch) if units > 0 else 0.0


def steps_per_epoch(sample_rate: float) -> int:
    """Steps Opacus's Poisson sampler takes per epoch: ``int(1 / q)``. For q = 1/k this is k
    except where 1/(1/k) rounds below k in floating point (k = 93, 99, 105, ...): then k - 1."""
    return int(1 / sample_rate) if sample_rate > 0 else 0


def epsilon_of(
    accountant: str, mechanisms: Sequence[Mechanism | tuple], delta: float
) -> tuple[float, str]:
    """Epsilon of the composed mechanisms at ``delta``; returns (epsilon, accountant used)."""
    history = [m.as_tuple() if isinstance(m, Mechanism) else tuple(m) for m in mechanisms]
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0, accountant
    from opacus.accountants import PRVAccountant, RDPAccountant  # torch: only when computing

    if accountant == "prv":
        try:
            eps = _epsilon(PRVAccountant(), history, delta)
            if math.isfinite(eps) and eps >= 0:
                return eps, "prv"
        except Exception:  # noqa: BLE001 - PRV's numerical failures have several exception types
            pass
        accountant = "rdp"
    return _epsilon(RDPAccountant(), history, delta), accountant


def _epsilon(acc: Any, history: list, delta: float) -> float:
    import warnings

    acc.history = list(history)
    with warnings.catch_warnings():  # PRV warns on q = 1 (log 0), RDP on few steps: both harmless
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def count_noise_multiplier(epsilon: float, delta: float, fraction: float) -> float:
    """Noise multiplier of a one-shot Gaussian release that takes ``fraction`` of the budget.

    Gaussian mechanisms compose like mu-GDP (mu^2 adds up), so the release gets
    mu_release^2 = fraction * mu_total^2 where mu_total is the GDP parameter whose
    (epsilon, delta) curve passes through the trial's target. The DP-SGD noise is then
    calibrated on the exact composition (:func:`calibrate`), so the total stays within target.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    return 1.0 / (math.sqrt(fraction) * gdp_mu(epsilon, delta))


def gdp_mu(epsilon: float, delta: float) -> float:
    """The mu of the Gaussian DP curve through (epsilon, delta) (Dong, Roth and Su 2019)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def gap(mu: float) -> float:
        return (
            norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2)
        ) - delta

    return float(brentq(gap, 1e-6, 100.0))


@dataclass(frozen=True)
class NoisePlan:
    """A DP run's noise, fixed before the first step for the composition it will perform."""

    noise_multiplier: float  # DP-SGD sigma
    sample_rate: float
    steps: int  # every step the sampler will take, over all epochs
    count_noise_multiplier: float = 0.0  # 0 = no label-count release
    accountant: str = "prv"  # the accountant the calibration used (a PRV failure -> rdp)

    @property
    def mechanisms(self) -> tuple[Mechanism, ...]:
        counts = (
            (Mechanism("label_counts", self.count_noise_multiplier, 1.0, 1),)
            if self.count_noise_multiplier > 0
            else ()
        )
        return (*counts, Mechanism("dp_sgd", self.noise_multiplier, self.sample_rate, self.steps))


def calibrate(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    count_fraction: float = 0.0,
    tolerance: float = 0.005,
) -> NoisePlan:
    """The smallest DP-SGD sigma (to ``tolerance`` relative epsilon) whose composition with the
    label-count release (``count_fraction`` of the budget; 0 = none) spends <= ``epsilon``.

    When PRV fails numerically near the answer, the ledger would report RDP's looser
    epsilon, so sigma is then calibrated with RDP to keep the reported epsilon within target.
    """
    counts = count_noise_multiplier(epsilon, delta, count_fraction) if count_fraction else 0.0

    def spent(sigma: float, acc: str) -> tuple[float, str]:
        plan = NoisePlan(sigma, sample_rate, steps, counts, acc)
        return epsilon_of(acc, plan.mechanisms, delta)

    for acc in dict.fromkeys([accountant, "rdp"]):
        sigma = _bisect(lambda s, a=acc: spent(s, a)[0], epsilon, tolerance)
        if spent(sigma, acc)[1] == acc:
            return NoisePlan(sigma, sample_rate, steps, counts, acc)
    raise RuntimeError("no accountant could calibrate the noise")  # pragma: no cover


def _bisect(eps_of_sigma, target: float, tolerance: float) -> float:
    """Smallest sigma with eps(sigma) <= target (to ``tolerance``), eps decreasing in sigma."""
    import functools

    eps_at = functools.lru_cache(maxsize=None)(eps_of_sigma)
    hi = 1.0
    while eps_at(hi) > target:
        hi *= 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {target}")
    lo = hi / 2
    while eps_at(lo) <= target and lo > 1e-6:
        hi, lo = lo, lo / 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if eps_at(mid) > target:
            lo = mid
        else:
            hi = mid
        if eps_at(hi) >= target * (1 - tolerance) or hi - lo < 1e-6 * hi:
            break
    return hi


def make_ledger(
    *,
    epsilon_target: float,
    delta: float,
    plan: NoisePlan,
    max_grad_norm: float,
    accountant: str,
    steps: int | None = None,
    secret: bool = True,
    **kw: Any,
) -> Ledger:
    """The ledger of a DP run that followed ``plan`` (``steps``: those actually taken, when the
    run stopped early; by default all planned steps). ``secret=False`` (generators injected by
    a test) records the run as such and leaves the ledger void: its noise can be replayed."""
    if steps is not None:
        plan = dataclasses.replace(plan, steps=steps)
    eps, used = epsilon_of(accountant, plan.mechanisms, delta)
    eps_rdp, _ = epsilon_of("rdp", plan.mechanisms, delta)
    return Ledger(
        epsilon_target=epsilon_target,
        epsilon_spent=eps,
        epsilon_rdp=eps_rdp,
        delta=delta,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        max_grad_norm=max_grad_norm,
        accountant=used,
        accountant_requested=accountant,
        poisson_sampling=True,
        mechanisms=plan.mechanisms,
        randomness=SECRET_RANDOMNESS if secret else "injected",
        mechanism_version=MECHANISM_VERSION if secret else 0,
        **kw,
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
