"""Copied from the statistics red team's power_sim.py (issue 24) and adapted to the new plan rule.
Exp 3: does the TOST reach the power `plan --power` promises at the size it prints?
Own generator of one test site: 5 labels, 3 sources (T's own + 2 others), DP and non-DP per
source, clustered patients; true Δdrop = 0 by symmetry (DP and non-DP equally distributed)."""

import math
import sys
import time

import numpy as np

from privdom_ray.costs import label_floor, power_at, units_needed
from privdom_ray.stats import metrics, resampling
from privdom_ray.stats.estimates import _columns, _mean

PREV = np.array([0.04, 0.07, 0.12, 0.2, 0.3])
L = PREV.size


def gen(rng, P, rho_pair, sig_model):
    m = np.minimum(rng.geometric(0.4, P), 8)
    pid = np.repeat(np.arange(P), m)
    n = pid.size
    dis = rng.random((P, L)) < PREV  # diseased patients per label
    first = np.r_[True, pid[1:] != pid[:-1]]
    yimg = (rng.random((n, L)) < 0.7) | first[:, None]
    y = (dis[pid] & yimg).astype(float)
    u = rng.standard_normal((P, L))[pid]  # shared patient difficulty (all models)
    scores = {}
    for src, mu in (("on", 1.4), ("o1", 0.9), ("o2", 0.8)):
        src_pat = rng.standard_normal((P, L))[pid]
        src_img = rng.standard_normal((n, L))
        for eps in ("dp", "nd"):
            own_pat = rng.standard_normal((P, L))[pid]
            own_img = rng.standard_normal((n, L))
            pat = math.sqrt(rho_pair) * src_pat + math.sqrt(1 - rho_pair) * own_pat
            img = math.sqrt(rho_pair) * src_img + math.sqrt(1 - rho_pair) * own_img
            scores[(src, eps)] = mu * y + 0.8 * u + sig_model * (pat + img)
    return scores, y, pid, P


def delta_est(scores, y, pid, P):
    codes, p = metrics.cluster_codes(pid, y.shape[0])
    sup = metrics.label_support(y, 10, 10, codes)
    ok = sup.ok
    macro = {}
    for k, s in scores.items():
        jk = resampling.jackknife_auc(s, y, codes, n_units=p)
        macro[k] = _columns(jk.point, jk.loo, jk.df, sup, ok, p)[-1]
    drop = {e: macro[("on", e)] - _mean([macro[("o1", e)], macro[("o2", e)]]) for e in ("dp", "nd")}
    share = np.minimum(sup.units_pos, sup.units_neg) / P
    return drop["dp"] - drop["nd"], int(ok.sum()), share


def sim(P, reps, rng, rho, sm, margin=0.02):
    passes = 0
    pts = []
    v = []
    dfs = []
    nlab = []
    rare = []
    for _ in range(reps):
        sc, y, pid, PP = gen(rng, P, rho, sm)
        d, nl, rr = delta_est(sc, y, pid, PP)
        r = d.infer(0.95, margin, "higher")
        nlab.append(nl)
        rare.append(rr)
        if r.p_tost is None:
            continue
        passes += r.p_tost <= 0.05
        pts.append(d.point)
        v.append((r.tost_hi - r.tost_lo) / 2)
        dfs.append(r.df)
    return passes, np.array(pts), np.array(v), np.array(dfs), np.array(nlab), np.array(rare)


if __name__ == "__main__":
    rho, sm, P0, pilot_reps, reps, power = (
        float(sys.argv[1]),
        float(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
        int(sys.argv[5]),
        float(sys.argv[6]),
    )
    rng = np.random.default_rng(2024)
    from scipy import stats

    t0 = time.time()
    _, pts, hw, dfs, nl, rare = sim(P0, pilot_reps, rng, rho, sm)
    se = hw / stats.t.ppf(0.95, dfs)
    V_old = float(np.median(se**2 * P0))
    V = float(np.mean(se**2 * P0))  # what unit_variance_from now reads (mean se^2 x patients)
    dpu = float(np.mean((dfs + 1.0) / P0))  # df per patient
    shares = {f"l{j}": float(v) for j, v in enumerate(np.mean(rare, axis=0))}
    V_true = float(np.var(pts, ddof=1) * P0)
    print(
        f"pilot P={P0} reps={pilot_reps}: V(median)={V_old:.4g} V(mean)={V:.4g} V(true MC var*P)={V_true:.4g} df/patient={dpu:.4f} labels={nl.mean():.2f} rarer shares={[round(v, 3) for v in shares.values()]} ({time.time() - t0:.0f}s)",
        flush=True,
    )
    n_old = units_needed(0.02, V_old, 0.05, power)
    n_pow = units_needed(0.02, V, 0.05, power, dpu)
    floor = label_floor(shares, 10, 5)
    n = max(n_pow, floor)
    print(
        f"old rule n={n_old}; new: power rule n={n_pow}, label floor {floor} -> n={n} (power_at {power_at(n, 0.02, V, 0.05, dpu):.3f}{'; floor decides' if floor > n_pow else ''})",
        flush=True,
    )
    t0 = time.time()
    passes, pts, hw, dfs, nl, rare = sim(n, reps, rng, rho, sm)
    k = pts.size
    print(
        f"at n={n}: TOST pass {passes}/{reps} = {passes / reps:.3f} (MC SE {math.sqrt(passes / reps * (1 - passes / reps) / reps):.3f}); "
        f"valid {k}; mean df {dfs.mean():.1f} min df {dfs.min():.1f}; labels {nl.mean():.2f}; "
        f"true sd*sqrt(n) {pts.std(ddof=1) * math.sqrt(n):.4g} mean se*sqrt(n) {np.mean(hw / stats.t.ppf(0.95, dfs)) * math.sqrt(n):.4g}; bias {pts.mean():.4f} ({time.time() - t0:.0f}s)",
        flush=True,
    )
