"""DP-SGD set-up and the privacy ledger.

The ledger holds what anyone needs to recompute epsilon without trusting this tool: noise
multiplier sigma, Poisson sample rate q, number of steps, clipping bound C and delta. Epsilon
is computed from the ledger (not read from the engine's internal state), by the accountant the
grid names; PRV has failed numerically at large epsilon (opacus #591, #601), so a PRV failure
falls back to RDP and the ledger says so. RDP is also always computed as a cross-check.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from opacus.accountants import PRVAccountant, RDPAccountant

ACCOUNTANT_CLASSES = {"prv": PRVAccountant, "rdp": RDPAccountant}


@dataclass(frozen=True)
class Ledger:
    """One trial's privacy record. Non-private trials have epsilon = inf and sigma = 0."""

    epsilon_target: float
    epsilon_spent: float
    epsilon_rdp: float  # the same mechanism under RDP: an upper-bound cross-check
    delta: float
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

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def clip_only(cls, steps: int, sample_rate: float, max_grad_norm: float) -> Ledger:
        """The clip-only control: clipped, Poisson-sampled steps with no noise (epsilon = inf)."""
        return cls._without_noise(steps, sample_rate, max_grad_norm, poisson_sampling=True)

    @classmethod
    def non_private(cls, steps: int, sample_rate: float) -> Ledger:
        return cls._without_noise(steps, sample_rate, math.inf, poisson_sampling=False)

    @classmethod
    def _without_noise(
        cls, steps: int, sample_rate: float, max_grad_norm: float, *, poisson_sampling: bool
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
        )


def epsilon_from_ledger(
    accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float
) -> tuple[float, str]:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps; returns (epsilon, accountant used)."""
    if steps == 0:
        return 0.0, accountant
    if accountant == "prv":
        try:
            eps = _epsilon(PRVAccountant(), noise_multiplier, sample_rate, steps, delta)
            if math.isfinite(eps) and eps >= 0:
                return eps, "prv"
        except Exception:  # noqa: BLE001 - PRV's numerical failures have several exception types
            pass
        accountant = "rdp"
    return _epsilon(RDPAccountant(), noise_multiplier, sample_rate, steps, delta), accountant


def _epsilon(acc: Any, sigma: float, q: float, steps: int, delta: float) -> float:
    acc.history = [(sigma, q, steps)]
    return float(acc.get_epsilon(delta=delta))


def make_ledger(
    *,
    epsilon_target: float,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    max_grad_norm: float,
    accountant: str,
) -> Ledger:
    eps, used = epsilon_from_ledger(accountant, noise_multiplier, sample_rate, steps, delta)
    eps_rdp, _ = epsilon_from_ledger("rdp", noise_multiplier, sample_rate, steps, delta)
    return Ledger(
        epsilon_target=epsilon_target,
        epsilon_spent=eps,
        epsilon_rdp=eps_rdp,
        delta=delta,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        max_grad_norm=max_grad_norm,
        accountant=used,
        accountant_requested=accountant,
        poisson_sampling=True,
    )


@dataclass(frozen=True)
class AuditRow:
    """One DP trial's reported epsilon next to the epsilon recomputed from its ledger."""

    reported: float
    recomputed: float
    recomputed_rdp: float
    target: float
    accountant: str
    problem: str  # "" when the ledger is consistent

    @property
    def ok(self) -> bool:
        return not self.problem


def audit_ledger(ledger: dict[str, Any], *, rel_tol: float = 1e-6) -> AuditRow:
    """Recompute epsilon from (sigma, q, steps, delta) with the ledger's accountant.

    A problem is reported when the stored epsilon is below the recomputed one (the privacy
    cost was understated) or above the target (the run spent more than it was allowed).
    """
    acc = ledger["accountant"]
    sigma, q, steps, delta = (
        float(ledger["noise_multiplier"]),
        float(ledger["sample_rate"]),
        int(ledger["steps"]),
        float(ledger["delta"]),
    )
    recomputed, _ = epsilon_from_ledger(acc, sigma, q, steps, delta)
    rdp, _ = epsilon_from_ledger("rdp", sigma, q, steps, delta)
    reported, target = float(ledger["epsilon_spent"]), float(ledger["epsilon_target"])
    problem = ""
    if reported < recomputed * (1 - rel_tol):
        problem = f"reported epsilon {reported:.6g} is below the recomputed {recomputed:.6g}"
    elif reported > target * (1 + rel_tol):
        problem = f"reported epsilon {reported:.6g} exceeds its target {target:.6g}"
    return AuditRow(reported, recomputed, rdp, target, acc, problem)
