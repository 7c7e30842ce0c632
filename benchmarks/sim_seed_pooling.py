"""Simulation: pooling k training seeds, hierarchical percentile bootstrap vs ``pool_seeds``.

The across-seeds row of a comparison pools k per-seed estimates D_s (e.g. the paired AUC
difference DP - non-DP of seed s's two models on one shared test set), each with B patient
resamples; every seed is scored on the same resamples. Two methods:

* ``hier``: the hierarchical bootstrap ``comparison_rows._across_row`` used before (resample seeds
  with replacement, average, percentile CI by the order-statistic rule; kept here, as
  :func:`hierarchical`, for this comparison);
* ``pool``: ``inference.pool_seeds`` (t interval, variance = shared test-set covariance of
  the patient resamples + between-seed sample variance / k, see ``seed_variance``).

Data-generating process (stated plainly: it is NOT an AUC). The statistic is the mean over
patients of a per-patient paired score difference, so its truth is known exactly and the
patient bootstrap is one matrix product; it has the variance structure of the paired AUC
difference:

    D_s = mu + a_s + mean_i d_si,   d_si = sd_p (sqrt(rho) u_i + sqrt(1 - rho) f_si)

* ``a_s``: training randomness. Each model's value varies across seeds with SD ``seed_sd``
  (0, 0.01, 0.02 "AUC"), the DP and non-DP seeds independently, so ``a_s`` has SD
  ``sqrt(2) seed_sd`` (as in the red-team runs);
* test-set noise per patient: ``sd_p = 0.40``, which gives a single seed's paired AUC
  difference its SD on the red-team's clustered chest-X-ray DGP (0.013 at 1000 patients,
  3 images each, prevalence 0.2); 300 / 1000 / 4000 patients, or none ("no test noise":
  every resample equals the point, the infinite-test-set limit);
* ``rho``: the share of the test-set noise common to all seeds (one patient sample for all).
  Main table rho = 0: the paired AUC difference, where shared patient effects cancel
  (measured ~0.0 +- 0.02 on the red-team DGP). ``--values`` adds rho = 0.5 with
  a_s SD ``seed_sd``: pooling one model's own AUC across seeds (the value_dp / value_nondp
  columns; measured ~0.5 there).

Per cell: coverage of the 95% CI of mu and the type-I error of the two-sided test of
mu = 0 (true mu = 0; equal by construction for both methods), the rate of "equivalent
within ±0.02" at true mu = 0 (power), the false "equivalent" rate at true mu = ±0.02
(the TOST's type-I, nominal <= 5%; signs alternate), and the median CI width ratio.
The truth is mu, the mean over training randomness and test sets of a seed's value.

Replicates in one batch share a patient-resample matrix (fresh per batch of 50), which
leaves each replicate's error rates unbiased. Monte-Carlo SE: sqrt(p (1 - p) / reps),
0.005 at p = 0.95 with 2000 reps.

    OMP_NUM_THREADS=1 uv run python benchmarks/sim_seed_pooling.py --quick   # ~20 s
    OMP_NUM_THREADS=1 uv run python benchmarks/sim_seed_pooling.py           # a few minutes
    ... --variants   adds the candidates that were rejected (see below)
    ... --values     adds the rho = 0.5 table (one model's value pooled across seeds)
    ... --df-check   only the exact Gaussian worst case of the df rule (~1 min)

``--variants`` columns (why ``pool_seeds`` is what it is): ``mom+`` = patient-bootstrap
variance plus the method-of-moments between-seed term truncated at 0 with Satterthwaite df;
``sat`` = the untruncated variance of ``pool_seeds`` with plain Satterthwaite df (s2 in
place of its upper bound); ``t`` = paired t across seeds (s2 / k, k - 1 df).
"""

from __future__ import annotations

import argparse
import os
import time
from multiprocessing import Pool

import numpy as np
from scipy import stats

from privdom_ray.stats import inference as I

