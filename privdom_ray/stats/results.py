"""The transfer table aggregated from the trial store (its schema, column privacy classes).

The transfer table is an aggregate: one row per trial x current target evaluation x label x
subgroup, with no patient identifiers, image paths or per-image rows (those stay in the
private trial folders, see ``store.py``). Each (trial, target) has one evaluation per data
version of the target, and the table takes the current one, so a trial evaluated twice (Tune
is at-least-once) or on an older version of a target's data never gives duplicate rows.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from privdom_ray import folder
from privdom_ray.atomic import write_parquet
from privdom_ray.folder import GUARANTEES, TRANSFER, PlannedTarget, SweepFolder
from privdom_ray.kinds import REGISTRY, attached, kind_of
from privdom_ray.stats.evaluation import MetricRow
from privdom_ray.store import TrialRecord, TrialStore

_ARROW_TYPES = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}


def _metric_fields() -> list[tuple[str, pa.DataType]]:
    """The metric columns, in ``evaluation.MetricRow``'s field order and types (one definition)."""
    out = []
    for f in dataclasses.fields(MetricRow):
        base = str(f.type).split("|")[0].strip()
        out.append((f.name, _ARROW_TYPES[base]))
    return out


# Where each value of a table comes from, i.e. what may be shared (docs/privacy.md, "What may
# leave" and the report's "What this epsilon covers" say the same). Every column of every table
# has one of these classes, stored in the parquet schema's field metadata ("privacy"); `export`
# writes every shareable column of every file with its class and keeps the rest home.
PRIVACY_CLASSES = {
    "public": "configuration, identity, versions or timing of evaluation: not computed from any "
    "training or validation image",
    "ledger": "the privacy accounting: from the grid and the training-set size, which (as in "
    "Opacus and the paper) is treated as public",
    "test": "computed only from the target's test images through the row's model: covered by "
    "that model's epsilon (column `guarantee`); a row of a model trained without DP carries "
    "no guarantee",
    "nondp": "a value of, or a comparison with, the model trained WITHOUT DP: computed from "
    "test images through a model that carries no guarantee (no guarantee: trained without DP)",
    "validation": "computed from the SOURCE's validation images without noise: outside the "
    "guarantee, which covers training images only",
    "training": "computed from training images without noise (the membership attack): "
    "non-private trials only (null for DP trials); stays home (`export` leaves it out)",
    "timing": "wall-clock training time: depends on the training set (its size and the secret "
    "Poisson batch sizes), outside the guarantee; stays home (`export` leaves it out)",
    "audit": "the one-run canary audit of the cell's audit twin: a second DP training on the "
    "same training images (its model is never released); stays home unless `export "
    "--with-audit`, whose stated epsilon then composes model and twin",
    "identifier": "a hash computed from the data's manifest (training rows included): exact, "
    "un-noised, so it stays home; `export` drops the fingerprint and replaces the trial key "
    "by a keyed release id",
    "release_id": "a keyed hash (HMAC, secret kept home) of the trial key: identifies a "
    "release, reveals nothing about the data",
}
#: Classes whose columns never leave the data owner (``export`` drops them).
HOME_ONLY = ("training", "timing", "identifier")
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
    "eval_seconds",
    "node",
    "versions",
    "tuning",  # a tuned cell's search (space, K's distribution, E[K]): configuration
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

