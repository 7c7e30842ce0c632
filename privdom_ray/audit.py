"""``launch.py audit``: every DP ledger of a sweep, recomputed and checked against the record.

Recomputing epsilon from a ledger catches a wrong epsilon for the ledger's numbers; it cannot
catch wrong numbers. So each ledger is also checked against what the trial's own record says
it did: the sample rate must be the sampler's 1/ceil(N/B) for the recorded training set, the
steps epochs x int(1/q) and equal to the steps its accountant saw, and a label-count release
must be in the ledger exactly when the loss weights came from the private counts. A ledger
written before noise and sampling were secret is void and flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from privdom_ray.privacy import RunRecord, audit_ledger, check_against_record
from privdom_ray.store import DamagedRecord, TrialRecord, TrialStore


@dataclass(frozen=True)
class AuditLine:
    """One audited ledger (or a trial that could not be audited)."""

    key: str
    site: str = ""
    accountant: str = ""
    target: float = math.nan
    reported: float = math.nan
    recomputed: float = math.nan
    recomputed_rdp: float = math.nan
    problem: str = ""
    checked: bool = True

    @property
    def ok(self) -> bool:
        return not self.problem

    def line(self) -> str:
        return (
            f"{self.key:14s} {self.site or '-':11s} {self.accountant:11s} {self.target:<9.4g} "
            f"{self.reported:<9.6g} {self.recomputed:<11.6g} {self.recomputed_rdp:<9.4g} "
            f"{'ok' if self.ok else self.problem}"
        )


def audit_output(output: Path) -> list[AuditLine]:
    """Audit lines for every DP ledger under ``output`` (non-private trials are skipped; a
    damaged trial folder is a problem of its own)."""
    store = TrialStore(output)
    lines: list[AuditLine] = []
    for key in store.trial_keys():
        if not store.is_trained(key):
            continue
        try:
            record = store.read(key)
        except DamagedRecord as exc:
            lines.append(AuditLine(key[:12], problem=f"damaged: {exc.path.name}: {exc.reason}"))
            continue
        lines.extend(audit_trial(store, record))
    return lines


def audit_trial(store: TrialStore, record: TrialRecord) -> list[AuditLine]:
    """Every ledger the trial's spec says it must have (a DP trial's, or each trained site's
    of a federation, and the federation's summary), checked against the spec and the record;
    for an audit twin also its empirical lower bound against the epsilon it spent."""
    out = [] if record.spec.audit is None else [_canary_line(record)]
    if not record.spec.is_private:
        return out  # non-private: no guarantee claimed, nothing to audit
    for site, ledger, run in _ledgers_and_runs(store, record):
        if ledger is None:
            out.append(AuditLine(record.key[:12], site, problem="no ledger for this site"))
            continue
        row = audit_ledger(ledger)
        problem = row.problem or check_against_record(ledger, run)
        if ledger["accountant"] == "none":
            problem = "a DP trial's ledger claims no accountant (epsilon = inf)"
        out.append(
            AuditLine(
                record.key[:12],
                site,
                row.accountant,
                row.target,
                row.reported,
                row.recomputed,
                row.recomputed_rdp,
                problem,
            )  # fmt: skip
        )
    if record.spec.federation is not None:
        out.append(_summary_line(record))
    return out


def _summary_line(record: TrialRecord) -> AuditLine:
    """A federation's summary ledger (the table's) must be its largest-epsilon site's."""
    sites = [v for v in record.ledger.get("sites", {}).values() if int(v.get("steps", 0)) > 0]
    summary = {k: v for k, v in record.ledger.items() if k not in ("sites", "scope", "site")}
    worst = max(sites, key=lambda v: float(v["epsilon_spent"]), default=None)
    same = worst is not None and all(
        worst.get(k) == v for k, v in summary.items() if k not in ("scope", "site")
    )
    problem = "" if same else "the summary ledger is not the largest-epsilon site's ledger"
    return AuditLine(record.key[:12], "(summary)", str(record.ledger.get("accountant")),
                     problem=problem)  # fmt: skip


def _canary_line(record: TrialRecord) -> AuditLine:
    """An audit twin's one-run bound, recomputed from its counts (kinds/audit.py): above the
    epsilon its mechanism spent (at 95% confidence) means the DP implementation or its
    accounting is broken."""
    from privdom_ray.kinds.audit import check_twin

    c = check_twin(record.info.get("audit"), record.ledger, record.spec.name)
    return AuditLine(
        record.key[:12], "canaries", c.kind, float(record.ledger["epsilon_target"]), c.spent,
        c.lower, c.epsilon_max, c.problem, checked=c.checked,
    )  # fmt: skip


def _ledgers_and_runs(
    store: TrialStore, record: TrialRecord
) -> list[tuple[str, dict | None, RunRecord]]:
    """(site, ledger or None when missing, what the spec and record say the run did)."""
    spec, info = record.spec, record.info
    common = dict(
        logical_batch=spec.training.logical_batch,
        epochs=spec.training.epochs,  # a federation's: rounds x local epochs
        loss_weights=spec.loss_weight_source,
        epsilon_target=spec.epsilon,
        max_grad_norm=spec.training.max_grad_norm,
        privacy_unit=spec.training.privacy_unit,
    )
    if spec.federation is None:
        history = store.history(record.key)
        run = RunRecord(
            units=int(info.get("units", info.get("n_train", 0))),
            steps_taken=int(history[-1]["steps"]) if history else 0,
            delta=spec.delta,
            **common,
        )
        return [("", record.ledger, run)]
    recorded = {s["name"]: s for s in info.get("sites", [])}
    ledgers = record.ledger.get("sites", {})
    out = []
    for site in spec.federation.sites:
        if site.weight <= 0:
            continue  # a weight-0 site never trained and released nothing
        rec = recorded.get(site.name, {})
        run = RunRecord(
            units=int(rec.get("n_train", 0)),
            steps_taken=int(rec.get("steps", -1)),
            delta=site.delta,
            **common,
        )
        out.append((site.name, ledgers.get(site.name), run))
    return out
