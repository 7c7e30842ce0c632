"""Atomic writes, and the transfer table aggregated from the trial store.

The transfer table is an aggregate: one row per trial x current target evaluation x label x
subgroup, with no patient identifiers, image paths or per-image rows (those stay in the
private trial folders, see ``store.py``). Each (trial, target) has one evaluation per data
version of the target, and the table takes the current one, so a trial evaluated twice (Tune
is at-least-once) or on an older version of a target's data never gives duplicate rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from privdom_ray.metrics import MetricRow

TRIALS = "trials"
TRANSFER = "transfer.parquet"

_ARROW_TYPES = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}


def _metric_fields() -> list[tuple[str, pa.DataType]]:
    """The metric columns, in ``metrics.MetricRow``'s field order and types (one definition)."""
    out = []
    for f in dataclasses.fields(MetricRow):
        base = str(f.type).split("|")[0].strip()
        out.append((f.name, _ARROW_TYPES[base]))
    return out


# Where each value of the transfer table comes from, i.e. what may be shared (the README's
# "What may leave" and the report's "What this epsilon covers" say the same). Every column is
# one of these; the class is stored in the parquet schema's field metadata ("privacy").
PRIVACY_CLASSES = {
    "public": "configuration, identity, versions or timing: not computed from any image",
    "ledger": "the privacy accounting: from the grid and the training-set size, which (as in "
    "Opacus and the paper) is treated as public",
    "test": "computed only from the target's test images (never trained on)",
    "validation": "computed from the SOURCE's validation images without noise: outside the "
    "guarantee, which covers training images only",
    "training": "computed from training images without noise: filled for non-private trials "
    "only (null for DP trials, whose values stay in the private trial record)",
    "audit": "the one-run canary audit of the cell's audit twin: a second run on the same "
    "training data (its model is never released), covered by the twin's own epsilon",
    "identifier": "a hash computed from the data's manifest (training rows included): exact, "
    "un-noised, so it stays home; `export` drops the fingerprint and replaces the trial key "
    "by a keyed release id",
}
_PUBLIC = [
    "sweep",
    "source",
    "target",
    "on_domain",
    "training_sites",
    "seed",
    "model",
    "variant",
    "init",
    "n_boot",
    "image_size",
    "epochs",
    "logical_batch",
    "lr",
    "train_seconds",
    "eval_seconds",
    "node",
    "versions",
]
#: the numeric ledger fields copied onto every row of a trial
LEDGER_COLUMNS = (
    "epsilon_target",
    "epsilon_spent",
    "epsilon_rdp",
    "delta",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "max_grad_norm",
    "accountant",
    "privacy_unit",
)

_LEDGER = [*LEDGER_COLUMNS, "privacy_scope", "loss_weights"]
AUDIT_COLUMNS = [
    "audit_epsilon_lower",
    "audit_epsilon_lower_replay",
    "audit_epsilon_max",
    "audit_power_noise_scale",
    "audit_noise_ratio",
    "audit_noise_check",
    "audit_canaries",
    "audit_guesses",
    "audit_correct",
    "audit_kind",
    "audit_twin_epsilon",
]
COLUMN_PRIVACY: dict[str, str] = {
    **dict.fromkeys(_PUBLIC, "public"),
    **dict.fromkeys(_LEDGER, "ledger"),
    "trial_key": "identifier",
    "data_fingerprint": "identifier",
    "threshold": "validation",
    "best_epoch": "validation",
    "mia_auc": "training",
    "mia_tpr_at_1fpr": "training",
    **dict.fromkeys(AUDIT_COLUMNS, "audit"),
}  # every other column (metrics.MetricRow's) is "test"


def privacy_class(column: str) -> str:
    return COLUMN_PRIVACY.get(column, "test")


def _with_privacy(fields: list[tuple[str, pa.DataType]]) -> pa.Schema:
    return pa.schema([pa.field(n, t, metadata={"privacy": privacy_class(n)}) for n, t in fields])


