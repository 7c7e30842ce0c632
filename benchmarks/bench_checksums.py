"""What verifying records costs: a model, a 1 GB cache, and the alternatives side by side.

    uv run python benchmarks/bench_checksums.py [--gb 1] [--dir /tmp]

Prints one markdown table (median of ``--repeat`` runs, page cache warm, so it measures the
hashing, not the disk):

- hash throughput of BLAKE2b-128 (what ``integrity`` uses) next to SHA-256 and MD5 (and
  xxh3-128 when the ``xxhash`` package is installed), one thread;
- a model: ``torch.load`` of its bytes alone vs ``TrialStore``'s verified load (read, hash,
  load), ResNet9 (the paper's, 19.6 MB) and ResNet50 (GroupNorm, ~94 MB);
- a cache entry of ``--gb`` GB (uint8 images, 48 px rows): ``cache.inspect_entry`` (every
  block, threads) vs reading the file once without hashing;
- the alternative to verifying once per run: hashing every batch a trial reads (32 images at
  512 px = 8 MiB) vs gathering that batch with ``pread``;
- the cache identity's one ``stat`` per image file (10,000 files).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def timed(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hashes(repeat: int) -> list[tuple[str, str, str]]:
    data = os.urandom(256 << 20)
    algos: dict[str, Callable[[bytes], object]] = {
        "blake2b-128 (used)": lambda b: hashlib.blake2b(b, digest_size=16).digest(),
        "sha256": lambda b: hashlib.sha256(b).digest(),
        "md5": lambda b: hashlib.md5(b).digest(),
    }
    try:
        import xxhash

        algos["xxh3-128"] = lambda b: xxhash.xxh3_128(b).digest()
    except ImportError:
        pass
    rows = []
    base = None
    for name, fn in algos.items():
        seconds = timed(lambda fn=fn: fn(data), repeat)
        rate = 256 / 1024 / seconds
        base = base or rate
        rows.append((f"hash 256 MiB: {name}", f"{rate:.2f} GB/s", f"{rate / base:.2f}x"))
    return rows


def models(folder: Path, repeat: int) -> list[tuple[str, str, str]]:
    import torch

    from privdom_ray import integrity
    from privdom_ray.models import build_model

    rows = []
    for name in ("resnet9", "resnet50"):
        buf = io.BytesIO()
        torch.save(build_model(name).state_dict(), buf)
        data = buf.getvalue()
        path = folder / f"{name}.pt"
        path.write_bytes(data)
        expected = integrity.FileSum.of(data)
        plain = timed(lambda p=path: torch.load(p, weights_only=True), repeat)

        def verified(p=path, e=expected) -> None:
            torch.load(io.BytesIO(integrity.read_verified(p, e)), weights_only=True)

        checked = timed(verified, repeat)
        mb = len(data) / 1e6
        rows.append(
            (
                f"load {name} ({mb:.1f} MB): torch.load vs verified",
                f"{plain * 1e3:.0f} ms vs {checked * 1e3:.0f} ms",
                f"{checked / plain:.2f}x",
            )
        )
    return rows


def cache_entry(folder: Path, gb: float, repeat: int) -> list[tuple[str, str, str]]:
    """A sealed entry of ``gb`` GB built with the cache's own sealing code (no decoding)."""
    from privdom_ray import cache

    size = 48
    n = int(gb * (1 << 30)) // (size * size)
    entry = folder / "entry"
    entry.mkdir()
    images = np.lib.format.open_memmap(entry / cache.IMAGES, "w+", np.uint8, (n, size, size))
    chunk = 1 << 16
    rng = np.random.default_rng(0)
    for start in range(0, n, chunk):
        images[start : start + chunk] = rng.integers(
            0, 256, (min(chunk, n - start), size, size), np.uint8
        )
    del images
    meta = {"images": cache._images_record(entry / cache.IMAGES), "files": {}}

    def read_only() -> None:
        with open(entry / cache.IMAGES, "rb") as f:
            while f.read(1 << 24):
                pass

    plain = timed(read_only, repeat)
    check = timed(lambda: cache._verify_files(entry, meta), repeat)
    real = (entry / cache.IMAGES).stat().st_size / (1 << 30)
    threads = min(8, os.cpu_count() or 1)
    return [
        (
            f"cache {real:.2f} GB: read once vs every block verified ({threads} threads)",
            f"{plain:.2f} s vs {check:.2f} s",
            f"{check / plain:.2f}x",
        )
    ]


def per_batch(folder: Path, repeat: int) -> list[tuple[str, str, str]]:
    """Gathering a batch of 32 rows at 512 px from a file vs hashing those rows too."""
    row = 512 * 512
    n = 512
    path = folder / "rows.bin"
    path.write_bytes(os.urandom(n * row))
    picks = np.sort(np.random.default_rng(1).choice(n, 32, replace=False))

    def gather(hash_rows: bool) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            for i in picks:
                data = os.pread(fd, row, int(i) * row)
                if hash_rows:
                    hashlib.blake2b(data, digest_size=16).digest()
        finally:
            os.close(fd)

    plain = timed(lambda: gather(False), repeat * 5)
    hashed = timed(lambda: gather(True), repeat * 5)
    return [
        (
            "a trial's batch (32 x 512 px, 8 MiB): pread vs pread + hash",
            f"{plain * 1e3:.1f} ms vs {hashed * 1e3:.1f} ms",
            f"{hashed / plain:.2f}x",
        )
    ]


def identity(folder: Path, repeat: int) -> list[tuple[str, str, str]]:
    from privdom_ray import cache

    files = folder / "files"
    files.mkdir()
    paths = []
    for i in range(10_000):
        (files / f"{i}.png").write_bytes(b"x")
        paths.append(str(files / f"{i}.png"))
    seconds = timed(lambda: cache.files_identity(paths), repeat)
    return [("cache identity: stat 10,000 image files", f"{seconds * 1e3:.0f} ms", "")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=1.0, help="size of the cache entry")
    p.add_argument("--dir", default=None, help="scratch folder (default: the system's)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        rows = [
            *hashes(args.repeat),
            *models(folder, args.repeat),
            *cache_entry(folder, args.gb, args.repeat),
            *per_batch(folder, args.repeat),
            *identity(folder, args.repeat),
        ]
    print(f"cpus: {os.cpu_count()}, repeat: {args.repeat} (median)\n")
    print("| measurement | time or rate | ratio |")
    print("|---|---|---|")
    for what, value, ratio in rows:
        print(f"| {what} | {value} | {ratio} |")


if __name__ == "__main__":
    main()
