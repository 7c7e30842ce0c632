"""What a grid will cost, before it runs (``launch.py plan``): no Ray, no training.

Per domain: the manifest's usable images per split and the cache's size at the grid's image
size. For the grid: trainings and evaluations by trial kind (and how many an existing output
folder already holds), the memory of one trial's step, and the compute: images processed
(epochs x training images per trial, summed over a federation's sites) at a training rate
that is measured here on this machine's device (a few steps of the grid's model) or given by
the user for the device the sweep will run on. And what the test sets can show: the test
patients per site that the primary endpoint (equivalence of the AUC drops within the grid's
margin) needs at a stated power, from the per-patient variance of a finished sweep (the
demo's, or the user's own) or a given number.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from privdom_ray import kinds
from privdom_ray.config import EvaluationConfig, SweepSpec, TrialSpec
from privdom_ray.folder import SweepFolder
from privdom_ray.store import TrialStore

EVAL_SPEEDUP = 3.0  # inference images/s relative to training (no backward pass): an estimate


@dataclass(frozen=True)
class DomainCost:
    name: str
    splits: dict[str, int]
    image_size: int

    @property
    def images(self) -> int:
        return sum(self.splits.values())

    @property
    def cache_bytes(self) -> int:
        return self.images * self.image_size**2


@dataclass(frozen=True)
class Rate:
    """Training images per second of one trial slot, plain and with DP-SGD clipping."""

    plain: float
    dp: float
    how: str  # "measured on <device>" or "given"


@dataclass
class GridCost:
    domains: list[DomainCost]
    trainings: Counter = field(default_factory=Counter)  # by kind
    expected_trainings: float = 0.0  # a tuned cell counts E[K] candidates (TrialKind.work)
    trainings_done: int = 0
    evaluations: int = 0
    evaluations_done: int = 0
    train_images: dict[str, float] = field(default_factory=dict)  # "plain"/"dp" -> images
    eval_images: float = 0.0
    step_bytes: int = 0  # peak memory of one training step at the physical batch
    step_device: str = "cpu"
    rate: Rate | None = None
    slots: int = 1
    notes: list[str] = field(default_factory=list)  # the kinds' own lines (kinds.plan_notes)

    @property
    def compute_seconds(self) -> float:
        if self.rate is None:
            return math.nan
        train = self.train_images.get("plain", 0) / self.rate.plain
        train += self.train_images.get("dp", 0) / self.rate.dp
        return train + self.eval_images / (self.rate.plain * EVAL_SPEEDUP)


def estimate(
    spec: SweepSpec,
    splits: dict[str, dict[str, int]],
    fingerprints: dict[str, str],
    *,
    rate: Rate | None = None,
    slots: int = 1,
    **plan_args: Any,
) -> GridCost:
    """The cost of ``spec``; ``splits`` = per domain, images per split (from the manifests);
    ``plan_args`` go to ``kinds.plan_trials`` (the weights file's hash, public weights)."""
    own = kinds.own_data_trials(spec, fingerprints)  # pretraining: its own preprocessing
    sizes = {d.name: spec.preprocessing.image_size for d in spec.domains}
    sizes.update({t.source: t.preprocessing.image_size for t in own})
    used = set(spec.trained_domains) | set(spec.targets) | {t.source for t in own}
    cost = GridCost([DomainCost(n, splits[n], sizes[n]) for n in sizes if n in used], slots=slots)
    n_train = {n: s.get("train", 0) for n, s in splits.items()}
    store = TrialStore(spec.output)

    def finished(key: str) -> bool:  # a kind's kept trials are counted when finished
        return store.valid(key) is not None

    trials = kinds.plan_trials(spec, fingerprints, n_train, finished=finished, **plan_args)
    cost.notes = kinds.plan_notes(spec, trials)
    targets = [_Target(t, fingerprints[t]) for t in spec.targets]
    for t in trials:
        _count(cost, t, store, targets, n_train, splits)
    cost.rate = rate
    return cost


def _count(cost: GridCost, t: TrialSpec, store: TrialStore, targets, n_train, splits) -> None:
    kind = kinds.kind_of(t)
    cost.trainings[kind.name] += 1
    runs, epochs = kind.work(t)
    cost.expected_trainings += runs
    trained = store.valid(t.key) is not None
    cost.trainings_done += trained
    sites = kind.training_sites(t)
    if not trained:
        images = runs * epochs * sum(n_train[s] for s in sites)
        key = "dp" if t.clips else "plain"
        cost.train_images[key] = cost.train_images.get(key, 0) + images
    if not kind.evaluated:
        return
    missing = store.missing_targets(t.key, targets) if trained else targets
    cost.evaluations += len(targets)
    cost.evaluations_done += len(targets) - len(missing)
    cost.eval_images += sum(splits[m.name].get("test", 0) for m in missing)


@dataclass(frozen=True)
class _Target:
    name: str
    fingerprint: str


def measure(spec: SweepSpec, device: str, *, steps: int = 3) -> tuple[Rate, int]:
    """Training images/s of one slot (plain and DP; ``steps`` 0: not measured) and the peak
    memory of one DP step at the physical batch, measured with a few steps of the grid's model
    on ``device`` (memory: two small probe batches, extrapolated)."""
    import warnings

    from privdom_ray import dpstep

    warnings.filterwarnings("ignore", message="Secure RNG turned off")  # no secure_mode here
    cfg = spec.training
    size = spec.preprocessing.image_size
    mode = cfg.grad_sample_mode
    mode = dpstep.fastest_correct_mode(spec.model) if mode == "auto" else mode
    batch = cfg.physical_batch or min(cfg.logical_batch, 32)
    rates = {"plain": math.nan, "dp": math.nan}
    for name, m in (("plain", "nondp"), ("dp", mode)) if steps else ():
        step = dpstep.build_step(spec.model, size, m, batch, device)
        step.run()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            step.run()
        rates[name] = steps * batch / (time.perf_counter() - t0)
    peak = dpstep.memory_model(spec.model, size, mode, device, probe=(2, 4)).peak(batch)
    return Rate(rates["plain"], rates["dp"], f"measured on {device}"), int(peak)


def render(cost: GridCost, spec: SweepSpec) -> str:
    lines = [f"# plan of sweep {spec.name!r} (nothing was run)", ""]
    lines += [
        "| domain | images | train | val | test | cache (at px) |",
        "|---|---|---|---|---|---|",
    ]
    for d in cost.domains:
        s = d.splits
        lines.append(
            f"| {d.name} | {d.images} | {s.get('train', 0)} | {s.get('val', 0)} | "
            f"{s.get('test', 0)} | {_bytes(d.cache_bytes)} ({d.image_size}) |"
        )
    total = sum(cost.trainings.values())
    by_kind = ", ".join(f"{n} {k}" for k, n in sorted(cost.trainings.items()))
    lines += [
        "",
        f"trainings: {total} ({by_kind}); {cost.trainings_done} already done, "
        f"{total - cost.trainings_done} to run",
        f"evaluations: {cost.evaluations} (trained models x targets); {cost.evaluations_done} "
        f"already done, {cost.evaluations - cost.evaluations_done} to run",
        f"images to process: {cost.train_images.get('plain', 0):,.0f} plain training, "
        f"{cost.train_images.get('dp', 0):,.0f} DP training, {cost.eval_images:,.0f} evaluation",
        *cost.notes,
    ]
    if cost.step_bytes:
        lines.append(
            f"memory per trial: {_bytes(cost.step_bytes)} for one training step on "
            f"{cost.step_device} at physical batch {spec.training.physical_batch or 'auto'} "
            "(the cached images are read in place, not held)"
        )
    if cost.rate is not None:
        seconds = cost.compute_seconds
        lines.append(
            f"compute: {_duration(seconds)} of one slot at {cost.rate.plain:,.1f} (plain) / "
            f"{cost.rate.dp:,.1f} (DP) training images/s per slot ({cost.rate.how}); about "
            f"{_duration(seconds / cost.slots)} on {cost.slots} slot(s)"
        )
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 60:,.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover


# ------------------------------------------------------------------------------ sample size

#: Per-patient variance of the primary endpoint (drop(DP) - drop(non-DP), macro AUC): the
#: mean over the demo sweep's primary rows of se^2 x test patients (see docs/operations.md, "Before a big sweep").
#: Real sites differ (labels, prevalence, images per patient): pass your own with
#: ``--variance-from`` a finished sweep of yours, or ``--variance``.
DEMO_UNIT_VARIANCE = math.nan


@dataclass(frozen=True)
class UnitVariance:
    """The variance of the primary endpoint for ONE test patient (se^2 x patients): a
    test set of n patients estimates it with standard error sqrt(value / n). With a pilot
    sweep behind it, also the t rule's degrees of freedom per test patient (the primary
    rows' (df + 1) / patients: at n patients the endpoint has about ``df_per_unit n - 1``
    df) and, per label, the rarer class's share of the pilot's test rows (the label floor)."""

    value: float
    source: str
    df_per_unit: float = math.nan  # NaN: normal quantiles (a given variance, no pilot)
    rarer_share: dict[str, float] = field(default_factory=dict)


def unit_variance_from(output: Path) -> UnitVariance:
    """The mean per-patient variance of a finished sweep's primary rows: each row's
    standard error (its 90% CI's half-width over the t quantile of its df) squared, times
    its test patients. The mean, not the median: a test set's variance is an average of
    these, and the median of a right-skewed spread of them understated it by ~10% (plan
    --power then delivered 0.765 for 0.80; /work/scratch/r24/power_sim.py). Also the df
    per patient and each label's rarer-class share (:class:`UnitVariance`). Raises
    FileNotFoundError / LookupError naming the fix."""
    path = SweepFolder(output).comparisons
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point --variance-from at a finished sweep's "
                                "output folder, or give --variance")  # fmt: skip
    df = pd.read_parquet(path)
    if "df" not in df.columns or "endpoint" not in df.columns:
        raise LookupError(f"{path} was written before the jackknife intervals: re-run that "
                         "sweep's command (no retraining) or give --variance")  # fmt: skip
    rows = df[(df["endpoint"] == "primary") & df["tost_half_width"].notna()]
    if rows.empty:
        raise LookupError(f"{path} has no primary row with an interval: give --variance")
    alpha = 1.0 - float(rows["ci"].iloc[0])
    units = rows["n_patients"].astype(float)
    se = rows["tost_half_width"] / stats.t.ppf(1.0 - alpha, rows["df"].astype(float))
    var = (se**2 * units).mean()
    per_unit = float(((rows["df"].astype(float) + 1.0) / units).mean())
    return UnitVariance(float(var), f"{path}, mean of {len(rows)} primary row(s)", per_unit,
                        _rarer_share(df, rows))  # fmt: skip


