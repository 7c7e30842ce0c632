"""Simulation: do the 95% intervals cover at the sizes the report prints?

Compares, on clustered test sets with a known true AUC, the interval method before
evaluation protocol 4 ("pct": the patient-level percentile bootstrap with the
order-statistic rule, ``inference.order_ci`` / ``p_two_sided``) with the one after it ("jk":
the leave-one-patient-out jackknife t interval, logit scale for AUC levels, Satterthwaite df
of the rarer class's effective patients: ``resampling.jackknife_auc``,
``inference.level_interval``, ``inference.infer_t``). Same data, same replicates.

Generator (ours, not the demo's): P patients, of whom exactly ``n_pos`` carry finding 0 (the
rarest label: prevalence ``prev``; the four others are 1.5, 2, 3 and 5 times as common,
capped at 40%, and correlated through a shared patient factor). Each patient has 1-15
images: "skewed" = truncated geometric (P(m) ~ 0.7^m, mean 3.3, a few patients with 10+),
"uniform" = uniform on 1..15 (mean 8). A positive patient's later images lose the finding
with probability 0.15 (follow-ups), so patients hold both classes. Scores: ``mu_l y + u_p +
e``, with ``u_p`` a patient effect and ``e`` an image effect whose shares set the
within-patient score correlation ``icc`` (0.8-0.95). True AUC of label l: ``Phi(mu_l /
sqrt 2)``, the AUC of a random positive image against a random negative image of another
patient (the estimator's limit). Two models per replicate share the test set and have the
SAME true AUC (scores correlated 0.5): the paired test's null.

Tables (per cell, ``reps`` replicates each; Monte-Carlo SE sqrt(p (1 - p) / reps), 0.007 at
p = 0.95 with 1000 reps):

1. coverage of the 95% CI of label 0's AUC (the rarest label, at ``n_pos`` patients) and of
   the macro AUC (five labels), pct vs jk;
2. rejection rate of the paired test of "AUC(model 1) = AUC(model 2)" at 5% (true: equal),
   label 0 and macro;
3. pooling k = 3 and 5 seeds where the test noise the seeds share dominates (each
   seed's model is its own draw, correlated 0.9 with the others on the same patients; seed
   SD of the true AUC ~0.005): coverage of the mean over seeds' true AUC, the bootstrap
   version (``pool_seeds`` on B resamples, AUC scale) vs ``pool_seeds_level`` (jackknife values,
   logit scale).

    OMP_NUM_THREADS=1 uv run python benchmarks/sim_intervals.py --quick   # about a minute
    OMP_NUM_THREADS=1 uv run python benchmarks/sim_intervals.py           # ~1.5 CPU-hours

Cells with 150 positive patients use prevalence >= 10% only (2% would mean 7,500 patients
and 25,000 images per replicate for the bootstrap); the seed table uses prevalence 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from multiprocessing import Pool

import numpy as np
from scipy import stats

from privdom_ray.stats import evaluation, resampling
from privdom_ray.stats import inference as I
from privdom_ray.stats import metrics as M

CI = 0.95
ALPHA = I.alpha_of(CI)
SIZES = np.arange(1, 16)
SKEW = 0.7 ** (SIZES - 1.0)
SKEW /= SKEW.sum()
FACTORS = np.array([1.0, 1.5, 2.0, 3.0, 5.0])
MUS = np.array([1.2, 1.0, 1.5, 0.8, 1.3])  # true AUCs 0.80, 0.76, 0.86, 0.71, 0.82
CELLS = (  # (prevalence of label 0, within-patient correlation, image counts)
    (0.02, 0.90, "skewed"),
    (0.10, 0.80, "skewed"),
    (0.10, 0.95, "uniform"),
    (0.40, 0.80, "skewed"),
    (0.40, 0.95, "uniform"),
)
N_POS = (10, 20, 50, 150)
BATCH = 25


def test_set(rng, n_pos: int, prev: float, icc: float, sizes: str, models: int = 2,
             rho: float = 0.5, mu_shift: np.ndarray | None = None):  # fmt: skip
    """(scores (models, n, 5), labels (n, 5), patient of each image, P, true AUCs (5,))."""
    p = int(round(n_pos / prev))
    m = rng.choice(SIZES, p, p=SKEW) if sizes == "skewed" else rng.integers(1, 16, p)
    codes = np.repeat(np.arange(p), m)
    n = codes.size
    first = np.r_[True, codes[1:] != codes[:-1]]
    z = rng.normal(size=p)
    y = np.empty((n, 5))
    s = np.empty((models, n, 5))
    shift = np.zeros(models) if mu_shift is None else mu_shift
    for lab in range(5):
        w = np.sqrt(0.3) * z + np.sqrt(0.7) * rng.normal(size=p)
        ill = np.zeros(p, bool)
        ill[np.argsort(-w)[: int(round(p * min(0.4, prev * FACTORS[lab])))]] = True
        yl = ill[codes].astype(float)
        yl[(yl == 1) & ~first & (rng.random(n) < 0.15)] = 0.0
        y[:, lab] = yl
        u0, e0 = rng.normal(size=p), rng.normal(size=n)
        for k in range(models):
            r = 1.0 if k == 0 else rho
            u = (r * u0 + np.sqrt(1 - r * r) * rng.normal(size=p))[codes]
            e = r * e0 + np.sqrt(1 - r * r) * rng.normal(size=n)
            s[k, :, lab] = (MUS[lab] + shift[k]) * yl + np.sqrt(icc) * u + np.sqrt(1 - icc) * e
    return s, y, codes, p, stats.norm.cdf(MUS / np.sqrt(2))


def _jk_side(s, y, codes, p):
    """The new method's pieces for one model: label-0 and macro (point, loo, df)."""
    jk = resampling.jackknife_auc(s, y, codes, n_units=p)
    var = np.array([I.jackknife_variance(jk.loo[j]) for j in range(5)])
    return jk, evaluation.macro_df(var, jk.df, p)