_LEDGER = [*LEDGER_COLUMNS, "privacy_scope", "loss_weights", "epsilon_validation"]
# the columns trial kinds attach to other trials' rows: the audit twin's (kinds/audit/)
AUDIT_COLUMNS = [c for kind in REGISTRY.values() for c in kind.columns]
#: Columns ``export`` adds to the transfer table: what each row's values are covered by.
GUARANTEE_COLUMNS = {
    # "(eps, delta)-DP for each training image of a: this model's releases (PLD)" or
    # "no guarantee: trained without DP"
    "guarantee": pa.string(),
    # PLD epsilon of the row's model's own releases (and its audit twin's with --with-audit)
    "epsilon_release": pa.float64(),
    # PLD epsilon of everything the export holds from the row's training set(s) (a
    # federation: its worst site); see guarantees.parquet
    "epsilon_training_set": pa.float64(),
}
COLUMN_PRIVACY: dict[str, str] = {
    **dict.fromkeys(_PUBLIC, "public"),
    **dict.fromkeys(_LEDGER, "ledger"),
    **dict.fromkeys(GUARANTEE_COLUMNS, "ledger"),
    "trial_key": "identifier",
    "data_fingerprint": "identifier",
    "threshold": "validation",
    "best_epoch": "validation",
    "mia_auc": "training",
    "mia_tpr_at_1fpr": "training",
    "train_seconds": "timing",
    **dict.fromkeys(AUDIT_COLUMNS, "audit"),
}  # every other column (evaluation.MetricRow's) is "test"

_CMP_PUBLIC = [
    "comparison",
    "quantity",
    "endpoint",
    "is_summary",
    "test",
    "model",
    "source",
    "target",
    "on_domain",
    "seed",
    "n_seeds",
    "label",
    "subgroup",
    "resampling_unit",
    "worse_if",
    "margin",
    "n_boot",
    "ci",
    "n_off",
    "q_family",  # the name of a BH family (comparison, quantity, ...)
    "n_sites",
]
_CMP_NONDP = [
    "value_nondp",
    "value_nondp_lo",
    "value_nondp_hi",
    "sd_nondp",
    "auc_on",
    "auc_off_mean",
    "auc_off_lo",
    "auc_off_hi",
    "delta",
    "delta_lo",
    "delta_hi",
    "p_value",
    "q_value",
    "tost_lo",
    "tost_hi",
    "p_tost",
    "p_tost_holm",
    "p_noninf",
    "p_value_holm",
    "p_noninf_holm",
    "verdict",
    "t_stat",
    "p_t",
    "delta_sd",
    "null_reason",
    "df",
    "margin_confirmable",
    "tost_half_width",
    "q_tost",
    "p_tost_iut",
    "q_noninf",
]
#: comparisons.parquet: every comparison sets a DP model against the non-DP one, so what
#: involves the non-DP side (its values, the differences, their p's and verdicts) is "nondp".
COMPARISONS_PRIVACY: dict[str, str] = {
    **dict.fromkeys(_CMP_PUBLIC, "public"),
    **dict.fromkeys(("epsilon", "epsilon_spent", "accountant", "guarantee"), "ledger"),
    **dict.fromkeys(
        (
            "n",
            "n_pos",
            "n_patients",
            "n_labels",
            "n_valid_boot",
            "value_dp",
            "value_dp_lo",
            "value_dp_hi",
            "sd_dp",
        ),
        "test",
    ),  # fmt: skip
    **dict.fromkeys(_CMP_NONDP, "nondp"),
}
#: reliability.parquet: one model's calibration bins on one target's test images.
RELIABILITY_PRIVACY: dict[str, str] = {
    **dict.fromkeys(
        ("model", "source", "target", "on_domain", "seed", "label", "bin", "bin_lo", "bin_hi"),
        "public",
    ),
    **dict.fromkeys(("epsilon", "guarantee"), "ledger"),
    **dict.fromkeys(("n", "mean_score", "observed"), "test"),
}
#: guarantees.parquet (written by ``export``): one row per training set, all accounting.
GUARANTEES_PRIVACY: dict[str, str] = {"training_site": "public"}
TABLE_PRIVACY: dict[str, dict[str, str]] = {
    TRANSFER: COLUMN_PRIVACY,
    folder.COMPARISONS: COMPARISONS_PRIVACY,
    folder.RELIABILITY: RELIABILITY_PRIVACY,
    GUARANTEES: GUARANTEES_PRIVACY,
}
_METRIC_NAMES = {f.name for f in dataclasses.fields(MetricRow)}


def privacy_class(column: str, table: str = TRANSFER) -> str | None:
    """The privacy class of a column of one of the sweep's tables; None for a column no
    class was assigned to (``export`` keeps it home and says so)."""
    classes = TABLE_PRIVACY.get(table, {})
    if column in classes:
        return classes[column]
    if table == TRANSFER and column in _METRIC_NAMES:
        return "test"
    if table == GUARANTEES:
        return "ledger"  # the per-site accounting: every other column
    return None


