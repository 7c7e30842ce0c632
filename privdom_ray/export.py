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
        for name in (*SHAREABLE_TABLES, *REPORT_FILES):
            if (output / name).is_file():
                shutil.copy2(output / name, tmp / name)
        if (output / FIGURES).is_dir():
            shutil.copytree(output / FIGURES, tmp / FIGURES)
        models = _copy_models(TrialStore(output), tmp / MODELS, non_private=non_private)
        (tmp / "PRIVACY.md").write_text(_privacy_note(models, non_private))
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(p for p in dest.rglob("*") if p.is_file())


def _copy_models(store: TrialStore, folder: Path, *, non_private: bool) -> list[str]:
    names = []
    for key in store.trial_keys():
        record = store.valid(key)
        if record is None or not released(record, non_private=non_private):
            continue
        target = folder / f"{record.spec.name}-{key}"
        target.mkdir(parents=True)
        shutil.copy2(store.model_path(key), target / "model.pt")
        (target / "ledger.json").write_text(json.dumps(record.ledger, indent=2, default=str))
        (target / "card.json").write_text(json.dumps(_card(record), indent=2, default=str))
        names.append(target.name)
    return names


def _card(record: TrialRecord) -> dict[str, Any]:
    """What a collaborator needs to use the weights: the spec, the thresholds (marked), and
    what the epsilon covers."""
    eps = record.ledger["epsilon_spent"]
    return {
        "trial_key": record.key,
        "name": record.spec.name,
        "spec": record.spec.to_json(),
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


def _privacy_note(models: list[str], non_private: bool) -> str:
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
        "",
        "Not exported (private, they stay with the data owner): trial folders with checkpoints "
        "(secret noise and sampling states), training curves and logs, per-image predictions, "
        "validation scores, caches and Ray's files.",
        "",
    ]
    return "\n".join(lines)


__all__ = ["export", "privacy_class", "released"]