def _cover(lo, hi, truth) -> float:
    return float(lo is not None and lo <= truth <= hi)


def one_replicate(rng, cell: tuple, n_pos: int, n_boot: int) -> dict[str, float]:
    """One test set: the new method's outcomes, and the old one's when ``n_boot`` > 0."""
    prev, icc, sizes = cell
    s, y, codes, p, truth = test_set(rng, n_pos, prev, icc, sizes)
    out: dict[str, float] = {}
    ja, dfa = _jk_side(s[0], y, codes, p)
    jb, dfb = _jk_side(s[1], y, codes, p)
    out["jk label"] = _cover(*I.level_interval(ja.point[0], I.jackknife_variance(ja.loo[0]),
                                               ja.df[0], CI), truth[0])  # fmt: skip
    mac, mac_loo = ja.point.mean(), ja.loo.mean(axis=0)
    out["jk macro"] = _cover(*I.level_interval(mac, I.jackknife_variance(mac_loo), dfa, CI),
                             truth.mean())  # fmt: skip
    d0 = I.infer_t(ja.point[0] - jb.point[0], I.jackknife_variance(ja.loo[0] - jb.loo[0]),
                   min(ja.df[0], jb.df[0]), ci=CI)  # fmt: skip
    dm = I.infer_t(mac - jb.point.mean(), I.jackknife_variance(mac_loo - jb.loo.mean(axis=0)),
                   min(dfa, dfb), ci=CI)  # fmt: skip
    out["jk paired label"] = float(d0.p_value <= ALPHA)
    out["jk paired macro"] = float(dm.p_value <= ALPHA)
    out["df label"], out["df macro"] = float(ja.df[0]), float(dfa)
    # rejected variants, same data: df = (patients of the rarer class - 1); macro df = min
    units = M.label_support(y, 1, 1, codes)
    count_df = I.class_df(units.units_pos[0], units.units_neg[0])
    out["jk label count-df"] = _cover(*I.level_interval(
        ja.point[0], I.jackknife_variance(ja.loo[0]), count_df, CI), truth[0])  # fmt: skip
    out["jk macro min-df"] = _cover(*I.level_interval(
        mac, I.jackknife_variance(mac_loo), float(ja.df.min()), CI), truth.mean())  # fmt: skip
    if not n_boot:
        return out
    out["pct reps"] = 1.0
    rs = resampling.make_resampler(len(codes), n_boot, int(rng.integers(2**31)), codes)
    ba, bb = resampling.bootstrap_stats(s[0], y, rs), resampling.bootstrap_stats(s[1], y, rs)
    ok = np.ones(5, bool)
    out["pct label"] = _cover(*I.order_ci(ba.auc[:, 0], CI), truth[0])
    _, ma = M.macro_over(ja.point, ba.auc, ba.valid, ok)
    _, mb = M.macro_over(jb.point, bb.auc, ba.valid & bb.valid, ok)
    out["pct macro"] = _cover(*I.order_ci(ma, CI), truth.mean())
    d0b = np.where(ba.valid[:, 0], ba.auc[:, 0] - bb.auc[:, 0], np.nan)
    out["pct paired label"] = float(I.p_two_sided(d0b) <= ALPHA)
    out["pct paired macro"] = float(I.p_two_sided(ma - mb) <= ALPHA)
    return out


