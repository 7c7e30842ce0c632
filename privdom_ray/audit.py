"""``launch.py audit``: every DP ledger of a sweep recomputed from its trial's spec, never trusted.

A ledger is a claim. Recomputing epsilon from the ledger's own numbers only catches a wrong
epsilon for those numbers (editing sigma AND epsilon_spent passed). So for every DP ledger
(single-site trials, each site of a federation and its summary, audit twins) the audit
rebuilds the ledger the trainer would have written, from the trial's spec and the recorded
training-set size alone (:func:`privacy.expected_ledger`: the same calibration of sigma on the
exact step count, the count release's sigma from its budget share, the same accountant), and
names every field that differs. It then recomputes epsilon from the ledger's mechanisms with
the recorded accountant AND Google's independent PLD accountant, and compares the ledger
with the training history (the steps the run's accountant saw, the epsilon it reported per
epoch or round). A ledger written before noise and sampling were secret is void.

The audit reads the ledger as it is stored (``TrialStore.ledger_document``: the bytes checked
against the trial's ``done``, parsed as JSON and nothing more), never the typed ``Ledger`` the
rest of the code reads: a typed parse drops unknown fields and defaults missing ones, and those
are exactly what the audit must name. The run record (training-set sizes, versions) is read
typed; a record whose fields are not of their type is a damaged trial.

Calibrating sigma with PRV costs seconds, so each distinct (epsilon, delta, q, steps) is
calibrated once per audit (sites of equal size and audit twins share their cell's).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privdom_ray.folder import PlanDamaged, SweepFolder
from privdom_ray.kinds import UnknownKind, kind_of
from privdom_ray.numeric import number_or_nan
from privdom_ray.privacy import (
    MECHANISM_VERSION,
    ExpectedRun,
    check_epsilon,
    expected_ledger,
    ledger_differences,
    pld_epsilon,
)
from privdom_ray.selection.untuned import DP_SELECTION, check_validation
from privdom_ray.store import DamagedRecord, TrialRecord, TrialStore

#: Recomputed sigma and epsilon must match a ledger written with the installed Opacus to
#: this relative tolerance; with another Opacus version (an upgrade) to the calibration's own
#: tolerance, so that finished sweeps stay auditable.
SAME_VERSION_TOL = 1e-9
OTHER_VERSION_TOL = 0.01
N_LABELS = 5  # manifest.LABELS (not imported: it pulls in pandas for one number)


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
    counts = _cache_counts(store.output)
    lines: list[AuditLine] = []
    for key in store.trial_keys():
        if not store.is_trained(key):
            continue
        try:
            record = store.read(key)
        except DamagedRecord as exc:
            lines.append(AuditLine(key[:12], problem=f"damaged: {exc.path.name}: {exc.reason}"))
            continue
        try:
            lines.extend(audit_trial(store, record, counts))
        except UnknownKind as exc:  # a newer version's trial: named, never judged or moved
            lines.append(AuditLine(key[:12], problem=str(exc)))
    return lines


def audit_trial(
    store: TrialStore, record: TrialRecord, counts: Mapping[str, Mapping[str, int]] | None = None
) -> list[AuditLine]:
    """Every ledger the trial's spec says it must have (a DP trial's, or each site's of a
    federation, and the federation's summary), each rebuilt from the spec and compared; for
    an audit twin also its empirical lower bound against the epsilon it spent. ``counts``:
    the cache's training-set sizes (:func:`_cache_counts`; read here when not given)."""
    try:
        document = store.ledger_document(record.key)  # the claim as stored, verified
    except DamagedRecord as exc:
        return [AuditLine(record.key[:12], problem=f"damaged: {exc.path.name}: {exc.reason}")]
    canaries = kind_of(record.spec).canary_check(record, document)
    out = [] if canaries is None else [_canary_line(record, canaries)]
    rekeyed = record.spec.with_key().key
    if rekeyed != record.key:  # the spec no longer hashes to its folder: edited after training
        out.append(AuditLine(record.key[:12], problem=(
            f"trial.json's spec hashes to {rekeyed[:12]}, not to its folder's key: the spec "
            "was edited after training, so nothing recomputed from it can be trusted")))  # fmt: skip
    if not record.spec.is_private:  # no guarantee, and its ledgers must not claim one
        claims = [led for led in [document, *_sites(document).values()]
                  if str(led.get("accountant")) != "none"
                  or math.isfinite(number_or_nan(led.get("epsilon_spent", math.inf)))]  # fmt: skip
        if claims:
            out.append(AuditLine(record.key[:12], problem=(
                "a trial trained without DP (its spec's epsilon is inf) has a ledger claiming "
                f"accountant {claims[0].get('accountant')!r}, epsilon_spent "
                f"{claims[0].get('epsilon_spent')!r}")))  # fmt: skip
        return out
    own = kind_of(record.spec).ledger_check(record, document)
    if own is not None:  # a tuned cell: its kind recomputes the selection's bound
        problems, recomputed = own
        (_, _, run), *_ = expected_runs(record, document)  # its units, recounted
        counts = _cache_counts(store.output) if counts is None else counts
        problems = [p for p in (*problems, _recount_problem(record, "", run, counts)) if p]
        out.append(AuditLine(
            record.key[:12], "", str(document.get("accountant", "")), record.spec.epsilon,
            number_or_nan(document.get("epsilon_spent")), recomputed, math.nan,  # no PLD of K runs
            "; ".join(problems)))  # fmt: skip
        return out
    try:
        history = store.history(record.key)
    except DamagedRecord as exc:
        return [*out, AuditLine(record.key[:12], problem=f"damaged: {exc.path.name}: {exc.reason}")]
    tol, note = _tolerance(record.info.versions)
    counts = _cache_counts(store.output) if counts is None else counts
    for site, found, run in expected_runs(record, document):
        if found is None:
            out.append(AuditLine(record.key[:12], site, problem="no ledger for this site"))
            continue
        line = _ledger_line(record, site, found, run, tol, note)
        recount = _recount_problem(record, site, run, counts)
        if recount:
            line = dataclasses.replace(
                line, problem="; ".join(p for p in (line.problem, recount) if p)
            )
        out.append(line)
    out += _history_lines(record, document, history)
    return out


