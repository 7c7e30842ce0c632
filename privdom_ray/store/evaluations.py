"""The trial store's evaluations: ``eval/<target>-<fingerprint>/`` folders read and written.

Owns :class:`Evaluations`, the part of :class:`~privdom_ray.store.TrialStore` that reads a
trial's sealed evaluations (``evaluation``, ``evaluations``, ``current``, ``missing_targets``)
and writes one atomically (``write_eval``). Separate because an evaluation is a record of its
own (bound to a model's and a test set's checksums, redone on a new protocol) with its own
folder; ``TrialStore`` inherits these methods, so they are called on the store as before. It
uses the store's layout and write fence (``folder``, ``_eval_folder``, ``guard``, ``_write``,
``model_digest``) through ``self``.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

from privdom_ray import integrity
from privdom_ray.integrity import Damage, FileSum
from privdom_ray.store.records import (
    _EVAL,
    _EVAL_JSON,
    _METRICS,
    _PRED,
    EVAL_PROTOCOL,
    DamagedRecord,
    EvalRecord,
    _legacy_eval,
    _parquet_bytes,
    _read,
)


class Evaluations:
    """A trial store's evaluation folders (mixed into :class:`TrialStore`)."""

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