def _rarer_share(df: pd.DataFrame, primary: pd.DataFrame) -> dict[str, float]:
    """Per label of the primary rows' sweep: the smallest share of the rarer class among the
    test rows of the primary quantity's label rows (positive images / known images, or its
    complement), over test sites and models. Images, not patients (the tables keep no
    per-label patient counts): with several images per patient the positive patients'
    share is usually larger, so the floor it gives errs on the safe side."""
    lab = df[(df["comparison"] == primary["comparison"].iloc[0]) & (df["subgroup"] == "all")
             & (df["label"] != "macro") & (df["n"] > 0)]  # fmt: skip
    if lab.empty:
        return {}
    pos = lab["n_pos"].astype(float) / lab["n"].astype(float)
    share = np.minimum(pos, 1.0 - pos).groupby(lab["label"]).min()
    return {str(k): float(v) for k, v in share.items() if v > 0}


def df_at(n_units: int, df_per_unit: float) -> float:
    """The endpoint's df at ``n_units`` test patients (inf: normal, when none is known)."""
    if not math.isfinite(df_per_unit):
        return math.inf
    return max(1.0, df_per_unit * n_units - 1.0)


def power_at(
    n_units: int, margin: float, variance: float, alpha: float, df_per_unit: float = math.nan
) -> float:
    """The TOST's power with ``n_units`` test patients when the true difference is 0:
    ``2 T_df(margin / se - t(1 - alpha, df)) - 1`` with se = sqrt(V / n) and df from
    :func:`df_at` (the t rule the tables use; the normal limit without a df)."""
    if n_units <= 0:
        return 0.0
    se = math.sqrt(variance / n_units)
    d = df_at(n_units, df_per_unit)
    return max(0.0, 2.0 * float(stats.t.cdf(margin / se - stats.t.ppf(1 - alpha, d), d)) - 1.0)