def _cache_counts(output: Path) -> dict[str, dict[str, int]]:
    """{data fingerprint: {"image": training images, "patient": training patients}} of the
    cache entries of the output (:func:`_cache_metas`), read from their rows: the
    training-set size the audit recomputes q from, without trusting the trial record.
    Entries gone are not recounted."""
    import pandas as pd

    out: dict[str, dict[str, int]] = {}
    for meta in _cache_metas(output):
        try:
            fingerprint = json.loads(meta.read_text())["fingerprint"]
            rows = pd.read_parquet(
                meta.parent / "rows.parquet", columns=["split", "ok", "patient_id"]
            )
        except (OSError, ValueError, KeyError):
            continue  # an unreadable entry: the cache's own checks deal with it
        train = rows[(rows["split"] == "train") & rows["ok"].astype(bool)]
        out[str(fingerprint)] = {
            "image": len(train), "patient": int(train["patient_id"].astype(str).nunique()),
        }  # fmt: skip
    return out


def _cache_metas(output: Path) -> list[Path]:
    """The ``meta.json`` of every cache entry under ``<output>/cache`` and of those the sweep's
    ``plan.json`` names (a grid's own cache_dir elsewhere)."""
    out = SweepFolder(output)
    metas = set(out.cache.glob("*/meta.json"))
    try:
        plan = out.read_plan()
    except PlanDamaged:
        plan = None
    for entry in plan.cache_paths(out.root).values() if plan is not None else ():
        meta = entry / "meta.json"  # an absolute entry stays absolute
        if meta.is_file():
            metas.add(meta)
    return sorted(metas)


def _recount_problem(
    record: TrialRecord, site: str, run: ExpectedRun, counts: Mapping[str, Mapping[str, int]]
) -> str:
    """The recorded training-set size against a recount of the site's cache entry."""
    spec = record.spec
    members = kind_of(spec).members(spec)
    if not members:
        fingerprint = spec.data_fingerprint
    else:
        named = [s for s in members if s.name == site]
        if not named:
            return ""  # the summary: its site's line recounts
        fingerprint = named[0].data_fingerprint
    recount = counts.get(fingerprint, {}).get(run.privacy_unit)
    if recount is None or recount == run.units:
        return ""
    return (f"units: the trial record says {run.units} training {run.privacy_unit}s, its cache "
            f"entry counts {recount}")  # fmt: skip


