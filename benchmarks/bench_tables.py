"""Benchmark: the comparisons table at the paper's size, from synthetic predictions.

What the aggregator computes after a sweep (``comparisons.compute_tables``: every paired
ΔAUC, drop, gap and across-seeds row with its jackknife t interval) on test sets of the
paper's sizes (VDR 3,000, C14 25,596, CPT 29,320, UKA 39,824, PCH 22,045 images; ~3 images
per patient), 5 sources x 5 epsilons (4 DP + inf) x 3 seeds = 75 models per test set, 5
labels, the subgroups all / sex / three age bins. Scores are synthetic (no training): the
work depends on the sizes only. Prints one line per test set and the total.

    OMP_NUM_THREADS=1 uv run python benchmarks/bench_tables.py             # all five sites
    OMP_NUM_THREADS=1 uv run python benchmarks/bench_tables.py --sites UKA  # the largest only
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from privdom_ray.config import EvaluationConfig
from privdom_ray.stats import comparisons as C
from privdom_ray.stats import study

SITES = {"VDR": 3000, "C14": 25596, "CPT": 29320, "UKA": 39824, "PCH": 22045}
EPSILONS = (1.0, 3.0, 6.0, 10.0, math.inf)


def test_set(name: str, n: int, models: dict[str, study.ModelInfo], seed: int) -> study.TestSet:
    """One site's test split with every model's scores (per-patient errors: clustered)."""
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(n // 3 + 1), 3)[:n]
    n_pat = int(group.max()) + 1
    y = (rng.random((n, 5)) < np.array([0.1, 0.12, 0.04, 0.15, 0.35])).astype(float)
    y[rng.random((n, 5)) < 0.05] = np.nan
    sex = rng.choice(np.array(["F", "M"]), n_pat)[group]
    ts = study.TestSet(name, "fp", tuple(f"l{j}" for j in range(5)), y, sex,
                   rng.uniform(18, 95, n_pat)[group], group)  # fmt: skip
    for key, m in models.items():
        strength = 1.6 if m.source == name else 1.0
        err = rng.normal(scale=0.7, size=(n_pat, 5))[group]
        ts.scores[key] = 1 / (1 + np.exp(-(np.nan_to_num(y) * strength + err
                                           + rng.normal(size=y.shape))))  # fmt: skip
    return ts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", nargs="+", default=list(SITES), choices=list(SITES))
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    models = {
        f"{s}_{e:g}_{k}": study.ModelInfo(f"{s}_{e:g}_{k}", s, e, k, "resnet9",
                                      None if math.isinf(e) else e, "prv", (s,))
        for s in SITES for e in EPSILONS for k in range(args.seeds)
    }  # fmt: skip
    print("| test site | images | models | rows | seconds |\n|---|---|---|---|---|")
    total, rows = 0.0, 0
    for i, name in enumerate(args.sites):
        ts = test_set(name, SITES[name], models, seed=i)
        t0 = time.perf_counter()
        tab = C.compute_tables(study.Study(models, [ts]), EvaluationConfig())
        dt = time.perf_counter() - t0
        total, rows = total + dt, rows + len(tab.comparisons)
        print(f"| {name} | {SITES[name]:,} | {len(ts.scores)} | {len(tab.comparisons):,} | "
              f"{dt:.1f} |")  # fmt: skip
    print(f"| all | | | {rows:,} | {total:.1f} |")


if __name__ == "__main__":
    main()