SD_P = 0.40  # per-patient SD of the paired difference (see the module docstring)
MARGIN = 0.02
CI = 0.95
ALPHA = I.alpha_of(CI)
BATCH = 50
METHODS = ("hier", "pool")
VARIANTS = ("mom+", "sat", "t")


def seed_draws(k: int, n_boot: int, seed: int) -> np.ndarray:
    """(B, k) seed indices drawn with replacement: the seed level of the replaced method."""
    return np.random.default_rng([int(seed), 0x5EED]).integers(0, k, size=(n_boot, k))


def hierarchical(per_seed: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Resample b = mean over the seeds drawn for b of their values on patient resample b."""
    return per_seed[draws, np.arange(per_seed.shape[1])[:, None]].mean(axis=1)


def _variant_cis(points: np.ndarray, boots: np.ndarray) -> dict[str, tuple]:
    """(lo, hi, tost_lo, tost_hi) of the rejected candidates, from the same parts."""
    sv = I.seed_variance(points, boots)
    k, est = sv.k, float(points.mean())
    out = {}
    trunc = sv.v_patients + max(0.0, sv.s2 / k - (sv.v_within - sv.v_patients) / (k - 1))
    between = sv.s2 / k
    for name, var, df in (
        ("mom+", trunc, (k - 1) * (trunc / between) ** 2 if between > 0 else np.inf),
        ("sat", sv.variance, (k - 1) * (sv.variance / between) ** 2 if between > 0 else np.inf),
        ("t", between, k - 1),
    ):
        df = max(k - 1.0, min(sv.n_valid - 1.0, df))
        se = np.sqrt(var)
        h, h2 = stats.t.ppf(1 - ALPHA / 2, df) * se, stats.t.ppf(1 - ALPHA, df) * se
        out[name] = (est - h, est + h, est - h2, est + h2)
    return out


def _run_batch(task: tuple) -> dict[str, np.ndarray]:
    """One batch of replicates of one cell; returns per-method outcome counts."""
    cell, mu_kind, n_rep, n_boot, seed, variants = task
    k, n_pat, seed_sd, rho = cell["k"], cell["n"], cell["seed_sd"], cell["rho"]
    rng = np.random.default_rng(seed)
    # the seed effect of each seed's value: a difference of two models (rho = 0 table) or one
    sd_a = seed_sd * (np.sqrt(2.0) if cell["paired"] else 1.0)
    a = sd_a * rng.standard_normal((n_rep, k))
    if mu_kind == "null":
        mu = np.zeros(n_rep)
    else:  # the equivalence boundary, alternating sides
        mu = MARGIN * np.where(np.arange(n_rep) % 2 == 0, 1.0, -1.0)
    base = mu[:, None] + a
    if n_pat is None:  # no test-set noise: every resample equals the point
        points = base
        boots = np.repeat(base[:, :, None], n_boot, axis=2)
    else:
        u = rng.standard_normal((n_rep, 1, n_pat))
        f = rng.standard_normal((n_rep, k, n_pat))
        d = SD_P * (np.sqrt(rho) * u + np.sqrt(1.0 - rho) * f)
        idx = rng.integers(0, n_pat, size=(n_boot, n_pat))
        w = np.bincount(
            (idx + n_pat * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n_pat
        )
        w = w.reshape(n_boot, n_pat).astype(np.float64) / n_pat
        points = base + d.mean(axis=2)
        boots = base[:, :, None] + d @ w.T  # (reps, k, B): same patient resamples for every seed
    draws = seed_draws(k, n_boot, 0)  # as comparison_rows._across_row did (ev.seed = 0)
    names = METHODS + (VARIANTS if variants else ())
    res = {m: np.zeros((n_rep, 5)) for m in names}  # cover, reject, equivalent, width, valid
    for r in range(n_rep):
        truth = mu[r]
        est = float(points[r].mean())
        out = {
            "hier": I.infer(
                est,
                hierarchical(boots[r], draws),
                ci=CI,
                margin=MARGIN,
                worse_if="lower",
            ),
            "pool": I.pool_seeds(points[r], boots[r], ci=CI, margin=MARGIN, worse_if="lower"),
        }
        for m, inf in out.items():
            ok = inf.lo is not None
            res[m][r] = (
                ok and inf.lo <= truth <= inf.hi,
                inf.p_value is not None and inf.p_value <= ALPHA,
                I.verdict(inf, ALPHA) == I.EQUIVALENT,
                (inf.hi - inf.lo) if ok else np.nan,
                ok,
            )
        if variants:
            for m, (lo, hi, tlo, thi) in _variant_cis(points[r], boots[r]).items():
                res[m][r] = (lo <= truth <= hi, lo > 0 or hi < 0, tlo > -MARGIN and thi < MARGIN,
                             hi - lo, True)  # fmt: skip
    return res


def df_check() -> None:
    """Exact (quadrature) worst-case coverage of the t rule in the Gaussian model.

    Units: the seed-specific test variance of the mean ``w = (v - gamma) / k = 1``; the shared
    test variance ``c = lam`` (both known from the patient resamples); the true between-seed
    variance of the mean ``tau >= 1``; ``s2 / k = tau X`` with ``X ~ chi2(k - 1) / (k - 1)``;
    mean ~ N(mu, lam + tau). Coverage = E_X[2 Phi(q sqrt(V / (lam + tau))) - 1], worst case
    over lam in [0, 1e4] and tau in [1, 1e5]. ``pool``: the rule of ``seed_variance``;
    ``sat``: plain Satterthwaite (s2 / k in place of its upper bound); ``mom+``: variance
    truncated at the patient bootstrap, Satterthwaite df.
    """
    nq = 4000
    taus = np.exp(np.linspace(0.0, np.log(1e5), 40))[:, None]
    lams = np.r_[0.0, np.exp(np.linspace(np.log(0.01), np.log(1e4), 25))]
    print("# exact worst-case coverage minus nominal over shared/seed/test variance splits")
    print(f"{'ci':>5} {'k':>3} | {'pool':>8} {'sat':>8} {'mom+':>8}")
    for ci in (0.90, 0.95, 0.99):
        alpha = I.alpha_of(ci)
        for k in (2, 3, 5, 10):
            x = stats.chi2.ppf((np.arange(nq) + 0.5) / nq, k - 1) / (k - 1)
            chi = stats.chi2.ppf(I.SEED_DF_BOUND, k - 1)
            worst = {"pool": 1.0, "sat": 1.0, "mom+": 1.0}
            for lam in lams:
                s = taus * x[None, :]
                upper = s * (k - 1) / chi
                rules = {
                    "pool": (lam + s, (k - 1) * ((lam + upper) / upper) ** 2),
                    "sat": (lam + s, (k - 1) * ((lam + s) / s) ** 2),
                    "mom+": (
                        lam + np.maximum(1.0, s),
                        (k - 1) * ((lam + np.maximum(1.0, s)) / s) ** 2,
                    ),
                }
                for name, (var, df) in rules.items():
                    q = stats.t.ppf(1 - alpha / 2, np.maximum(k - 1.0, df))
                    cov = (2 * stats.norm.cdf(q * np.sqrt(var / (lam + taus))) - 1).mean(axis=1)
                    worst[name] = min(worst[name], float(cov.min()) - ci)
            print(f"{ci:>5} {k:>3} | " + " ".join(f"{worst[n]:+8.4f}" for n in worst), flush=True)


def _cells(values: bool) -> list[dict]:
    cells = []
    for paired, rho in ((True, 0.0),) + (((False, 0.5),) if values else ()):
        for k in (2, 3, 5):
            for n in (300, 1000, 4000):
                for sd in (0.0, 0.01, 0.02):
                    cells.append({"k": k, "n": n, "seed_sd": sd, "rho": rho, "paired": paired})
            cells.append({"k": k, "n": None, "seed_sd": 0.02, "rho": rho, "paired": paired})
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="300 reps, B = 200 (~20 s)")
    ap.add_argument("--reps", type=int, help="replicates per cell and truth (default 2000)")
    ap.add_argument("--boot", type=int, help="patient resamples B (default 500)")
    ap.add_argument("--variants", action="store_true", help="add the rejected candidates")
    ap.add_argument("--values", action="store_true", help="add the rho = 0.5 table")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--df-check", action="store_true", help="only the exact Gaussian df check")
    args = ap.parse_args()
    if args.df_check:
        df_check()
        return
    reps = args.reps or (300 if args.quick else 2000)
    n_boot = args.boot or (200 if args.quick else 500)
    reps = max(BATCH, reps // BATCH * BATCH) if reps >= BATCH else reps
    cells = _cells(args.values)
    tasks, keys = [], []
    for ci_, cell in enumerate(cells):
        for kind_i, kind in enumerate(("null", "margin")):
            for b in range(max(1, reps // BATCH)):
                ss = np.random.SeedSequence([args.seed, ci_, kind_i, b])
                tasks.append((cell, kind, min(BATCH, reps), n_boot, ss, args.variants))
                keys.append((ci_, kind))
    t0 = time.time()
    with Pool(args.workers) as pool:
        outs = pool.map(_run_batch, tasks, chunksize=1)
    agg: dict = {}
    for key, out in zip(keys, outs, strict=True):
        for m, arr in out.items():
            agg.setdefault(key + (m,), []).append(arr)
    agg = {key: np.concatenate(v) for key, v in agg.items()}
    names = METHODS + (VARIANTS if args.variants else ())
    n_real = len(agg[(0, "null", "hier")])
    print(f"# {n_real} reps per cell and truth, B = {n_boot} patient resamples, margin {MARGIN},"
          f" nominal 95% CI / 5% tests; MC SE ~{np.sqrt(.05 * .95 / n_real):.3f} at 0.95")  # fmt: skip
    print("# cover: CI covers mu (true mu = 0); typeI: p <= 0.05 at mu = 0; eq@0: 'equivalent'"
          " at mu = 0; FALSE-eq: 'equivalent' at mu = +-margin; width: median CI width")  # fmt: skip
    hdr = f"{'table':<6}{'k':>2} {'patients':>9} {'seedSD':>6} |"
    cols = ("cover", "typeI", "eq@0", "FALSE-eq")
    for c in cols:
        hdr += " " + c.center(6 * len(names)) + " |"
    hdr += " width " + "/".join(names[1:]) + " vs hier"
    print(hdr)
    print(
        f"{'':<6}{'':>2} {'':>9} {'':>6} |" + (" " + "".join(f"{m:>6}" for m in names) + " |") * 4
    )
    for ci_, cell in enumerate(cells):
        label = "delta" if cell["paired"] else "value"
        n = "no noise" if cell["n"] is None else str(cell["n"])
        line = f"{label:<6}{cell['k']:>2} {n:>9} {cell['seed_sd']:>6.2f} |"
        null = {m: agg[(ci_, "null", m)] for m in names}
        marg = {m: agg[(ci_, "margin", m)] for m in names}
        for src, j in ((null, 0), (null, 1), (null, 2), (marg, 2)):  # the columns of `cols`
            line += " " + "".join(f"{src[m][:, j].mean():6.3f}" for m in names) + " |"
        wh = np.nanmedian(null["hier"][:, 3])
        line += " " + "/".join(f"{np.nanmedian(null[m][:, 3]) / wh:.2f}" for m in names[1:])
        print(line, flush=True)
    print(f"# {time.time() - t0:.0f} s on {args.workers} worker(s)")


if __name__ == "__main__":
    main()
