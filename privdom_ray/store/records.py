"""The trial store's records and file formats: what a trial folder's files hold, typed.

Owns the folder's file names (``CORE``, ``LOGS``, the private ``_TRIAL_JSON`` ...), the typed
records read back (:class:`TrialRecord`, :class:`EvalRecord`, :class:`Inspection`,
:class:`Weights`, :class:`FileCheckpoint`, :class:`DamagedRecord`) and the byte/JSON helpers
that turn documents into files and back (``_json``, ``_parquet_bytes``, ``_ledger_json``,
``_record_json``, ``_record``, ``_parse_check``, ``_legacy_eval``). Separate from
:class:`~privdom_ray.store.TrialStore` (the folder's reads, writes and repairs) so that the
store's behaviour and its formats each fit in a readable module; ``privdom_ray.store``
re-exports every name here, and this module never imports the store itself.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from privdom_ray import integrity
from privdom_ray.atomic import atomic_write
from privdom_ray.config import TrialSpec
from privdom_ray.integrity import Damage, FileSum
from privdom_ray.kinds import TrialKind, UnknownKind, kind_of
from privdom_ray.privacy import Ledger
from privdom_ray.records import RunRecord

#: Evaluations of an older protocol are redone (the model is never retrained for it):
#: 1 resampled images (predictions had no patient groups); 2 counted a label's minimum
#: positives in images, so a label of 3 patients could pass a minimum of 10; 3 counts patients;
#: 4 names the checksum of the model it came from (older ones cannot prove which model made
#: them), jackknife t CIs (the percentile bootstrap under-covered) and subgroup macros over the
#: labels shared by their family (metrics.shared_label_sets); 5 marks intervals at a point AUC
#: >= 0.95 (or <= 0.05) approximate (ci_note: they under-cover there) and says which of
#: sensitivity and specificity a degenerate threshold fixes at 1.
EVAL_PROTOCOL = 5
DONE_FORMAT = 2

_TRIAL_JSON, _LEDGER, _MODEL, _THRESHOLDS = (
    "trial.json",
    "ledger.json",
    "model.pt",
    "thresholds.json",
)
_HISTORY, _VAL_PRED, _CONFIG, _DONE = (
    "history.json",
    "val_predictions.parquet",
    "config.yaml",
    "done",
)
_CHECKPOINT, _RUNNING, _FAILED, _TB = "checkpoint.pt", "running.json", "failed.json", "tensorboard"
_EVAL, _EVAL_JSON, _METRICS, _PRED = "eval", "eval.json", "metrics.parquet", "predictions.parquet"
#: a damaged one of these voids the trial (retrained); a damaged log is set aside alone
CORE = (_TRIAL_JSON, _LEDGER, _MODEL, _THRESHOLDS)
#: config.yaml: only in folders written before each fact was written once (verified, kept)
LOGS = (_HISTORY, _CONFIG, _VAL_PRED)
_LEGACY_DONE = b"done"


class DamagedRecord(Damage):
    """A file of a trial folder is missing, truncated, unparsable or not what was written."""

    @classmethod
    def of(cls, damage: Damage) -> DamagedRecord:
        return damage if isinstance(damage, DamagedRecord) else cls(damage.path, damage.reason)


def _json(path: Path, data: bytes, required: Sequence[str] = ()) -> Any:
    """Parse a JSON record's bytes, raising DamagedRecord (naming the file) for any defect."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DamagedRecord(path, f"unparsable ({type(exc).__name__}: {str(exc)[:80]})") from None
    missing = [k for k in required if not isinstance(value, dict) or k not in value]
    if missing:
        raise DamagedRecord(path, f"lacks {missing}")
    return value


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DamagedRecord(path, "missing") from None
    except OSError as exc:
        raise DamagedRecord(path, f"unreadable ({exc.strerror or exc})") from None


def _json_bytes(obj: Any) -> bytes:
    def default(o: Any) -> Any:
        return o.item() if hasattr(o, "item") else str(o)

    return json.dumps(obj, indent=2, default=default).encode()


def _yaml_bytes(obj: Any) -> bytes:
    """Human-readable record (round-tripped through JSON so numpy scalars and inf are plain)."""
    import yaml

    return yaml.safe_dump(json.loads(_json_bytes(obj)), sort_keys=False).encode()


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
    return buf.getvalue()


def _parquet_frame(path: Path, data: bytes) -> pd.DataFrame:
    try:
        return pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DamagedRecord(path, f"unparsable ({type(exc).__name__}: {str(exc)[:80]})") from None