def seed_replicate(rng, k: int, n_pos: int, n_boot: int, seed_sd: float) -> dict[str, float]:
    """k seeds' models on one test set (correlated 0.9: shared test noise dominates); the
    seed effect moves each seed's true AUC (SD about ``seed_sd`` x 0.28 at AUC 0.8)."""
    shift = seed_sd * rng.normal(size=k)
    s, y, codes, p, _ = test_set(rng, n_pos, 0.1, 0.9, "skewed", models=k, rho=0.9,
                                 mu_shift=shift)  # fmt: skip
    truth = stats.norm.cdf(MUS[0] / np.sqrt(2 + seed_sd**2))  # mean over the seed effect
    jks = [resampling.jackknife_auc(s[i][:, :1], y[:, :1], codes, n_units=p) for i in range(k)]
    points = np.array([j.point[0] for j in jks])
    loos = np.stack([j.loo[0] for j in jks])
    new = I.pool_seeds_level(points, loos, ci=CI, df_test=min(j.df[0] for j in jks))
    rs = resampling.make_resampler(len(codes), n_boot, int(rng.integers(2**31)), codes)
    boots = np.stack([resampling.bootstrap_stats(s[i][:, :1], y[:, :1], rs).auc[:, 0] for i in range(k)])
    old = I.pool_seeds(points, boots, ci=CI)
    return {"jk": _cover(new.lo, new.hi, truth), "boot": _cover(old.lo, old.hi, truth)}


def _task(args: tuple) -> tuple[tuple, dict[str, float], int]:
    kind, key, reps, n_boot, seed, with_old = args
    rng = np.random.default_rng(seed)
    acc: dict[str, float] = {}
    for _ in range(reps):
        if kind == "cell":
            cell, n_pos = key
            r = one_replicate(rng, cell, n_pos, n_boot if with_old else 0)
        else:
            k, n_pos = key
            r = seed_replicate(rng, k, n_pos, n_boot, seed_sd=0.02)
        for name, v in r.items():
            acc[name] = acc.get(name, 0.0) + v
    return (kind, key), acc, reps


def _tasks(args) -> list[tuple]:
    tasks, s = [], args.seed
    for n_pos in args.n_pos:
        for cell in CELLS:
            if n_pos * (1 / cell[0]) > args.max_patients:
                continue
            for b in range(0, args.reps, BATCH):
                s += 1
                tasks.append(("cell", (cell, n_pos), min(BATCH, args.reps - b), args.boot, s,
                              b < args.old_reps))  # fmt: skip
    for k in args.seeds:
        for n_pos in args.seed_pos:
            for b in range(0, args.seed_reps, BATCH):
                s += 1
                tasks.append(("seeds", (k, n_pos), min(BATCH, args.seed_reps - b), args.boot, s,
                              True))  # fmt: skip
    return sorted(tasks, key=lambda t: -t[1][1])  # the big cells first: less idle at the end


def _rates(acc: dict[str, float], n: int) -> dict[str, float]:
    """Per-replicate rates: the old method's over the replicates that ran it."""
    n_old = acc.get("pct reps", 0.0)
    return {k: v / (n_old if k.startswith("pct") else n) if (n_old or not k.startswith("pct"))
            else float("nan") for k, v in acc.items()}  # fmt: skip