def _with_privacy(fields: list[tuple[str, pa.DataType]]) -> pa.Schema:
    return pa.schema([pa.field(n, t, metadata={"privacy": privacy_class(n)}) for n, t in fields])


def with_privacy_metadata(
    table: pa.Table, name: str, overrides: dict[str, str] | None = None
) -> pa.Table:
    """``table`` (one of the sweep's tables, ``name``) with each column's privacy class in its
    field metadata (``overrides``: column -> class where the export changed what a column
    holds); raises KeyError naming a column without a class."""
    fields = []
    for f in table.schema:
        cls = (overrides or {}).get(f.name) or privacy_class(f.name, name)
        if cls is None:
            raise KeyError(f"{name}: column {f.name!r} has no privacy class (stats/results.py)")
        fields.append(f.with_metadata({**(f.metadata or {}), b"privacy": cls.encode()}))
    return table.cast(pa.schema(fields, metadata=table.schema.metadata))


# Columns of the transfer table, in order. Metric columns come from evaluation.MetricRow.
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
        # an untuned DP trial whose epoch and thresholds are DP releases on the validation
        # split (its ledger's ``validation`` entry): their own epsilon (RDP accountant), at
        # most the trial's, in parallel with training; null where they were chosen exactly
        # (trials finished before, non-DP trials: outside the guarantee) and for tuned cells
        ("epsilon_validation", pa.float64()),
        *_metric_fields(),  # label, subgroup, n, auc, ... : every field of evaluation.MetricRow
        ("mia_auc", pa.float64()),
        ("mia_tpr_at_1fpr", pa.float64()),
        # the cell's audit twin (grid option audit:): a 95% lower bound on epsilon from m
        # canaries (the largest over its attacks), the replay attack's, the most m canaries
        # can show, the largest noise factor it catches in 80% of simulated runs, the noise it
        # measured over the stated one and its tests' verdict, and what gave it (null without
        # a twin; kinds/audit/result.py: columns)
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
        ("tuning", pa.string()),  # kinds' own public columns (TrialKind.own_columns)
    ]
)


# ------------------------------------------------------------------------------ aggregation


