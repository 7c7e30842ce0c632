"""The sweep's input checks: everything that needs no cluster, before anything starts.

Manifests and fingerprints of every domain, writable output and cache folders, deltas and
sample rates against the training splits (again after decoding, with the images that
decoded), a user-supplied ``training.init`` file, and the public loss weights. A failed check
raises :class:`~privdom_ray.config.GridError` and leaves no trace. Called by the driver
(:mod:`privdom_ray.sweep`) and by ``launch.py plan``; knows nothing of Ray.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from privdom_ray import cache, grid, kinds
from privdom_ray.config import SweepSpec
from privdom_ray.domains import build_manifest
from privdom_ray.manifest import fingerprint

Log = Callable[[str], None]


def _log(msg: str) -> None:
    print(msg, flush=True)


def build_manifests(
    spec: SweepSpec, log: Log = _log
) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    manifests, fps = {}, {}
    for d in spec.domains:
        t0 = time.perf_counter()
        df = build_manifest(d.kind, d.root, d.options, name=d.name)
        manifests[d.name] = df
        fps[d.name] = fingerprint(df, d.root)
        counts = df.groupby("split").size().to_dict()
        log(
            f"[data] {d.name} ({d.kind}): {len(df)} images, "
            + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("train", "val", "test"))
            + f" ({time.perf_counter() - t0:.1f}s)"
        )
    return manifests, fps


@dataclass(frozen=True)
class Inputs:
    """What is known about the data before Ray starts: manifests, fingerprints, train sizes."""

    manifests: dict[str, pd.DataFrame]
    fingerprints: dict[str, str]
    n_train: dict[str, int]
    init_file_hash: str = ""
    public_pos_weight: tuple[float, ...] = ()  # training.pos_weight "public", resolved


def check_inputs(spec: SweepSpec, log: Log = _log, *, writable: bool = True) -> Inputs:
    """Every check that needs no cluster, before anything is started or written.

    Deltas are checked against the manifest's training-split size, which is at least the
    decoded size, so a delta accepted here is also below 1/N of the images actually trained on.
    """
    if writable:
        _check_writable(spec.output, "output")
        _check_writable(spec.cache_dir, "cache_dir")
    manifests, fps = build_manifests(spec, log)
    n_train = {s: int((manifests[s]["split"] == "train").sum()) for s in spec.trained_domains}
    kinds.check_deltas(spec, n_train)
    grid.check_sample_rates(spec, *_train_units(spec, manifests))
    init_hash = check_weights_file(spec.init_path, spec.model) if spec.init_path else ""
    return Inputs(manifests, fps, n_train, init_hash, public_pos_weight(spec, manifests))


def _train_units(
    spec: SweepSpec, manifests: Mapping[str, pd.DataFrame]
) -> tuple[dict[str, int], dict[str, int]]:
    """Training images and patients per trained (or pretraining) domain of the manifests."""
    names = [*spec.trained_domains, *([spec.pretrain.domain] if spec.pretrain else [])]
    train = {n: manifests[n][manifests[n]["split"] == "train"] for n in names}
    return (
        {n: len(df) for n, df in train.items()},
        {n: int(df["patient_id"].nunique()) for n, df in train.items()},
    )


def public_pos_weight(spec: SweepSpec, manifests: Mapping[str, pd.DataFrame]) -> tuple:
    """``training.pos_weight: public``: exact weights of the pretraining domain's training
    split (public by declaration, so reading its labels costs no privacy)."""
    if spec.training.pos_weight != "public" or spec.pretrain is None:
        return ()
    from privdom_ray.lossweights import exact_pos_weight
    from privdom_ray.manifest import LABELS

    public = manifests[spec.pretrain.domain]
    labels = public.loc[public["split"] == "train", list(LABELS)].to_numpy(dtype=float)
    return tuple(float(w) for w in exact_pos_weight(labels))


def check_weights_file(path: Path, model_name: str) -> str:
    """A user-supplied ``training.init`` file must be a state_dict of the grid's model.

    Loaded with ``weights_only=True`` (no code runs from the file); returns a content hash
    that becomes part of every dependent trial's key and ledger.
    """
    import hashlib

    import torch

    from privdom_ray.models import build_model

    def fail(why: str) -> grid.GridError:
        return grid.GridError("training.init", [f"training.init: {str(path)!r} {why}"])

    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - unreadable for any reason: say why
        raise fail(f"is not a readable weights file ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise fail("must hold a state_dict (a mapping of parameter names to tensors)")
    try:
        build_model(model_name).load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise fail(f"does not fit model {model_name!r}: {' '.join(first)}") from None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def check_decoded_sizes(spec: SweepSpec, trained: Mapping[str, cache.CacheEntry]) -> None:
    """The sample-rate check again with the images that decoded (skipped ones are gone)."""
    n_train, n_patients = {}, {}
    for domain, entry in trained.items():
        rows = pd.read_parquet(entry.path / cache.ROWS, columns=["split", "ok", "patient_id"])
        train = rows[(rows["split"] == "train") & rows["ok"]]
        n_train[domain], n_patients[domain] = len(train), int(train["patient_id"].nunique())
    grid.check_sample_rates(spec, n_train, n_patients)


def _check_writable(path: Path, key: str) -> None:
    """The folder ``key`` names, or the nearest existing folder above it, must be writable
    (tried with a temporary file, removed at once: permissions alone do not tell, e.g. for
    root or a read-only mount). A sweep that fails its checks leaves no trace."""
    import tempfile

    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    why = "is not a folder" if not existing.is_dir() else ""
    if not why:
        try:
            fd, probe = tempfile.mkstemp(prefix=".privdom-write-check-", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            why = f"is not writable ({exc.strerror or exc})"
    if why:
        fix = {
            "output": "choose another output folder (--out DIR)",
            "cache_dir": "make it writable or set cache_dir to a writable folder: every run "
            "verifies its cache there and rebuilds damaged entries",
        }[key]
        raise grid.GridError(
            key, [f"{key}: {str(path)!r} cannot be used: {str(existing)!r} {why}; {fix}"]
        )
