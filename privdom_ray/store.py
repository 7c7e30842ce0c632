"""The trial store: the one module that knows a trial folder's layout.

Every other stage reads and writes trial folders through :class:`TrialStore` and gets typed
records back (:class:`TrialRecord` with its ``privacy.Ledger`` and ``records.RunRecord``,
:class:`EvalRecord`); only this module turns them into JSON and back, so file names and
formats are a private detail of this module and a damaged file is reported once, naming the file, instead of crashing six
readers. One trial = ``<output>/trials/<key>/`` (key = content hash of what determines the
model). Everything in it is PRIVATE (it stays with the data owner) except what ``export``
copies out (see docs/privacy.md, "What may leave"):

- ``trial.json``  the resolved spec, the run's summary, versions, timings
- ``ledger.json`` the privacy ledger (per-site ledgers of a federation under ``sites``)
- ``model.pt``    final weights (a plain state_dict, loadable with ``weights_only=True``)
- ``thresholds.json`` Youden thresholds on the source's validation split
- ``history.json``, ``tensorboard/``, ``val_predictions.parquet``: training curves and
  validation scores
- ``config.yaml`` (folders written before each fact was written once): trial.json plus the
  ledger, for people; read, verified and kept, never written again: ``show`` renders the same
  text from the verified records (:meth:`TrialStore.config_text`)
- ``checkpoint.pt`` while training: model, optimizer and the SECRET generator states of the DP
  mechanism; deleted when the trial is done, so nothing left can replay its noise or batches
- ``running.json`` (heartbeat), ``failed.json`` (last error)
- ``done``        written last: the commit record, sealed JSON with the size and checksum of
  every file above (``integrity``); a file that does not match is damaged, whatever it parses as
- ``eval/<target>-<fingerprint>/`` per target data version: ``predictions.parquet`` (row
  position, scores, labels, sex, age, patient group: no ids, no paths), ``metrics.parquet``,
  ``eval.json`` (sealed: the two files' checksums and the checksum of the model they came from);
  each folder is renamed into place complete

Damage to the model, ledger, trial record or thresholds voids the trial: the sweep moves the
folder (never deletes it) to ``<output>/set_aside/`` and trains it again. Damage to a training
log (history, an old config.yaml, validation scores) sets that file aside and keeps the intact
model. A
damaged evaluation, or one of another model, is evaluated again. Folders of trials written
before checksums (``done`` = "done") are parsed in full once and then sealed.

Writes are fenced (``lease``): a store made with a driver's lease token refuses every write
once that driver lost its lease.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from privdom_ray import folder as sweep_folder
from privdom_ray import integrity, lease
from privdom_ray.atomic import atomic_write, read_json, write_json
from privdom_ray.config import TrialSpec
from privdom_ray.integrity import Damage, FileSum
from privdom_ray.kinds import kind_of
from privdom_ray.lease import LockHeld
from privdom_ray.privacy import Ledger
from privdom_ray.records import RunRecord

__all__ = ["DamagedRecord", "EvalRecord", "LockHeld", "TrialRecord", "TrialStore"]

TRIALS = sweep_folder.TRIALS  # the output folder's names live in privdom_ray.folder
SET_ASIDE = sweep_folder.SET_ASIDE
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


class TrialStore:
    """The trial folders of one sweep output folder.

    ``fence``: the lease token of the driver this store writes for (0: unfenced, e.g. tools
    and tests that run no sweep); every write first checks that the driver still holds it.
    """

    def __init__(self, output: str | Path, fence: int = 0) -> None:
        self.output = Path(output)
        self.fence = fence

    def guard(self) -> None:
        """Raise ``lease.Fenced`` when this store's driver no longer holds the folder's lease."""
        if self.fence:
            lease.check(self.output, self.fence)

    # ---------------------------------------------------------------------------- layout

    def folder(self, key: str) -> Path:
        return self.output / TRIALS / key

    def trial_keys(self) -> list[str]:
        base = self.output / TRIALS
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def _eval_folder(self, key: str, target: str, fingerprint: str) -> Path:
        return self.folder(key) / _EVAL / f"{target}-{fingerprint}"

    # ---------------------------------------------------------------------------- reading

    def is_trained(self, key: str) -> bool:
        return (self.folder(key) / _DONE).is_file()

    def _commit(self, key: str) -> dict[str, Any] | None:
        """The sealed ``done`` (None for a folder written before checksums); DamagedRecord."""
        path = self.folder(key) / _DONE
        data = _read(path)
        if data.strip() == _LEGACY_DONE:
            return None
        try:
            return integrity.unseal(path, data, required=("files",))
        except Damage as exc:
            raise DamagedRecord.of(exc) from None

    def inspect(self, key: str) -> Inspection:
        """Verify a trained trial's files against its ``done`` (or, for a folder written
        before checksums, parse every one in full). Read-only."""
        tdir = self.folder(key)
        if not self.is_trained(key):
            return Inspection()
        try:
            commit = self._commit(key)
        except DamagedRecord as exc:
            return Inspection(damage=exc)
        files = None if commit is None else commit["files"]
        contents: dict[str, bytes] = {}
        logs = []
        for name in (*CORE, *LOGS):
            try:
                contents[name] = self._verified(tdir / name, files)
                if files is None:  # no checksum: a full parse instead
                    _parse_check(tdir / name, contents[name])
            except DamagedRecord as exc:
                if name in CORE:
                    return Inspection(damage=exc, legacy=files is None)
                if name in (files or {}) or files is None and (tdir / name).exists():
                    logs.append(exc)  # a log that was written and is damaged now
        try:
            record = _record(key, tdir, contents, files)
        except DamagedRecord as exc:
            return Inspection(damage=exc, legacy=files is None)
        lost = dict((commit or {}).get("lost", {}))
        return Inspection(record, None, tuple(logs), lost, legacy=files is None)

    @staticmethod
    def _verified(path: Path, files: dict[str, Any] | None) -> bytes:
        """The file's bytes, checked against its entry in ``done`` (when there is one)."""
        if files is None:
            return _read(path)
        if path.name not in files:
            raise DamagedRecord(path, "not in the trial's done record")
        try:
            return integrity.read_verified(path, FileSum.from_dict(files[path.name]))
        except Damage as exc:
            raise DamagedRecord.of(exc) from None

    def read(self, key: str) -> TrialRecord:
        """The trained trial ``key``; DamagedRecord names the first bad file."""
        found = self.inspect(key)
        if found.damage is not None:
            raise found.damage
        if found.record is None:
            raise DamagedRecord(self.folder(key) / _DONE, "missing (not trained)")
        return found.record

    def ledger_document(self, key: str) -> dict[str, Any]:
        """The stored ledger.json as written, parsed from bytes checked against ``done`` (a
        folder written before checksums: read as it is): what ``audit`` compares field by
        field with its recomputation, unknown and missing fields included. DamagedRecord."""
        return self._document(key, _LEDGER)

    def _document(self, key: str, name: str) -> dict[str, Any]:
        path = self.folder(key) / name
        commit = self._commit(key)
        value = _json(path, self._verified(path, None if commit is None else commit["files"]))
        if not isinstance(value, dict):
            raise DamagedRecord(path, "not a JSON object")
        return value

    def history(self, key: str) -> list[dict[str, Any]]:
        """The training curves; DamagedRecord when the file is damaged or was set aside."""
        path = self.folder(key) / _HISTORY
        commit = self._commit(key) if self.is_trained(key) else None
        if commit is not None and _HISTORY in commit.get("lost", {}):
            raise DamagedRecord(path, f"set aside: {commit['lost'][_HISTORY]}")
        files = commit["files"] if commit is not None and _HISTORY in commit["files"] else None
        value = _json(path, self._verified(path, files))
        if not isinstance(value, list):
            raise DamagedRecord(path, "not a list of epoch records")
        return value

    def model(self, key: str) -> Weights:
        """The released weights, loaded from bytes checked against ``done`` (never running
        code from the file), with their checksum: an evaluation names it."""
        path = self.folder(key) / _MODEL
        commit = self._commit(key)
        data = self._verified(path, None if commit is None else commit["files"])
        return Weights(_torch_state(path, data), integrity.digest(data))

    def model_state(self, key: str) -> dict[str, Any]:
        return self.model(key).state

    def model_digest(self, key: str) -> str:
        """The checksum of the model ``done`` records ("" for a folder written before
        checksums, until the sweep seals it)."""
        commit = self._commit(key)
        return "" if commit is None else FileSum.from_dict(commit["files"][_MODEL]).digest

    def model_path(self, key: str) -> Path:
        """Where a dependent trial's initial weights are (pretraining): read by ``torch.load``."""
        return self.folder(key) / _MODEL

    def verified_bytes(self, key: str, name: str) -> bytes:
        """A finished trial's file (``model.pt``, ``ledger.json``, ... or
        ``eval/<target>-<fingerprint>/<file>``) as bytes checked against the checksum written
        with it: what ``export`` copies. DamagedRecord when it does not match, or when the
        trial was written before checksums and the sweep has not sealed it yet."""
        if name.startswith(f"{_EVAL}/"):
            _, folder, file = name.split("/")
            target, _, fingerprint = folder.rpartition("-")
            ev = self.evaluation(key, target, fingerprint)
            if ev is None or file not in ev.files:
                raise DamagedRecord(self.folder(key) / name, "no sealed evaluation holds it")
            try:
                return integrity.read_verified(ev.path / file, ev.files[file])
            except Damage as exc:
                raise DamagedRecord.of(exc) from None
        commit = self._commit(key)
        if commit is None:
            raise DamagedRecord(self.folder(key) / name, "written before checksums (run the sweep)")
        return self._verified(self.folder(key) / name, commit["files"])

    def verify_file(self, key: str, name: str) -> str:
        """The checksum of a verified file of a finished trial (see :meth:`verified_bytes`)."""
        return integrity.digest(self.verified_bytes(key, name))

    def evaluation(self, key: str, target: str, fingerprint: str) -> EvalRecord | None:
        """The finished evaluation of (target, fingerprint), or None when there is none;
        DamagedRecord when its record or files do not match their checksums."""
        edir = self._eval_folder(key, target, fingerprint)
        path = edir / _EVAL_JSON
        if not edir.is_dir():
            return None  # never evaluated (a folder is renamed into place only when complete)
        data = _read(path)  # a folder without eval.json was damaged after it was complete
        try:
            ev = integrity.unseal(path, data, required=("target", "fingerprint", "files", "model"))
        except Damage as exc:
            ev = _legacy_eval(path, data)
            if ev is None:
                raise DamagedRecord.of(exc) from None
        files = {n: FileSum.from_dict(s) for n, s in ev.get("files", {}).items()}
        for name in (_METRICS, _PRED):
            if files:
                try:
                    integrity.read_verified(edir / name, files[name])
                except (Damage, KeyError) as exc:
                    raise DamagedRecord.of(
                        exc if isinstance(exc, Damage) else Damage(edir / name, "not recorded")
                    ) from None
            elif not (edir / name).is_file():
                raise DamagedRecord(edir / name, "missing")
        return EvalRecord(
            target=str(ev["target"]),
            fingerprint=str(ev["fingerprint"]),
            n_test=int(ev.get("n_test", 0)),
            n_boot=int(ev.get("n_boot", 0)),
            eval_seconds=float(ev.get("eval_seconds", 0.0)),
            resampling_unit=str(ev.get("resampling_unit", "image")),
            protocol=int(ev.get("protocol", 1)),
            path=edir,
            model=str(ev.get("model", "")),
            files=files,
            data=str(ev.get("data", "")),
        )

    def evaluations(self, key: str) -> list[EvalRecord]:
        """Every finished evaluation of the trial's current model, any data version (``show``)."""
        base = self.folder(key) / _EVAL
        names = (
            sorted(p.name for p in base.iterdir() if not p.name.startswith("."))
            if base.is_dir()
            else []
        )
        model = self.model_digest(key) if self.is_trained(key) else None
        out = []
        for name in names:
            target, _, fingerprint = name.rpartition("-")
            ev = self.evaluation(key, target, fingerprint)
            if ev is not None and (not model or ev.model == model):
                out.append(ev)
        return out

    def current(self, key: str, targets: Iterable[Any]) -> list[EvalRecord]:
        """The evaluations of ``targets`` (objects with ``name``, ``fingerprint`` and optionally
        ``data``) at their current data version and protocol, made from the model now on disk
        (and from the target's current test images); one per target at most. A damaged one, or
        one of another model or other images, counts as missing: it is evaluated again."""
        try:
            model = self.model_digest(key) if self.is_trained(key) else ""
        except DamagedRecord:
            model = ""
        if not model:
            return []  # not trained, damaged, or not sealed yet: nothing can be bound to it
        out = []
        for t in targets:
            try:
                ev = self.evaluation(key, t.name, t.fingerprint)
            except DamagedRecord:
                continue
            if ev is not None and ev.protocol >= EVAL_PROTOCOL and ev.made_from(model, t):
                out.append(ev)
        return out

    def missing_targets(self, key: str, targets: Sequence[Any]) -> list[Any]:
        """The targets without a current evaluation (new targets, changed data, old protocol,
        another model, damage)."""
        have = {(e.target, e.fingerprint) for e in self.current(key, targets)}
        return [t for t in targets if (t.name, t.fingerprint) not in have]

    # ---------------------------------------------------------------------------- state

    def status(self, key: str, targets: Sequence[Any], driver_run: str = "") -> tuple[str, str]:
        """(state, detail) of one planned cell: done, damaged, void, failed, running,
        interrupted, evaluating or pending. ``driver_run``: the run id of the live driver
        ("" when none): a heartbeat of another run is a cell that run left unfinished.
        Read-only: nothing is moved (the sweep does that)."""
        tdir = self.folder(key)
        found = self.inspect(key)
        if found.damage is not None:
            return "damaged", f"{_rel(found.damage.path, tdir)}: {found.damage.reason} " + (
                "(the next sweep sets the trial aside and trains it again)"
            )
        if found.record is not None:
            if found.record.void:
                return "void", "DP model trained before secret randomness; will be retrained"
            problems = [f"{_rel(d.path, tdir)}: {d.reason}" for d in found.logs]
            for t in targets:
                try:
                    self.evaluation(key, t.name, t.fingerprint)
                except DamagedRecord as exc:
                    problems.append(f"{_rel(exc.path, tdir)}: {exc.reason}")
            if problems:
                return "damaged", "; ".join(problems) + (
                    " (the model is intact: the next sweep sets a damaged training log aside "
                    "and evaluates a damaged evaluation again)"
                )
            missing = self.missing_targets(key, targets)
            notes = [f"{n} set aside earlier ({why})" for n, why in found.lost.items()]
            if found.legacy:
                notes.append("written before checksums: parsed in full; the next sweep seals it")
            if not missing and not found.legacy:
                return "done", "; ".join(notes)
        return self._activity(key, targets, found, driver_run)

    def _activity(
        self, key: str, targets: Sequence[Any], found: Inspection, driver_run: str
    ) -> tuple[str, str]:
        tdir = self.folder(key)
        if (tdir / _FAILED).is_file():
            f = _safe_json(tdir / _FAILED)
            tail = "\n".join(str(f.get("error", "")).strip().splitlines()[-3:])
            return "failed", f"{f.get('reason', 'error')}: {tail}"
        if (tdir / _RUNNING).is_file():
            r = _safe_json(tdir / _RUNNING)
            age = time.time() - float(r.get("updated", 0))
            epoch = f"epoch {r['epoch']}, " if "epoch" in r else ""
            if driver_run and r.get("run_id") == driver_run:
                return (
                    "running",
                    f"{epoch}node {str(r.get('node', '?'))[:12]}, heartbeat {age:.0f}s ago",
                )
            return "interrupted", (
                f"{epoch}its driver (run {r.get('run_id', '?')}) is gone; last heartbeat "
                f"{age:.0f}s ago; the next sweep resumes it"
            )
        if found.record is not None:
            if found.legacy:
                return "done", "written before checksums: parsed in full; the next sweep seals " + (
                    "it and evaluates its targets again"
                )
            names = ", ".join(t.name for t in self.missing_targets(key, targets))
            return "evaluating", "trained; targets left: " + names
        return "pending", ""

    def valid(self, key: str) -> TrialRecord | None:
        """The trained trial if it is intact and its guarantee (if any) valid, else None.
        Read-only: tables and reports use it; the sweep uses :meth:`usable`."""
        found = self.inspect(key)
        if found.record is None or found.record.void:
            return None
        return found.record

    def usable(self, key: str, log: Callable[[str], None] = print) -> TrialRecord | None:
        """The trained trial if the sweep may use it. Driver only (it writes): a damaged or
        void trial is set aside (None returned, with a line to ``log``) so that it is trained
        again; a damaged training log is set aside alone; a folder written before checksums
        is sealed after its full parse."""
        found = self.inspect(key)
        if found.record is None and found.damage is None:
            return None
        if found.damage is not None:
            why = ("damaged", f"{found.damage.path.name}: {found.damage.reason}")
        elif found.record is not None and found.record.void:
            why = ("void", "a DP model trained before its noise and sampling were secret")
        else:
            record = found.record
            assert record is not None
            if found.legacy or found.logs:
                self._repair(key, found, log)
            self.checkpoint(key).remove()  # a crash between `done` and its removal
            return record
        dest = self.set_aside(key, *why)
        log(f"[store] trial {key}: {why[1]}; moved to {dest} and run again")
        return None

    def unusable_reason(self, key: str) -> str:
        """Why a trained trial cannot be used ("" when it can, or is not trained)."""
        found = self.inspect(key)
        if found.damage is not None:
            return f"{_rel(found.damage.path, self.folder(key))}: {found.damage.reason}"
        if found.record is not None and found.record.void:
            return "a DP model trained before its noise and sampling were secret (void)"
        return ""

    def _repair(self, key: str, found: Inspection, log: Callable[[str], None]) -> None:
        """Set damaged training logs aside (an old config.yaml too: it is derived, ``show``
        renders it from the record), and record the checksums of a folder written before them."""
        tdir = self.folder(key)
        lost = dict(found.lost)
        for damage in found.logs:
            name = damage.path.name
            if damage.path.exists():
                self.guard()
                dest = self.output / SET_ASIDE / f"{key}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(damage.path, dest)
            if name == _CONFIG:  # derived: nothing is lost, nothing is written again
                log(f"[store] trial {key}: {name} {damage.reason}; set aside (show renders it "
                    "from the trial record and ledger)")  # fmt: skip
                continue
            lost[name] = f"{damage.reason}; moved to {SET_ASIDE}/"
            log(
                f"[store] trial {key}: {name} {damage.reason}; set aside (a private training log: "
                "the model, its ledger and evaluations are intact and kept)"
            )
        files = {}
        for name in (*CORE, *LOGS):
            path = tdir / name
            if path.is_file() and name not in lost:
                files[name] = FileSum.of(path.read_bytes()).as_dict()
        if found.legacy:
            log(f"[store] trial {key}: written before checksums; parsed in full and sealed")
        self._seal(key, files, lost)

    def _seal(self, key: str, files: dict[str, Any], lost: dict[str, str] | None = None) -> None:
        body = {"format": DONE_FORMAT, "algorithm": integrity.ALGORITHM, "files": files}
        if lost:
            body["lost"] = lost
        self._write(self.folder(key) / _DONE, integrity.seal(body))

    def rewrite(self, key: str, name: str, data: bytes) -> None:
        """Replace one file of a finished trial and record its new checksum in ``done``: a
        deliberate change (a repair, or a test playing a faulty writer), never a silent one."""
        commit = self._commit(key)
        if commit is None:
            raise DamagedRecord(self.folder(key) / _DONE, "written before checksums")
        files = dict(commit["files"])
        files[name] = self._write(self.folder(key) / name, data).as_dict()
        self._seal(key, files, commit.get("lost"))

    def set_aside(self, key: str, reason: str, detail: str = "") -> Path:
        """Move a trial folder out of the sweep (kept, with a note of why)."""
        self.guard()
        dest = self.output / SET_ASIDE / f"{key}-{reason}-{time.strftime('%Y%m%d-%H%M%S')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.folder(key), dest)
        (dest / "SET_ASIDE.txt").write_text(f"{reason}: {detail}\n")
        return dest

    # ---------------------------------------------------------------------------- writing

    def _write(self, path: Path, data: bytes, *, private: bool = False) -> FileSum:
        self.guard()
        return integrity.write_atomic(path, data, private=private)

    def write_trained(
        self,
        key: str,
        *,
        state_dict: dict[str, Any],
        ledger: Ledger | Mapping[str, Any],
        history: list[dict[str, Any]],
        thresholds: Sequence[float | None],
        labels: Sequence[str],
        record: RunRecord | Mapping[str, Any],
        val_predictions: pd.DataFrame | None = None,
        spec: TrialSpec | None = None,
        site_ledgers: Mapping[str, Ledger] | None = None,
    ) -> None:
        """A trained model's files, then ``done`` with their checksums (the commit); then the
        checkpoint (with the secret generator states) is deleted: model.pt holds the result.

        Typed: ``ledger`` a Ledger (a federation's summary, its members in ``site_ledgers``),
        ``record`` a RunRecord and ``spec`` the trial's spec. The documents themselves (a
        ledger dict with ``sites``, a record dict with ``spec``) are still taken as they are:
        tests that play a faulty or an older writer write them."""
        import torch

        ledger, record = _ledger_json(ledger, site_ledgers), _record_json(record, spec)

        tdir = self.folder(key)
        files: dict[str, Any] = {}
        if val_predictions is not None:
            files[_VAL_PRED] = self._write(tdir / _VAL_PRED, _parquet_bytes(val_predictions))
        buf = io.BytesIO()
        torch.save(state_dict, buf)
        files[_MODEL] = self._write(tdir / _MODEL, buf.getvalue())
        files[_LEDGER] = self._write(tdir / _LEDGER, _json_bytes(ledger))
        files[_HISTORY] = self._write(tdir / _HISTORY, _json_bytes(history))
        thresholds_record = {"labels": list(labels), "youden_val": list(thresholds)}
        files[_THRESHOLDS] = self._write(tdir / _THRESHOLDS, _json_bytes(thresholds_record))
        files[_TRIAL_JSON] = self._write(tdir / _TRIAL_JSON, _json_bytes(record))
        self._seal(key, {n: s.as_dict() for n, s in files.items()})
        self.checkpoint(key).remove()

    def write_eval(
        self,
        key: str,
        target: str,
        fingerprint: str,
        *,
        metrics: pd.DataFrame,
        predictions: pd.DataFrame,
        info: dict[str, Any],
        model: str,
        data: str = "",
    ) -> None:
        """Write one evaluation atomically (a temporary folder renamed into place), bound to
        ``model``, the checksum of the model bytes it was computed from, and ``data``, that of
        the test images it read. A current one of the same model and images written meanwhile
        by another attempt wins; any other one is replaced."""
        self.guard()
        edir = self._eval_folder(key, target, fingerprint)
        tmp = edir.with_name(f".{edir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        files = {
            _PRED: self._write(tmp / _PRED, _parquet_bytes(predictions)).as_dict(),
            _METRICS: self._write(tmp / _METRICS, _parquet_bytes(metrics)).as_dict(),
        }
        body = {"target": target, "fingerprint": fingerprint, "protocol": EVAL_PROTOCOL, **info}
        sealed = {**body, "model": model, "data": data, "files": files}
        self._write(tmp / _EVAL_JSON, integrity.seal(sealed))
        try:
            existing = self.evaluation(key, target, fingerprint) if edir.exists() else None
        except DamagedRecord:
            existing = None  # replaced below (and kept beside, hidden)
        same = existing is not None and existing.model == model and existing.data == data
        if same and existing.protocol >= EVAL_PROTOCOL:
            shutil.rmtree(tmp, ignore_errors=True)  # an at-least-once duplicate: keep the first
            return
        self.guard()
        if edir.exists():  # older protocol, another model or damaged: kept beside, out of use
            os.replace(edir, edir.with_name(f".{edir.name}.replaced-{time.time_ns()}"))
        os.replace(tmp, edir)

    def checkpoint(self, key: str) -> FileCheckpoint:
        return FileCheckpoint(self.folder(key) / _CHECKPOINT, self.guard)

    def has_checkpoint(self, key: str) -> bool:
        return (self.folder(key) / _CHECKPOINT).is_file()

    def tensorboard_dir(self, key: str) -> Path:
        return self.folder(key) / _TB

    def heartbeat(self, key: str, run_id: str, node: str, **extra: Any) -> None:
        """``running.json``: a cell at work, with its last epoch (status and progress read it)."""
        self.guard()
        write_json(
            self.folder(key) / _RUNNING,
            {"run_id": run_id, "node": node, "pid": os.getpid(), "updated": time.time(), **extra},
        )

    def last_heartbeat(self, key: str) -> dict[str, Any] | None:
        try:
            return read_json(self.folder(key) / _RUNNING)
        except (OSError, ValueError):
            return None  # not written yet, or already removed at the end

    def record_failure(self, key: str, run_id: str, *, reason: str, error: str) -> None:
        """``failed.json``: why a cell stopped (the error's last lines), for ``status``."""
        self.guard()
        write_json(
            self.folder(key) / _FAILED,
            {"run_id": run_id, "reason": reason, "error": error[-4000:], "time": time.time()},
        )

    def failure(self, key: str) -> dict[str, Any] | None:
        path = self.folder(key) / _FAILED
        return _safe_json(path) if path.is_file() else None

    def finish_attempt(self, key: str) -> None:
        """A cell's attempt ended well: no heartbeat, no failure left behind."""
        self.guard()
        (self.folder(key) / _RUNNING).unlink(missing_ok=True)
        (self.folder(key) / _FAILED).unlink(missing_ok=True)

    # ---------------------------------------------------------------------------- queries

    def release_id(self, key: str) -> str:
        """The id a trial goes by outside the data owner's site: a keyed hash (HMAC with a
        secret kept in the output folder) of its key. The key itself hashes the data's
        manifest, so publishing it would let anyone test guesses about the training set."""
        import hashlib
        import hmac

        salt_path = self.output / sweep_folder.RELEASE_SALT
        if not salt_path.is_file():
            import secrets

            self.guard()
            atomic_write(salt_path, lambda p: p.write_text(secrets.token_hex(32)), private=True)
        salt = salt_path.read_text().strip().encode()
        return hmac.new(salt, key.encode(), hashlib.sha256).hexdigest()[:12]

    def find(self, query: str) -> list[str]:
        """Keys of finished trials matching a key (or prefix) or ``source/epsilon/seed``."""
        if not (self.output / TRIALS).is_dir():
            raise FileNotFoundError(f"no trials in {self.output}; is it a sweep's output folder?")
        if "/" not in query:
            return [k for k in self.trial_keys() if k.startswith(query) and self._has_record(k)]
        parts = query.split("/")
        if len(parts) != 3:
            raise LookupError(
                f"{query!r}: expected a trial key or source/epsilon/seed, e.g. site_a/1/0"
            )
        source, eps, seed = parts
        hits = []
        for k in self.trial_keys():
            spec = _safe_json(self.folder(k) / _TRIAL_JSON).get("spec", {})
            if (spec.get("source"), str(spec.get("epsilon")), str(spec.get("seed"))) == (
                source, eps, seed,
            ):  # fmt: skip
                hits.append(k)
        return hits

    def _has_record(self, key: str) -> bool:
        return (self.folder(key) / _TRIAL_JSON).is_file()

    def config_text(self, key: str) -> str | None:
        """The trial's record and ledger as YAML, for people (``show``; None: not trained),
        rendered from the verified trial.json and ledger.json: each fact is written once."""
        if not self.is_trained(key):
            return None
        try:
            self.read(key)  # the trial's records verified and parsed, or the damage named
            record, ledger = self._document(key, _TRIAL_JSON), self.ledger_document(key)
        except DamagedRecord as exc:
            return f"# damaged: {_rel(exc.path, self.folder(key))}: {exc.reason}\n"
        return _yaml_bytes({**record, "ledger": ledger}).decode()


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
    """trial.json's document: the spec, then the run record."""
    if not isinstance(record, RunRecord):
        return dict(record)
    if spec is None:
        raise TypeError("a typed RunRecord is written with its spec")
    return {"spec": spec.to_json(), **record.to_json()}


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
        run = RunRecord.from_json(info)
        thresholds = tuple(None if t is None else float(t) for t in thresholds)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DamagedRecord(tdir / _TRIAL_JSON, f"bad spec or run record ({exc})") from None
    try:
        summary = Ledger.from_dict(ledger)
        sites = {str(n): Ledger.from_dict(led) for n, led in ledger.get("sites", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DamagedRecord(tdir / _LEDGER, f"bad ledger ({exc})") from None
    digest = integrity.digest(contents[_MODEL])
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