def rows_for_trial(
    record: Any, evaluations: Iterable[Any], sweep: str, twin: Any = None
) -> list[pd.DataFrame]:
    """The transfer-table rows of one trained trial (a store.TrialRecord), one frame per
    current evaluation (store.EvalRecord); ``twin``: its audit twin's record, if any."""
    spec, info, ledger = record.spec, record.info, record.ledger
    # the membership attack reads training images without noise: never shared for DP trials
    shareable_mia = not ledger.is_private
    fixed = {
        "sweep": sweep,
        "trial_key": record.key,
        "source": spec.source,
        "training_sites": ",".join(record.training_sites),
        "seed": spec.seed,
        "model": spec.model,
        "variant": kind_of(spec).label(spec),
        "init": spec.init,
        "mia_auc": info.mia_auc if shareable_mia else None,
        "mia_tpr_at_1fpr": info.mia_tpr_at_1fpr if shareable_mia else None,
        **{k: getattr(ledger, k) for k in LEDGER_COLUMNS},
        "privacy_scope": ledger.scope,
        "loss_weights": ledger.loss_weights,
        "epsilon_validation": _validation_epsilon(ledger),
        "image_size": spec.preprocessing.image_size,
        "epochs": spec.training.epochs,
        "best_epoch": info.best_epoch,
        "logical_batch": spec.training.logical_batch,
        "lr": spec.training.lr,
        "train_seconds": info.train_seconds,
        "node": info.node,
        "versions": json.dumps(dict(info.versions), sort_keys=True),
        "tuning": None,
        **kind_of(spec).own_columns(record),
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


def _validation_epsilon(ledger: Any) -> float | None:
    """The epsilon of an untuned DP trial's validation releases (None: chosen exactly)."""
    value = (ledger.validation or {}).get("epsilon")
    return float(value) if isinstance(value, int | float) else None


def audit_columns(twin: Any) -> dict[str, Any]:
    """The audit columns of a cell from its twin's record (nulls without one): the columns
    the attached trial's kind gives (``TrialKind.row_columns``)."""
    extra = {} if twin is None else kind_of(twin.spec).row_columns(twin)
    return {**dict.fromkeys(AUDIT_COLUMNS), **extra}



def aggregate(
    output: Path, keys: Iterable[str], sweep: str, targets: Iterable[Any] | None = None
) -> tuple[Path, pd.DataFrame]:
    """Combine the finished trials ``keys`` into ``<output>/transfer.parquet`` (atomically).

    One evaluation per (trial, target): the one of the target's current data version
    (``targets``: objects with ``name`` and ``fingerprint``; default: the targets of the last
    plan, ``plan.json``). Older evaluations stay on disk, out of the table.
    """
    table, df = transfer_table(output, keys, sweep, targets)
    path = SweepFolder(output).transfer
    write_parquet(path, table)
    return path, df


def transfer_table(
    output: Path, keys: Iterable[str], sweep: str, targets: Iterable[Any] | None = None
) -> tuple[pa.Table, pd.DataFrame]:
    """The transfer table of :func:`aggregate`, built but not written."""
    return table_of(load_finished(output, keys, targets), sweep)


@dataclasses.dataclass(frozen=True)
class Finished:
    """A sweep's finished trials read once through the store: every valid record (in the
    keys' order) and its current evaluations. The transfer table (:func:`table_of`) and the
    comparisons' study (``study.study_of``) are both built from it, so an aggregation reads
    and verifies each trial folder once."""

    records: dict[str, TrialRecord]
    evaluations: dict[str, list[Any]]  # key -> store.EvalRecord (current ones)
    # False: no targets given and no plan: ``evaluations`` holds every evaluation of each
    # model (what the study compares), and the transfer table takes none (none is current)
    planned: bool = True


def load_finished(
    output: Path, keys: Iterable[str], targets: Iterable[Any] | None = None
) -> Finished:
    """The valid trials ``keys`` and their evaluations of ``targets`` at their current data
    versions (objects with ``name``, ``fingerprint`` and optionally ``data``; default: the
    last plan's targets)."""
    store = TrialStore(output)
    wanted = list(targets) if targets is not None else (planned_targets(output) or None)
    records: dict[str, TrialRecord] = {}
    evaluations: dict[str, list[Any]] = {}
    for key in dict.fromkeys(keys):
        record = store.valid(key)
        if record is not None:
            records[key] = record
            found = store.current(key, wanted) if wanted is not None else store.evaluations(key)
            evaluations[key] = found
    return Finished(records, evaluations, planned=wanted is not None)


def table_of(finished: Finished, sweep: str) -> tuple[pa.Table, pd.DataFrame]:
    """The transfer table of the loaded trials (no file access)."""
    records = finished.records
    twins = attached(records.values())  # audit twins, by the key of the cell they audit
    frames: list[pd.DataFrame] = []
    for key, record in records.items():
        evaluations = finished.evaluations[key] if finished.planned else []
        frames.extend(rows_for_trial(record, evaluations, sweep, twins.get(key)))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for field in SCHEMA:
        if field.name not in df.columns:
            df[field.name] = None
    df = df.loc[:, SCHEMA.names]
    return pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False), df


def planned_targets(output: Path) -> list[PlannedTarget]:
    """The targets (name, data fingerprint, test images' checksum) of the last plan written
    to ``output`` (``folder.Plan``); none without a plan."""
    plan = SweepFolder(output).read_plan()
    return [] if plan is None else list(plan.targets)


def load(output: str | Path) -> pd.DataFrame:
    """The transfer table of a sweep as a DataFrame."""
    path = SweepFolder(output).transfer
    if not path.is_file():
        raise FileNotFoundError(
            f"no {TRANSFER} in {output}; run the sweep first (launch.py --grid ...)"
        )
    return pd.read_parquet(path)
