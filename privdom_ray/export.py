"""``launch.py export``: the shareable outputs of a sweep, each value marked, and nothing else.

The privacy boundary (docs/privacy.md, "What may leave"): the tables, a report drawn from them, and
the released weights of DP models with their ledgers and cards may leave the data owner.
Every column of every exported parquet file carries its privacy class in its field metadata
(``results.PRIVACY_CLASSES``); columns of the home-only classes (training statistics, timing,
data identifiers) and, unless ``--with-audit``, the audit twins' columns stay home. Every row
says what covers it (column ``guarantee``: the model's epsilon, or "no guarantee: trained
without DP"), and ``guarantees.parquet``, the report, PRIVACY.md and every model card state
for each training set the epsilon of everything the export holds that was computed from its
training images, composed by the PLD accountant (``guarantee.py``; a site with a tuned model:
its releases' RDP curves summed, the Papernot-Steinke bound of the tuned one included).

Export certifies before it copies: the folder must pass ``audit`` (every ledger recomputed
from its spec), every file is verified as it is read (parquet read in full, weights loaded
with ``torch.load(weights_only=True)``; :func:`verify_file` is where the trial store's content
checksums plug in), only the models whose rows it exports are copied, and the result is
written into a temporary folder renamed into place: an interrupted export leaves nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from privdom_ray import atomic, guarantee, integrity
from privdom_ray.folder import (
    COMPARISONS,
    GUARANTEES,
    MODELS,
    PRIVACY_NOTE,
    RELIABILITY,
    TRANSFER,
)
from privdom_ray.kinds import attached, kind_of
from privdom_ray.numeric import number_or_nan
from privdom_ray.selection.untuned import DP_SELECTION
from privdom_ray.stats import results
from privdom_ray.stats.results import PRIVACY_CLASSES, privacy_class
from privdom_ray.store import TrialRecord, TrialStore

#: In the exported transfer table ``trial_key`` holds keyed release ids (same column name, so
#: readers and the report keep working), never the keys that hash the data.
RELEASE_ID = {"trial_key": "release_id"}


class ExportRefused(RuntimeError):
    """The folder cannot be exported as it is (a failed audit, a damaged file): exit 1."""


class BadDestination(ValueError):
    """The destination is not a place to export to (inside the output folder): exit 2."""


def released(record: TrialRecord, *, non_private: bool) -> bool:
    """Whether a trial's weights are part of the shareable set: standard trials (single-site
    or federated) with a valid guarantee; non-private ones only when asked for (their weights
    carry no guarantee). Controls, pretraining and audit twins are never released."""
    if not kind_of(record.spec).released or record.void:
        return False
    return record.is_private or non_private


# ------------------------------------------------------------------------------ verification


def verify_file(path: Path, kind: str) -> Any:
    """Read ``path`` in full and return its content, or raise ExportRefused naming it.

    ``kind``: "parquet" (a pyarrow Table), "table" (one of the sweep's sealed tables: its
    bytes checked against the checksums in ``outputs.json`` first), "torch" (a state_dict,
    loaded without running code from the file) or "json".
    """
    try:
        if kind == "table":
            data = integrity.verified_bytes(path.parent, path.name)
            return pq.read_table(pa.BufferReader(data))
        if kind == "parquet":
            return pq.read_table(path)
        if kind == "torch":
            import torch

            return torch.load(path, weights_only=True, map_location="cpu")
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ExportRefused(f"{path}: missing; refusing to export (re-run the sweep)") from None
    except integrity.Damage as exc:
        raise ExportRefused(
            f"{exc.path}: {exc.reason}; refusing to export a table the sweep did not write as "
            "it is. Re-run the sweep (or `launch.py evaluate`) to rebuild and seal the tables"
        ) from None
    except Exception as exc:  # noqa: BLE001 - every reader raises its own types for bad bytes
        raise ExportRefused(
            f"{path}: damaged ({type(exc).__name__}: {str(exc)[:200]}); refusing to export. "
            "Re-run the sweep (or the aggregation) to rebuild it"
        ) from None


def _check_destination(output: Path, dest: Path) -> None:
    out, to = output.resolve(), dest.resolve()
    if to == out or to.is_relative_to(out):
        raise BadDestination(
            f"--to {dest}: inside the output folder {output}; export to a folder outside it "
            "(the output folder is private: what is exported must be separable from it)"
        )
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} is not an empty folder; export into a new folder")


def _check_audit(output: Path) -> None:
    from privdom_ray.audit import audit_output

    bad = [line for line in audit_output(output) if not line.ok]
    if bad:
        lines = "\n".join(f"  {line.key} {line.site or '-'}: {line.problem}" for line in bad[:10])
        raise ExportRefused(
            f"refusing to export {output}: `launch.py audit` finds {len(bad)} problem(s):\n"
            f"{lines}\nRun `launch.py audit {output}` for the full list."
        )


# ------------------------------------------------------------------------------ export


def export(
    output: Path, dest: Path, *, non_private: bool = False, with_audit: bool = False
) -> list[Path]:
    """Copy the shareable set of ``output`` to ``dest`` (which must not exist or be empty, and
    must not lie inside ``output``). Refuses a folder that fails ``audit`` or holds a damaged
    file. ``with_audit``: include the audit twins' columns, and state the epsilon that then
    applies (model and twin composed). Returns the files written."""
    output, dest = Path(output), Path(dest)
    if not (output / TRANSFER).is_file():
        raise FileNotFoundError(f"no {TRANSFER} in {output}; run the sweep first")
    _check_destination(output, dest)
    _check_audit(output)
    store = TrialStore(output)
    transfer = verify_file(output / TRANSFER, "table")
    records = _records_of(store, transfer)
    _check_ledger_columns(transfer, records)
    twins = _twins(store, records)  # both totals are stated; the rows use them with_audit
    sites = guarantee.site_guarantees(records.values(), twins.values(), audit_included=with_audit)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        rows = _row_guarantees(records, twins, sites, with_audit)
        _write(tmp / TRANSFER, _export_transfer(store, transfer, rows, twins, with_audit))
        for name in (COMPARISONS, RELIABILITY):
            if (output / name).is_file():
                table = verify_file(output / name, "table")
                _check_models_exported(name, table, records)
                _write(tmp / name, _with_guarantee(table, records, rows))
        _write(tmp / GUARANTEES, pa.Table.from_pylist(guarantee.as_rows(sites)))
        models, withheld = _copy_models(store, records, tmp / MODELS, sites, rows, non_private)
        from privdom_ray import report

        report.write_report(tmp)  # drawn from the exported tables only
        (tmp / PRIVACY_NOTE).write_text(_privacy_note(tmp, sites, models, withheld, with_audit))
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(p for p in dest.rglob("*") if p.is_file())


def _records_of(store: TrialStore, transfer: pa.Table) -> dict[str, TrialRecord]:
    """The trial of every row of the table, verified: a row whose model is not a valid record
    on disk (damaged, void, gone) stops the export."""
    out = {}
    for key in dict.fromkeys(transfer.column("trial_key").to_pylist()):
        record = store.valid(key) if key else None
        if record is None:
            raise ExportRefused(
                f"{TRANSFER} has rows of trial {key!r}, whose record is missing, damaged or "
                "void; refusing to export rows whose model is not the one on disk. Re-run "
                "the sweep to redo it"
            )
        out[key] = record
    return out


def _check_ledger_columns(transfer: pa.Table, records: Mapping[str, TrialRecord]) -> None:
    """Every row's ledger columns equal its trial's verified ledger: the table's copies are
    what a reader sees, and they must say what the ledger (which ``audit`` recomputed) says."""
    columns = [c for c in ("epsilon_spent", "noise_multiplier", "sample_rate", "steps", "delta")
               if c in transfer.column_names]  # fmt: skip
    keys = transfer.column("trial_key").to_pylist()
    for name in columns:
        for key, value in zip(keys, transfer.column(name).to_pylist(), strict=True):
            want = getattr(records[key].ledger, name)
            if not _same_number(value, want):
                raise ExportRefused(
                    f"{TRANSFER}: trial {key[:12]}'s {name} is {value!r}, its ledger says "
                    f"{want!r}; refusing to export a table that contradicts the ledgers. Re-run "
                    "the sweep (or `launch.py evaluate`) to rebuild the table"
                )


def _same_number(value: Any, want: Any) -> bool:
    a, b = number_or_nan(value), number_or_nan(want)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or math.isclose(a, b, rel_tol=1e-9)


def _check_models_exported(name: str, table: pa.Table, records: Mapping[str, TrialRecord]) -> None:
    """Every model a row of ``name`` names (source, epsilon, seed) is a trial of the exported
    transfer rows, whose guarantees are stated: a row of any other model would leave
    uncovered."""
    have = {(r.spec.source, float(r.spec.epsilon), r.spec.seed) for r in records.values()}
    cols = [table.column(c).to_pylist() for c in ("source", "epsilon", "seed")]
    for source, eps, seed in zip(*cols, strict=True):
        if source is None or eps is None or seed is None:
            continue  # a summary over the exported models (a target's drops, pooled seeds)
        if (source, float(eps), int(seed)) not in have:
            raise ExportRefused(
                f"{name} has rows of the model {source}, epsilon {eps}, seed {seed}, which "
                f"has no rows in {TRANSFER}: its guarantee would not be stated. Re-run the "
                "sweep (or `launch.py evaluate`) to rebuild the tables together"
            )


def _twins(store: TrialStore, records: Mapping[str, TrialRecord]) -> dict[str, TrialRecord]:
    """The audit twin of each exported cell that has one (by the cell's key), verified."""
    twins = attached(store.valid(key) for key in store.trial_keys())
    return {cell: twin for cell, twin in twins.items() if cell in records}


def _row_guarantees(
    records: Mapping[str, TrialRecord],
    twins: Mapping[str, TrialRecord],
    sites: Sequence[guarantee.SiteGuarantee],
    with_audit: bool,
) -> dict[str, dict[str, Any]]:
    """Per trial: the row columns ``guarantee``, ``epsilon_release``, ``epsilon_training_set``."""
    per_site = guarantee.by_site(sites)
    out = {}
    for key, rec in records.items():
        twin = twins.get(key) if with_audit else None
        eps, how = guarantee.release_guarantee(rec, twin)
        if not math.isfinite(eps):
            out[key] = {"guarantee": guarantee.NO_GUARANTEE, "epsilon_release": math.inf,
                        "epsilon_training_set": math.inf}  # fmt: skip
            continue
        own = guarantee.releases(rec)
        text = (
            f"({eps:.4g}, {max(r.delta for r in own):g})-DP for each training "
            f"{own[0].privacy_unit} of {', '.join(rec.training_sites)}: this model's releases"
            + (" and its audit twin's" if twin is not None else "")
            + f" ({how.upper()})"
        )  # fmt: skip
        total = max(per_site[r.site].epsilon for r in own)
        out[key] = {"guarantee": text, "epsilon_release": eps, "epsilon_training_set": total}
    return out


def _export_transfer(
    store: TrialStore,
    table: pa.Table,
    rows: Mapping[str, dict[str, Any]],
    twins: Mapping[str, TrialRecord],
    with_audit: bool,
) -> pa.Table:
    """The transfer table as it may leave: home-only columns dropped (training statistics,
    timing, data identifiers; the audit columns unless ``with_audit``, and then recomputed
    from the verified twins whose epsilon the guarantee composes: null for a cell without
    one), trial keys replaced by release ids, each row's guarantee added."""
    keys = table.column("trial_key").to_pylist()
    if with_audit:
        audit = [results.audit_columns(twins.get(k)) for k in keys]
        for name in results.AUDIT_COLUMNS:
            if name in table.column_names:
                index = table.schema.get_field_index(name)
                values = pa.array([a.get(name) for a in audit], table.schema.field(name).type)
                table = table.set_column(index, table.schema.field(name), values)
    for name, dtype in results.GUARANTEE_COLUMNS.items():
        table = table.append_column(name, pa.array([rows[k][name] for k in keys], dtype))
    drop = [
        c for c in table.column_names
        if c != "trial_key" and (privacy_class(c) in results.HOME_ONLY
                                 or (privacy_class(c) == "audit" and not with_audit))
    ]  # fmt: skip
    table = table.drop_columns(drop)
    index = table.schema.get_field_index("trial_key")  # the same name: readers keep working
    ids = pa.array([store.release_id(k) for k in keys], pa.string())
    table = table.set_column(index, pa.field("trial_key", pa.string()), ids)
    return results.with_privacy_metadata(table, TRANSFER, RELEASE_ID)


def _with_guarantee(
    table: pa.Table, records: Mapping[str, TrialRecord], rows: Mapping[str, dict[str, Any]]
) -> pa.Table:
    """comparisons/reliability rows with a ``guarantee`` column: the DP model's statement on
    rows of a DP model (the non-DP side's columns are class "nondp"), else no guarantee."""
    dp = {}
    for key, rec in records.items():
        if kind_of(rec.spec).in_matrices and rec.is_private:  # the compared models
            dp[(rec.spec.source, float(rec.spec.epsilon), rec.spec.seed)] = rows[key]["guarantee"]
    names = table.column_names
    source = table.column("source").to_pylist() if "source" in names else [None] * len(table)
    seed = table.column("seed").to_pylist() if "seed" in names else [None] * len(table)
    text = []
    for s, e, sd in zip(source, table.column("epsilon").to_pylist(), seed, strict=True):
        if e is None or not math.isfinite(e):
            text.append(guarantee.NO_GUARANTEE)
        else:
            text.append(dp.get((s, float(e), sd), "DP models of every source at this epsilon; "
                               "see guarantees.parquet"))  # fmt: skip
    return table.append_column("guarantee", pa.array(text, pa.string()))


def _write(path: Path, table: pa.Table) -> None:
    table = table.replace_schema_metadata(None)  # pandas' metadata names the dropped columns
    overrides = RELEASE_ID if path.name == TRANSFER else None
    atomic.write_parquet(path, results.with_privacy_metadata(table, path.name, overrides))


# ------------------------------------------------------------------------------ models


def _copy_models(
    store: TrialStore,
    records: Mapping[str, TrialRecord],
    folder: Path,
    sites: Sequence[guarantee.SiteGuarantee],
    rows: Mapping[str, dict[str, Any]],
    non_private: bool,
) -> tuple[list[str], list[str]]:
    """Copy the released models among the exported rows' trials, each verified after the
    copy (a state_dict that loads with ``weights_only=True``); returns (copied, left home)."""
    names, withheld = [], []
    for key, record in records.items():
        if not released(record, non_private=non_private):
            if kind_of(record.spec).released and not record.is_private:
                withheld.append(record.spec.name)
            continue
        target = folder / f"{record.spec.name}-{store.release_id(key)}"
        target.mkdir(parents=True)
        verify_file(store.model_path(key), "torch")
        shutil.copyfile(store.model_path(key), target / "model.pt")
        verify_file(target / "model.pt", "torch")
        ledger = store.ledger_document(key)  # the stored ledger, verified, as audited
        (target / "ledger.json").write_text(json.dumps(ledger, indent=2, default=str))
        card = _card(record, store.release_id(key), sites, rows[key])
        (target / "card.json").write_text(json.dumps(card, indent=2, default=str))
        names.append(target.name)
    return names, withheld


def _public_spec(record: TrialRecord) -> dict[str, Any]:
    """The spec without what hashes the data (its key, the data fingerprints)."""
    spec = record.spec.to_json()
    for name in ("key", "data_fingerprint"):
        spec.pop(name, None)
    for site in (spec.get("federation") or {}).get("sites", []):
        site.pop("data_fingerprint", None)
    return spec


def _card(
    record: TrialRecord,
    release_id: str,
    sites: Sequence[guarantee.SiteGuarantee],
    row: Mapping[str, Any],
) -> dict[str, Any]:
    """What a collaborator needs to use the weights: the spec, the thresholds (marked), and
    what covers them: this model's epsilon and, per training set, the export's total."""
    per_site = guarantee.by_site(sites)
    inside = (  # a tuned DP cell's plan, or an untuned DP trial's validation entry, covers both
        TUNED_VALIDATION if record.ledger.selection is not None
        else DP_VALIDATION
        if record.ledger.validation is not None and record.info.selection == DP_SELECTION
        else ""
    )  # fmt: skip
    return {
        "release_id": release_id,
        "name": record.spec.name,
        "spec": _public_spec(record),
        "training_sites": list(record.training_sites),
        "epsilon_spent": record.ledger.epsilon_spent,
        "delta": record.ledger.delta,
        "accountant": record.ledger.accountant,
        "guarantee": row["guarantee"],
        "epsilon_release": row["epsilon_release"],
        "training_sets": {
            s: {
                "epsilon": per_site[s].epsilon,
                "delta": per_site[s].delta,
                "accountant": per_site[s].accountant,
                "statement": per_site[s].statement,
            }
            for s in record.training_sites
            if s in per_site
        },
        "youden_thresholds": {
            "values": list(record.thresholds),
            "privacy": inside or PRIVACY_CLASSES["validation"],
        },
        "selected_epoch": {"value": record.info.best_epoch,
                           "privacy": inside or "validation"},  # fmt: skip
    }


#: An untuned DP model's thresholds and epoch, when its ledger has the validation entry.
DP_VALIDATION = (
    "a DP release on the source's validation split (epoch by the exponential mechanism, "
    "thresholds from noisy histograms; the ledger's validation entry), inside this model's "
    "epsilon (parallel with training)"
)
#: A tuned DP model's thresholds and epoch: DP releases its ledger's selection entry accounts.
TUNED_VALIDATION = (
    "a DP release on the source's validation split (tuned cell: epoch by the exponential "
    "mechanism, thresholds from noisy histograms), inside this model's epsilon"
)


# ------------------------------------------------------------------------------ PRIVACY.md


def _privacy_note(
    folder: Path,
    sites: Sequence[guarantee.SiteGuarantee],
    models: list[str],
    withheld: list[str],
    with_audit: bool,
) -> str:
    """What the export holds, file by file and column by column, and what covers it."""
    lines = [
        "# What is in this export, and what covers each value",
        "",
        "Exported with `launch.py export`" + (" --with-audit" if with_audit else "") + ": only "
        "the shareable outputs of the sweep, after `launch.py audit` recomputed every ledger.",
        "",
        "## One guarantee per training set",
        "",
        "Everything here that was computed from a site's training images, composed by "
        + guarantee.composed_by((g.accountant for g in sites),
                                "the PLD accountant (Google's dp-accounting)")
        + (", the audit twins' canary results included:" if with_audit
           else "; the audit twins' columns stayed home (`--with-audit` adds them):"),
        "",
    ]  # fmt: skip
    lines += [f"- **{g.training_site}**: {g.statement}" for g in sites] or ["- (no DP training)"]
    lines += ["", "## Files and the privacy class of every column", ""]
    for path in sorted(folder.glob("*.parquet")):
        lines.append(f"- `{path.name}`:")
        by_class: dict[str, list[str]] = {}
        for f in pq.read_schema(path):
            by_class.setdefault((f.metadata or {}).get(b"privacy", b"?").decode(), []).append(
                f.name
            )
        for cls, cols in by_class.items():
            lines.append(f"  - **{cls}** ({PRIVACY_CLASSES.get(cls, '?')}): {', '.join(cols)}")
    lines += [
        "- `report.md`, `report.html`, `figures/`: drawn from these tables only.",
        f"- `models/`: {len(models)} released model(s), each with `model.pt` (weights), "
        "`ledger.json` (recompute epsilon from it) and `card.json` (spec, thresholds of class "
        "**validation**, this model's epsilon and each training set's total).",
    ]
    if withheld:
        lines.append(
            f"- Left home: the weights of {len(withheld)} model(s) trained without DP "
            f"({', '.join(withheld)}); `--with-non-private-models` adds them, with no guarantee."
        )
    lines += [
        "",
        "Rows of models trained without DP are marked `no guarantee: trained without DP` "
        "(column `guarantee`); their values carry no privacy guarantee. Trial keys and data "
        "fingerprints hash the data's manifest, so they stay home (`release_id` is a keyed hash).",
        "",
        "Not exported (private, they stay with the data owner): trial folders with checkpoints, "
        "training curves and logs, per-image predictions, validation scores, membership-attack "
        "results, training times, caches and Ray's files.",
        "",
    ]
    return "\n".join(lines)


__all__ = ["BadDestination", "ExportRefused", "export", "privacy_class", "released", "verify_file"]
