"""Decode and preprocess each domain once (Ray Data), into an on-disk cache every trial reads.

Layout of one cache entry, ``<cache_dir>/<domain>-<key>/`` where key hashes the manifest
fingerprint and the preprocessing:

- ``images.npy``   uint8 (N, S, S), row i = manifest row i (zeros where decoding failed)
- ``rows.parquet`` the manifest plus ``ok`` (decoded) per row
- ``skipped.csv``  path and error of every image that could not be decoded
- ``meta.json``    domain, fingerprint, preprocessing, counts; written last = entry complete

Ray Data workers decode blocks of rows and hand them back; the driver streams the blocks
(``iter_batches``, so it holds a few at a time) and is the only writer of ``images.npy``. On a
multi-node cluster the cache lives on shared storage, and no two nodes ever write one file
(page-cache coherence across NFS clients is not something to rely on). The entry is built in
a temporary folder and renamed into place, so an interrupted build is never taken for a
finished one.

Reading (``load_split``) needs only numpy and pandas (trials and GPU machines need no Ray
Data) and reads the cache IN PLACE: a split's images are a :class:`CachedImages`, which reads
the rows a batch needs with ``pread`` when it is indexed. Every trial on a node shares the
operating system's one page-cached copy, and a trial's resident memory holds a few batches,
not the split: it does not grow with the number of images, nor does the time to first step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from privdom_ray.config import content_key
from privdom_ray.imaging import Preprocessing, load
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


def cache_key(fingerprint: str, prep: Preprocessing) -> str:
    return content_key({"manifest": fingerprint, "preprocessing": dataclasses.asdict(prep)})


def entry_path(cache_dir: Path, domain: str, fingerprint: str, prep: Preprocessing) -> Path:
    return Path(cache_dir) / f"{domain}-{cache_key(fingerprint, prep)}"


def is_complete(path: Path) -> bool:
    return (path / "meta.json").is_file()


def _decode_batch(batch: dict[str, np.ndarray], prep: dict) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: decode and preprocess a block of rows, return them."""
    preprocessing = Preprocessing(**prep)
    size = preprocessing.image_size
    images = np.zeros((len(batch["row"]), size, size), dtype=np.uint8)
    ok = np.zeros(len(batch["row"]), dtype=bool)
    errors: list[str] = []
    for i, path in enumerate(batch["path"]):
        try:
            images[i] = load(str(path), preprocessing)
            ok[i] = True
            errors.append("")
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped and counted
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
    return {"row": batch["row"], "image": images, "ok": ok, "error": np.array(errors, dtype=object)}


def _quiet_ray_data() -> None:
    """One line per domain (the sweep's ``[cache]`` line) instead of Ray Data's per-operator
    progress blocks and its start/finish messages, which a user cannot act on."""
    import logging

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_operator_progress_bars = False
    for name in ("ray.data._internal.progress", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.ERROR)  # "bars disabled", "finished in 0.1s"


def build(
    domain: str,
    manifest: pd.DataFrame,
    fingerprint: str,
    prep: Preprocessing,
    cache_dir: Path,
    *,
    log=print,
) -> CacheEntry:
    """Build (or reuse) one domain's cache entry with Ray Data; requires ``ray.init`` first."""
    final = entry_path(cache_dir, domain, fingerprint, prep)
    if is_complete(final):
        meta = json.loads((final / "meta.json").read_text())
        return CacheEntry(domain, final, meta["n_images"], meta["n_skipped"], 0.0)

    t0 = time.perf_counter()
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    status = _decode_into(manifest, prep, tmp / "images.npy")
    if len(status) != len(manifest):
        raise RuntimeError(f"domain {domain!r}: decoded {len(status)} of {len(manifest)} rows")

    rows = manifest.reset_index(drop=True).copy()
    rows["ok"] = status["ok"].to_numpy(dtype=bool)
    skipped = pd.DataFrame({"path": rows["path"], "error": status["error"]})[~rows["ok"]]
    n_ok = int(rows["ok"].sum())
    if n_ok == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        first = skipped["error"].iloc[0] if len(skipped) else "no rows"
        raise ManifestError(
            f"domain {domain!r}: none of its {len(rows)} images could be decoded "
            f"(first error: {first}); check the domain's root folder and file formats"
        )
    rows.to_parquet(tmp / "rows.parquet", index=False)
    skipped.to_csv(tmp / "skipped.csv", index=False)
    seconds = time.perf_counter() - t0
    meta = {
        "domain": domain,
        "fingerprint": fingerprint,
        "preprocessing": dataclasses.asdict(prep),
        "n_images": n_ok,
        "n_skipped": len(skipped),
        "built_seconds": seconds,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if final.exists():  # a concurrent builder won the race: keep its entry
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if len(skipped):
        log(
            f"[cache] {domain}: skipped {len(skipped)} unreadable image(s); see {final / 'skipped.csv'}"
        )
    return CacheEntry(domain, final, n_ok, len(skipped), seconds)


def _decode_into(manifest: pd.DataFrame, prep: Preprocessing, images_path: Path) -> pd.DataFrame:
    """Decode every row with Ray Data; this process alone writes the blocks into the file."""
    import ray.data  # only the builder needs Ray Data

    _quiet_ray_data()
    size = prep.image_size
    images = np.lib.format.open_memmap(
        images_path, mode="w+", dtype=np.uint8, shape=(len(manifest), size, size)
    )
    items = [{"row": i, "path": p} for i, p in enumerate(manifest["path"])]
    blocks = max(1, min(len(items) // 64, 64))
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        _decode_batch,
        fn_kwargs={"prep": dataclasses.asdict(prep)},
        batch_size=64,
        batch_format="numpy",
        num_cpus=1,
    )
    parts = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        images[batch["row"]] = batch["image"]
        parts.append(pd.DataFrame({k: batch[k] for k in ("row", "ok", "error")}))
    images.flush()
    del images
    if not parts:
        return pd.DataFrame(columns=["row", "ok", "error"])
    return pd.concat(parts).sort_values("row").reset_index(drop=True)


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
