"""The privacy ledger and the accounting a training run uses: mechanisms, epsilon, calibration.

Owns :class:`Mechanism` and :class:`Ledger` (what was released and what it costs), the
accountants' epsilon (PRV, RDP fallback), the Poisson rate and steps, the exact noise
calibration (:class:`NoisePlan`, :func:`calibrate`) and :func:`make_ledger`. Separate from
``privacy.audit`` (recomputing and comparing a written ledger) because this is what training
needs to write one; it imports nothing of the package but the number parser, and
``privdom_ray.privacy`` re-exports every name.
"""

from __future__ import annotations

import dataclasses
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
    # a tuned cell's ``selection`` entry as stored (kinds/tuning: the Papernot-Steinke plan its
    # epsilon is recomputed from); None for every other ledger, and then not written
    selection: Mapping[str, Any] | None = dataclasses.field(default=None, hash=False)
    # an untuned DP trial's validation releases (selection.untuned.validation_entry: the epoch by
    # the exponential mechanism, thresholds from noisy histograms, in parallel with training);
    # None for ledgers written before them (their epoch and thresholds are outside epsilon) and
    # every other ledger, and then not written
    validation: Mapping[str, Any] | None = dataclasses.field(default=None, hash=False)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("selection", "validation"):
            if out[name] is None:
                del out[name]
        return out

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
        for name in ("selection", "validation"):
            if kw.get(name) is not None and not isinstance(kw[name], Mapping):
                raise TypeError(f"{name}: {kw[name]!r} is not a mapping")
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
