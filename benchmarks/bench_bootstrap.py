"""Benchmark: the vectorised patient-clustered bootstrap (``bootstrap_stats``) vs a per-resample sklearn loop.

Why: the original code bootstrapped 1,000 resamples by calling ``roc_auc_score`` once per
resample and label; with ~30k test images x 5 labels x 1,000 resamples that dominates
evaluation time. Resamples now draw PATIENTS (all their images), so the loop first expands
each resample's drawn patients into image rows. This script times both at the patient level
(``--images-per-patient``, default ~3) and at the image level (every image its own patient),
on the same synthetic data, and checks that the per-resample AUCs and rates agree exactly.

The loop is slow, so it is timed on ``--loop-boot`` resamples (default 100) and
extrapolated linearly to ``--boot``; the table says so. The vectorised ``evaluate`` also
computes the Brier score and ECE with CIs, which the loop does not: the speed-up is a floor.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from privdom_ray.stats import evaluation, resampling
from privdom_ray.stats.thresholds import threshold_metrics, youden_threshold

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


def make_patients(n: int, per_patient: float, seed: int) -> np.ndarray:
    """An opaque patient index per image, about ``per_patient`` images each (1 = image level)."""
    if per_patient <= 1:
        return np.arange(n)
    rng = np.random.default_rng(seed + 1)
    return rng.integers(0, max(1, round(n / per_patient)), size=n)


def expand(draws: np.ndarray, codes: np.ndarray) -> list[np.ndarray]:
    """Image rows of each resample's drawn patients (the loop's resampling step)."""
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes, minlength=draws.shape[1])
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    out = []
    for drawn in draws:
        lengths = sizes[drawn]
        first = np.repeat(starts[drawn] - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
        out.append(order[first + np.arange(lengths.sum())])
    return out


def loop_bootstrap(
    scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray, rows: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The original style: per resample, per label, sklearn AUC + numpy acc/sens/spec."""
    n_boot, n_lab = len(rows), scores.shape[1]
    aucs = np.full((n_boot, n_lab), np.nan)
    rates = np.full((n_boot, 3, n_lab), np.nan)
    for b, idx in enumerate(rows):
        s_b, y_b = scores[idx], labels[idx]
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


def measure(args, scores, labels, thresholds, per_patient: float) -> dict[str, object]:
    """Both methods at one resampling level; asserts that they agree on shared resamples."""
    clusters = make_patients(args.n, per_patient, args.seed)
    loop_boot = min(args.loop_boot, args.boot)
    # the vectorised bootstrap (evaluate's CIs before protocol 4; they are jackknife t now)
    rs = resampling.make_resampler(args.n, args.boot, args.seed, clusters)
    pred = scores >= thresholds[None, :]
    t_vec, _ = timed(lambda: resampling.bootstrap_stats(scores, labels, rs, pred=pred), args.reps)
    rows = evaluation.evaluate(scores, labels, thresholds, LABELS, clusters=clusters)
    draws = rs.draws[:loop_boot]
    t_loop_part, (loop_auc, loop_rates) = timed(
        lambda: loop_bootstrap(scores, labels, thresholds, expand(draws, rs.codes)),
        args.loop_reps,
    )
    vec_auc = resampling.bootstrap_auc(scores, labels, draws, clusters=clusters)
    tm = threshold_metrics(scores, labels, thresholds, draws, clusters=clusters)
    vec_rates = np.stack([tm.boot_accuracy, tm.boot_sensitivity, tm.boot_specificity], axis=1)
    auc_diff = float(np.nanmax(np.abs(vec_auc - loop_auc)))
    rate_diff = float(np.nanmax(np.abs(vec_rates - loop_rates)))
    same_nan = bool(np.array_equal(np.isnan(vec_auc), np.isnan(loop_auc)))
    assert same_nan and auc_diff < 1e-9 and rate_diff < 1e-12, "methods disagree"
    return {
        "level": "patient" if per_patient > 1 else "image",
        "patients": rs.n_clusters,
        "t_vec": t_vec,
        "t_loop_part": t_loop_part,
        "t_loop": t_loop_part * args.boot / loop_boot,
        "auc_diff": auc_diff,
        "rate_diff": rate_diff,
        "macro": rows[len(LABELS)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30_000, help="test images")
    ap.add_argument("--images-per-patient", type=float, default=3.0)
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--loop-boot", type=int, default=100, help="resamples timed for the loop")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of the vectorised path")
    ap.add_argument("--loop-reps", type=int, default=3, help="repetitions of the loop")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    loop_boot = min(args.loop_boot, args.boot)
    print(
        "Reproduce: uv run python benchmarks/bench_bootstrap.py "
        f"--n {args.n} --images-per-patient {args.images_per_patient:g} --boot {args.boot} "
        f"--loop-boot {loop_boot} --reps {args.reps} --loop-reps {args.loop_reps} "
        f"--seed {args.seed}"
    )
    print(f"numpy {np.__version__}; {args.n} images x {len(LABELS)} labels\n")
    scores, labels = make_data(args.n, args.seed)
    thresholds = np.array(
        [youden_threshold(scores[:, j], labels[:, j]) for j in range(len(LABELS))]
    )
    results = [
        measure(args, scores, labels, thresholds, per) for per in (args.images_per_patient, 1.0)
    ]
    print(
        "| resampling unit | patients | vectorised `bootstrap_stats` s (median of "
        f"{args.reps}) | sklearn loop s (timed on {loop_boot}, x{args.boot / loop_boot:g}) "
        "| speed-up |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['level']} | {r['patients']} | {r['t_vec']:.3f} | {r['t_loop']:.3f} "
            f"| {r['t_loop'] / r['t_vec']:.1f}x |"
        )
    print(
        f"\n{args.boot} resamples, 'all' subgroup only (the macro CI below: evaluate's jackknife t)."
    )
    for r in results:
        m = r["macro"]
        print(
            f"{r['level']}: loop measured {r['t_loop_part']:.3f} s for {loop_boot} resamples; "
            f"max |AUC diff| {r['auc_diff']:.1e}, max |rate diff| {r['rate_diff']:.1e}; "
            f"macro AUC {m.auc:.4f} [{m.auc_lo:.4f}, {m.auc_hi:.4f}]"
        )


if __name__ == "__main__":
    main()
