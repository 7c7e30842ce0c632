"""A federation's plan: each site's sample rate, steps and noise, fixed before round 1 (a pure
function of the spec and the sites' training-set sizes), and the seeded random streams.

Separate from the rounds because the planner, the trial and the checks need the plan without
training anything.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

from privdom_ray import privacy
from privdom_ray.config import Federation, TrialSpec
from privdom_ray.privacy import NoisePlan


@dataclass(frozen=True)
class SitePlan:
    """One site's training and accounting, fixed before round 1 (a pure function of the spec
    and the site's training-set size). Zero-weight sites are planned but never trained."""

    name: str
    weight: float  # un-normalised FedAvg weight; 0 = not trained, not used for selection
    delta: float
    n_train: int
    # DP: the Poisson rate 1/ceil(N/B); non-private: B/N (informative only, as in run_trial)
    sample_rate: float
    steps_per_round: int  # optimizer steps of one round (local_epochs epochs); 0 if weight 0
    noise_multiplier: float  # 0.0 for non-private trials and zero-weight sites
    count_noise_multiplier: float = 0.0  # the site's label-count release (dp_counts); 0 = none
    rounds: int = 1

    @property
    def active(self) -> bool:
        return self.weight > 0

    def noise_plan(self, steps: int | None = None) -> NoisePlan:
        """The site's mechanisms over ``steps`` DP-SGD steps (default: all rounds)."""
        total = self.rounds * self.steps_per_round if steps is None else steps
        return NoisePlan(
            self.noise_multiplier, self.sample_rate, total, self.count_noise_multiplier
        )


def federation_of(spec: TrialSpec) -> Federation:
    if spec.federation is None:
        raise ValueError(f"trial {spec.key or spec.name!r} is not federated")
    if spec.variant != "standard":
        raise ValueError(f"federated trials have no controls; got variant {spec.variant!r}")
    if spec.training.privacy_unit != "image":
        raise ValueError("federated training protects images; privacy_unit must be 'image'")
    return spec.federation


def plan_sites(spec: TrialSpec, n_train: Mapping[str, int]) -> list[SitePlan]:
    """Resolve every site's sample rate, steps and noise multiplier, in the federation's order.

    sigma_s is calibrated for the site's total steps over all rounds (and its label-count
    release, when its loss weights come from its private counts) with the grid's accountant,
    so after the last round the site has spent at most ``spec.epsilon``.
    """
    fed = federation_of(spec)
    cfg = spec.training
    missing = [s.name for s in fed.sites if s.name not in n_train]
    if missing:
        raise ValueError(f"no training-set size for sites {missing}")
    if not any(s.weight > 0 for s in fed.sites):
        raise ValueError("a federation needs at least one site with a positive weight")
    budget = cfg.pos_weight_budget if spec.loss_weight_source == "dp_counts" else 0.0
    plans = []
    # sites of equal size share (delta, q, steps), hence sigma: calibrate each distinct one once
    # (a PRV calibration takes seconds, and the site slots wait for it)
    noise: dict[tuple[float, float, int], NoisePlan] = {}
    for site in fed.sites:
        n = int(n_train[site.name])
        if site.weight > 0 and n <= 0:
            raise ValueError(f"site {site.name!r} has weight {site.weight} but no training images")
        if spec.is_private:
            rate = privacy.poisson_rate(n, cfg.logical_batch)
            per_epoch = privacy.steps_per_epoch(rate)
        else:
            rate, per_epoch = cfg.logical_batch / max(n, 1), math.ceil(n / cfg.logical_batch)
        steps_per_round = fed.local_epochs * per_epoch if site.weight > 0 else 0
        plan = NoisePlan(0.0, rate, 0)
        if spec.is_private and steps_per_round:
            if site.delta <= 0:
                raise ValueError(f"site {site.name!r}: a DP trial needs delta > 0")
            args = (site.delta, rate, fed.rounds * steps_per_round)
            if args not in noise:
                noise[args] = privacy.calibrate(
                    epsilon=spec.epsilon, delta=site.delta, sample_rate=rate,
                    steps=args[2], accountant=cfg.accountant, count_fraction=budget,
                )  # fmt: skip
            plan = noise[args]
        plans.append(
            SitePlan(
                name=site.name,
                weight=float(site.weight),
                delta=float(site.delta),
                n_train=n,
                sample_rate=rate,
                steps_per_round=steps_per_round,
                noise_multiplier=plan.noise_multiplier,
                count_noise_multiplier=plan.count_noise_multiplier,
                rounds=fed.rounds,
            )
        )
    return plans


def stream_seed(key: str, site: str, round: int, stream: str) -> int:
    """A 63-bit seed from (site key, site name, round, stream name), stable across processes
    and Python versions (sha256, not ``hash``). DP trials' keys are secret (:func:`site_keys`)."""
    text = f"{key}\x1f{site}\x1f{round}\x1f{stream}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)
