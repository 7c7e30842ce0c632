"""Decode and preprocess each domain once (Ray Data), into an on-disk cache every trial reads.

Layout of one cache entry, ``<cache_dir>/<domain>-<key>/`` where key hashes the manifest
fingerprint and the preprocessing:

- ``images.npy``   uint8 (N, S, S), row i = manifest row i (zeros where decoding failed)
- ``rows.parquet`` the manifest plus ``ok`` (decoded) per row
- ``skipped.csv``  path and error of every image that could not be decoded
- ``meta.json``    written last = entry complete; sealed (``integrity``): domain, fingerprint,
  preprocessing, counts, the entry's *identity* (the image files' sizes and mtimes, the
  decoders' versions) and the checksums of the files above, ``images.npy`` per block of rows

Every run verifies each entry it uses before any trial reads it: the seal, the identity (a
replaced image file or a new decoder makes the entry stale) and every checksum, blocks hashed
in parallel threads (``benchmarks/bench_checksums.py``: about a second per GB on 2 cores).
A stale or damaged entry is built again and replaces the old one atomically; one verification
per run, in the driver, keeps the trials' reads as fast as before and heals the cache before
any trial starts, which a check inside a trial's batch reads could not (it could only fail).

Ray Data workers decode blocks of rows and hand them back (``ray_decode``, the decoder
``build`` is given: this module imports no Ray); the driver streams the blocks (``iter_batches``,
so it holds a few at a time) and is the only writer of ``images.npy``. On a
multi-node cluster the cache lives on shared storage, and no two nodes ever write one file
(page-cache coherence across NFS clients is not something to rely on). The entry is built in
a temporary folder and renamed into place under a per-entry file lock (sweeps may share a
cache folder), so an interrupted build is never taken for a finished one; its temporary
folder is removed by the next build of the entry.

Reading (``load_split``) needs only numpy and pandas (trials and GPU machines need no Ray
Data) and reads the cache IN PLACE: a split's images are a :class:`CachedImages`, which reads
the rows a batch needs with ``pread`` when it is indexed. Every trial on a node shares the
operating system's one page-cached copy, and a trial's resident memory holds a few batches,
not the split: it does not grow with the number of images, nor does the time to first step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from privdom_ray import integrity
from privdom_ray.config import content_key
from privdom_ray.imaging import Preprocessing
from privdom_ray.manifest import LABELS, ManifestError


class CachedImages:
    """The images of some rows of a cache entry's ``images.npy``, read on demand.

    Indexing reads: an int gives one (S, S) array, a slice or an index array a (k, S, S) array,
    gathered with one ``pread`` per run of consecutive rows (the batches of a split are mostly
    runs). :meth:`subset` gives another lazy view. ``np.asarray`` reads everything (small data
    and tests only).
    """

    def __init__(self, path: str | Path, rows: np.ndarray) -> None:
        self.path = str(path)
        self.rows = np.asarray(rows, dtype=np.int64)
        header = np.load(self.path, mmap_mode="r")  # maps the file; reads only its header
        shape, dtype, self.offset = header.shape, header.dtype, header.offset
        del header
        if dtype != np.uint8 or len(shape) != 3:
            raise ValueError(f"{path}: expected uint8 (N, S, S), found {dtype} {shape}")
        self.size = shape[1:]
        self.row_bytes = int(shape[1] * shape[2])
        self.extra = np.zeros((0, *self.size), dtype=np.uint8)  # in-memory rows (row -1 - k)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.rows), *self.size)

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, int | np.integer):
            return self._read(self.rows[[int(index)]])[0]
        return self._read(self.rows[index])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self._read(self.rows)
        return out if dtype is None else out.astype(dtype)

    def subset(self, index) -> CachedImages:
        view = object.__new__(CachedImages)
        view.__dict__.update(self.__dict__)
        view.rows = self.rows[index]
        return view

    def with_rows(self, images: np.ndarray) -> CachedImages:
        """These rows followed by ``images`` (kept in memory): e.g. an audit's input canaries
        appended to a split that stays in the cache file."""
        view = self.subset(slice(None))
        view.extra = np.concatenate([self.extra, np.asarray(images, dtype=np.uint8)])
        start = len(self.extra)
        view.rows = np.concatenate([self.rows, -1 - np.arange(start, start + len(images))])
        return view

    def _read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.size), dtype=np.uint8)
        in_memory = rows < 0
        if in_memory.any():
            out[in_memory] = self.extra[-1 - rows[in_memory]]
            out[~in_memory] = self._read(rows[~in_memory])
            return out
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        wanted = rows[order]
        flat = out.reshape(len(rows), -1)
        # consecutive runs of (sorted) rows: one read each
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for run in np.split(np.arange(len(wanted)), breaks):
                first, count = int(wanted[run[0]]), len(run)
                data = os.pread(fd, count * self.row_bytes, self.offset + first * self.row_bytes)
                if len(data) != count * self.row_bytes:
                    raise OSError(
                        f"{self.path}: rows {first}-{first + count - 1} lie past its end (the "
                        "cache was truncated after this run verified it; run the sweep again)"
                    )
                flat[order[run]] = np.frombuffer(data, np.uint8).reshape(count, -1)
        finally:
            os.close(fd)
        return out


def take(images: np.ndarray | CachedImages, index) -> np.ndarray | CachedImages:
    """Rows of an image array without reading them (a lazy view of a cached split)."""
    return images.subset(index) if isinstance(images, CachedImages) else images[index]


def append(images: np.ndarray | CachedImages, extra: np.ndarray) -> np.ndarray | CachedImages:
    """``images`` followed by ``extra``, without reading a cached split into memory."""
    if isinstance(images, CachedImages):
        return images.with_rows(extra)
    return np.concatenate([images, extra])


@dataclass(frozen=True)
class SplitData:
    """One split of one domain: images uint8 (n, S, S) (a :class:`CachedImages` when read from
    a cache: indexing reads), labels float32 (n, L) NaN=masked, sex, age, patient ids."""

    images: np.ndarray | CachedImages
    labels: np.ndarray
    sex: np.ndarray
    age: np.ndarray
    # per-image patient ids: used only inside a trial (patient-level privacy), never stored
    patient: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class CacheEntry:
    domain: str
    path: Path
    n_images: int
    n_skipped: int
    built_seconds: float  # 0 when reused
    verify_seconds: float = 0.0  # checking every block of a reused entry
    rebuilt_because: str = ""  # why an existing entry was replaced ("" when new or reused)
    test_digest: str = ""  # checksum of the decoded test split: evaluations are bound to it


def cache_key(fingerprint: str, prep: Preprocessing) -> str:
    """The entry's folder name: the manifest and the preprocessing. What else the entry
    depends on (the image files' sizes and mtimes, the decoders) is its :func:`identity`,
    checked on every reuse: a change rebuilds the entry in place."""
    return content_key({"manifest": fingerprint, "preprocessing": dataclasses.asdict(prep)})


def entry_path(cache_dir: Path, domain: str, fingerprint: str, prep: Preprocessing) -> Path:
    return Path(cache_dir) / f"{domain}-{cache_key(fingerprint, prep)}"


def is_complete(path: Path) -> bool:
    return (path / META).is_file()


#: Decodes every manifest row into ``images.npy`` (uint8 (N, S, S), created by the decoder) and
#: returns one row per manifest row: ``row``, ``ok``, ``error`` (``ray_decode.decode_into``).
Decode = Callable[[pd.DataFrame, Preprocessing, Path], pd.DataFrame]


# ------------------------------------------------------------------------ identity, checksums

META, IMAGES, ROWS, SKIPPED = "meta.json", "images.npy", "rows.parquet", "skipped.csv"
META_FORMAT = 2
#: images.npy is checksummed in blocks of about this many bytes (whole rows)
BLOCK_BYTES = 4 << 20
_DECODER_PACKAGES = (
    "numpy", "pillow", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg",
    "pylibjpeg-rle", "pyjpegls",
)  # fmt: skip


def decoder_versions() -> dict[str, str]:
    """What turns files into pixels: the decoding libraries' versions and a checksum of our
    own decoding and preprocessing code (``imaging.py``)."""
    import importlib.metadata

    from privdom_ray import imaging

    out = {"imaging.py": integrity.digest(Path(imaging.__file__).read_bytes())}
    for pkg in _DECODER_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def files_identity(paths: Sequence[str]) -> str:
    """A checksum of every image file's size and modification time (nanoseconds), in row
    order; a missing file counts as (-1, -1). One ``stat`` per image."""
    stats = np.empty((len(paths), 2), dtype=np.int64)
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
            stats[i] = (st.st_size, st.st_mtime_ns)
        except OSError:
            stats[i] = (-1, -1)
    return integrity.digest(stats.tobytes())


def identity(paths: Sequence[str]) -> dict[str, Any]:
    """What a cache entry's pixels depend on beyond its key: the image files and decoders."""
    return {"files": files_identity(paths), "decoders": decoder_versions()}


@dataclass(frozen=True)
class EntryState:
    """A cache entry checked against its checksums (and its identity, when one is given)."""

    state: str  # ok, missing, incomplete, stale or damaged
    detail: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def inspect_entry(
    path: Path, ident: dict[str, Any] | None = None, *, blocks: bool = True
) -> EntryState:
    """Verify an entry: its sealed ``meta.json``, the checksums of ``rows.parquet`` and
    ``skipped.csv``, and of every block of ``images.npy`` (read in parallel threads); with
    ``ident``, also that the image files and decoders are those it was built from.
    ``blocks=False`` skips hashing images.npy's blocks (its size and header are still
    checked): ``status --quick`` on large caches. Read-only."""
    t0 = time.perf_counter()
    path = Path(path)
    if not path.is_dir():
        return EntryState("missing", "not built yet")
    try:
        meta = integrity.unseal(
            path / META, required=("format", "identity", "files", "images", "test_digest")
        )
    except integrity.Damage as exc:
        if (path / META).is_file() and _legacy_meta(path / META):
            return EntryState("stale", f"{META}: written before caches had checksums")
        state = "incomplete" if exc.reason == "missing" else "damaged"
        return EntryState(state, f"{META}: {exc.reason}")
    if meta["format"] != META_FORMAT:
        return EntryState("stale", f"{META}: format {meta['format']}, not {META_FORMAT}")
    problem = _verify_files(path, meta, blocks=blocks)
    if not problem and ident is not None:
        changed = [k for k in ("files", "decoders") if meta["identity"].get(k) != ident[k]]
        what = {"files": "image files changed", "decoders": "decoders changed"}
        if changed:
            reason = " and ".join(what[k] for k in changed) + " since the build"
            return EntryState("stale", reason, meta, time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    return EntryState("damaged" if problem else "ok", problem, meta, seconds)


def _legacy_meta(path: Path) -> bool:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and "n_images" in value and integrity.CHECKSUM not in value


def _verify_files(path: Path, meta: dict[str, Any], *, blocks: bool = True) -> str:
    """'' when every file matches meta.json, else the first problem, naming the file."""
    for name, fs in meta["files"].items():
        try:
            integrity.read_verified(path / name, integrity.FileSum.from_dict(fs))
        except integrity.Damage as exc:
            return f"{name}: {exc.reason}"
    images = meta["images"]
    n, size = images["shape"][0], images["shape"][1] * images["shape"][2]
    expected = images["offset"] + n * size
    try:
        actual = (path / IMAGES).stat().st_size
    except FileNotFoundError:
        return f"{IMAGES}: missing"
    if actual != expected:
        return f"{IMAGES}: {actual} bytes where {expected} were written (truncated?)"
    header = integrity.FileSum.from_dict(images["header"])
    if integrity.digest_file(path / IMAGES, 0, images["offset"]) != header.digest:
        return f"{IMAGES}: its header does not match its checksum"
    bad = _bad_blocks(path / IMAGES, images) if blocks else []
    if bad:
        rows = images["block_rows"]
        first = bad[0] * rows
        return (
            f"{IMAGES}: {len(bad)} block(s) do not match their checksums (first: block "
            f"{bad[0]}, rows {first}-{min(first + rows, n) - 1})"
        )
    return ""


def _block_digests(path: Path, offset: int, n: int, row_bytes: int, block_rows: int) -> list[str]:
    """Checksums of images.npy's data in blocks of ``block_rows`` rows, hashed in threads
    (hashlib releases the GIL on large buffers)."""
    from concurrent.futures import ThreadPoolExecutor

    starts = range(0, n, block_rows)

    def one(start: int) -> str:
        count = min(block_rows, n - start)
        return integrity.digest_file(path, offset + start * row_bytes, count * row_bytes)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, starts))


