"""Table: what best-of-K tuning costs in noise, at the demo's and the paper's shapes.

Why: Papernot and Steinke's bound says releasing the best of K ~ D runs costs a small additive
term over one run's RDP; this prints how much more noise each run then needs for a given total
epsilon, next to today's untuned noise (PRV, calibrated on the same steps), and compares the
distributions of K at the same mean (the evidence for ``runs.DEFAULT_RUNS``).

    uv run python benchmarks/tuning_table.py            # both tables, markdown
    uv run python benchmarks/tuning_table.py --quick    # demo shape only

DP-SGD only: no label-count release (it would be composed once per cell on top, ``fixed``).
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
from scipy.stats import norm

from privdom_ray import privacy
from privdom_ray.selection import rdp, runs, tuning, validation
from privdom_ray.stats import thresholds

TARGETS = (1.0, 3.0, 8.0)
# (name, N_train, logical batch, epochs, delta); paper: shared/reference/paper.md (VinDr-CXR
# 15,000 and CheXpert 128,356 training images less the 10% validation carve, batch 128,
# 80 epochs, the per-site deltas of experiments/paper.yaml)
SHAPES = (
    ("demo (N 470, B 64, 6 ep)", 470, 64, 6, 1e-5),
    ("paper VDR (N 13,500, B 128, 80 ep)", 13_500, 128, 80, 1e-5),
    ("paper CPT (N 115,520, B 128, 80 ep)", 115_520, 128, 80, 7e-6),
)
DISTRIBUTIONS = (
    ("logarithmic (eta 0)", runs.TruncatedNegativeBinomial.from_mean(0.0, 10)),
    ("TNB eta 0.5", runs.TruncatedNegativeBinomial.from_mean(0.5, 10)),
    ("geometric (eta 1)", runs.TruncatedNegativeBinomial.from_mean(1.0, 10)),
    ("TNB eta 2", runs.TruncatedNegativeBinomial.from_mean(2.0, 10)),
    ("Poisson", runs.PoissonRuns(10.0)),
)


def run_shape(n: int, batch: int, epochs: int) -> tuning.RunShape:
    q = privacy.poisson_rate(n, batch)
    return tuning.RunShape(q, epochs * privacy.steps_per_epoch(q))


def main_table(shapes) -> None:
    print(f"Default K: {runs.DEFAULT_RUNS.as_dict()}\n")
    print(
        "| shape | target eps | untuned sigma (PRV) | tuned sigma per run | per-run eps (RDP) "
        "| per-run eps (PRV) | total eps (PS, RDP) | validation sigma (score) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, n, batch, epochs, delta in shapes:
        shape = run_shape(n, batch, epochs)
        for target in TARGETS:
            untuned = privacy.calibrate(
                epsilon=target, delta=delta, sample_rate=shape.sample_rate,
                steps=shape.steps, accountant="prv",
            )  # fmt: skip
            plan = tuning.calibrate(epsilon=target, delta=delta, shapes=[shape])
            (cand,) = plan.candidates
            prv, acc = privacy.epsilon_of("prv", [cand.as_tuple()], delta)
            print(
                f"| {name} | {target:g} | {untuned.noise_multiplier:.3f} | "
                f"{cand.noise_multiplier:.3f} | {plan.epsilon_run:.3f} | {prv:.3f} ({acc}) | "
                f"{plan.epsilon_total:.3f} | {plan.validation.score_noise_multiplier:.2f} |"
            )


def distribution_table(shapes) -> None:
    print("\nPer-run sigma for total eps (E[K] = 10 each), and K's tail:\n")
    head = " | ".join(f"{n} eps {t:g}" for n, *_ in shapes for t in TARGETS)
    print(f"| K distribution | P[K>30] | 95% quantile | {head} |")
    print("|---|---|---|" + "---|" * (len(shapes) * len(TARGETS)))
    for label, dist in DISTRIBUTIONS:
        tail = 1 - float(dist.pmf(range(0, 31)).sum())
        cells = []
        for _, n, batch, epochs, delta in shapes:
            shape = run_shape(n, batch, epochs)
            for target in TARGETS:
                plan = tuning.calibrate(epsilon=target, delta=delta, shapes=[shape], runs=dist)
                cells.append(f"{plan.candidates[0].noise_multiplier:.3f}")
        print(f"| {label} | {tail:.3f} | {runs.quantile(dist, 0.95)} | {' | '.join(cells)} |")


def threshold_table(repeats: int = 100) -> None:
    """Youden J lost by DP thresholds vs the exact (in-sample) Youden threshold: 5 labels,
    prevalence 0.2, binormal scores (AUC ~0.8), one image per patient, the histogram noise
    multipliers of the demo's tuned plans at total epsilon 1, 3, 8 (12.5, 4.5, 2.0)."""
    rng = np.random.default_rng(0)  # a simulation: its noise need not be secret

    def youden_j(p: np.ndarray, y: np.ndarray, t: float) -> float:
        pred = p >= t
        return float(pred[y == 1].mean() - pred[y == 0].mean())

    print("\nYouden J lost by DP thresholds (mean over labels and repeats):\n")
    print("| validation patients | histogram sigma | 10 bins | 20 bins | 50 bins |")
    print("|---|---|---|---|---|")
    for n in (60, 1500):
        for sigma in (12.5, 4.5, 2.0):
            cells = []
            for bins in (10, 20, 50):
                lost = []
                for _ in range(repeats):
                    y = (rng.random((n, 5)) < 0.2).astype(float)
                    p = norm.cdf(rng.normal(0, 1, (n, 5)) + 1.2 * y - 0.6)
                    rel = validation.release_thresholds(p, y, np.arange(n), sigma, bins, rng)
                    for j in range(5):
                        exact = youden_j(
                            p[:, j], y[:, j], thresholds.youden_threshold(p[:, j], y[:, j])
                        )
                        t = rel.thresholds[j]
                        lost.append(
                            exact - (youden_j(p[:, j], y[:, j], t) if np.isfinite(t) else 0)
                        )
                cells.append(f"{np.mean(lost):.3f}")
            print(f"| {n} | {sigma} | {' | '.join(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the demo shape only")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    shapes = SHAPES[:1] if args.quick else SHAPES
    t0 = time.perf_counter()
    main_table(shapes)
    distribution_table(shapes)
    threshold_table()
    print(
        f"\n{time.perf_counter() - t0:.0f} s; accountant {rdp.ACCOUNTANT}, {len(rdp.ORDERS)} orders"
    )


if __name__ == "__main__":
    main()