def label_floor(shares: dict[str, float], minimum: int, labels: int | None = None) -> int:
    """The fewest test patients at which every label keeps >= ``minimum`` patients of its
    rarer class (at its ``shares`` prevalence) with probability 1 - 0.05 / L for each of
    its L labels (all labels together >= 0.95): below it the macro's label set shrinks at
    random and the endpoint is a different, noisier one (at 77 patients only 2.4 of 5
    labels were left and the power fell to 0.62)."""
    if not shares:
        return 0
    k, q = max(1, minimum), 0.05 / max(labels or 0, len(shares))

    def short(n: int) -> bool:
        return any(stats.binom.cdf(k - 1, n, s) > q for s in shares.values())

    lo = hi = max(k, math.ceil(k / min(shares.values())))
    while short(hi):
        lo, hi = hi + 1, hi * 2
    while lo < hi:  # the smallest n in [lo, hi] that keeps every label
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if not short(mid) else (mid + 1, hi)
    return hi


def units_needed(
    margin: float, variance: float, alpha: float, power: float, df_per_unit: float = math.nan
) -> int:
    """Test patients per site for the TOST to confirm equivalence within ``margin`` with
    probability ``power`` when DP changes the drop by exactly 0: the smallest n with
    :func:`power_at` >= ``power`` (t quantiles at the df that n gives; without a df the
    normal n = V (z(1 - alpha) + z(1 - beta/2))^2 / margin^2)."""
    if not (margin > 0 and variance > 0 and 0 < alpha < 0.5 and 0 < power < 1):
        raise ValueError("need margin > 0, variance > 0, 0 < alpha < 0.5 and 0 < power < 1")
    z = float(stats.norm.ppf(1.0 - alpha) + stats.norm.ppf(1.0 - (1.0 - power) / 2.0))
    lo = max(1, math.ceil(variance * z**2 / margin**2))
    if not math.isfinite(df_per_unit):
        return lo
    hi = lo
    while power_at(hi, margin, variance, alpha, df_per_unit) < power:
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        if power_at(mid, margin, variance, alpha, df_per_unit) >= power:
            hi = mid
        else:
            lo = mid + 1
    return hi