def _torch_state(path: Path, data: bytes) -> dict[str, Any]:
    """A state_dict from a model file's bytes (``weights_only``: no code runs from it)."""
    import torch

    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a bad file
        raise DamagedRecord(path, f"unreadable ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DamagedRecord(path, "not a state_dict of tensors")
    return state


@dataclass(frozen=True)
class TrialRecord:
    """A trained trial as the rest of the code sees it: typed, parsed from verified bytes.
    (``audit`` checks the stored ledger document itself: :meth:`TrialStore.ledger_document`.)"""

    key: str
    spec: TrialSpec
    ledger: Ledger  # a federation's: the summary (its largest-epsilon site's ledger)
    info: RunRecord  # trial.json: the run's summary (best epoch, timings, versions, ...)
    thresholds: tuple[float | None, ...]
    model_digest: str = ""  # checksum of model.pt: what evaluations are bound to
    site_ledgers: Mapping[str, Ledger] = field(default_factory=dict)  # a federation's members

    @property
    def ledgers(self) -> tuple[Ledger, ...]:
        """Every ledger of the trial: its own (a federation's summary) and its sites'."""
        return (self.ledger, *self.site_ledgers.values())

    @property
    def is_private(self) -> bool:
        return self.spec.is_private

    @property
    def void(self) -> bool:
        """A DP model trained before its noise and sampling were secret: no valid guarantee."""
        return any(led.void for led in self.ledgers)

    @property
    def training_sites(self) -> tuple[str, ...]:
        """The domains whose training data made the model: the source, or the federation's
        sites with a positive weight (the kind's rule: ``TrialKind.training_sites``)."""
        return kind_of(self.spec).training_sites(self.spec)

    def on_domain(self, target: str) -> bool:
        return target in self.training_sites


@dataclass(frozen=True)
class Inspection:
    """What a trial folder holds, verified: the record (None when it is not trained or its
    model, ledger, trial record or thresholds are damaged), the damage, damaged logs."""

    record: TrialRecord | None = None
    damage: DamagedRecord | None = None  # voids the trial: it is trained again
    logs: tuple[DamagedRecord, ...] = ()  # damaged training logs: set aside, model kept
    lost: dict[str, str] = field(default_factory=dict)  # logs set aside earlier, and why
    legacy: bool = False  # a ``done`` without checksums (parsed in full instead)


@dataclass(frozen=True)
class EvalRecord:
    """One finished evaluation of a trial's model on one target data version."""

    target: str
    fingerprint: str
    n_test: int
    n_boot: int
    eval_seconds: float
    resampling_unit: str  # "patient" or "image"
    protocol: int
    path: Path
    model: str = ""  # checksum of the model.pt it came from ("" before protocol 4)
    files: dict[str, FileSum] = field(default_factory=dict)
    data: str = ""  # checksum of the target's decoded test images it read ("": not known)

    def made_from(self, model: str, target: Any) -> bool:
        """Computed from these model bytes and, when the target says, these test images."""
        wanted = getattr(target, "data", "")
        return self.model == model and (not wanted or self.data == wanted)

    def metrics(self) -> pd.DataFrame:
        return self._frame(_METRICS)

    def predictions(self) -> pd.DataFrame:
        """Per-image scores (private: they stay in the trial folder)."""
        return self._frame(_PRED)

    def _frame(self, name: str) -> pd.DataFrame:
        """Parsed from bytes verified against eval.json (before protocol 4: parsed only)."""
        path = self.path / name
        try:
            data = integrity.read_verified(path, self.files[name]) if self.files else _read(path)
        except Damage as exc:
            raise DamagedRecord.of(exc) from None
        return _parquet_frame(path, data)


@dataclass(frozen=True)
class Weights:
    """A trial's released weights and the checksum of the bytes they were loaded from."""

    state: dict[str, Any]
    digest: str


class FileCheckpoint:
    """A trial's checkpoint file, written atomically and loaded with ``weights_only=True``."""

    def __init__(self, path: Path, guard: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self.guard = guard  # the store's fence: raises before a write of a fenced driver

    def load(self) -> dict[str, Any] | None:
        import torch

        if not self.path.is_file():
            return None
        return torch.load(self.path, weights_only=True)

    def save(self, state: dict[str, Any]) -> None:
        import torch

        self.guard()
        atomic_write(self.path, lambda p: torch.save(state, p), private=True)  # mode 0600

    def remove(self) -> None:
        """Delete the checkpoint and any temporary copy an interrupted save left behind: once
        the trial is done, nothing may be able to replay its noise or batches."""
        self.guard()
        self.path.unlink(missing_ok=True)
        for leftover in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            leftover.unlink(missing_ok=True)


def _ledger_json(
    ledger: Ledger | Mapping[str, Any], sites: Mapping[str, Ledger] | None
) -> dict[str, Any]:
    """ledger.json's document: the ledger, a federation's members under ``sites``."""
    if not isinstance(ledger, Ledger):
        if sites:
            raise TypeError("site_ledgers go with a typed Ledger (a document holds its sites)")
        return dict(ledger)
    out = ledger.as_dict()
    if sites:
        out["sites"] = {name: led.as_dict() for name, led in sites.items()}
    return out


def _record_json(record: RunRecord | Mapping[str, Any], spec: TrialSpec | None) -> dict[str, Any]:
    """trial.json's document: the spec, then the run record, its kind's part written by the
    kind (``TrialKind.record_json``); a writer that passed the kind's keys as plain fields
    (``RunRecord.make(audit=...)``: in ``extra``) has them read by the kind first."""
    if not isinstance(record, RunRecord):
        return dict(record)
    if spec is None:
        raise TypeError("a typed RunRecord is written with its spec")
    kind = _known_kind(spec)
    if kind is None:  # a newer version's kind: its keys stay in extra, written back unchanged
        return {"spec": spec.to_json(), **record.to_json({})}
    own = {k: record.extra[k] for k in kind.record_keys if k in record.extra}
    if own:
        if record.part is not None:
            raise TypeError(f"{sorted(own)} given both as fields and as the record's part")
        rest = {k: v for k, v in record.extra.items() if k not in own}
        record = dataclasses.replace(record, extra=rest, part=kind.record_part(own))
    if record.part is not None and not kind.record_keys:
        raise TypeError(f"a {kind.name} trial's record has no part ({record.part!r})")
    part = {} if record.part is None else kind.record_json(record.part)
    return {"spec": spec.to_json(), **record.to_json(part)}


def _known_kind(spec: TrialSpec) -> TrialKind | None:
    """The trial's kind, or None for one this version does not register: reading its record is
    not damage (the folder stays for the version that knows it); what needs the kind raises
    ``kinds.UnknownKind`` there."""
    try:
        return kind_of(spec)
    except UnknownKind:
        return None


def _run_record(spec: TrialSpec, info: Mapping[str, Any]) -> RunRecord:
    """trial.json's run record; the keys its kind owns (``TrialKind.record_keys``) read by the
    kind into the record's typed ``part`` (ValueError or TypeError: a damaged record)."""
    kind = _known_kind(spec)
    if kind is None:  # a newer version's kind: read whole into extra (kind_of names it later)
        return RunRecord.from_json(info, part=None)
    own = {k: info[k] for k in kind.record_keys if k in info}
    rest = {k: v for k, v in info.items() if k not in own}
    return RunRecord.from_json(rest, part=kind.record_part(own))


def _record(
    key: str, tdir: Path, contents: dict[str, bytes], files: dict[str, Any] | None
) -> TrialRecord:
    """The typed record from verified bytes (a folder without checksums: its model parsed)."""
    info = _json(tdir / _TRIAL_JSON, contents[_TRIAL_JSON], ("spec",))
    ledger = _json(tdir / _LEDGER, contents[_LEDGER], ("accountant", "epsilon_spent", "steps"))
    thresholds = _json(tdir / _THRESHOLDS, contents[_THRESHOLDS], ("youden_val",))["youden_val"]
    if files is None:
        _torch_state(tdir / _MODEL, contents[_MODEL])  # no checksum: a full structural parse
    try:
        spec = TrialSpec.from_json(info["spec"])
        run = _run_record(spec, info)
        thresholds = tuple(None if t is None else float(t) for t in thresholds)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DamagedRecord(tdir / _TRIAL_JSON, f"bad spec or run record ({exc})") from None
    try:
        summary = Ledger.from_dict(ledger)
        sites = {str(n): Ledger.from_dict(led) for n, led in ledger.get("sites", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DamagedRecord(tdir / _LEDGER, f"bad ledger ({exc})") from None
    # verified bytes are the bytes ``done`` names: its digest, not a second hash of the model
    digest = integrity.digest(contents[_MODEL]) if files is None else files[_MODEL]["digest"]
    return TrialRecord(key, spec, summary, run, thresholds, digest, sites)


def _parse_check(path: Path, data: bytes) -> None:
    """A full parse of a record without checksums (or of a training log): DamagedRecord."""
    if path.name == _VAL_PRED:
        _parquet_frame(path, data)
    elif path.name == _CONFIG:
        import yaml

        try:
            yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise DamagedRecord(path, f"unparsable ({str(exc)[:80]})") from None
    elif path.name == _HISTORY:
        if not isinstance(_json(path, data), list):
            raise DamagedRecord(path, "not a list of epoch records")
    elif path.name.endswith(".json"):
        _json(path, data)


def _legacy_eval(path: Path, data: bytes) -> dict[str, Any] | None:
    """An eval.json written before checksums (protocol < 4: evaluated again), else None."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(value, dict) or integrity.CHECKSUM in value:
        return None
    if int(value.get("protocol", 1)) >= EVAL_PROTOCOL or "target" not in value:
        return None
    return value


def _rel(path: Path, base: Path) -> Path:
    return path.relative_to(base) if path.is_relative_to(base) else path


def _safe_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
