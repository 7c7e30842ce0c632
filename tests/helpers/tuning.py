"""Tuned cells' records built in memory (issue 26): a tuned DP cell as its trainer writes it
(the released model's own mechanisms and its plan's ``selection`` entry), for the guarantee's
and the report's tests."""

from __future__ import annotations

import dataclasses

from helpers.trials import tiny_ledger, tiny_spec
from privdom_ray.config import SearchDomain, TuningConfig
from privdom_ray.kinds import tuning as tuned
from privdom_ray.privacy import Ledger, Mechanism
from privdom_ray.records import RunRecord
from privdom_ray.store import TrialRecord

UNITS = 400  # training images of a tuned cell
SECTION = TuningConfig(
    space=(SearchDomain("lr", "loguniform", (1e-4, 3e-3)),),
    runs=(("distribution", "geometric"), ("mean", 3.0)),
)


def record(spec, ledger: Ledger) -> TrialRecord:
    return TrialRecord(spec.key, spec, ledger, RunRecord(), thresholds=())


def tuned_cell(source: str = "a", epsilon: float = 2.0, seed: int = 0) -> TrialRecord:
    """A tuned DP cell's record: its ledger lists the label counts and DP-SGD at the run
    shape's sigma, epsilon_spent is the plan's bound (accountant rdp), with the selection entry."""
    spec = tiny_spec(source, epsilon, seed, tuning=SECTION)
    plan = tuned.tuning_plan(spec, UNITS)
    assert plan is not None and plan.fixed  # dp_counts: the label counts ride on top
    run = plan.candidates[0]
    mechanisms = (Mechanism("label_counts", *plan.fixed[0][:2], int(plan.fixed[0][2])),
                  Mechanism("dp_sgd", run.noise_multiplier, run.sample_rate, run.steps))  # fmt: skip
    ledger = dataclasses.replace(
        tiny_ledger(epsilon), epsilon_spent=plan.epsilon_total, epsilon_rdp=plan.epsilon_total,
        noise_multiplier=run.noise_multiplier, sample_rate=run.sample_rate, steps=run.steps,
        accountant="rdp", accountant_requested="rdp", mechanisms=mechanisms,
        selection=tuned.selection_entry(plan, SECTION),
    )  # fmt: skip
    return record(spec, ledger)
