"""A site's side of a round: its randomness and its local DP-SGD update of the global model
(the same training path as a single-site trial), with the accounting checked each round.

Separate from the coordinator: this is the code that runs where the site's images are (as a Ray
task in a sweep); it receives a global model and a plan and returns weights and counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from privdom_ray import privacy
from privdom_ray.cache import SplitData, load_split
from privdom_ray.config import TrialSpec
from privdom_ray.federated.plan import SitePlan, federation_of, stream_seed
from privdom_ray.models import build_model
from privdom_ray.train.data import _unwrap
from privdom_ray.train.epochs import (
    Randomness,
    loss_weights,
    prepare_training,
    train_epoch,
)
from privdom_ray.train.patients import _sample_rate


@dataclass(frozen=True)
class TaskTiming:
    """When a site task ran (for the sweep's efficiency benchmark, benchmarks/bench_sweep.py):
    wall-clock start (time.time()), wall seconds, and the process's CPU seconds (a site's
    compute even when sites share CPUs)."""

    started: float = 0.0
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    @classmethod
    def since(cls, started: float, t0: float, c0: float) -> TaskTiming:
        return cls(started, time.perf_counter() - t0, time.process_time() - c0)

    @property
    def interval(self) -> list[float]:
        return [self.started, self.started + self.seconds]


def _clock() -> tuple[float, float, float]:
    return time.time(), time.perf_counter(), time.process_time()


@dataclass(frozen=True)
class SiteUpdate:
    """What a site sends back after local training: weights and accounting numbers only (no
    training loss or other training statistic for DP trials: it would leave un-noised)."""

    name: str
    state: dict[str, Tensor]  # on the CPU
    steps: int
    sample_rate: float
    noise_multiplier: float
    # non-private trials only: the round's mean physical-batch loss (NaN for DP trials)
    train_loss: float
    # the released loss weights (DP: the noised label counts, covered by the site's epsilon)
    pos_weight: tuple[float, ...] = ()
    loss_weights: str = ""
    timing: TaskTiming = field(default_factory=TaskTiming)


def site_randomness(spec: TrialSpec, site: str, key: str, round: int, device) -> Randomness:
    """A site's generators for one round, from its key (secret for DP trials). The count
    release uses one stream for all rounds, so every round re-derives the same release."""

    def gen(stream: str, rnd: int = round, dev: str | torch.device = "cpu") -> torch.Generator:
        return torch.Generator(device=torch.device(dev)).manual_seed(
            stream_seed(key, site, rnd, stream)
        )

    return Randomness(
        sampling=gen("sample"),
        noise=gen("noise", dev=device),
        release=gen("counts", rnd=0),
        augment=gen("augment"),  # secret too: see train.Randomness
        secret=spec.is_private,
    )


def local_update(
    spec: TrialSpec,
    plan: SitePlan,
    global_state: Mapping[str, Tensor],
    train: SplitData,
    *,
    round: int,
    key: str,
    device: str = "cpu",
    memory_budget_mb: int = 2048,
    channels_last: bool = False,
) -> SiteUpdate:
    """Train the global model for ``local_epochs`` epochs on this site's training split.

    The NAdam optimizer (and, for DP, the Opacus engine) are fresh each round: sites are
    stateless between rounds, which keeps checkpoints small and resumes exact. ``key`` seeds
    the round's streams (:func:`site_randomness`). A DP site runs with its planned sigma and
    raises if the accountant saw anything but exactly (sigma, q, planned steps).
    """
    started, t0, c0 = _clock()
    fed = federation_of(spec)
    if not plan.active:
        raise ValueError(f"site {plan.name!r} has weight 0 and is not trained")
    if len(train) != plan.n_train:
        raise ValueError(
            f"site {plan.name!r} has {len(train)} training images, planned with "
            f"{plan.n_train}; the data changed since planning"
        )
    dev = torch.device(device)
    torch.manual_seed(stream_seed(str(spec.seed), plan.name, round, "torch"))
    model = build_model(spec.model, num_outputs=train.labels.shape[1]).to(dev)
    model.load_state_dict(dict(global_state))
    optimizer = torch.optim.NAdam(model.parameters(), lr=spec.training.lr)
    rng = site_randomness(spec, plan.name, key, round, dev)
    weights = loss_weights(spec, train, rng.release, plan.count_noise_multiplier)
    t = prepare_training(
        spec, model, optimizer, train, randomness=rng, weights=weights.tensor(),
        noise_multiplier=plan.noise_multiplier if spec.is_private else None, device=device,
        memory_budget_mb=memory_budget_mb, channels_last=channels_last,
    )  # fmt: skip
    losses: list[float] = []
    for _ in range(fed.local_epochs):
        losses += train_epoch(t)
    if t.engine is not None:
        steps = t.accounted_steps()
        _check_accounting(plan, t.engine.accountant.history, _sample_rate(t.loader))
    else:
        steps = fed.local_epochs * len(t.loader)
    if steps != plan.steps_per_round:
        raise RuntimeError(
            f"site {plan.name!r} took {steps} steps in round {round}, planned "
            f"{plan.steps_per_round}"
        )
    state = {  # NCHW whatever the training layout
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in _unwrap(t.model).state_dict().items()
    }
    return SiteUpdate(
        name=plan.name,
        state=state,
        steps=steps,
        sample_rate=plan.sample_rate,
        noise_multiplier=plan.noise_multiplier,
        train_loss=math.nan if spec.is_private or not losses else float(np.mean(losses)),
        pos_weight=weights.values,
        loss_weights=weights.source,
        timing=TaskTiming.since(started, t0, c0),
    )


def _check_accounting(plan: SitePlan, history: list, loader_rate: float) -> None:
    """Raise unless Opacus sampled at q_s and accounted exactly (sigma_s, steps) this round.

    Opacus accounts at 1/len(loader) = 1/int(1/q_s), which is q_s except for the few batch
    counts where int(1/q_s) rounds down (then slightly above q_s: conservative)."""
    expected = [
        (plan.noise_multiplier, 1 / privacy.steps_per_epoch(plan.sample_rate), plan.steps_per_round)
    ]
    seen = [(float(s), float(q), int(n)) for s, q, n in history]
    if loader_rate != plan.sample_rate or seen != expected:
        raise RuntimeError(
            f"site {plan.name!r}: accounting drifted from the plan: sampled at {loader_rate} "
            f"(planned {plan.sample_rate}), accountant saw (sigma, q, steps) = {seen}, "
            f"expected {expected}"
        )


def site_update_from_cache(
    spec: TrialSpec,
    plan: SitePlan,
    cache_path: str,
    global_state: Mapping[str, Tensor],
    *,
    threads: int = 1,
    **kwargs: Any,
) -> SiteUpdate:
    """:func:`local_update` on the site's cached training split (runs where the data is);
    ``kwargs`` are local_update's (round, key, device, memory settings)."""
    torch.set_num_threads(max(1, threads))
    return local_update(spec, plan, global_state, load_split(cache_path, "train"), **kwargs)
