"""``launch.py export``: the shareable outputs of a sweep, and nothing else.

The privacy boundary (README "What may leave"): the tables, the report and its figures, and
the released weights of DP models with their ledgers may leave the data owner; every value in
them is covered by the trial's epsilon, computed only from test images, or marked as outside
the guarantee (``results.PRIVACY_CLASSES``, stored per column in the parquet schema).
Everything else stays: trial folders (checkpoints with the secret generator states, training
curves, logs, per-image predictions, validation scores), caches, Ray's files and plans.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa

from privdom_ray.kinds import kind_of
from privdom_ray.results import COLUMN_PRIVACY, PRIVACY_CLASSES, TRANSFER, privacy_class
from privdom_ray.store import TrialRecord, TrialStore

#: Aggregate tables a sweep writes next to its trial folders: all shareable.
SHAREABLE_TABLES = (TRANSFER, "comparisons.parquet", "reliability.parquet")
REPORT_FILES = ("report.md",)
FIGURES = "figures"
MODELS = "models"


def released(record: TrialRecord, *, non_private: bool) -> bool:
    """Whether a trial's weights are part of the shareable set: standard trials (single-site
    or federated) with a valid guarantee; non-private ones only when asked for (their weights
    carry no guarantee). Controls, pretraining and audit twins are never released."""
    if not kind_of(record.spec).released or record.void:
        return False
    return record.is_private or non_private


def export(output: Path, dest: Path, *, non_private: bool = False) -> list[Path]:
    """Copy the shareable set of ``output`` to ``dest`` (which must not exist or be empty).
    Written into a temporary folder first and renamed: an interrupted export leaves nothing."""
    output, dest = Path(output), Path(dest)
    if not (output / TRANSFER).is_file():
        raise FileNotFoundError(f"no {TRANSFER} in {output}; run the sweep first")
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} is not empty; export into a new folder")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        store = TrialStore(output)
        _export_transfer(store, output / TRANSFER, tmp / TRANSFER)
        for name in (*SHAREABLE_TABLES[1:], *REPORT_FILES):
            if (output / name).is_file():
                shutil.copy2(output / name, tmp / name)
        if (output / FIGURES).is_dir():
            shutil.copytree(output / FIGURES, tmp / FIGURES)
        models, held = _copy_models(store, tmp / MODELS, non_private=non_private)
        (tmp / "PRIVACY.md").write_text(_privacy_note(models, held, non_private))
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(p for p in dest.rglob("*") if p.is_file())


def _export_transfer(store: TrialStore, src: Path, dest: Path) -> None:
    """The transfer table without identifiers computed from the data: trial keys become
    release ids, the data fingerprint column is left out."""
    import pyarrow.parquet as pq

    table = pq.read_table(src)
    ids = [store.release_id(k) if k else None for k in table.column("trial_key").to_pylist()]
    index = table.schema.get_field_index("trial_key")
    field = table.schema.field(index).with_metadata({"privacy": "public (keyed release id)"})
    table = table.set_column(index, field, pa.array(ids, pa.string()))
    if "data_fingerprint" in table.column_names:
        table = table.drop_columns(["data_fingerprint"])
    pq.write_table(table, dest)


def _copy_models(
    store: TrialStore, folder: Path, *, non_private: bool
) -> tuple[list[str], list[str]]:
    """Copy the released models; a DP model whose audit finds a problem is held back."""
    from privdom_ray.audit import audit_trial

    names, held = [], []
    for key in store.trial_keys():
        record = store.valid(key)
        if record is None or not released(record, non_private=non_private):
            continue
        problems = [line.problem for line in audit_trial(store, record) if not line.ok]
        if problems:
            held.append(f"{record.spec.name}: {problems[0]}")
            continue
        target = folder / f"{record.spec.name}-{store.release_id(key)}"
        target.mkdir(parents=True)
        shutil.copy2(store.model_path(key), target / "model.pt")
        (target / "ledger.json").write_text(json.dumps(record.ledger, indent=2, default=str))
        card = _card(record, store.release_id(key))
        (target / "card.json").write_text(json.dumps(card, indent=2, default=str))
        names.append(target.name)
    return names, held


def _public_spec(record: TrialRecord) -> dict[str, Any]:
    """The spec without what hashes the data (its key, the data fingerprints)."""
    spec = record.spec.to_json()
    for name in ("key", "data_fingerprint"):
        spec.pop(name, None)
    for site in (spec.get("federation") or {}).get("sites", []):
        site.pop("data_fingerprint", None)
    return spec


def _card(record: TrialRecord, release_id: str) -> dict[str, Any]:
    """What a collaborator needs to use the weights: the spec, the thresholds (marked), and
    what the epsilon covers."""
    eps = record.ledger["epsilon_spent"]
    return {
        "release_id": release_id,
        "name": record.spec.name,
        "spec": _public_spec(record),
        "training_sites": list(record.training_sites),
        "epsilon_spent": eps,
        "delta": record.ledger["delta"],
        "accountant": record.ledger["accountant"],
        "guarantee": (
            f"({eps}, {record.ledger['delta']})-DP for each training "
            f"{record.ledger.get('privacy_unit', 'image')} of {', '.join(record.training_sites)}: "
            "covers these weights and everything computed from them"
            if isinstance(eps, int | float) and math.isfinite(eps)
            else "none: trained without differential privacy"
        ),
        "youden_thresholds": {
            "values": list(record.thresholds),
            "privacy": PRIVACY_CLASSES["validation"],
        },
        "selected_epoch": {"value": record.info.get("best_epoch"), "privacy": "validation"},
    }


def _privacy_note(models: list[str], held: list[str], non_private: bool) -> str:
    lines = [
        "# What is in this export, and what each value's privacy is",
        "",
        "Exported with `launch.py export`: only the shareable outputs of the sweep.",
        "",
        "- `transfer.parquet`: aggregate transfer performance. Each column's class is in the "
        "parquet schema (field metadata `privacy`):",
    ]
    for cls, meaning in PRIVACY_CLASSES.items():
        cols = sorted(c for c, k in COLUMN_PRIVACY.items() if k == cls)
        listed = ", ".join(cols) if cols else "every metric column"
        if cls == "test":
            listed = "label, subgroup, n, n_pos and every metric column (auc, accuracy, ...)"
        lines.append(f"  - **{cls}** ({meaning}): {listed}")
    lines += [
        "- `comparisons.parquet`, `reliability.parquet` (when present): statistics of the test "
        "predictions (class **test**), with the ledger's epsilon (class **ledger**).",
        "- `report.md`, `figures/`: drawn from the tables above only.",
        f"- `models/`: {len(models)} released model(s), each with `model.pt` (weights), "
        "`ledger.json` (recompute epsilon from it) and `card.json` (spec, thresholds: class "
        "**validation**). "
        + (
            "Non-private models are included on request: they carry NO guarantee."
            if non_private
            else "Only DP models with a valid guarantee; non-private weights were left out."
        ),
        *(
            ["", "Held back (their ledger failed `launch.py audit`):"] + [f"- {h}" for h in held]
            if held
            else []
        ),  # fmt: skip
        "",
        "Trial keys and data fingerprints hash the data's manifest (training rows included), "
        "so they stay home: `trial_key` here is a keyed release id, and the fingerprint column "
        "is left out.",
        "",
        "Not exported (private, they stay with the data owner): trial folders with checkpoints "
        "(secret noise and sampling states), training curves and logs, per-image predictions, "
        "validation scores, caches and Ray's files.",
        "",
    ]
    return "\n".join(lines)


__all__ = ["export", "privacy_class", "released"]