def render_sample_size(
    ev: EvaluationConfig, test_units: dict[str, int], uv: UnitVariance | None, power: float
) -> str:
    """The ``plan`` line on what the test sets can show (the primary endpoint's size)."""
    alpha, margin = round(1.0 - ev.ci, 10), ev.equivalence_margin
    head = (f"test sets: the primary endpoint (equivalence of drop(DP) - drop(non-DP) within "
            f"±{margin:g}, alpha {alpha:g}) at power {power:g} if DP changes the drop by 0")  # fmt: skip
    if uv is None or not math.isfinite(uv.value):
        return (f"{head}: no per-patient variance known; pass --variance-from <a finished "
                "sweep's output> (e.g. the demo's) or --variance V")  # fmt: skip
    need = units_needed(margin, uv.value, alpha, power, uv.df_per_unit)
    floor = label_floor(uv.rarer_share, max(ev.min_positives, ev.min_negatives))
    planned = ", ".join(
        f"{t} {n:,} (power {power_at(n, margin, uv.value, alpha, uv.df_per_unit):.2f}"
        + (f"; below the label floor {floor:,}" if n < floor else "")
        + ")"
        for t, n in sorted(test_units.items())
    )
    rule = ("t quantiles at the pilot's df per patient "
            f"{uv.df_per_unit:.3g}" if math.isfinite(uv.df_per_unit) else "normal quantiles")  # fmt: skip
    why = ""
    if floor > need:
        why = (f" (the label floor decides: the power alone needs {need:,}, but below "
               f"{floor:,} patients some label would keep fewer than "
               f"{max(ev.min_positives, ev.min_negatives)} patients of its rarer class and "
               "drop out of the macro)")  # fmt: skip
        need = floor
    return (f"{head}: needs {need:,} test patients per site{why} (per-patient "
            f"variance {uv.value:.4g}, {uv.source}; {rule}); planned test patients: "
            f"{planned or 'none'}")  # fmt: skip
