"""Content checksums for stored records: written with a record, verified when it is read.

Data files (``model.pt``, parquet tables, JSON records, the cache's arrays) keep their formats;
their digests live in a *commit record* written last and atomically: a trial's ``done``, an
evaluation's ``eval.json``, a cache entry's ``meta.json``, an output folder's ``outputs.json``.
A commit record seals itself (its own digest over its canonical JSON), so a damaged one is
caught too, and a record whose file does not match its digest is damaged whatever it parses as.

Why: the ends of a file say nothing about its middle. 4 KiB of zeros inside ``model.pt`` or
``images.npy`` still loads; only a digest of the whole content tells a record from its ruin.

The digest is BLAKE2b (128 bits) from the standard library: no extra dependency, and
``benchmarks/bench_checksums.py`` measures what verification costs (a model, a 1 GB cache).
Pure and torch-free (Tune's trial process imports it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privdom_ray import folder as sweep_folder
from privdom_ray.atomic import atomic_write

ALGORITHM = "blake2b-128"
_PREFIX = "b2:"
_CHUNK = 1 << 20
CHECKSUM = "checksum"  # the key of a commit record's own digest


class Damage(Exception):
    """A stored record is missing, truncated, unparsable or does not match its checksum."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def digest(data: bytes | memoryview) -> str:
    return _PREFIX + hashlib.blake2b(data, digest_size=16).hexdigest()


def digest_file(path: Path, start: int = 0, length: int | None = None) -> str:
    """The digest of ``length`` bytes of a file from ``start`` (default: to its end)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        f.seek(start)
        left = math.inf if length is None else length
        while left > 0:
            chunk = f.read(int(min(_CHUNK, left)))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return _PREFIX + h.hexdigest()


@dataclass(frozen=True)
class FileSum:
    """What a commit record says about one file: its size and content digest."""

    digest: str
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size}

    @classmethod
    def of(cls, data: bytes) -> FileSum:
        return cls(digest(data), len(data))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FileSum:
        return cls(str(d["digest"]), int(d["size"]))


def read_verified(path: Path, expected: FileSum) -> bytes:
    """The bytes of ``path`` if they match ``expected``; Damage (naming why) otherwise."""
    data = _read(path)
    if len(data) != expected.size:
        raise Damage(path, f"{len(data)} bytes where {expected.size} were written (truncated?)")
    if digest(data) != expected.digest:
        raise Damage(path, "content does not match its checksum (changed or damaged inside)")
    return data


def _read(path: Path) -> bytes:
    """The bytes of ``path``; Damage when it is missing or unreadable."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise Damage(path, "missing") from None
    except OSError as exc:
        raise Damage(path, f"unreadable ({exc.strerror or exc})") from None


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def _plain(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (numpy scalars as numbers, other objects as text)."""

    def default(o: Any) -> Any:
        return o.item() if hasattr(o, "item") else str(o)

    return json.loads(json.dumps(obj, default=default))


def seal(obj: Mapping[str, Any]) -> bytes:
    """A commit record as JSON bytes that carry their own checksum (``"checksum"``)."""
    plain = _plain({k: v for k, v in obj.items() if k != CHECKSUM})
    plain[CHECKSUM] = digest(_canonical(plain))
    return json.dumps(plain, indent=2).encode()


def unseal(path: Path, data: bytes | None = None, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A sealed record's content; Damage when it is missing, unparsable or not its own."""
    if data is None:
        data = _read(path)
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Damage(path, f"unparsable ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(value, dict) or CHECKSUM not in value:
        raise Damage(path, "not a sealed record (no checksum)")
    stated = value.pop(CHECKSUM)
    if digest(_canonical(value)) != stated:
        raise Damage(path, "content does not match its checksum (changed or damaged inside)")
    missing = [k for k in required if k not in value]
    if missing:
        raise Damage(path, f"lacks {missing}")
    return value


def write_atomic(path: Path, data: bytes, *, private: bool = False) -> FileSum:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename) and return its
    checksum, computed from the very bytes written."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(Path(path), write, private=private)
    return FileSum.of(data)


# ------------------------------------------------------------------ sealed files of a folder


def seal_files(folder: Path, names: list[str], record: str = sweep_folder.OUTPUTS) -> None:
    """Record the checksums of ``folder/<name>`` (those that exist) in a sealed ``record``:
    e.g. the tables a sweep wrote, so ``status`` and ``export`` can verify them later."""
    folder = Path(folder)
    files = {}
    for name in names:
        path = folder / name
        if path.is_file():
            files[name] = FileSum(digest_file(path), path.stat().st_size).as_dict()
    write_atomic(folder / record, seal({"algorithm": ALGORITHM, "files": files}))


def verified_bytes(folder: Path, name: str, record: str = sweep_folder.OUTPUTS) -> bytes:
    """The bytes of ``folder/<name>`` checked against the sealed ``record``; Damage when the
    record is missing or damaged, does not list the file, or the file does not match."""
    folder = Path(folder)
    sealed = unseal(folder / record, required=("files",))
    if name not in sealed["files"]:
        raise Damage(folder / name, f"not listed in {record}: written by nothing that sealed it")
    return read_verified(folder / name, FileSum.from_dict(sealed["files"][name]))
