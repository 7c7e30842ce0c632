"""Decode and preprocess each domain once (Ray Data), into an on-disk cache every trial reads.

Layout of one cache entry, ``<cache_dir>/<domain>-<key>/`` where key hashes the manifest
fingerprint and the preprocessing:

- ``images.npy``   uint8 (N, S, S), row i = manifest row i (zeros where decoding failed)
- ``rows.parquet`` the manifest plus ``ok`` (decoded) per row
- ``skipped.csv``  path and error of every image that could not be decoded
- ``meta.json``    domain, fingerprint, preprocessing, counts; written last = entry complete

Workers write their decoded rows straight into the memory-mapped ``images.npy`` and return
only (row, ok, error), so the driver never holds the images. The entry is built in a temporary
folder and renamed into place, so an interrupted build is never taken for a finished one.
Reading (``load_split``) needs only numpy and pandas: trials and GPU machines need no Ray Data.
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

from privdom_ray.grid import content_key
from privdom_ray.imaging import Preprocessing, load
from privdom_ray.manifest import LABELS, ManifestError


@dataclass(frozen=True)
class SplitData:
    """One split of one domain as arrays: images uint8 (n, S, S), labels float32 (n, L) NaN=masked."""

    images: np.ndarray
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


def _decode_batch(
    batch: dict[str, np.ndarray], images_path: str, prep: dict
) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: decode, preprocess, write rows into the shared memmap."""
    preprocessing = Preprocessing(**prep)
    images = np.load(images_path, mmap_mode="r+")
    ok = np.zeros(len(batch["row"]), dtype=bool)
    errors: list[str] = []
    for i, (row, path) in enumerate(zip(batch["row"], batch["path"], strict=True)):
        try:
            images[int(row)] = load(str(path), preprocessing)
            ok[i] = True
            errors.append("")
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped and counted
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
    images.flush()
    return {"row": batch["row"], "ok": ok, "error": np.array(errors, dtype=object)}


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

    import ray.data  # only the builder needs Ray Data

    t0 = time.perf_counter()
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    size = prep.image_size
    images_path = tmp / "images.npy"
    np.lib.format.open_memmap(
        images_path, mode="w+", dtype=np.uint8, shape=(len(manifest), size, size)
    )
    items = [{"row": i, "path": p} for i, p in enumerate(manifest["path"])]
    blocks = max(1, min(len(items) // 64, 64))
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        _decode_batch,
        fn_kwargs={"images_path": str(images_path), "prep": dataclasses.asdict(prep)},
        batch_size=64,
        batch_format="numpy",
        num_cpus=1,
    )
    status = pd.DataFrame(ds.take_all()).sort_values("row").reset_index(drop=True)
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


def load_split(path: str | Path, split: str) -> SplitData:
    """The decoded rows of one split (skipped images left out), as arrays for training/eval."""
    path = Path(path)
    rows = pd.read_parquet(path / "rows.parquet")
    keep = (rows["split"] == split).to_numpy() & rows["ok"].to_numpy(dtype=bool)
    images = np.load(path / "images.npy", mmap_mode="r")
    idx = np.flatnonzero(keep)
    return SplitData(
        images=np.ascontiguousarray(images[idx]),
        labels=rows.loc[keep, list(LABELS)].to_numpy(dtype=np.float32),
        sex=rows.loc[keep, "sex"].to_numpy(dtype=object),
        age=rows.loc[keep, "age"].to_numpy(dtype=np.float64),
        patient=rows.loc[keep, "patient_id"].to_numpy(dtype=object),
    )


def split_sizes(path: str | Path) -> dict[str, int]:
    rows = pd.read_parquet(Path(path) / "rows.parquet", columns=["split", "ok"])
    return rows[rows["ok"]].groupby("split").size().to_dict()
