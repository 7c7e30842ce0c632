"""Audit twins: a one-run canary audit of a cell (``audit:`` in the grid).

A twin trains exactly like the cell it audits (same source, epsilon, seed, hyper-parameters
and mechanism) but with m canaries in its training set, each included by a secret fair coin;
afterwards the auditor guesses the coins from the twin's output, and the correct guesses give
a 95% lower bound on epsilon (``audit_bound``). Its model is never released and never enters
the transfer matrices; its audit result is attached to the audited cell's rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from privdom_ray.config import AuditSpec, TrialSpec
from privdom_ray.kinds import PlanContext, TrialKind, register
from privdom_ray.kinds.standard import single_site


def plan(ctx: PlanContext) -> Iterator[TrialSpec]:
    audit = ctx.spec.audit
    if audit is None:
        return
    twin = AuditSpec(audit.canaries, audit.kind, audit.auditor_seed)
    for source in audit.sources or ctx.spec.sources:
        for epsilon in audit.epsilons or ctx.spec.epsilons:
            for seed in ctx.spec.seeds:
                cell = single_site(ctx, source, epsilon, seed, "audit")
                yield dataclasses.replace(cell, audit=twin)


def audited(twin: TrialSpec) -> TrialSpec:
    """The standard cell a twin audits (its key names the rows the result is attached to)."""
    return dataclasses.replace(twin, variant="standard", audit=None).with_key()


register(
    TrialKind(
        name="audit",
        plan=plan,
        trainer="privdom_ray.trial:train_audit_twin",
        description="a cell's twin with m canaries: a one-run lower bound on its epsilon",
        evaluated=False,
        in_matrices=False,
        released=False,
    )
)