def _bad_blocks(path: Path, images: dict[str, Any]) -> list[int]:
    n, row_bytes = images["shape"][0], images["shape"][1] * images["shape"][2]
    found = _block_digests(path, images["offset"], n, row_bytes, images["block_rows"])
    return [i for i, (a, b) in enumerate(zip(found, images["blocks"], strict=True)) if a != b]


def split_digest(images: Path, rows: pd.DataFrame, split: str) -> str:
    """A checksum of one split as a trial reads it: which rows decoded, and their pixels.
    Evaluations name their target's test digest, so a rebuild that changes the test images
    (an image file replaced, a decoder that reads it differently) evaluates again, and one
    that only repairs damage does not."""
    keep = np.flatnonzero((rows["split"] == split).to_numpy() & rows["ok"].to_numpy(dtype=bool))
    h = hashlib.blake2b(keep.astype(np.int64).tobytes(), digest_size=16)
    pixels = np.load(images, mmap_mode="r")
    for start in range(0, len(keep), 1024):
        h.update(np.ascontiguousarray(pixels[keep[start : start + 1024]]).tobytes())
    del pixels
    return "b2:" + h.hexdigest()


def _images_record(path: Path) -> dict[str, Any]:
    """The checksums of a freshly built images.npy: its header and every block of rows."""
    header = np.load(path, mmap_mode="r")
    shape, offset = [int(x) for x in header.shape], int(header.offset)
    del header
    row_bytes = shape[1] * shape[2]
    block_rows = max(1, BLOCK_BYTES // max(row_bytes, 1))
    return {
        "shape": shape,
        "offset": offset,
        "header": integrity.FileSum(integrity.digest_file(path, 0, offset), offset).as_dict(),
        "block_rows": block_rows,
        "blocks": _block_digests(path, offset, shape[0], row_bytes, block_rows),
    }


def build(
    domain: str,
    manifest: pd.DataFrame,
    fingerprint: str,
    prep: Preprocessing,
    cache_dir: Path,
    *,
    decode: Decode,
    log=print,
    guard: Callable[[], None] = lambda: None,
) -> CacheEntry:
    """Build, verify-and-reuse, or rebuild one domain's cache entry. One builder per entry at
    a time (a file lock: caches may be shared by sweeps); a stale or damaged entry is replaced
    atomically by a new build, and temporaries of an interrupted build are removed. ``decode``
    fills ``images.npy`` (``ray_decode.decode_into``: Ray Data, needs ``ray.init``); ``guard``
    (the driver's fence) runs before every write."""
    from filelock import FileLock

    final = entry_path(cache_dir, domain, fingerprint, prep)
    final.parent.mkdir(parents=True, exist_ok=True)
    ident = identity(list(manifest["path"]))
    lock = FileLock(str(final.with_name(f".{final.name}.lock")))
    try:
        lock.acquire(timeout=1)
    except TimeoutError:
        log(f"[cache] {domain}: another process is building {final.name}; waiting for it")
        lock.acquire()
    try:
        _remove_leftovers(final, guard, log)
        found = inspect_entry(final, ident)
        if found.ok:
            meta = found.meta
            return CacheEntry(
                domain, final, meta["n_images"], meta["n_skipped"], 0.0, found.seconds,
                test_digest=meta["test_digest"],
            )  # fmt: skip
        why = "" if found.state == "missing" else f"{found.state}: {found.detail}"
        if why:
            log(f"[cache] {domain}: {final.name} is {why}; building it again")
        entry = _build_entry(
            domain, manifest, fingerprint, prep, final, ident, guard, log, decode
        )
        return dataclasses.replace(entry, rebuilt_because=why)
    finally:
        lock.release()


def _remove_leftovers(final: Path, guard: Callable[[], None], log) -> None:
    """Temporaries of interrupted builds of this entry (the caller holds the entry's lock,
    so no live builder owns them)."""
    leftovers = [
        *final.parent.glob(f"{final.name}.tmp-*"),
        *final.parent.glob(f"{final.name}.old-*"),
    ]
    for left in leftovers:
        guard()
        shutil.rmtree(left, ignore_errors=True)
        log(f"[cache] removed {left.name}, left by an interrupted build")


def _build_entry(
    domain: str,
    manifest: pd.DataFrame,
    fingerprint: str,
    prep: Preprocessing,
    final: Path,
    ident: dict[str, Any],
    guard: Callable[[], None],
    log,
    decode: Decode,
) -> CacheEntry:
    """Decode into a temporary folder, seal it, and rename it into place (replacing an old
    entry: renamed aside first, then removed)."""
    t0 = time.perf_counter()
    guard()
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        status = decode(manifest, prep, tmp / IMAGES)
        meta = _finish_entry(domain, manifest, fingerprint, prep, tmp, status, ident, t0)
        guard()
        if final.exists():
            old = final.with_name(f"{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if meta["n_skipped"]:
        log(
            f"[cache] {domain}: skipped {meta['n_skipped']} unreadable image(s); see {final / SKIPPED}"
        )
    return CacheEntry(
        domain, final, meta["n_images"], meta["n_skipped"], meta["built_seconds"],
        test_digest=meta["test_digest"],
    )  # fmt: skip


def _finish_entry(
    domain: str,
    manifest: pd.DataFrame,
    fingerprint: str,
    prep: Preprocessing,
    tmp: Path,
    status: pd.DataFrame,
    ident: dict[str, Any],
    t0: float,
) -> dict[str, Any]:
    """rows.parquet, skipped.csv and the sealed meta.json (written last) of a decoded entry."""
    if len(status) != len(manifest):
        raise RuntimeError(f"domain {domain!r}: decoded {len(status)} of {len(manifest)} rows")
    rows = manifest.reset_index(drop=True).copy()
    rows["ok"] = status["ok"].to_numpy(dtype=bool)
    skipped = pd.DataFrame({"path": rows["path"], "error": status["error"]})[~rows["ok"]]
    n_ok = int(rows["ok"].sum())
    if n_ok == 0:
        first = skipped["error"].iloc[0] if len(skipped) else "no rows"
        raise ManifestError(
            f"domain {domain!r}: none of its {len(rows)} images could be decoded "
            f"(first error: {first}); check the domain's root folder and file formats"
        )
    buf = io.BytesIO()
    rows.to_parquet(buf, index=False)
    files = {
        ROWS: integrity.write_atomic(tmp / ROWS, buf.getvalue()).as_dict(),
        SKIPPED: integrity.write_atomic(
            tmp / SKIPPED, skipped.to_csv(index=False).encode()
        ).as_dict(),
    }
    meta = {
        "format": META_FORMAT,
        "domain": domain,
        "fingerprint": fingerprint,
        "preprocessing": dataclasses.asdict(prep),
        "identity": ident,
        "n_images": n_ok,
        "n_skipped": len(skipped),
        "files": files,
        "images": _images_record(tmp / IMAGES),
        "test_digest": split_digest(tmp / IMAGES, rows, "test"),
        "built_seconds": time.perf_counter() - t0,
    }
    integrity.write_atomic(tmp / META, integrity.seal(meta))
    return meta


def load_split(path: str | Path, split: str) -> SplitData:
    """The decoded rows of one split (skipped images left out). Images stay in the cache file
    (:class:`CachedImages`); labels and demographics are small arrays."""
    path = Path(path)
    rows = pd.read_parquet(path / "rows.parquet")
    keep = (rows["split"] == split).to_numpy() & rows["ok"].to_numpy(dtype=bool)
    idx = np.flatnonzero(keep)
    return SplitData(
        images=CachedImages(path / "images.npy", idx),
        labels=rows.loc[keep, list(LABELS)].to_numpy(dtype=np.float32),
        sex=rows.loc[keep, "sex"].to_numpy(dtype=object),
        age=rows.loc[keep, "age"].to_numpy(dtype=np.float64),
        patient=rows.loc[keep, "patient_id"].to_numpy(dtype=object),
    )


def split_sizes(path: str | Path) -> dict[str, int]:
    rows = pd.read_parquet(Path(path) / "rows.parquet", columns=["split", "ok"])
    return rows[rows["ok"]].groupby("split").size().to_dict()


def entry_status(path: str | Path, *, blocks: bool = True) -> EntryState:
    """``status``: an entry verified in full, and checked against the image files its rows
    name and the decoders now installed (stale when they changed since the build)."""
    try:
        paths = list(pd.read_parquet(Path(path) / ROWS, columns=["path"])["path"])
    except Exception:  # noqa: BLE001 - a damaged rows.parquet: named by the verification
        paths = None
    return inspect_entry(Path(path), None if paths is None else identity(paths), blocks=blocks)