# Columns of the transfer table, in order. Metric columns come from metrics.MetricRow.
SCHEMA = _with_privacy(
    [
        ("sweep", pa.string()),
        ("trial_key", pa.string()),
        ("source", pa.string()),
        ("target", pa.string()),
        # the target's data version (manifest fingerprint) the row was evaluated on
        ("data_fingerprint", pa.string()),
        ("on_domain", pa.bool_()),
        # the domains whose training data made the model: the source, or a federation's sites
        ("training_sites", pa.string()),
        ("seed", pa.int64()),
        ("model", pa.string()),
        ("variant", pa.string()),
        ("init", pa.string()),
        ("epsilon_target", pa.float64()),
        ("epsilon_spent", pa.float64()),
        ("epsilon_rdp", pa.float64()),
        ("delta", pa.float64()),
        ("noise_multiplier", pa.float64()),
        ("sample_rate", pa.float64()),
        ("steps", pa.int64()),
        ("max_grad_norm", pa.float64()),
        ("accountant", pa.string()),
        ("privacy_unit", pa.string()),
        # "trial": one dataset's guarantee; "site": per-site guarantees of a federation (the
        # row holds the ledger of the site with the largest epsilon)
        ("privacy_scope", pa.string()),
        # where the loss's pos_weight came from: dp_counts (a DP release in the ledger), exact
        # (non-private trials only), public, fixed or none
        ("loss_weights", pa.string()),
        *_metric_fields(),  # label, subgroup, n, auc, ... : every field of metrics.MetricRow
        ("mia_auc", pa.float64()),
        ("mia_tpr_at_1fpr", pa.float64()),
        # the cell's audit twin (grid option audit:): a 95% lower bound on epsilon from m
        # canaries (the largest over its attacks), the replay attack's, the most m canaries
        # can show, the largest noise factor it catches in 80% of simulated runs, the noise it
        # measured over the stated one and its tests' verdict, and what gave it (null without
        # a twin; kinds/audit.py: columns)
        ("audit_epsilon_lower", pa.float64()),
        ("audit_epsilon_lower_replay", pa.float64()),
        ("audit_epsilon_max", pa.float64()),
        ("audit_power_noise_scale", pa.float64()),
        ("audit_noise_ratio", pa.float64()),
        ("audit_noise_check", pa.string()),
        ("audit_canaries", pa.int64()),
        ("audit_guesses", pa.int64()),
        ("audit_correct", pa.int64()),
        ("audit_kind", pa.string()),
        ("audit_twin_epsilon", pa.float64()),
        ("n_boot", pa.int64()),
        ("image_size", pa.int64()),
        ("epochs", pa.int64()),
        ("best_epoch", pa.int64()),
        ("logical_batch", pa.int64()),
        ("lr", pa.float64()),
        ("train_seconds", pa.float64()),
        ("eval_seconds", pa.float64()),
        ("node", pa.string()),
        ("versions", pa.string()),
    ]
)


# ------------------------------------------------------------------------------ atomic writes

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write, *, private: bool = False) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers see the old file or the new
    one. ``private`` files (checkpoints: secret generator states) stay readable by the owner
    only; others get the usual permissions (results are meant to be shared)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        if not private:
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=_json_default)))


def write_parquet(path: Path, df: pd.DataFrame | pa.Table) -> None:
    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    atomic_write(path, lambda p: pq.write_table(table, p))


def write_yaml(path: Path, obj: Any) -> None:
    """Human-readable record (round-tripped through JSON so numpy scalars and inf are plain)."""
    import yaml

    plain = json.loads(json.dumps(obj, default=_json_default))
    atomic_write(path, lambda p: p.write_text(yaml.safe_dump(plain, sort_keys=False)))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------ aggregation


