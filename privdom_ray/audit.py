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
    """The trial's DP ledgers: a single-site trial's one, or every trained site's."""
    out = []
    for site, ledger, run in _ledgers_and_runs(store, record):
        if ledger["accountant"] == "none":
            continue  # non-private: nothing to audit
        row = audit_ledger(ledger)
        problem = row.problem or check_against_record(ledger, run)
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
            )
        )
    return out


def _ledgers_and_runs(store: TrialStore, record: TrialRecord) -> list[tuple[str, dict, RunRecord]]:
    spec, info = record.spec, record.info
    source = spec.loss_weight_source
    if spec.federation is None:
        history = store.history(record.key)
        run = RunRecord(
            units=int(info.get("units", info.get("n_train", 0))),
            logical_batch=spec.training.logical_batch,
            epochs=spec.training.epochs,
            steps_taken=int(history[-1]["steps"]) if history else 0,
            loss_weights=source,
        )
        return [("", record.ledger, run)]
    sites = {s["name"]: s for s in info.get("sites", [])}
    out = []
    for name, ledger in sorted(record.ledger.get("sites", {}).items()):
        if int(ledger["steps"]) == 0:
            continue  # a weight-0 site never trained
        site = sites.get(name, {})
        run = RunRecord(
            units=int(site.get("n_train", 0)),
            logical_batch=spec.training.logical_batch,
            epochs=spec.training.epochs,  # rounds x local epochs
            steps_taken=int(site.get("steps", -1)),
            loss_weights=source,
        )
        out.append((name, ledger, run))
    return out