def _ledger_line(
    record: TrialRecord, site: str, found: Mapping[str, Any], run: ExpectedRun, tol: float,
    note: str,
) -> AuditLine:  # fmt: skip
    """One ledger against its recomputation: every differing field named."""
    key = record.key[:12]
    if (_int(found.get("mechanism_version")) or 0) < MECHANISM_VERSION:
        return AuditLine(key, site, str(found.get("accountant", "")), problem=(
            f"void (mechanism_version {found.get('mechanism_version', 0)} < "
            f"{MECHANISM_VERSION}): trained before noise and Poisson sampling were secret (they followed the "
            "published seed), so this model has no valid guarantee; re-run the sweep to retrain it"
        ))  # fmt: skip
    if run.active and run.units <= 0:
        return AuditLine(key, site, str(found.get("accountant", "")), problem=(
            "the trial record names no training-set size (units / n_train): nothing to "
            "recompute sigma from"))  # fmt: skip
    expected = expected_ledger(run)
    validation = found.get("validation")  # an untuned DP trial's releases on V (or absent)
    if validation is not None:
        found = {k: v for k, v in found.items() if k != "validation"}
    problems = ledger_differences(found, expected, rel_tol=tol)
    if validation is not None:
        problems += _validation_problems(site, validation, found, expected, tol)
    if not site:
        problems += _selection_agrees(record, validation is not None)
    if run.active:
        problems += check_epsilon(found)
    if str(found.get("accountant")) == "none":
        problems.insert(0, "a DP trial's ledger claims no accountant (epsilon = inf)")
    return AuditLine(
        key, site, str(found.get("accountant", "")), run.epsilon_target,
        number_or_nan(found.get("epsilon_spent")), expected.epsilon_spent,
        pld_epsilon(expected.mechanisms, run.delta),
        "; ".join(problems) + (f" {note}" if problems and note else ""),
    )  # fmt: skip


def _selection_agrees(record: TrialRecord, has_entry: bool) -> list[str]:
    """trial.json and the ledger must tell the same story about the epoch and thresholds: a
    record naming the DP rule needs the ledger's validation entry (dropped, the site's
    composition would leave its releases out) and no exact validation AUC; a ledger entry on a
    record naming another rule would mark an exact choice as inside epsilon."""
    says_dp = record.info.selection == DP_SELECTION
    if says_dp and not has_entry:
        return ["trial.json says the epoch and thresholds are DP releases, but the ledger has "
                "no validation entry"]  # fmt: skip
    if has_entry and not says_dp:
        return [f"the ledger has a validation entry, but trial.json says the epoch was chosen "
                f"by {record.info.selection!r}"]  # fmt: skip
    if says_dp and record.info.val_macro_auc is not None:
        return ["trial.json holds an exact validation AUC next to a DP choice of the epoch"]
    return []


def _validation_problems(
    site: str, stored: Any, found: Mapping[str, Any], expected: Any, tol: float
) -> list[str]:
    """An untuned DP trial's validation releases (epoch, thresholds) recomputed: their noise
    from the expected training epsilon (spec and N_train, never the ledger's), their own
    epsilon within the ledger's (``selection.untuned.check_validation``). A ledger without the
    entry (written before) is valid: its epoch and thresholds are outside the guarantee."""
    if site:
        return [f"validation releases in a federation site's ledger ({site}): no trainer "
                "writes them"]  # fmt: skip
    return check_validation(
        stored, epsilon_train=expected.epsilon_spent,
        epsilon_spent=number_or_nan(found.get("epsilon_spent")), delta=expected.delta,
        n_labels=N_LABELS, rel_tol=tol,
    )  # fmt: skip


