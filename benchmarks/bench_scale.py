"""Benchmark: does a trial's memory grow with its dataset? Cache read in place vs in memory.

One synthetic cache entry per size (random 128 px images; the numbers do not depend on what
the pixels show), then trial processes that load the training split and run DP-SGD steps
(resnet9, bk clipping) on it, alone and two at a time, with the split either read in place
(``cache.load_split``: batches gathered from images.npy, the default) or copied into memory
first (what every trial did before: ``np.ascontiguousarray(images[rows])``). Per trial:
peak resident memory (``ru_maxrss``), time from process start to the first optimizer step,
and images/s over the steps after the first.

    uv run python benchmarks/bench_scale.py --sizes 2000 20000 --steps 8

Targets (issue 18): a trial's peak memory at the large size within 1.2x of the small size; a
trial running beside another within 1.3x of one running alone; images/s in place within 10%
of the in-memory path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

TRIAL = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import numpy as np, torch
torch.set_num_threads(1)
from privdom_ray.cache import load_split, SplitData
from privdom_ray.config import TrainingConfig, TrialSpec
from privdom_ray.imaging import Preprocessing
from privdom_ray.models import build_model
from privdom_ray.train import Randomness, prepare_training
path, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
train = load_split(path, "train")
if mode == "memory":  # the old path: the whole split copied into this process
    train = SplitData(np.ascontiguousarray(np.asarray(train.images)), train.labels, train.sex, train.age)
spec = TrialSpec("bench", "x", 8.0, 1e-5, 0, "resnet9",
                 TrainingConfig(epochs=1, logical_batch=32, physical_batch=32, grad_sample_mode="bk"),
                 Preprocessing(image_size=train.images.shape[1])).with_key()
model = build_model("resnet9")
t = prepare_training(spec, model, torch.optim.NAdam(model.parameters(), lr=1e-3), train,
                     randomness=Randomness.for_trial(0, "cpu", secret=False),
                     weights=torch.ones(5), noise_multiplier=1.0, device="cpu",
                     memory_budget_mb=2048)
first, images, t_steps = None, 0, None
for x, y in t.loader:
    t.optimizer.zero_grad(set_to_none=True)
    t.criterion(t.model(t.inputs(x)), y).backward()
    t.optimizer.step()
    if first is None:
        first, t_steps = time.perf_counter() - t0, time.perf_counter()
    else:
        images += len(x)
    steps -= 1
    if steps == 0:
        break
rate = images / (time.perf_counter() - t_steps)
print(json.dumps({"first_step_s": first, "images_per_s": rate,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_entry(folder: Path, n_train: int, size: int, seed: int = 0) -> Path:
    """A cache entry of ``n_train`` training rows (plus a few val/test rows), images random."""
    folder.mkdir(parents=True)
    n = n_train + 64
    images = np.lib.format.open_memmap(
        folder / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size)
    )
    rng = np.random.default_rng(seed)
    for start in range(0, n, 1024):  # in chunks: the builder never holds the whole entry
        stop = min(n, start + 1024)
        images[start:stop] = rng.integers(0, 256, size=(stop - start, size, size), dtype=np.uint8)
    images.flush()
    del images
    labels = (rng.random((n, 5)) < 0.3).astype(float)
    rows = pd.DataFrame(
        {
            "path": [f"{i}.png" for i in range(n)],
            "patient_id": [f"p{i // 3}" for i in range(n)],
            "split": ["train"] * n_train + ["val"] * 32 + ["test"] * 32,
            "sex": "F",
            "age": 50.0,
            **{
                c: labels[:, j]
                for j, c in enumerate(
                    ["cardiomegaly", "pleural_effusion", "pneumonia", "atelectasis", "healthy"]
                )
            },
            "ok": True,
        }
    )
    rows.to_parquet(folder / "rows.parquet", index=False)
    return folder


def run_trials(entry: Path, mode: str, steps: int, concurrent: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TRIAL, str(entry), mode, str(steps)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(concurrent)
    ]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"trial process failed ({p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs=2, default=[2000, 20000], help="training images")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="DP-SGD steps per trial")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_scale."))
    rows = []
    try:
        entries = {n: make_entry(work / f"n{n}", n, args.image_size) for n in args.sizes}
        for mode in ("memory", "in place"):
            key = "memory" if mode == "memory" else "place"
            for n, entry in entries.items():
                for concurrent in (1, 2):
                    res = run_trials(entry, key, args.steps, concurrent)
                    rows.append((mode, n, concurrent, res))
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(f"resnet9 DP-SGD (bk), {args.image_size} px, logical batch 32, {args.steps} steps\n")
    print(
        "| split read | train images | trials at once | peak RSS per trial (MB) | first step (s) | images/s |"
    )
    print("|---|---|---|---|---|---|")
    table = {}
    for mode, n, concurrent, res in rows:
        rss = max(r["peak_rss_mb"] for r in res)
        first = statistics.mean(r["first_step_s"] for r in res)
        rate = statistics.mean(r["images_per_s"] for r in res)
        table[(mode, n, concurrent)] = (rss, first, rate)
        print(f"| {mode} | {n} | {concurrent} | {rss:.0f} | {first:.2f} | {rate:.1f} |")
    small, large = args.sizes
    print("\n| ratio | in memory | in place | target |")
    print("|---|---|---|---|")
    for name, num, den, target in (
        ("peak RSS, large / small size", (large, 1), (small, 1), "<= 1.2"),
        ("peak RSS, 2 trials at once / alone (large)", (large, 2), (large, 1), "< 1.3"),
    ):
        vals = [table[(m, *num)][0] / table[(m, *den)][0] for m in ("memory", "in place")]
        print(f"| {name} | {vals[0]:.2f} | {vals[1]:.2f} | {target} |")
    speed = table[("in place", large, 1)][2] / table[("memory", large, 1)][2]
    print(f"| images/s in place / in memory (large, alone) | 1.00 | {speed:.2f} | >= 0.90 |")


if __name__ == "__main__":
    main()
