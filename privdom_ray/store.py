"""The trial store: the one module that knows a trial folder's layout.

Every other stage reads and writes trial folders through :class:`TrialStore` and gets typed
records back (:class:`TrialRecord`, :class:`EvalRecord`), so file names are a private detail of
this module and a damaged file is reported once, naming the file, instead of crashing six
readers. One trial = ``<output>/trials/<key>/`` (key = content hash of what determines the
model). Everything in it is PRIVATE (it stays with the data owner) except what ``export``
copies out (see README "What may leave"):

- ``trial.json``  the resolved spec, the run's summary, versions, timings (``config.yaml``: the
  same plus the ledger, for people)
- ``ledger.json`` the privacy ledger (per-site ledgers of a federation under ``sites``)
- ``model.pt``    final weights (a plain state_dict, loadable with ``weights_only=True``)
- ``thresholds.json`` Youden thresholds on the source's validation split
- ``history.json``, ``tensorboard/``, ``val_predictions.parquet``: training curves and
  validation scores
- ``checkpoint.pt`` while training: model, optimizer and the SECRET generator states of the DP
  mechanism; deleted when the trial is done, so nothing left can replay its noise or batches
- ``running.json`` (heartbeat), ``failed.json`` (last error)
- ``done``        written last: the trained model is complete
- ``eval/<target>-<fingerprint>/`` per target data version: ``predictions.parquet`` (row
  position, scores, labels, sex, age, patient group: no ids, no paths), ``metrics.parquet``,
  ``eval.json``; each folder is renamed into place complete

Folders the sweep must not use (damaged records, DP models whose guarantee is void) are moved,
never deleted, to ``<output>/set_aside/``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from privdom_ray.config import TrialSpec
from privdom_ray.privacy import Ledger
from privdom_ray.results import atomic_write, read_json, write_json, write_parquet, write_yaml

TRIALS = "trials"
SET_ASIDE = "set_aside"
#: Evaluations of an older protocol are redone (the model is never retrained for it):
#: 1 resampled images (predictions had no patient groups); 2 counted a label's minimum
#: positives in images, so a label of 3 patients could pass a minimum of 10; 3 counts patients;
#: 4 jackknife t CIs (the percentile bootstrap under-covered) and subgroup macros over the
#: labels shared by their family (metrics.shared_label_sets).
EVAL_PROTOCOL = 4

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


class DamagedRecord(Exception):
    """A file of a trial folder is missing, truncated or unparsable."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"{path}: {reason}. The sweep sets the trial folder aside (under set_aside/) and "
            "re-runs the trial; nothing else needs fixing"
        )


def _json(path: Path, required: Sequence[str] = ()) -> Any:
    """Read a JSON record, raising DamagedRecord (naming the file) for any defect."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise DamagedRecord(path, "missing") from None
    except (OSError, ValueError) as exc:
        raise DamagedRecord(path, f"unreadable ({type(exc).__name__}: {exc})") from None
    missing = [k for k in required if not isinstance(value, dict) or k not in value]
    if missing:
        raise DamagedRecord(path, f"lacks {missing}")
    return value


@dataclass(frozen=True)
class TrialRecord:
    """A trained trial as the rest of the code sees it."""

    key: str
    spec: TrialSpec
    ledger: dict[str, Any]  # the ledger as written (a federation's per-site ledgers: "sites")
    info: dict[str, Any]  # trial.json: the run's summary (best epoch, timings, versions, ...)
    thresholds: tuple[float | None, ...]

    @property
    def summary_ledger(self) -> Ledger:
        return Ledger.from_dict(self.ledger)

    @property
    def is_private(self) -> bool:
        return self.spec.is_private

    @property
    def void(self) -> bool:
        """A DP model trained before its noise and sampling were secret: no valid guarantee."""
        ledgers = [self.ledger, *self.ledger.get("sites", {}).values()]
        return any(Ledger.from_dict(led).void for led in ledgers if led["accountant"] != "none")

    @property
    def training_sites(self) -> tuple[str, ...]:
        """The domains whose training data made the model: the source, or the federation's
        sites with a positive weight."""
        fed = self.spec.federation
        if fed is None:
            return (self.spec.source,)
        return tuple(s.name for s in fed.sites if s.weight > 0)

    def on_domain(self, target: str) -> bool:
        return target in self.training_sites


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

    def metrics(self) -> pd.DataFrame:
        return _parquet(self.path / _METRICS)

    def predictions(self) -> pd.DataFrame:
        """Per-image scores (private: they stay in the trial folder)."""
        return _parquet(self.path / _PRED)


def _check_complete(path: Path, complete: Callable[[Path], bool], what: str) -> None:
    if not path.is_file():
        raise DamagedRecord(path, "missing")
    if not complete(path):
        raise DamagedRecord(path, f"{what} (truncated?)")


def _parquet_complete(path: Path) -> bool:
    """A parquet file ends with its footer's magic bytes: a cheap check without reading it."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 8:
            return False
        f.seek(-4, os.SEEK_END)
        return f.read(4) == b"PAR1"