def rows_for_trial(
    record: Any, evaluations: Iterable[Any], sweep: str, twin: Any = None
) -> list[pd.DataFrame]:
    """The transfer-table rows of one trained trial (a store.TrialRecord), one frame per
    current evaluation (store.EvalRecord); ``twin``: its audit twin's record, if any."""
    spec, info, ledger = record.spec, record.info, record.ledger
    # the membership attack reads training images without noise: never shared for DP trials
    shareable_mia = ledger["accountant"] == "none"
    fixed = {
        "sweep": sweep,
        "trial_key": record.key,
        "source": spec.source,
        "training_sites": ",".join(record.training_sites),
        "seed": spec.seed,
        "model": spec.model,
        "variant": spec.variant,
        "init": spec.init,
        "mia_auc": info.get("mia_auc") if shareable_mia else None,
        "mia_tpr_at_1fpr": info.get("mia_tpr_at_1fpr") if shareable_mia else None,
        **{k: _number(ledger[k]) for k in LEDGER_COLUMNS},
        "privacy_scope": ledger.get("scope", "trial"),
        "loss_weights": ledger.get("loss_weights", "exact"),
        "image_size": spec.preprocessing.image_size,
        "epochs": spec.training.epochs,
        "best_epoch": info["best_epoch"],
        "logical_batch": spec.training.logical_batch,
        "lr": spec.training.lr,
        "train_seconds": info["train_seconds"],
        "node": info.get("node", ""),
        "versions": json.dumps(info.get("versions", {}), sort_keys=True),
        **audit_columns(twin),
    }
    frames = []
    for ev in evaluations:
        df = ev.metrics()
        df = df.assign(
            **fixed,
            target=ev.target,
            data_fingerprint=ev.fingerprint,
            on_domain=record.on_domain(ev.target),
            n_boot=ev.n_boot,
            eval_seconds=ev.eval_seconds,
        )
        frames.append(df)
    return frames


def audit_columns(twin: Any) -> dict[str, Any]:
    """The audit columns of a cell from its twin's record (nulls without one)."""
    if twin is None or "audit" not in twin.info:
        return dict.fromkeys(AUDIT_COLUMNS)
    from privdom_ray.kinds.audit import columns

    return columns(twin.info["audit"], twin.ledger)


def _number(value: Any) -> Any:
    if isinstance(value, str) and value in ("inf", "Infinity"):
        return math.inf
    return value


def aggregate(
    output: Path, keys: Iterable[str], sweep: str, targets: Iterable[Any] | None = None
) -> tuple[Path, pd.DataFrame]:
    """Combine the finished trials ``keys`` into ``<output>/transfer.parquet`` (atomically).

    One evaluation per (trial, target): the one of the target's current data version
    (``targets``: objects with ``name`` and ``fingerprint``; default: the targets of the last
    plan, ``plan.json``). Older evaluations stay on disk, out of the table.
    """
    from privdom_ray.kinds.audit import audited
    from privdom_ray.store import TrialStore

    store = TrialStore(output)
    targets = list(targets) if targets is not None else planned_targets(output)
    records = {key: store.valid(key) for key in dict.fromkeys(keys)}
    twins = {audited(r.spec).key: r for r in records.values() if r is not None and r.spec.audit}
    frames: list[pd.DataFrame] = []
    for key, record in records.items():
        if record is not None:
            evaluations = store.current(key, targets)
            frames.extend(rows_for_trial(record, evaluations, sweep, twins.get(key)))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for field in SCHEMA:
        if field.name not in df.columns:
            df[field.name] = None
    df = df.loc[:, SCHEMA.names]
    table = pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False)
    path = Path(output) / TRANSFER
    write_parquet(path, table)
    return path, df


@dataclasses.dataclass(frozen=True)
class _Target:
    name: str
    fingerprint: str


def planned_targets(output: Path) -> list[_Target]:
    """The targets (name, data fingerprint) of the last plan written to ``output``."""
    path = Path(output) / "plan.json"
    if not path.is_file():
        return []
    return [_Target(t["name"], t["fingerprint"]) for t in read_json(path)["targets"]]


def load(output: str | Path) -> pd.DataFrame:
    """The transfer table of a sweep as a DataFrame."""
    path = Path(output) / TRANSFER
    if not path.is_file():
        raise FileNotFoundError(
            f"no {TRANSFER} in {output}; run the sweep first (launch.py --grid ...)"
        )
    return pd.read_parquet(path)
