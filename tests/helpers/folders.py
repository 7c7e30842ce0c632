"""Reading a sweep's trial folders the way the code does: through the trial store's verified
reads, so a test sees what the sweep, the tables and the audit see (a file that does not match
its checksum raises ``DamagedRecord`` instead of being read as if it were fine).

Also the one sanctioned way for a test to change a finished record: :func:`rewrite_record`
plays a faulty writer (the record rewritten and sealed again, as ``TrialStore.rewrite`` does),
and :func:`rewritten` undoes it afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from privdom_ray.store import EvalRecord, TrialRecord, TrialStore


def trained_keys(output: Path) -> list[str]:
    """Keys of the trials with a ``done`` commit record (intact or not)."""
    store = TrialStore(output)
    return [k for k in store.trial_keys() if store.is_trained(k)]


def records(output: Path) -> dict[str, TrialRecord]:
    """Every trained trial, key -> its verified record (DamagedRecord if one is damaged)."""
    store = TrialStore(output)
    return {k: store.read(k) for k in trained_keys(output)}


def record(output: Path, key: str) -> TrialRecord:
    """One trained trial's verified record."""
    return TrialStore(output).read(key)


def key_named(output: Path, name: str) -> str:
    """The key of the trained trial called ``name`` (e.g. ``a_eps1_seed0``)."""
    keys = [k for k, r in records(output).items() if r.info.name == name]
    assert len(keys) == 1, f"{len(keys)} trials named {name!r} in {output}"
    return keys[0]


def ledger(output: Path, key: str) -> dict[str, Any]:
    """The trial's privacy ledger document as written, verified (a federation's per-site
    ledgers: ``sites``): what the audit reads (the typed record is ``record(...).ledger``)."""
    return dict(TrialStore(output).ledger_document(key))


def info(output: Path, key: str) -> dict[str, Any]:
    """The trial's run record as written, verified (spec, name, timings, versions, ...; the
    typed record is ``record(...).info``)."""
    return json.loads(TrialStore(output).verified_bytes(key, "trial.json"))


def model_state(output: Path, key: str) -> dict[str, Any]:
    """The released weights, loaded from bytes checked against ``done``."""
    return TrialStore(output).model(key).state


def model_stamps(output: Path) -> dict[str, int]:
    """key -> modification time (ns) of each trained trial's model file: a model trained again
    gets a new one, a finished model left alone keeps it."""
    store = TrialStore(output)
    return {k: store.model_path(k).stat().st_mtime_ns for k in trained_keys(output)}


def evaluation(output: Path, key: str, target: str, fingerprint: str | None = None) -> EvalRecord:
    """The trial's finished evaluation on ``target`` (``fingerprint`` None: its only one, of the
    model now on disk); its ``metrics()`` and ``predictions()`` are verified reads."""
    store = TrialStore(output)
    if fingerprint is not None:
        found = store.evaluation(key, target, fingerprint)
        assert found is not None, f"trial {key} has no evaluation on {target}-{fingerprint}"
        return found
    found_all = [e for e in store.evaluations(key) if e.target == target]
    assert len(found_all) == 1, f"trial {key}: {len(found_all)} evaluations on {target}"
    return found_all[0]


def metrics(output: Path, key: str, target: str, fingerprint: str | None = None) -> pd.DataFrame:
    return evaluation(output, key, target, fingerprint).metrics()


def predictions(
    output: Path, key: str, target: str, fingerprint: str | None = None
) -> pd.DataFrame:
    return evaluation(output, key, target, fingerprint).predictions()


def rewrite_record(output: Path, key: str, name: str, edit: Callable[[Any], Any]) -> bytes:
    """A faulty writer: replace the JSON record ``name`` (``ledger.json``, ``trial.json``) of a
    finished trial by ``edit(its value)``, sealed in ``done`` like an honest write. Returns the
    original bytes."""
    store = TrialStore(output)
    original = store.verified_bytes(key, name)
    store.rewrite(key, name, json.dumps(edit(json.loads(original))).encode())
    return original


@contextmanager
def rewritten(output: Path, key: str, name: str, edit: Callable[[Any], Any]) -> Iterator[None]:
    """:func:`rewrite_record` for the duration of a ``with`` block; the original bytes are
    written back (and sealed) afterwards, whatever happened inside."""
    original = rewrite_record(output, key, name, edit)
    try:
        yield
    finally:
        TrialStore(output).rewrite(key, name, original)


def find(output: Path, source: str, epsilon: float, seed: int = 0) -> str:
    """The key of the one trained trial of (source, epsilon, seed) (an audit twin excluded)."""
    keys = [
        k
        for k, r in records(output).items()
        if (r.spec.source, r.spec.epsilon, r.spec.seed) == (source, float(epsilon), seed)
        and r.spec.audit is None
    ]
    assert len(keys) == 1, f"{len(keys)} trials of {source}/{epsilon}/{seed} in {output}"
    return keys[0]


def reseal_evaluations(output: Path, **fields: Any) -> int:
    """Set ``fields`` in every evaluation record (eval.json) and seal it again: a deliberate
    edit, as a writer of another version would have made it. Returns how many were changed."""
    from privdom_ray import integrity

    store = TrialStore(output)
    n = 0
    for key in trained_keys(output):
        for ev in store.evaluations(key):
            path = ev.path / "eval.json"
            path.write_bytes(integrity.seal({**integrity.unseal(path), **fields}))
            n += 1
    return n


def clone_trial(output: Path, key: str, **spec_changes: Any) -> str:
    """A copy of finished trial ``key`` (model, ledger, evaluations) under the key of its spec
    with ``spec_changes`` (e.g. a model of an older data version); returns the new key."""
    import shutil

    from privdom_ray.config import TrialSpec

    store = TrialStore(output)
    old = info(output, key)
    spec = TrialSpec.from_json({**old["spec"], **spec_changes}).with_key()
    shutil.copytree(store.folder(key), store.folder(spec.key))
    rewrite_record(output, spec.key, "trial.json", lambda i: {**i, "spec": spec.to_json()})
    return spec.key


def checkpoint_left(output: Path, key: str) -> bool:
    """Whether the trial's checkpoint (with the secret generator states) is still on disk."""
    return TrialStore(output).has_checkpoint(key)


def commit_stamps(output: Path) -> dict[str, int]:
    """key -> modification time (ns) of each trained trial's commit record (``done``, written
    last): when the trial finished."""
    store = TrialStore(output)
    return {k: (store.folder(k) / "done").stat().st_mtime_ns for k in trained_keys(output)}
