"""Patient resamples: the leave-one-patient-out jackknife and the vectorised patient bootstrap.

Conventions (labels, scores, clusters) as in :mod:`privdom_ray.stats.metrics`. The jackknife
(:func:`jackknife_auc`, :func:`jackknife_ratio`) gives the leave-one-out values every CI of
evaluation protocol 4 is built from; the bootstrap (:func:`bootstrap_stats`) is the method
before protocol 4, kept for the simulations that compare the two
(``benchmarks/sim_intervals.py``) and ``benchmarks/bench_bootstrap.py``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import sparse

from privdom_ray.stats.metrics import _check_idx, _check_pair_2d, cluster_codes

__all__ = [
    "BootStats",
    "Resampler",
    "are_probabilities",
    "bootstrap_auc",
    "bootstrap_indices",
    "bootstrap_stats",
    "make_resampler",
    "subgroup_seed",
]


# Target number of (resample, row) cells per chunk of resamples: the sparse and dense products
# per chunk need tens of resamples to run at speed, while a chunk's counts (8 MiB here) should
# stay near the cache; 2**19-2**20 was fastest on a busy 2-core box (35 resamples at n = 30,000).
_CHUNK_CELLS = 1 << 20


# --------------------------------------------------------------------------- resamples


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Units (images, or patients) drawn with replacement, shape (n_boot, n), int32.

    Deterministic in ``seed``. Generate once and share between the models of a paired
    comparison so that their resamples coincide.
    """
    if n < 0 or n_boot < 0:
        raise ValueError("n and n_boot must be >= 0")
    if n >= 2**31:
        raise ValueError("n too large for int32 indices")
    rng = np.random.default_rng(seed)
    if n == 0:
        return np.zeros((n_boot, 0), dtype=np.int32)
    return rng.integers(0, n, size=(n_boot, n), dtype=np.int32)


def subgroup_seed(seed: int, name: str) -> int:
    """Seed of a subgroup's resamples: ``seed`` for "all", else ``seed + crc32(name)``.

    "all" keeps the plain seed so ``make_resampler(n, n_boot, seed, clusters)`` reproduces
    the resamples ``evaluate`` used on the full set (the comparisons rely on it).
    """
    if name == "all":
        return int(seed)
    return int(seed) + zlib.crc32(name.encode("utf-8"))