def expected_runs(
    record: TrialRecord, document: Mapping[str, Any]
) -> Iterator[tuple[str, Mapping[str, Any] | None, ExpectedRun]]:
    """(site, stored ledger or None when missing, what the spec and record say it must be),
    ``document``: the trial's stored ledger (:meth:`TrialStore.ledger_document`):
    one for a single-site trial (site ""), one per federation site plus the federation's
    summary (site "(summary)"), which must be its largest-epsilon site's ledger."""
    spec, info = record.spec, record.info
    weights = spec.loss_weight_source
    common = dict(
        epsilon_target=spec.epsilon,
        logical_batch=spec.training.logical_batch,
        epochs=spec.training.epochs,
        max_grad_norm=spec.training.max_grad_norm,
        accountant=spec.training.accountant,
        count_fraction=spec.training.pos_weight_budget if weights == "dp_counts" else 0.0,
        loss_weights=weights,
        pos_weight=_expected_pos_weight(record),
        n_labels=N_LABELS,
        initialization=spec.init,
    )
    members = kind_of(spec).members(spec)
    if not members:
        units = info.units if info.units is not None else info.n_train or 0
        run = ExpectedRun(
            delta=spec.delta, units=units, privacy_unit=spec.training.privacy_unit, **common
        )
        yield "", document, run
        return
    recorded = {n: s.n_train for n, s in kind_of(spec).member_runs(info.part).items()}
    ledgers = _sites(document)
    runs = []
    for site in members:
        run = ExpectedRun(
            delta=site.delta, units=recorded.get(site.name) or 0,
            scope="site", site=site.name, active=site.weight > 0, federated=True, **common,
        )  # fmt: skip
        runs.append(run)
        yield site.name, ledgers.get(site.name), run
    active = [r for r in runs if r.active]
    if active:  # the summary: the site ledger with the largest epsilon, as the table shows it
        worst = max(active, key=lambda r: expected_ledger(r).epsilon_spent)
        summary = {k: v for k, v in document.items() if k != "sites"}
        yield "(summary)", summary, worst


def _expected_pos_weight(record: TrialRecord) -> tuple[float, ...] | None:
    """The loss weights a trial used when they are not a release: public, none or fixed."""
    source = record.spec.loss_weight_source
    if source == "public":
        return tuple(float(v) for v in record.spec.public_pos_weight)
    if source == "none":
        return (1.0,) * N_LABELS
    if source == "fixed":
        return tuple(float(v) for v in record.spec.training.pos_weight)
    return None  # dp_counts: noised values, only their number and range are checkable


def _history_lines(
    record: TrialRecord, document: Mapping[str, Any], history: list[dict[str, Any]]
) -> list[AuditLine]:
    """The training history against the stored ledger ``document``: the steps the run's
    accountant counted and the epsilon it reported after the last epoch (round) must be the
    ledger's."""
    key = record.key[:12]
    if not history:
        return [AuditLine(key, "history", problem="history.json holds no epoch")]
    last = history[-1]
    problems = []
    if not kind_of(record.spec).members(record.spec):
        ledgers = {"": document}
        want_steps = _int(document.get("steps"))
        if _int(last.get("steps")) != want_steps:
            problems.append(
                f"the history counts {last.get('steps')} steps, the ledger {want_steps}"
            )
    else:
        ledgers = _sites(document)
        runs = kind_of(record.spec).member_runs(record.info.part)
        sites = {name: run.steps for name, run in runs.items()}
        for name, led in ledgers.items():
            if sites.get(name) != _int(led.get("steps")):
                problems.append(f"site {name}: the run record counts {sites.get(name)} steps, "
                                f"its ledger {led.get('steps')}")  # fmt: skip
    spent = max((number_or_nan(v.get("epsilon_spent")) for v in ledgers.values()), default=math.nan)
    seen = number_or_nan(last.get("epsilon"))
    if not math.isclose(seen, spent, rel_tol=1e-6):
        problems.append(f"the history's last epsilon {seen:.6g} is not the ledger's "
                        f"epsilon_spent {spent:.6g}")  # fmt: skip
    return [AuditLine(key, "history", problem="; ".join(problems))]


def _tolerance(versions: Mapping[str, str]) -> tuple[float, str]:
    """Exact recomputation when the trial was trained with the installed Opacus; the
    calibration's tolerance otherwise (an upgrade may move its last digits)."""
    trained = str(versions.get("opacus", ""))
    try:
        installed = importlib.metadata.version("opacus")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        installed = ""
    if trained and trained == installed:
        return SAME_VERSION_TOL, ""
    return OTHER_VERSION_TOL, f"(trained with opacus {trained or '?'}, audited with {installed})"


def _canary_line(record: TrialRecord, c: Any) -> AuditLine:
    """An audit twin's one-run bound, recomputed from its counts (``c``: the kind's
    ``canary_check``): above the epsilon its mechanism spent (at 95% confidence) means the DP
    implementation or its accounting is broken."""
    return AuditLine(
        record.key[:12], "canaries", c.kind, record.ledger.epsilon_target, c.spent,
        c.lower, c.epsilon_max, c.problem, checked=c.checked,
    )  # fmt: skip


def _sites(document: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """A stored ledger's per-site ledgers (a federation's); {} when it has none."""
    sites = document.get("sites") or {}
    return dict(sites) if isinstance(sites, Mapping) else {}


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
