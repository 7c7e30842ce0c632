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
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from privdom_ray import folder as sweep_folder
from privdom_ray import integrity, lease
from privdom_ray.atomic import atomic_write, read_json, write_json
from privdom_ray.config import TrialSpec
from privdom_ray.folder import SET_ASIDE, TRIALS
from privdom_ray.integrity import Damage, FileSum
from privdom_ray.kinds import UnknownKind, kind_of
from privdom_ray.lease import LockHeld
from privdom_ray.privacy import Ledger
from privdom_ray.records import RunRecord
from privdom_ray.store.evaluations import Evaluations
from privdom_ray.store.records import (
    _CHECKPOINT,
    _CONFIG,
    _DONE,
    _EVAL,
    _FAILED,
    _HISTORY,
    _LEDGER,
    _LEGACY_DONE,
    _MODEL,
    _RUNNING,
    _TB,
    _THRESHOLDS,
    _TRIAL_JSON,
    _VAL_PRED,
    CORE,
    DONE_FORMAT,
    EVAL_PROTOCOL,
    LOGS,
    DamagedRecord,
    EvalRecord,
    FileCheckpoint,
    Inspection,
    TrialRecord,
    Weights,
    _json,
    _json_bytes,
    _ledger_json,
    _parquet_bytes,
    _parse_check,
    _read,
    _record,
    _record_json,
    _rel,
    _safe_json,
    _torch_state,
    _yaml_bytes,
)

__all__ = ["DamagedRecord", "EVAL_PROTOCOL", "EvalRecord", "LockHeld", "TrialRecord", "TrialStore"]


class TrialStore(Evaluations):
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

    def inspect(self, key: str, contents: dict[str, bytes] | None = None) -> Inspection:
        """Verify a trained trial's files against its ``done`` (or, for a folder written
        before checksums, parse every one in full). Read-only. ``contents``, when given, is
        filled with the bytes it verified, by file name (a caller that needs a file's bytes
        too uses these instead of reading and verifying the file again)."""
        tdir = self.folder(key)
        if not self.is_trained(key):
            return Inspection()
        try:
            commit = self._commit(key)
        except DamagedRecord as exc:
            return Inspection(damage=exc)
        files = None if commit is None else commit["files"]
        contents = {} if contents is None else contents
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

    def read(self, key: str, contents: dict[str, bytes] | None = None) -> TrialRecord:
        """The trained trial ``key``; DamagedRecord names the first bad file. ``contents``:
        filled with the verified bytes, as by :meth:`inspect`."""
        found = self.inspect(key, contents)
        if found.damage is not None:
            raise found.damage
        if found.record is None:
            raise DamagedRecord(self.folder(key) / _DONE, "missing (not trained)")
        return found.record

    def read_with_model(self, key: str) -> tuple[TrialRecord, Weights]:
        """The trained trial and its weights from ONE verified read of its files (what an
        evaluation needs; :meth:`read` then :meth:`model` would read, verify and hash the
        largest file twice). The weights are loaded from the bytes the read verified."""
        contents: dict[str, bytes] = {}
        record = self.read(key, contents)
        state = _torch_state(self.folder(key) / _MODEL, contents[_MODEL])
        return record, Weights(state, record.model_digest)

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
            try:  # a newer version's kind: named, not judged (void, missing targets) nor moved
                kind_of(found.record.spec)
            except UnknownKind as exc:
                return "unknown", str(exc)
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

    def valid(self, key: str, found: Inspection | None = None) -> TrialRecord | None:
        """The trained trial if it is intact and its guarantee (if any) valid, else None.
        Read-only: tables and reports use it; the sweep uses :meth:`usable`. ``found``: this
        trial's :meth:`inspect`, when the caller has just made it (verified once, not twice)."""
        found = self.inspect(key) if found is None else found
        if found.record is None or found.record.void:
            return None
        return found.record

    def usable(
        self, key: str, log: Callable[[str], None] = print, found: Inspection | None = None
    ) -> TrialRecord | None:
        """The trained trial if the sweep may use it. Driver only (it writes): a damaged or
        void trial is set aside (None returned, with a line to ``log``) so that it is trained
        again; a damaged training log is set aside alone; a folder written before checksums
        is sealed after its full parse. ``found``: as in :meth:`valid`."""
        found = self.inspect(key) if found is None else found
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

    def unusable_reason(self, key: str, found: Inspection | None = None) -> str:
        """Why a trained trial cannot be used ("" when it can, or is not trained). ``found``:
        as in :meth:`valid`."""
        found = self.inspect(key) if found is None else found
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