def _print_tables(totals: dict, args) -> None:
    print(f"\n# 95% CI coverage of the true AUC (pct: patient percentile bootstrap, B = "
          f"{args.boot}, the first {args.old_reps} reps of each cell; jk: jackknife t, logit "
          f"scale, {args.reps} reps per cell)\n")  # fmt: skip
    print("| n_pos | prevalence | ICC | images | label pct | label jk | macro pct | macro jk "
          "| mean df label / macro | rejected: label jk, count df / macro jk, min df |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = sorted(((key, acc, n) for (kind, key), (acc, n) in totals.items() if kind == "cell"),
                  key=lambda t: (t[0][1], t[0][0]))  # fmt: skip
    for (cell, n_pos), acc, n in rows:
        f = _rates(acc, n)
        print(f"| {n_pos} | {cell[0]:.0%} | {cell[1]} | {cell[2]} | {f['pct label']:.3f} | "
              f"**{f['jk label']:.3f}** | {f['pct macro']:.3f} | **{f['jk macro']:.3f}** | "
              f"{f['df label']:.0f} / {f['df macro']:.0f} | {f['jk label count-df']:.3f} / "
              f"{f['jk macro min-df']:.3f} |")  # fmt: skip
    print(f"\n# Paired test of two models with EQUAL true AUC: rejections at 5% (nominal "
          f"0.05); pct over {args.old_reps} reps, jk over {args.reps} per cell\n")  # fmt: skip
    print("| n_pos | prevalence | ICC | images | label pct | label jk | macro pct | macro jk |")
    print("|---|---|---|---|---|---|---|---|")
    for (cell, n_pos), acc, n in rows:
        f = _rates(acc, n)
        print(f"| {n_pos} | {cell[0]:.0%} | {cell[1]} | {cell[2]} | {f['pct paired label']:.3f} "
              f"| **{f['jk paired label']:.3f}** | {f['pct paired macro']:.3f} | "
              f"**{f['jk paired macro']:.3f}** |")  # fmt: skip
    seeds = sorted((key, acc, n) for (kind, key), (acc, n) in totals.items() if kind == "seeds")
    if seeds:
        print(f"\n# pool_seeds where shared test noise dominates: 95% CI coverage of the mean "
              f"over seeds ({args.seed_reps} reps; prevalence 10%, ICC 0.9, skewed)\n")  # fmt: skip
        print("| seeds k | n_pos | bootstrap pool_seeds (before) | jackknife pool_seeds_level |")
        print("|---|---|---|---|")
        for (k, n_pos), acc, n in seeds:
            print(f"| {k} | {n_pos} | {acc['boot'] / n:.3f} | **{acc['jk'] / n:.3f}** |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="few reps, small cells (~1 min)")
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--boot", type=int, default=200, help="resamples of the old method")
    ap.add_argument("--old-reps", type=int, default=300,
                    help="reps per cell that also run the old method (it costs B resamples)")
    ap.add_argument("--n-pos", type=int, nargs="+", default=list(N_POS))
    ap.add_argument("--max-patients", type=int, default=2500)
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--seed-pos", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--seed-reps", type=int, default=500)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--save", help="also write the raw counts to this JSON file")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.old_reps, args.seed_reps, args.boot = 100, 100, 100, 200
        args.n_pos, args.seeds, args.seed_pos = [10, 50], [5], [20]
        args.max_patients = 600
    t0 = time.time()
    totals: dict = {}
    with Pool(args.workers) as pool:
        for key, acc, n in pool.imap_unordered(_task, _tasks(args)):
            tot, m = totals.get(key, ({}, 0))
            merged = {k: tot.get(k, 0.0) + acc.get(k, 0.0) for k in {*tot, *acc}}
            totals[key] = (merged, m + n)
    if args.save:
        with open(args.save, "w") as f:  # the raw counts, in case a table is wanted again
            json.dump([[list(map(str, k)), acc, n] for k, (acc, n) in totals.items()], f)
    _print_tables(totals, args)
    print(f"\n({time.time() - t0:.0f} s, {args.workers} worker(s))")


if __name__ == "__main__":
    main()
