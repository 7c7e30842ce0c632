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
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["mechanisms"] = tuple(Mechanism(**m) for m in d.get("mechanisms", ()))
        kw["pos_weight"] = tuple(float(w) for w in d.get("pos_weight", ()))
        for k in ("epsilon_target", "epsilon_spent", "epsilon_rdp"):
            kw[k] = _number(kw[k])
        return cls(**kw)

    @property
    def is_private(self) -> bool:
        return self.accountant != "none"

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


def _number(value: Any) -> float:
    if isinstance(value, str):
        return math.inf if value in ("inf", "Infinity") else float(value)
    return float(value)


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
    reported, target = _number(ledger["epsilon_spent"]), _number(ledger["epsilon_target"])
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


@dataclass(frozen=True)
class RunRecord:
    """What a DP run's own spec and record say it did, for checking its ledger against."""

    units: int  # training images, or patients for privacy_unit "patient"
    logical_batch: int
    epochs: int
    steps_taken: int  # steps the run's accountant saw (from its history)
    loss_weights: str
    epsilon_target: float = math.nan  # the spec's (NaN: not checked)
    delta: float = math.nan
    max_grad_norm: float = math.nan
    privacy_unit: str = ""


def check_against_record(ledger: Mapping[str, Any], record: RunRecord) -> str:
    """A problem ("" if none) where the ledger's q, steps or releases are not what the run's
    own record implies: q = 1/ceil(units/B), steps = epochs x int(1/q) = the steps taken, and a
    label-count release exactly when the loss weights came from private counts."""
    q = poisson_rate(record.units, record.logical_batch)
    steps = record.epochs * steps_per_epoch(q)
    names = [m.name for m in ledger_mechanisms(ledger)]
    if not math.isclose(float(ledger["sample_rate"]), q, rel_tol=1e-12):
        return (
            f"sample rate {ledger['sample_rate']} is not 1/ceil({record.units}/"
            f"{record.logical_batch}) = {q:.6g} for the recorded training set"
        )
    if int(ledger["steps"]) != steps or record.steps_taken != steps:
        return (
            f"the ledger counts {ledger['steps']} steps and the run took {record.steps_taken}; "
            f"{record.epochs} epochs x int(1/q) = {steps}"
        )
    wants = 1 if record.loss_weights == "dp_counts" else 0
    if names.count("label_counts") != wants or ledger.get("loss_weights") != record.loss_weights:
        return (
            f"loss weights {record.loss_weights!r} but the ledger says "
            f"{ledger.get('loss_weights')!r} with releases {names}"
        )
    return _against_spec(ledger, record)


def _against_spec(ledger: Mapping[str, Any], record: RunRecord) -> str:
    """The ledger's target, delta, clipping bound and unit must be the spec's."""
    checks = (
        ("epsilon_target", _number(ledger["epsilon_target"]), record.epsilon_target),
        ("delta", float(ledger["delta"]), record.delta),
        ("max_grad_norm", float(ledger["max_grad_norm"]), record.max_grad_norm),
    )
    for name, found, expected in checks:
        if not math.isnan(expected) and found != expected:
            return f"the ledger's {name} {found:g} is not the trial spec's {expected:g}"
    if record.privacy_unit and ledger.get("privacy_unit", "image") != record.privacy_unit:
        return f"the ledger protects {ledger.get('privacy_unit')}s, the spec {record.privacy_unit}s"
    return ""
