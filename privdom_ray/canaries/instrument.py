"""The audit of one attack (:func:`audit_canaries`) and :class:`CanaryInstrument`: an audit
twin's canaries carried by a training run (``train.run_trial``'s ``instrument``).

Separate from the canaries themselves: this is the glue a trial uses (prepare the split, attach
to the optimizer, checkpoint the secret state, turn scores into bounds).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from privdom_ray import audit_bound
from privdom_ray.audit_bound import AuditPower, PowerSetting, RunAudit
from privdom_ray.cache import SplitData
from privdom_ray.canaries.gradient import Fault, GradientCanaries, draw_coins
from privdom_ray.canaries.inputs import (
    InputCanaries,
    input_canary_losses,
    make_input_canaries,
    with_input_canaries,
)

KINDS: tuple[str, ...] = ("gradient", "input")


def audit_canaries(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    kind: str,
    delta: float,
    beta: float = audit_bound.DEFAULT_BETA,
    diagnostics: bool = True,
) -> audit_bound.AuditResult:
    """The one-run audit of one attack: higher score = guess "in" (gradient scores as they are;
    for input canaries pass ``-losses``). See ``audit_bound.audit`` for the bound and grid."""
    if kind not in KINDS:
        raise ValueError(f"unknown canary kind {kind!r}; known: {', '.join(KINDS)}")
    return audit_bound.audit(
        scores, included, delta=delta, beta=beta, kind=kind, diagnostics=diagnostics
    )


# --------------------------------------------------------------------------------------------
# An audit twin's canaries, carried by a training run (train.run_trial's ``instrument``)
# --------------------------------------------------------------------------------------------


class CanaryInstrument:
    """An audit twin's canaries in a training run: input canaries join the training split
    (``prepare``), gradient canaries attach to the optimizer (``attach``). The coins, the
    per-step draws and the scores are secret: they live in the private checkpoint only, and
    the twin keeps just the audit's result.

    ``units`` and ``sample_rate`` are the audited cell's (the trial's training set WITHOUT
    canaries): the Poisson rate and, for input canaries, the expected batch size that the DP
    optimizer divides by stay what they would be without them, so nothing the released run
    computes depends on how many coins came up.

    ``replay_noise``: the generator the public seed gives a build's noise (the replay attack,
    DP gradient twins). ``fault``: a deliberately broken build (tests and benchmarks only).
    """

    def __init__(
        self,
        *,
        count: int,
        kind: str,
        auditor_seed: int,
        units: int,
        logical_batch: int,
        max_grad_norm: float,
        replay_noise: torch.Generator | None = None,
        fault: Fault | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown canary kind {kind!r}; known: {', '.join(KINDS)}")
        self.count, self.kind, self.auditor_seed = count, kind, auditor_seed
        self.units, self.logical_batch, self.max_grad_norm = units, logical_batch, max_grad_norm
        self.replay_noise, self.fault = replay_noise, fault
        self.coins: np.ndarray | None = None
        self.generator: torch.Generator | None = None
        self.gradient: GradientCanaries | None = None
        self.inputs: InputCanaries | None = None
        self._saved: dict | None = None

    def prepare(self, train: SplitData, generator: torch.Generator) -> SplitData:
        """Draw the coins (unless restored) and, for input canaries, append the included ones."""
        self.generator = generator
        if self.coins is None:
            self.coins = draw_coins(self.count, generator)
        if self.kind != "input":
            return train
        size = int(train.images.shape[1])
        self.inputs = make_input_canaries(self.count, size, self.auditor_seed)
        return with_input_canaries(train, self.inputs, self.coins)

    def attach(self, optimizer: torch.optim.Optimizer, sample_rate: float) -> None:
        assert self.coins is not None and self.generator is not None, "prepare() first"
        private = isinstance(optimizer, DPOptimizer)
        if self.fault is not None and private:
            self.fault.apply(optimizer)
        if self.kind == "input":
            if private:  # divide by the cell's expected batch, not one that counts the coins
                optimizer.expected_batch_size = int(self.units * sample_rate)
            return
        extra = {} if private else dict(
            max_grad_norm=self.max_grad_norm, expected_batch_size=self.logical_batch
        )  # fmt: skip
        self.gradient = GradientCanaries.attach(
            optimizer, count=self.count, sample_rate=sample_rate, generator=self.generator,
            auditor_seed=self.auditor_seed, included=self.coins,
            known_noise=self.replay_noise if private else None, **extra,
        )  # fmt: skip
        if self._saved is not None:
            self.gradient.load_state_dict(self._saved)

    def result(
        self,
        model: nn.Module,
        *,
        delta: float,
        epsilon_spent: float = math.inf,
        device: str = "cpu",
        power_runs: int = 24,
    ) -> RunAudit:
        """Every attack's scores against the secret coins (gradient canaries of a DP run: the
        plain and the replayed likelihood ratios; of a plain run: the released sums; input
        canaries: minus the final model's loss on each), Bonferroni over the attacks; for DP
        gradient twins also the noise check and the power (``audit_bound.audit_power``,
        ``power_runs`` simulated runs; 0 = none) against ``epsilon_spent``."""
        assert self.coins is not None
        scores, score = self._scores(model, device)
        audit = audit_bound.run_audit(scores, self.coins, delta=delta, kind=self.kind, score=score)
        g = self.gradient
        if score != "llr" or g is None:
            return audit
        audit = dataclasses.replace(audit, noise=g.noise_check())
        if power_runs < 1 or not math.isfinite(epsilon_spent):
            return audit
        opt = g.optimizer
        setting = PowerSetting(
            m=self.count, sample_rate=g.sample_rate, steps=g.steps,
            noise_multiplier=float(opt.noise_multiplier), epsilon=float(epsilon_spent),
            delta=delta, beta=audit.beta, tests=len(scores),
        )  # fmt: skip
        return dataclasses.replace(audit, power=_power(setting, power_runs))

    def _scores(self, model: nn.Module, device: str) -> tuple[dict[str, np.ndarray], str]:
        if self.kind == "input":
            assert self.inputs is not None
            return {"standard": -input_canary_losses(model, self.inputs, device=device)}, "loss"
        g = self.gradient
        assert g is not None
        if not g.private or float(g.optimizer.noise_multiplier) <= 0:
            return {"standard": g.scores()}, "sum"
        scores = {"standard": g.llr_scores()}
        if g.known_noise is not None:
            scores["replay"] = g.replay_scores()
        return scores, "llr"

    def state_dict(self) -> dict[str, object]:
        return {
            "coins": [] if self.coins is None else self.coins.tolist(),
            "gradient": None if self.gradient is None else self.gradient.state_dict(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.coins = np.asarray(state["coins"], dtype=bool)
        self._saved = state["gradient"]  # type: ignore[assignment]


@functools.lru_cache(maxsize=8)
def _power(setting: PowerSetting, runs: int) -> AuditPower:
    """Twins of one sweep often share their shapes (sites of similar size): simulate once per
    worker process."""
    return audit_bound.audit_power(setting, runs=runs)
