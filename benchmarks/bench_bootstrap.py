"""Benchmark: vectorised bootstrap ``evaluate`` vs the original per-resample sklearn loop.

Why: the original code bootstrapped 1,000 resamples by calling ``roc_auc_score`` once per
resample and label; with ~30k test images x 5 labels x 1,000 resamples that dominates
evaluation time. This script times both on the same synthetic data and checks that the
per-resample AUCs agree.

The loop is slow, so it is timed on ``--loop-boot`` resamples (default 100) and
extrapolated linearly to ``--boot``; the table says so.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from privdom_ray import metrics as M

LABELS = ["cardiomegaly", "effusion", "pneumonia", "atelectasis", "healthy"]
PREVALENCE = [0.10, 0.12, 0.04, 0.15, 0.35]


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images x 5 labels: binormal logits, sigmoid-probabilities rounded to 1e-4 (ties),
    and 3% of labels masked as NaN (unknown)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(LABELS))) < PREVALENCE).astype(float)
    logits = rng.normal(size=y.shape) + np.array([1.4, 1.8, 0.8, 0.9, 1.2]) * y - 1.0
    scores = np.round(1.0 / (1.0 + np.exp(-logits)), 4)
    y[rng.random(y.shape) < 0.03] = np.nan
    return scores, y


def loop_bootstrap(
    scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray, idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The original style: per resample, per label, sklearn AUC + numpy acc/sens/spec."""
    n_boot, n_lab = idx.shape[0], scores.shape[1]
    aucs = np.full((n_boot, n_lab), np.nan)
    rates = np.full((n_boot, 3, n_lab), np.nan)
    for b in range(n_boot):
        s_b, y_b = scores[idx[b]], labels[idx[b]]
        for j in range(n_lab):
            known = ~np.isnan(y_b[:, j])
            y, s = y_b[known, j], s_b[known, j]
            pos = y == 1
            if pos.all() or not pos.any():
                continue
            aucs[b, j] = roc_auc_score(y, s)
            pred = s >= thresholds[j]
            tp = np.sum(pred & pos)
            tn = np.sum(~pred & ~pos)
            rates[b, :, j] = ((tp + tn) / y.size, tp / pos.sum(), tn / (~pos).sum())
    return aucs, rates


def timed(fn, reps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30_000, help="test images")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--loop-boot", type=int, default=100, help="resamples timed for the loop")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of the vectorised path")
    ap.add_argument("--loop-reps", type=int, default=3, help="repetitions of the loop")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    loop_boot = min(args.loop_boot, args.boot)

    print(
        "Reproduce: uv run python benchmarks/bench_bootstrap.py "
        f"--n {args.n} --boot {args.boot} --loop-boot {loop_boot} "
        f"--reps {args.reps} --loop-reps {args.loop_reps} --seed {args.seed}"
    )
    print(f"numpy {np.__version__}; {args.n} images x {len(LABELS)} labels\n")

    scores, labels = make_data(args.n, args.seed)
    thresholds = np.array(
        [M.youden_threshold(scores[:, j], labels[:, j]) for j in range(len(LABELS))]
    )

    t_vec, rows = timed(
        lambda: M.evaluate(scores, labels, thresholds, LABELS, n_boot=args.boot, seed=args.seed),
        args.reps,
    )

    # evaluate() resamples the "all" subgroup with bootstrap_indices(n, n_boot, seed)
    idx = M.bootstrap_indices(args.n, args.boot, args.seed)[:loop_boot]
    t_loop_part, (loop_auc, loop_rates) = timed(
        lambda: loop_bootstrap(scores, labels, thresholds, idx), args.loop_reps
    )
    t_loop = t_loop_part * args.boot / loop_boot

    # exactness on identical resample indices
    vec_auc = M.bootstrap_auc(scores, labels, idx)
    tm = M.threshold_metrics(scores, labels, thresholds, idx)
    vec_rates = np.stack([tm.boot_accuracy, tm.boot_sensitivity, tm.boot_specificity], axis=1)
    auc_diff = float(np.nanmax(np.abs(vec_auc - loop_auc)))
    rate_diff = float(np.nanmax(np.abs(vec_rates - loop_rates)))
    same_nan = bool(np.array_equal(np.isnan(vec_auc), np.isnan(loop_auc)))

    cells = args.n * args.boot
    print("| method | resamples | seconds (median) | images*resamples/s | speed-up |")
    print("|---|---|---|---|---|")
    print(
        f"| vectorised `evaluate` (AUC + acc/sens/spec, 'all' only, {args.reps} reps) "
        f"| {args.boot} | {t_vec:.3f} | {cells / t_vec:,.0f} | {t_loop / t_vec:.1f}x |"
    )
    print(
        f"| per-resample loop (sklearn roc_auc_score + numpy), timed on {loop_boot} "
        f"resamples x {args.loop_reps} reps, extrapolated x{args.boot / loop_boot:g} "
        f"| {args.boot} | {t_loop:.3f} | {cells / t_loop:,.0f} | 1.0x |"
    )
    print(f"\n(loop measured: {t_loop_part:.3f} s for {loop_boot} resamples)")
    print(
        f"max |AUC_vectorised - AUC_sklearn| over {loop_boot} shared resamples x "
        f"{len(LABELS)} labels: {auc_diff:.3e} (NaN pattern identical: {same_nan})"
    )
    print(f"max |acc/sens/spec difference|: {rate_diff:.3e}")
    macro = rows[-1]
    print(
        f"macro AUC {macro.auc:.4f} [{macro.auc_lo:.4f}, {macro.auc_hi:.4f}] "
        f"(sanity check of the evaluate output)"
    )
    assert same_nan and auc_diff < 1e-9 and rate_diff < 1e-12, "methods disagree"


if __name__ == "__main__":
    main()
