"""Decode + preprocess throughput: Ray Data pipeline vs a single-process loop, and cache reads.

    uv run python benchmarks/bench_data.py [--patients 400 --file-size 256 --image-size 64 --reps 3]

Generates one synthetic domain (8-bit PNGs) in a temporary folder, then measures side by side
in one run, median of --reps:
  1. a single-process loop of imaging.load over every file (what a trial would pay per epoch
     without the cache),
  2. cache.build through Ray Data on the local cluster (--cpus workers), the once-per-sweep cost,
  3. cache.load_split of the training split (what each trial pays instead), images/s and MB/s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=400)
    ap.add_argument("--file-size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    import os

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    from privdom_ray import cache, imaging, ray_decode
    from privdom_ray.domains import build_manifest, make_options
    from privdom_ray.manifest import fingerprint

    print(
        "command: uv run python benchmarks/bench_data.py "
        f"--patients {args.patients} --file-size {args.file_size} --image-size {args.image_size} "
        f"--reps {args.reps} --cpus {args.cpus}\n"
    )
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        opts = make_options(
            "synthetic", {"site": "a", "n_patients": args.patients, "file_size": args.file_size}
        )
        manifest = build_manifest("synthetic", work / "domain", opts, name="bench")
        fp = fingerprint(manifest, work / "domain")
        prep = imaging.Preprocessing(image_size=args.image_size)
        paths = list(manifest["path"])
        n = len(paths)

        loop = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for p in paths:
                imaging.load(p, prep)
            loop.append(time.perf_counter() - t0)

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray_data = []
        try:
            for r in range(args.reps):
                t0 = time.perf_counter()
                entry = cache.build(
                    "bench", manifest, fp, prep, work / f"cache{r}",
                    decode=ray_decode.decode_into, log=lambda _m: None,
                )
                ray_data.append(time.perf_counter() - t0)
        finally:
            ray.shutdown()

        reads = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            split = cache.load_split(entry.path, "train")
            reads.append(time.perf_counter() - t0)
        n_train = len(split)
        mb = split.images.nbytes / 2**20

        def row(name: str, images: int, seconds: list[float], extra: str = "") -> str:
            med = statistics.median(seconds)
            return f"| {name} | {images} | {med:.3f} | {images / med:,.0f} | {extra} |"

        loop_rate = n / statistics.median(loop)
        print(
            f"{n} images of {args.file_size}x{args.file_size} px -> {args.image_size} px, {args.cpus} CPUs\n"
        )
        print("| path | images | seconds (median) | images/s | note |")
        print("|---|---|---|---|---|")
        print(row("single-process loop (decode + preprocess)", n, loop, "1.00x"))
        print(
            row(
                "Ray Data cache.build (decode + preprocess + write)",
                n,
                ray_data,
                f"{n / statistics.median(ray_data) / loop_rate:.2f}x the loop, incl. Ray Data start-up",
            )
        )
        print(
            row(
                "cache.load_split (a trial's read of its train split)",
                n_train,
                reads,
                f"{mb / statistics.median(reads):,.0f} MB/s; "
                f"{n_train / statistics.median(reads) / loop_rate:,.0f}x the loop",
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