def _zip_complete(path: Path) -> bool:
    """torch.save writes a zip archive: its end-of-directory record is at the end."""
    import zipfile

    return zipfile.is_zipfile(path)


def _parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except FileNotFoundError:
        raise DamagedRecord(path, "missing") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DamagedRecord(path, f"unreadable ({type(exc).__name__}: {exc})") from None


class FileCheckpoint:
    """A trial's checkpoint file, written atomically and loaded with ``weights_only=True``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        import torch

        if not self.path.is_file():
            return None
        return torch.load(self.path, weights_only=True)

    def save(self, state: dict[str, Any]) -> None:
        import torch

        atomic_write(self.path, lambda p: torch.save(state, p), private=True)  # mode 0600

    def remove(self) -> None:
        """Delete the checkpoint and any temporary copy an interrupted save left behind: once
        the trial is done, nothing may be able to replay its noise or batches."""
        self.path.unlink(missing_ok=True)
        for leftover in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            leftover.unlink(missing_ok=True)


class TrialStore:
    """The trial folders of one sweep output folder."""

    def __init__(self, output: str | Path) -> None:
        self.output = Path(output)

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

    def read(self, key: str) -> TrialRecord:
        """The trained trial ``key``; DamagedRecord names the first bad file."""
        tdir = self.folder(key)
        info = _json(tdir / _TRIAL_JSON, ("spec",))
        ledger = _json(tdir / _LEDGER, ("accountant", "epsilon_spent", "steps"))
        thresholds = _json(tdir / _THRESHOLDS, ("youden_val",))["youden_val"]
        if not isinstance(_json(tdir / _HISTORY), list):
            raise DamagedRecord(tdir / _HISTORY, "not a list of epoch records")
        _check_complete(tdir / _MODEL, _zip_complete, "not a complete torch file")
        try:
            spec = TrialSpec.from_json(info["spec"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DamagedRecord(tdir / _TRIAL_JSON, f"bad spec ({exc})") from None
        return TrialRecord(key, spec, ledger, info, tuple(thresholds))

    def history(self, key: str) -> list[dict[str, Any]]:
        return _json(self.folder(key) / _HISTORY)

    def model_state(self, key: str) -> dict[str, Any]:
        """The released weights (a state_dict; loaded without running code from the file)."""
        import torch

        path = self.folder(key) / _MODEL
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except FileNotFoundError:
            raise DamagedRecord(path, "missing") from None
        except Exception as exc:  # noqa: BLE001 - torch raises several types for a bad file
            raise DamagedRecord(path, f"unreadable ({type(exc).__name__})") from None

    def model_path(self, key: str) -> Path:
        """Where a dependent trial's initial weights are (pretraining): read by ``torch.load``."""
        return self.folder(key) / _MODEL

    def evaluation(self, key: str, target: str, fingerprint: str) -> EvalRecord | None:
        """The finished evaluation of (target, fingerprint), or None when there is none."""
        edir = self._eval_folder(key, target, fingerprint)
        if not (edir / _EVAL_JSON).is_file():
            return None  # absent or half-written (renamed into place only when complete)
        ev = _json(edir / _EVAL_JSON, ("target", "fingerprint", "n_test", "n_boot"))
        for name in (_METRICS, _PRED):
            _check_complete(edir / name, _parquet_complete, "not a complete parquet file")
        return EvalRecord(
            target=str(ev["target"]),
            fingerprint=str(ev["fingerprint"]),
            n_test=int(ev["n_test"]),
            n_boot=int(ev["n_boot"]),
            eval_seconds=float(ev.get("eval_seconds", 0.0)),
            resampling_unit=str(ev.get("resampling_unit", "image")),
            protocol=int(ev.get("protocol", 1)),
            path=edir,
        )

    def evaluations(self, key: str) -> list[EvalRecord]:
        """Every finished evaluation of the trial, current or not (``show``)."""
        base = self.folder(key) / _EVAL
        names = (
            sorted(p.name for p in base.iterdir() if not p.name.startswith("."))
            if base.is_dir()
            else []
        )
        out = []
        for name in names:
            target, _, fingerprint = name.rpartition("-")
            ev = self.evaluation(key, target, fingerprint)
            if ev is not None:
                out.append(ev)
        return out

    def current(self, key: str, targets: Iterable[Any]) -> list[EvalRecord]:
        """The evaluations of ``targets`` (objects with ``name`` and ``fingerprint``) at their
        current data version and protocol; one per target at most. A damaged one counts as
        missing: it is evaluated again (and replaced)."""
        out = []
        for t in targets:
            try:
                ev = self.evaluation(key, t.name, t.fingerprint)
            except DamagedRecord:
                continue
            if ev is not None and ev.protocol >= EVAL_PROTOCOL:
                out.append(ev)
        return out

    def missing_targets(self, key: str, targets: Sequence[Any]) -> list[Any]:
        """The targets without a current evaluation (new targets, changed data, old protocol)."""
        have = {(e.target, e.fingerprint) for e in self.current(key, targets)}
        return [t for t in targets if (t.name, t.fingerprint) not in have]

    # ---------------------------------------------------------------------------- state

    def status(self, key: str, targets: Sequence[Any]) -> tuple[str, str]:
        """(state, detail) of one planned cell: done, damaged, void, failed, running,
        evaluating or pending. Read-only: nothing is moved (the sweep does that)."""
        tdir = self.folder(key)
        if self.is_trained(key):
            try:
                record = self.read(key)
                for t in targets:
                    self.evaluation(key, t.name, t.fingerprint)  # raises when damaged
                missing = self.missing_targets(key, targets)
            except DamagedRecord as exc:
                where = exc.path.relative_to(tdir) if exc.path.is_relative_to(tdir) else exc.path
                return "damaged", f"{where}: {exc.reason} (the next sweep redoes it)"
            if record.void:
                return "void", "DP model trained before secret randomness; will be retrained"
            if not missing:
                return "done", ""
        if (tdir / _FAILED).is_file():
            f = _safe_json(tdir / _FAILED)
            tail = "\n".join(str(f.get("error", "")).strip().splitlines()[-3:])
            return "failed", f"{f.get('reason', 'error')}: {tail}"
        if (tdir / _RUNNING).is_file():
            r = _safe_json(tdir / _RUNNING)
            age = time.time() - float(r.get("updated", 0))
            epoch = f"epoch {r['epoch']}, " if "epoch" in r else ""
            return (
                "running",
                f"{epoch}node {str(r.get('node', '?'))[:12]}, heartbeat {age:.0f}s ago",
            )
        if self.is_trained(key):
            names = ", ".join(t.name for t in self.missing_targets(key, targets))
            return "evaluating", "trained; targets left: " + names
        return "pending", ""

    def valid(self, key: str) -> TrialRecord | None:
        """The trained trial if it is readable and its guarantee (if any) valid, else None.
        Read-only: tables and reports use it; the sweep uses :meth:`usable`."""
        if not self.is_trained(key):
            return None
        try:
            record = self.read(key)
        except DamagedRecord:
            return None
        return None if record.void else record

    def usable(self, key: str, log: Callable[[str], None] = print) -> TrialRecord | None:
        """The trained trial if the sweep may use it; a damaged or void one is set aside (and
        None returned, with a line to ``log``) so that the trial is run again. Driver only:
        it moves folders."""
        if not self.is_trained(key):
            return None
        try:
            record = self.read(key)
        except DamagedRecord as exc:
            why = ("damaged", f"{exc.path.name}: {exc.reason}")
        else:
            if not record.void:
                self.checkpoint(key).remove()  # a crash between `done` and its removal
                return record
            why = ("void", "a DP model trained before its noise and sampling were secret")
        dest = self.set_aside(key, *why)
        log(f"[store] trial {key}: {why[1]}; moved to {dest} and run again")
        return None

    def set_aside(self, key: str, reason: str, detail: str = "") -> Path:
        """Move a trial folder out of the sweep (kept, with a note of why)."""
        dest = self.output / SET_ASIDE / f"{key}-{reason}-{time.strftime('%Y%m%d-%H%M%S')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.folder(key), dest)
        (dest / "SET_ASIDE.txt").write_text(f"{reason}: {detail}\n")
        return dest

    # ---------------------------------------------------------------------------- writing

    def write_trained(
        self,
        key: str,
        *,
        state_dict: dict[str, Any],
        ledger: dict[str, Any],
        history: list[dict[str, Any]],
        thresholds: Sequence[float | None],
        labels: Sequence[str],
        record: dict[str, Any],
        val_predictions: pd.DataFrame | None = None,
    ) -> None:
        """A trained model's files, ``done`` last; then the checkpoint (with the secret
        generator states) is deleted: model.pt holds the result now."""
        import torch

        tdir = self.folder(key)
        if val_predictions is not None:
            write_parquet(tdir / _VAL_PRED, val_predictions)
        atomic_write(tdir / _MODEL, lambda p: torch.save(state_dict, p))
        write_json(tdir / _LEDGER, ledger)
        write_json(tdir / _HISTORY, history)
        write_json(tdir / _THRESHOLDS, {"labels": list(labels), "youden_val": list(thresholds)})
        write_json(tdir / _TRIAL_JSON, record)
        write_yaml(tdir / _CONFIG, {**record, "ledger": ledger})
        atomic_write(tdir / _DONE, lambda p: p.write_text("done\n"))
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
    ) -> None:
        """Write one evaluation atomically (a temporary folder renamed into place). A current
        one written meanwhile by another attempt wins; an older-protocol one is replaced."""
        edir = self._eval_folder(key, target, fingerprint)
        tmp = edir.with_name(f".{edir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_parquet(tmp / _PRED, predictions)
        write_parquet(tmp / _METRICS, metrics)
        write_json(
            tmp / _EVAL_JSON,
            {"target": target, "fingerprint": fingerprint, "protocol": EVAL_PROTOCOL, **info},
        )
        try:
            existing = self.evaluation(key, target, fingerprint) if edir.exists() else None
        except DamagedRecord:
            existing = None  # replaced below (and kept beside, hidden)
        if existing is not None and existing.protocol >= EVAL_PROTOCOL:
            shutil.rmtree(tmp, ignore_errors=True)  # an at-least-once duplicate: keep the first
            return
        if edir.exists():  # an older protocol (or a damaged one): keep it beside, out of use
            os.replace(edir, edir.with_name(f".{edir.name}.replaced-{time.time_ns()}"))
        os.replace(tmp, edir)

    def checkpoint(self, key: str) -> FileCheckpoint:
        return FileCheckpoint(self.folder(key) / _CHECKPOINT)

    def has_checkpoint(self, key: str) -> bool:
        return (self.folder(key) / _CHECKPOINT).is_file()

    def tensorboard_dir(self, key: str) -> Path:
        return self.folder(key) / _TB

    def heartbeat(self, key: str, run_id: str, node: str, **extra: Any) -> None:
        """``running.json``: a cell at work, with its last epoch (status and progress read it)."""
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
        write_json(
            self.folder(key) / _FAILED,
            {"run_id": run_id, "reason": reason, "error": error[-4000:], "time": time.time()},
        )

    def failure(self, key: str) -> dict[str, Any] | None:
        path = self.folder(key) / _FAILED
        return _safe_json(path) if path.is_file() else None

    def finish_attempt(self, key: str) -> None:
        """A cell's attempt ended well: no heartbeat, no failure left behind."""
        (self.folder(key) / _RUNNING).unlink(missing_ok=True)
        (self.folder(key) / _FAILED).unlink(missing_ok=True)

    # ---------------------------------------------------------------------------- queries

    def release_id(self, key: str) -> str:
        """The id a trial goes by outside the data owner's site: a keyed hash (HMAC with a
        secret kept in the output folder) of its key. The key itself hashes the data's
        manifest, so publishing it would let anyone test guesses about the training set."""
        import hashlib
        import hmac

        salt_path = self.output / ".release_salt"
        if not salt_path.is_file():
            import secrets

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
        path = self.folder(key) / _CONFIG
        return path.read_text() if path.is_file() else None


def _safe_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------------------- the driver lock


class LockHeld(RuntimeError):
    """Another live driver works on the same output folder."""


class DriverLock:
    """One driver per output folder: two sweeps on one folder would train every cell twice
    (and, with secret noise, write two different models for one key).

    ``<output>/driver.lock`` names the holder (host, pid, run id, start) and is refreshed by
    ``beat()``; a lock whose holder is dead (same host, pid gone) or silent for
    ``stale_after`` seconds is taken over, so a killed driver never blocks the folder forever.
    """

    def __init__(self, output: Path, run_id: str, *, stale_after: float = 120.0) -> None:
        self.path = Path(output) / "driver.lock"
        self.run_id = run_id
        self.stale_after = stale_after
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = _safe_json(self.path)
                if other and not self._stale(other):
                    raise LockHeld(self._message(other)) from None
                self.path.unlink(missing_ok=True)  # a dead driver's lock: take it over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({**self.holder, "started": time.time(), "updated": time.time()}, f)
            return
        raise LockHeld(f"could not take {self.path}; another driver keeps taking it")

    def beat(self) -> None:
        current = _safe_json(self.path)
        if current.get("run_id") == self.run_id:
            write_json(self.path, {**current, "updated": time.time()})

    def release(self) -> None:
        if _safe_json(self.path).get("run_id") == self.run_id:
            self.path.unlink(missing_ok=True)

    def _stale(self, other: dict[str, Any]) -> bool:
        if time.time() - float(other.get("updated", 0)) > self.stale_after:
            return True
        if other.get("host") == self.holder["host"]:
            try:
                os.kill(int(other.get("pid", -1)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, OverflowError):
                return False
        return False

    def _message(self, other: dict[str, Any]) -> str:
        started = time.strftime("%H:%M:%S", time.localtime(float(other.get("started", 0))))
        return (
            f"another driver is running a sweep in {self.path.parent} (host {other.get('host')}, "
            f"pid {other.get('pid')}, run {other.get('run_id')}, started {started}); wait for it "
            f"to finish, or stop it. A killed driver's lock is taken over automatically once its "
            f"process is gone (same host) or after {self.stale_after:.0f} s without a heartbeat."
        )

    def __enter__(self) -> DriverLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def keep_beating(lock: DriverLock, every: float = 20.0) -> Callable[[], None]:
    """Refresh ``lock`` from a daemon thread until the returned function is called."""
    import threading

    stop = threading.Event()

    def run() -> None:
        while not stop.wait(every):
            lock.beat()

    threading.Thread(target=run, name="driver-lock", daemon=True).start()
    return stop.set