@dataclass(frozen=True)
class Resampler:
    """Bootstrap resamples of a test set drawn by patient.

    ``draws[b]`` are the P patients drawn with replacement for resample b and ``codes[i]`` is
    the patient (0..P-1) of row i. :meth:`subset` keeps the same draws for a subset of rows, so
    several subgroups of one resample are resampled jointly (what a between-subgroup gap needs).
    """

    codes: np.ndarray  # (n,) intp
    draws: np.ndarray  # (B, P) int32

    @property
    def n_boot(self) -> int:
        return int(self.draws.shape[0])

    @property
    def n_clusters(self) -> int:
        return int(self.draws.shape[1])

    @property
    def n_rows(self) -> int:
        return int(self.codes.size)

    @property
    def identity(self) -> bool:
        """Every row is its own cluster, in order (an image-level bootstrap)."""
        n = self.n_rows
        return self.n_clusters == n and np.array_equal(self.codes, np.arange(n))

    @cached_property
    def count_dtype(self) -> type:
        """float32 while every sum of counts is an exact float32 integer: a resample holds at
        most P x (largest patient's images) images, kept below 2**24. It halves the memory
        traffic of the products; float64 beyond."""
        if self.n_rows == 0:
            return np.float64
        largest = int(np.bincount(self.codes).max())
        return np.float32 if self.n_clusters * largest < (1 << 24) else np.float64

    def subset(self, mask: np.ndarray) -> Resampler:
        return Resampler(self.codes[np.asarray(mask, dtype=bool)], self.draws)

    def cluster_counts(self, cells: int = _CHUNK_CELLS) -> Iterator[tuple[int, np.ndarray]]:
        """(first resample b0, counts (P, bc)): ``counts[p, b]`` = how often patient p was
        drawn in resample b0 + b, for chunks of about ``cells`` (resample, row) cells.

        Transposed so that a chunk's counts of one patient are contiguous: the sparse
        products and row gathers of the AUC and the linear statistics read them in order.
        """
        n_boot, p = self.draws.shape
        if n_boot == 0 or p == 0 or self.n_rows == 0:
            return
        chunk = max(1, min(n_boot, cells // max(p, self.n_rows)))
        for b0 in range(0, n_boot, chunk):
            ic = self.draws[b0 : b0 + chunk]
            bc = ic.shape[0]
            keys = ic.astype(np.int64) * bc + np.arange(bc, dtype=np.int64)[:, None]
            counts = np.bincount(keys.ravel(), minlength=bc * p).reshape(p, bc)
            yield b0, counts.astype(self.count_dtype)


def make_resampler(n: int, n_boot: int, seed: int, clusters: np.ndarray | None = None) -> Resampler:
    """Patient-level resamples of n rows (image level when ``clusters`` is None).

    Without clusters the draws equal ``bootstrap_indices(n, n_boot, seed)`` (image indices).
    """
    codes, p = cluster_codes(clusters, n)
    return Resampler(codes, bootstrap_indices(p, n_boot, seed))


def _resampler_from_idx(idx: np.ndarray, n: int, clusters: np.ndarray | None) -> Resampler:
    codes, p = cluster_codes(clusters, n)
    return Resampler(codes, _check_idx(idx, p))


# --------------------------------------------------------------------------- bootstrap core


@dataclass
class _AucPlan:
    """Per-label precomputation for the vectorised bootstrap AUC.

    The larger class, sorted by score, is cut into segments at the ranks where items of the
    smaller class fall (``k_lt`` / ``k_le``). ``seg`` (segments x patients, sparse) counts each
    patient's larger-class images per segment, so one sparse product turns a chunk of patient
    counts into segment sums, whose cumulative sum gives the counts below every smaller-class
    item: O(images) per resample without expanding counts to images.
    """

    seg: sparse.csr_array  # (n_seg, P)
    small: np.ndarray  # patient of each smaller-class image
    at_lt: np.ndarray  # per small item: segment boundary = #big items with score < its score
    at_le: np.ndarray  # per small item: boundary = #big items with score <= its score


def _auc_plan(s: np.ndarray, y: np.ndarray, codes: np.ndarray, p: int) -> _AucPlan | None:
    pos = np.flatnonzero(y == 1.0)
    neg = np.flatnonzero(y == 0.0)
    if pos.size == 0 or neg.size == 0:
        return None
    # AUC(s, y) == AUC(-s, 1 - y) with the same integer U, so let the segments run over the
    # larger class and gather at the (fewer) items of the smaller class.
    if pos.size > neg.size:
        pos, neg, s = neg, pos, -s
    big = neg[np.argsort(s[neg], kind="stable")]
    sv, sp = s[big], s[pos]
    k_lt = np.searchsorted(sv, sp, side="left")
    k_le = np.searchsorted(sv, sp, side="right")
    bounds = np.unique(np.concatenate([[0, big.size], k_lt, k_le]))
    which = np.searchsorted(bounds, np.arange(big.size), side="right") - 1
    seg = sparse.csr_array(
        (np.ones(big.size, dtype=np.float32), (which, codes[big])), shape=(bounds.size - 1, p)
    )  # duplicates (a patient twice in a segment) are summed
    return _AucPlan(
        seg=seg,
        small=codes[pos],
        at_lt=np.searchsorted(bounds, k_lt),
        at_le=np.searchsorted(bounds, k_le),
    )


def _chunk_auc(pc_t: np.ndarray, plan: _AucPlan) -> np.ndarray:
    """AUC of each resample of a chunk from its (P, bc) patient counts (transposed).

    Exact: counts and their cumulative sums are integers exact in the counts' dtype (see
    ``Resampler.count_dtype``); the U statistic is summed in float64 (exact below 2**53).
    NaN where a class is missing."""
    bc = pc_t.shape[1]
    cum = np.zeros((plan.seg.shape[0] + 1, bc), dtype=pc_t.dtype)
    np.cumsum(plan.seg @ pc_t, axis=0, out=cum[1:])
    c_small = np.take(pc_t, plan.small, axis=0).astype(np.float64)
    below = np.take(cum, plan.at_lt, axis=0).astype(np.float64)
    below += np.take(cum, plan.at_le, axis=0)
    two_u = np.einsum("ib,ib->b", c_small, below)
    denom = 2.0 * c_small.sum(axis=0) * cum[-1].astype(np.float64)
    col = np.full(bc, np.nan)
    np.divide(two_u, denom, out=col, where=denom > 0)
    return col


def are_probabilities(s: np.ndarray, y: np.ndarray) -> bool:
    """Calibration needs probabilities: every score with a known label lies in [0, 1]."""
    v = s[~np.isnan(y)]
    return bool(v.size == 0 or ((v >= 0.0) & (v <= 1.0)).all())


def _linear_columns(
    s: np.ndarray, y: np.ndarray, pred: np.ndarray | None, bins: int | None
) -> tuple[np.ndarray, list[str]]:
    """Per-image columns whose resample sums give every non-rank statistic, (n, c) float64.

    Blocks of L columns: known, pos, [tp, tn], [squared error, then the residual y - p of
    each calibration bin k (bin0 .. bin{K-1})]."""
    known = ~np.isnan(y)
    pos = y == 1.0
    blocks, names = [known, pos], ["known", "pos"]
    if pred is not None:
        blocks += [pos & pred, (y == 0.0) & ~pred]
        names += ["tp", "tn"]
    if bins:
        p = np.where(known, s, 0.0)
        resid = np.where(known, np.nan_to_num(y) - p, 0.0)
        blocks.append(resid * resid)
        names.append("sq")
        which = np.clip(np.floor(p * bins), 0, bins - 1).astype(np.intp)
        for k in range(bins):
            blocks.append(np.where(which == k, resid, 0.0))
            names.append(f"bin{k}")
    return np.concatenate(blocks, axis=1).astype(np.float64), names


@dataclass(frozen=True)
class BootStats:
    """Per-resample statistics of one model, each (B, L); None where not requested.

    ``valid[b, j]``: resample b has both classes of label j (its AUC is defined).
    """

    known: np.ndarray
    pos: np.ndarray
    auc: np.ndarray | None = None
    tp: np.ndarray | None = None
    tn: np.ndarray | None = None
    brier: np.ndarray | None = None
    ece: np.ndarray | None = None

    @property
    def valid(self) -> np.ndarray:
        return (self.pos > 0) & (self.known - self.pos > 0)


def _from_linear(lin: np.ndarray, names: list[str], n_lab: int, bins: int | None) -> dict:
    block = {name: lin[:, k * n_lab : (k + 1) * n_lab] for k, name in enumerate(names)}
    out = {key: block.get(key) for key in ("known", "pos", "tp", "tn")}
    if bins:
        known = block["known"]
        err = np.abs(np.stack([block[f"bin{k}"] for k in range(bins)])).sum(axis=0)
        for key, total in (("brier", block["sq"]), ("ece", err)):
            val = np.full(known.shape, np.nan)
            np.divide(total, known, out=val, where=known > 0)
            out[key] = val
    return out


def bootstrap_stats(
    scores: np.ndarray,
    labels: np.ndarray,
    rs: Resampler,
    *,
    pred: np.ndarray | None = None,
    want_auc: bool = True,
    bins: int | None = None,
) -> BootStats:
    """Per-resample AUCs, confusion counts at ``pred`` and calibration (``bins``) of one model.

    Validated (n, L) inputs. Linear statistics are one product of the patient counts with the
    per-patient sums of :func:`_linear_columns`; AUCs gather the image counts per label.
    """
    scores, labels = _check_pair_2d(scores, labels)  # NaN scores would read as ties (0.5)
    n, n_lab = scores.shape
    if rs.n_rows != n:
        raise ValueError(f"resampler has {rs.n_rows} rows, scores have {n}")
    cols, names = _linear_columns(scores, labels, pred, bins)
    # float32 products when the counts are float32: exact for the 0/1 columns (integer sums
    # < 2**24), ~1e-7 relative for the Brier / calibration sums (immaterial for their CIs)
    per_patient = _per_patient(cols, rs.codes, rs.n_clusters).astype(rs.count_dtype)
    lin = np.zeros((rs.n_boot, cols.shape[1]))
    boot_auc = np.full((rs.n_boot, n_lab), np.nan) if want_auc else None
    p = rs.n_clusters
    plans = [(j, _auc_plan(scores[:, j], labels[:, j], rs.codes, p)) for j in range(n_lab)]
    plans = [(j, plan) for j, plan in plans if plan is not None and want_auc]
    for b0, pc_t in rs.cluster_counts():
        b1 = b0 + pc_t.shape[1]
        lin[b0:b1] = (per_patient @ pc_t).T
        for j, plan in plans:
            boot_auc[b0:b1, j] = _chunk_auc(pc_t, plan)
    return BootStats(auc=boot_auc, **_from_linear(lin, names, n_lab, bins))


def _per_patient(cols: np.ndarray, codes: np.ndarray, n_clusters: int) -> np.ndarray:
    """Per-patient sums of per-image columns, transposed: (c, P) float64, C-contiguous."""
    out = np.zeros((cols.shape[1], n_clusters))
    for k in range(cols.shape[1]):
        out[k] = np.bincount(codes, weights=cols[:, k], minlength=n_clusters)
    return out


def bootstrap_auc(
    scores: np.ndarray,
    labels: np.ndarray,
    idx: np.ndarray,
    *,
    clusters: np.ndarray | None = None,
) -> np.ndarray:
    """AUC of every resample and label: shape (B, L); 1-D inputs give (B,).

    ``idx`` (B, P) are the drawn units: image indices without ``clusters``, patient indices
    (0..P-1 in the order of ``np.unique(clusters)``) with them. Exactly equal to ``auc`` on
    the explicitly resampled arrays, without a Python loop over resamples. Resamples lacking
    positives or negatives give NaN.
    """
    one_d = np.ndim(scores) == 1
    s, y = _check_pair_2d(scores, labels)
    out = bootstrap_stats(s, y, _resampler_from_idx(idx, s.shape[0], clusters)).auc
    return out[:, 0] if one_d else out


# --------------------------------------------------------------------------- jackknife


@dataclass(frozen=True)
class Jackknife:
    """Leave-one-unit-out values of per-label statistics on one set of units (patients).

    ``point`` (L,); ``loo`` (L, P): the statistic recomputed without unit i (NaN where it is
    undefined); ``df`` (L,): degrees of freedom of the label's t interval (:func:`_auc_df`).
    Any linear combination of statistics on the SAME units (a macro, a paired difference, a
    drop) is inferred from the same combination of their ``loo`` rows
    (:func:`inference.jackknife_variance`): the pairing is kept exactly.
    """

    point: np.ndarray
    loo: np.ndarray
    df: np.ndarray


def _icc(values: np.ndarray, groups: np.ndarray, n_groups: int) -> float:
    """One-way ANOVA intra-class correlation of ``values`` within ``groups`` (dense indices
    below ``n_groups``), in [0, 1]; 1 when it cannot be estimated (no group with two values:
    the conservative side)."""
    cnt = np.bincount(groups, minlength=n_groups)
    have = cnt > 0
    k, n = int(have.sum()), values.size
    if k < 2 or n <= k:
        return 1.0
    sums = np.bincount(groups, weights=values, minlength=n_groups)
    means = np.divide(sums, cnt, out=np.zeros(n_groups), where=have)
    msb = float((cnt * (means - values.mean()) ** 2).sum()) / (k - 1)
    msw = float(((values - means[groups]) ** 2).sum()) / (n - k)
    n0 = (n - float((cnt.astype(np.float64) ** 2).sum()) / n) / (k - 1)
    denom = msb + (n0 - 1.0) * msw
    return 1.0 if denom <= 0 else float(np.clip((msb - msw) / denom, 0.0, 1.0))


def _effective_units(sizes: np.ndarray, rho: float) -> float:
    """Effective number of units whose contributions have variance proportional to
    ``m (1 + (m - 1) rho)`` (m images each, within-unit correlation rho): the Satterthwaite
    df of a sum of their squared contributions (Imbens & Kolesar 2016 with a random-effects
    working model). Equals the count for equal sizes; far fewer when one patient has many
    correlated images."""
    w = sizes * (1.0 + (sizes - 1.0) * rho)
    if w.size < 2:
        return float(w.size)
    return max(2.0, float(w.sum() ** 2 / (w * w).sum()))  # >= 1 df from two or more units


def _auc_df(part_pos: np.ndarray, part_neg: np.ndarray, eff_pos: float, eff_neg: float) -> float:
    """Satterthwaite df of an AUC's variance: its positive-class part (per patient, the
    placement values of its positive images around the AUC) with ``eff_pos - 1`` df and its
    negative-class part with ``eff_neg - 1`` df. Chosen by ``benchmarks/sim_intervals.py``:
    with df = (patients of the rarer class - 1) the 95% intervals covered 0.930 at 50
    positive patients (prevalence 2%, 1-15 images per patient, ICC 0.9; 4,000 replicates),
    with these df 0.946."""
    vp, vn = float(part_pos @ part_pos), float(part_neg @ part_neg)
    dp, dn = eff_pos - 1.0, eff_neg - 1.0
    if dp <= 0 or dn <= 0:
        return max(0.0, min(dp, dn))
    if vp + vn == 0.0:
        return min(dp, dn)
    return (vp + vn) ** 2 / (vp * vp / dp + vn * vn / dn)


def _jack_auc_1d(s: np.ndarray, y: np.ndarray, codes: np.ndarray, p: int):
    """(AUC, leave-one-patient-out AUCs (p,), df) of one label, O(n log n).

    Without patient i the Mann-Whitney sum loses its positives' row sums and its negatives'
    column sums, and regains the pairs within i (counted twice): ``U_(-i) = U - R_i - C_i +
    W_i`` over ``(M - m_i)(N - n_i)`` pairs. Integer arithmetic in units of 1/2 (ties).
    """
    known = ~np.isnan(y)
    s, y, c = s[known], y[known], codes[known]
    pos = y == 1.0
    cp, cn = c[pos], c[~pos]
    m_all, n_all = cp.size, cn.size
    loo = np.full(p, np.nan)
    if m_all == 0 or n_all == 0:
        return math.nan, loo, 0.0
    # one sort: per distinct score, the negatives below / positives above and the ties
    rank = np.unique(s, return_inverse=True)[1].astype(np.int64).reshape(-1)
    rp, rn = rank[pos], rank[~pos]
    n_cnt = np.bincount(rn, minlength=rank.size)
    p_cnt = np.bincount(rp, minlength=rank.size)
    r2 = 2 * (np.cumsum(n_cnt) - n_cnt)[rp] + n_cnt[rp]  # 2 x (negatives below + ties / 2)
    c2 = 2 * (m_all - np.cumsum(p_cnt))[rn] + p_cnt[rn]  # 2 x (positives above + ties / 2)
    u2 = int(r2.sum(dtype=np.int64))
    row = np.bincount(cp, weights=r2, minlength=p)
    col = np.bincount(cn, weights=c2, minlength=p)
    m_i, n_i = np.bincount(cp, minlength=p), np.bincount(cn, minlength=p)
    within = _within_pairs(rank, pos, c, (m_i > 0) & (n_i > 0), p)
    den = 2.0 * (m_all - m_i) * (n_all - n_i)
    np.divide(u2 - row - col + within, den, out=loo, where=den > 0)
    theta = u2 / (2.0 * m_all * n_all)
    eff_pos = _effective_units(m_i[m_i > 0].astype(np.float64), _icc(r2 / (2.0 * n_all), cp, p))
    eff_neg = _effective_units(n_i[n_i > 0].astype(np.float64), _icc(c2 / (2.0 * m_all), cn, p))
    part_pos = (row / (2.0 * n_all) - m_i * theta) / m_all
    part_neg = (col / (2.0 * m_all) - n_i * theta) / n_all
    return theta, loo, min(_auc_df(part_pos, part_neg, eff_pos, eff_neg), p - 1.0)


def _within_pairs(rank: np.ndarray, pos: np.ndarray, c: np.ndarray, both: np.ndarray, p: int):
    """Twice the Mann-Whitney sum of each patient's own (positive, negative) pairs, (p,),
    from the scores' dense ranks: only patients with both classes have any, so only their
    rows are sorted."""
    rows = both[c]
    if not rows.any():
        return np.zeros(p)
    n_rank = int(rank.max()) + 1
    rank, pos, c = rank[rows], pos[rows], c[rows].astype(np.int64)
    key_n = np.sort(c[~pos] * n_rank + rank[~pos])
    key_p = c[pos] * n_rank + rank[pos]
    start = np.searchsorted(key_n, c[pos] * n_rank, "left")
    w2 = np.searchsorted(key_n, key_p, "left") + np.searchsorted(key_n, key_p, "right") - 2 * start
    return np.bincount(c[pos], weights=w2, minlength=p)


def jackknife_auc(
    scores: np.ndarray,
    labels: np.ndarray,
    clusters: np.ndarray | None = None,
    *,
    n_units: int | None = None,
) -> Jackknife:
    """Per-label AUC with its leave-one-patient-out values and t degrees of freedom.

    ``clusters`` None: every image is its own unit. Units (0..P-1) are ``cluster_codes``'s
    renumbering, so two models scored on the same rows get aligned ``loo`` columns. With
    ``n_units`` the clusters are taken as unit indices in [0, n_units) as they are: the units
    of a larger set (a subgroup's rows on the whole test set's patients, for a gap between
    subgroups); a unit without rows here leaves the AUC unchanged. Exact: ``loo[j, i]``
    equals :func:`auc` on the rows of every other unit (tested).
    """
    s, y = _check_pair_2d(scores, labels)
    if n_units is None:
        codes, p = cluster_codes(clusters, s.shape[0])
    else:
        codes, p = np.asarray(clusters, dtype=np.intp).reshape(s.shape[0]), int(n_units)
        if codes.size and (codes.min() < 0 or codes.max() >= p):
            raise ValueError(f"unit indices must lie in [0, {p})")
    out = [_jack_auc_1d(s[:, j], y[:, j], codes, p) for j in range(s.shape[1])]
    return Jackknife(
        np.array([o[0] for o in out]), np.stack([o[1] for o in out]).reshape(len(out), p),
        np.array([o[2] for o in out], dtype=np.float64),
    )  # fmt: skip


def jackknife_ratio(num: np.ndarray, den: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(point (L,), leave-one-unit-out values (L, P)) of ratios of per-unit sums ``num`` /
    ``den`` (each (L, P)): a rate (TP / positives), an accuracy or a Brier score. NaN where
    the denominator is 0."""
    tot_n, tot_d = num.sum(axis=1), den.sum(axis=1)
    point = np.full(tot_n.shape, np.nan)
    np.divide(tot_n, tot_d, out=point, where=tot_d > 0)
    d = tot_d[:, None] - den
    loo = np.full(num.shape, np.nan)
    np.divide(tot_n[:, None] - num, d, out=loo, where=d > 0)
    return point, loo
