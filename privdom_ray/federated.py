"""FedAvg over sites that each train with their own DP-SGD guarantee.

Pure: no Ray, no file layout. The coordinator (:func:`run_federation`) sees model weights,
step counts, AUC numbers and k-anonymous score histograms, never images, labels or per-image
scores; how and where a site's work runs is injected (``update``/``validate``), so the same
code runs serially in a test and as Ray tasks in a sweep.

Privacy is per site: site s is Poisson-sampled at q_s = 1/ceil(N_s/B) and its noise
multiplier sigma_s is calibrated once, before round 1, for all the steps it will take over all
rounds, so its (epsilon, delta_s) guarantee covers the whole federation. Rounds never
re-calibrate: every round's accountant must show exactly (sigma_s, q_s, planned steps), and a
resumed run must find the checkpoint's (sigma_s, q_s) again, or it stops.

Every random stream of a site's round is seeded from (site key, site name, round, stream). For
DP trials each site's key is drawn from OS entropy when the trial starts and kept only in the
trial's private checkpoint (deleted when the trial is done): nobody outside the coordinator can
replay a site's noise or batches, while a resumed run is bit-identical to an uninterrupted one
(a round re-run after a crash releases exactly what the lost attempt released).

Trust model: a TRUSTED coordinator. Here the coordinator (the trial's own process, run by the
data owner's sweep) draws every site's key and holds all of them in its checkpoint, so each
site's (epsilon, delta) guarantee protects that site's training images against everyone who
sees the released model, tables and report, but NOT against the coordinator: with the keys it
can regenerate a site's noise and Poisson samples, subtract the noise from the site's update
and read its clipped gradient sum and which images each step used, i.e. against it the sites'
updates are not private at all. An untrusted coordinator could, besides, hand out keys it
chose (replayable noise), send sites crafted global models whose updates leak their inputs,
ask for more rounds or another sigma than the plan, or skip the noise; and it sees every
site's validation summary. A deployment that does not trust its coordinator must draw each
key at its site and never send it, have every site check the (sigma, q, steps) it is asked to
run against its own budget, and aggregate with secure aggregation.

What a site sends to the coordinator, each round: its noised model weights and step counts
(DP: covered by its epsilon), its released loss weights (DP: the noised label counts, covered),
timings, and a validation summary of the new global model on its validation images (which
DP-SGD does not protect: outside the guarantee): the site's macro AUC (one number) and, per
label, histograms of the positive and of the negative images' scores that are k-anonymous
(:func:`k_anonymous`: adjacent cells of a public 50-cell grid on [0, 1] merged until every
released bin holds at least ``MIN_BIN_IMAGES`` = 10 images, a label-class with fewer images
sent as nothing). No per-image score leaves a site, and no released count describes fewer
than 10 images; the pooled Youden thresholds resolve 0.02. For DP trials it
sends no training loss and no membership-inference statistic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from privdom_ray import privacy
from privdom_ray.cache import SplitData, load_split
from privdom_ray.config import Federation, TrialSpec
from privdom_ray.manifest import LABELS
from privdom_ray.models import build_model
from privdom_ray.privacy import Ledger, NoisePlan
from privdom_ray.train import (
    CheckpointStore,
    Randomness,
    _sample_rate,
    _unwrap,
    load_model,
    loss_weights,
    macro_auc,
    predict,
    prepare_training,
    train_epoch,
)

HIST_BINS = 1000  # validation-score histogram bins on [0, 1]: the pooled threshold's resolution
# k of the k-anonymous validation summaries: no released bin describes fewer images. 10 is the
# evaluation's own floor (a label needs min_positives = min_negatives = 10 before any metric is
# reported) and sits within the 5-11 of common small-cell suppression rules; a smaller k shows
# scores more finely, a larger one blurs the pooled threshold on small validation splits.
MIN_BIN_IMAGES = 10
# the public grid the k-anonymous bins are merged on (edges at multiples of 1/50): what the
# pooled threshold can resolve in a federation, and how finely a merged bin's edge can place
# the group of scores below it
SUMMARY_CELLS = 50


# ------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class SitePlan:
    """One site's training and accounting, fixed before round 1 (a pure function of the spec
    and the site's training-set size). Zero-weight sites are planned but never trained."""

    name: str
    weight: float  # un-normalised FedAvg weight; 0 = not trained, not used for selection
    delta: float
    n_train: int
    # DP: the Poisson rate 1/ceil(N/B); non-private: B/N (informative only, as in run_trial)
    sample_rate: float
    steps_per_round: int  # optimizer steps of one round (local_epochs epochs); 0 if weight 0
    noise_multiplier: float  # 0.0 for non-private trials and zero-weight sites
    count_noise_multiplier: float = 0.0  # the site's label-count release (dp_counts); 0 = none
    rounds: int = 1

    @property
    def active(self) -> bool:
        return self.weight > 0

    def noise_plan(self, steps: int | None = None) -> NoisePlan:
        """The site's mechanisms over ``steps`` DP-SGD steps (default: all rounds)."""
        total = self.rounds * self.steps_per_round if steps is None else steps
        return NoisePlan(
            self.noise_multiplier, self.sample_rate, total, self.count_noise_multiplier
        )


def federation_of(spec: TrialSpec) -> Federation:
    if spec.federation is None:
        raise ValueError(f"trial {spec.key or spec.name!r} is not federated")
    if spec.variant != "standard":
        raise ValueError(f"federated trials have no controls; got variant {spec.variant!r}")
    if spec.training.privacy_unit != "image":
        raise ValueError("federated training protects images; privacy_unit must be 'image'")
    return spec.federation


def plan_sites(spec: TrialSpec, n_train: Mapping[str, int]) -> list[SitePlan]:
    """Resolve every site's sample rate, steps and noise multiplier, in the federation's order.

    sigma_s is calibrated for the site's total steps over all rounds (and its label-count
    release, when its loss weights come from its private counts) with the grid's accountant,
    so after the last round the site has spent at most ``spec.epsilon``.
    """
    fed = federation_of(spec)
    cfg = spec.training
    missing = [s.name for s in fed.sites if s.name not in n_train]
    if missing:
        raise ValueError(f"no training-set size for sites {missing}")
    if not any(s.weight > 0 for s in fed.sites):
        raise ValueError("a federation needs at least one site with a positive weight")
    budget = cfg.pos_weight_budget if spec.loss_weight_source == "dp_counts" else 0.0
    plans = []
    # sites of equal size share (delta, q, steps), hence sigma: calibrate each distinct one once
    # (a PRV calibration takes seconds, and the site slots wait for it)
    noise: dict[tuple[float, float, int], NoisePlan] = {}
    for site in fed.sites:
        n = int(n_train[site.name])
        if site.weight > 0 and n <= 0:
            raise ValueError(f"site {site.name!r} has weight {site.weight} but no training images")
        if spec.is_private:
            rate = privacy.poisson_rate(n, cfg.logical_batch)
            per_epoch = privacy.steps_per_epoch(rate)
        else:
            rate, per_epoch = cfg.logical_batch / max(n, 1), math.ceil(n / cfg.logical_batch)
        steps_per_round = fed.local_epochs * per_epoch if site.weight > 0 else 0
        plan = NoisePlan(0.0, rate, 0)
        if spec.is_private and steps_per_round:
            if site.delta <= 0:
                raise ValueError(f"site {site.name!r}: a DP trial needs delta > 0")
            args = (site.delta, rate, fed.rounds * steps_per_round)
            if args not in noise:
                noise[args] = privacy.calibrate(
                    epsilon=spec.epsilon, delta=site.delta, sample_rate=rate,
                    steps=args[2], accountant=cfg.accountant, count_fraction=budget,
                )  # fmt: skip
            plan = noise[args]
        plans.append(
            SitePlan(
                name=site.name,
                weight=float(site.weight),
                delta=float(site.delta),
                n_train=n,
                sample_rate=rate,
                steps_per_round=steps_per_round,
                noise_multiplier=plan.noise_multiplier,
                count_noise_multiplier=plan.count_noise_multiplier,
                rounds=fed.rounds,
            )
        )
    return plans


def stream_seed(key: str, site: str, round: int, stream: str) -> int:
    """A 63-bit seed from (site key, site name, round, stream name), stable across processes
    and Python versions (sha256, not ``hash``). DP trials' keys are secret (:func:`site_keys`)."""
    text = f"{key}\x1f{site}\x1f{round}\x1f{stream}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)


# ------------------------------------------------------------------------------ site side


@dataclass(frozen=True)
class TaskTiming:
    """When a site task ran (for the sweep's efficiency benchmark, benchmarks/bench_sweep.py):
    wall-clock start (time.time()), wall seconds, and the process's CPU seconds (a site's
    compute even when sites share CPUs)."""

    started: float = 0.0
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    @classmethod
    def since(cls, started: float, t0: float, c0: float) -> TaskTiming:
        return cls(started, time.perf_counter() - t0, time.process_time() - c0)

    @property
    def interval(self) -> list[float]:
        return [self.started, self.started + self.seconds]


def _clock() -> tuple[float, float, float]:
    return time.time(), time.perf_counter(), time.process_time()


@dataclass(frozen=True)
class SiteUpdate:
    """What a site sends back after local training: weights and accounting numbers only (no
    training loss or other training statistic for DP trials: it would leave un-noised)."""

    name: str
    state: dict[str, Tensor]  # on the CPU
    steps: int
    sample_rate: float
    noise_multiplier: float
    # non-private trials only: the round's mean physical-batch loss (NaN for DP trials)
    train_loss: float
    # the released loss weights (DP: the noised label counts, covered by the site's epsilon)
    pos_weight: tuple[float, ...] = ()
    loss_weights: str = ""
    timing: TaskTiming = field(default_factory=TaskTiming)


def site_randomness(spec: TrialSpec, site: str, key: str, round: int, device) -> Randomness:
    """A site's generators for one round, from its key (secret for DP trials). The count
    release uses one stream for all rounds, so every round re-derives the same release."""

    def gen(stream: str, rnd: int = round, dev: str | torch.device = "cpu") -> torch.Generator:
        return torch.Generator(device=torch.device(dev)).manual_seed(
            stream_seed(key, site, rnd, stream)
        )

    return Randomness(
        sampling=gen("sample"),
        noise=gen("noise", dev=device),
        release=gen("counts", rnd=0),
        augment=gen("augment"),  # secret too: see train.Randomness
        secret=spec.is_private,
    )


def local_update(
    spec: TrialSpec,
    plan: SitePlan,
    global_state: Mapping[str, Tensor],
    train: SplitData,
    *,
    round: int,
    key: str,
    device: str = "cpu",
    memory_budget_mb: int = 2048,
    channels_last: bool = False,
) -> SiteUpdate:
    """Train the global model for ``local_epochs`` epochs on this site's training split.

    The NAdam optimizer (and, for DP, the Opacus engine) are fresh each round: sites are
    stateless between rounds, which keeps checkpoints small and resumes exact. ``key`` seeds
    the round's streams (:func:`site_randomness`). A DP site runs with its planned sigma and
    raises if the accountant saw anything but exactly (sigma, q, planned steps).
    """
    started, t0, c0 = _clock()
    fed = federation_of(spec)
    if not plan.active:
        raise ValueError(f"site {plan.name!r} has weight 0 and is not trained")
    if len(train) != plan.n_train:
        raise ValueError(
            f"site {plan.name!r} has {len(train)} training images, planned with "
            f"{plan.n_train}; the data changed since planning"
        )
    dev = torch.device(device)
    torch.manual_seed(stream_seed(str(spec.seed), plan.name, round, "torch"))
    model = build_model(spec.model, num_outputs=train.labels.shape[1]).to(dev)
    model.load_state_dict(dict(global_state))
    optimizer = torch.optim.NAdam(model.parameters(), lr=spec.training.lr)
    rng = site_randomness(spec, plan.name, key, round, dev)
    weights = loss_weights(spec, train, rng.release, plan.count_noise_multiplier)
    t = prepare_training(
        spec, model, optimizer, train, randomness=rng, weights=weights.tensor(),
        noise_multiplier=plan.noise_multiplier if spec.is_private else None, device=device,
        memory_budget_mb=memory_budget_mb, channels_last=channels_last,
    )  # fmt: skip
    losses: list[float] = []
    for _ in range(fed.local_epochs):
        losses += train_epoch(t)
    if t.engine is not None:
        steps = t.accounted_steps()
        _check_accounting(plan, t.engine.accountant.history, _sample_rate(t.loader))
    else:
        steps = fed.local_epochs * len(t.loader)
    if steps != plan.steps_per_round:
        raise RuntimeError(
            f"site {plan.name!r} took {steps} steps in round {round}, planned "
            f"{plan.steps_per_round}"
        )
    state = {  # NCHW whatever the training layout
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in _unwrap(t.model).state_dict().items()
    }
    return SiteUpdate(
        name=plan.name,
        state=state,
        steps=steps,
        sample_rate=plan.sample_rate,
        noise_multiplier=plan.noise_multiplier,
        train_loss=math.nan if spec.is_private or not losses else float(np.mean(losses)),
        pos_weight=weights.values,
        loss_weights=weights.source,
        timing=TaskTiming.since(started, t0, c0),
    )


def _check_accounting(plan: SitePlan, history: list, loader_rate: float) -> None:
    """Raise unless Opacus sampled at q_s and accounted exactly (sigma_s, steps) this round.

    Opacus accounts at 1/len(loader) = 1/int(1/q_s), which is q_s except for the few batch
    counts where int(1/q_s) rounds down (then slightly above q_s: conservative)."""
    expected = [
        (plan.noise_multiplier, 1 / privacy.steps_per_epoch(plan.sample_rate), plan.steps_per_round)
    ]
    seen = [(float(s), float(q), int(n)) for s, q, n in history]
    if loader_rate != plan.sample_rate or seen != expected:
        raise RuntimeError(
            f"site {plan.name!r}: accounting drifted from the plan: sampled at {loader_rate} "
            f"(planned {plan.sample_rate}), accountant saw (sigma, q, steps) = {seen}, "
            f"expected {expected}"
        )


@dataclass(frozen=True)
class SiteValidation:
    """What a site sends about a global model: its validation macro AUC, its number of
    validation images, and per label the k-anonymous histograms of the positive and of the
    negative images' scores (:func:`k_anonymous`: each merged bin's count spread evenly over
    the HIST_BINS bins it covers, so the coordinator sums sites bin by bin). Computed from the
    site's validation images without noise (outside the DP guarantee); no per-image score."""

    name: str
    macro_auc: float
    n: int
    hist_pos: np.ndarray  # (L, HIST_BINS) float64: positive images, k-anonymous
    hist_neg: np.ndarray  # (L, HIST_BINS) float64: negative images; masked labels left out
    timing: TaskTiming = field(default_factory=TaskTiming)


def score_histograms(
    scores: np.ndarray, labels: np.ndarray, bins: int = HIST_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """Per-label counts of positive and negative images' scores in ``bins`` equal bins on
    [0, 1]. Bin k holds scores s with k/bins <= s < (k+1)/bins (the last bin includes 1), so
    ``s >= edge k`` exactly when s lies in a bin >= k."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    known = ~np.isnan(labels)
    if np.isnan(scores[known]).any():
        raise ValueError("scores must not be NaN where the label is known")
    edges = _edges(bins)
    idx = np.searchsorted(edges[1:-1], np.nan_to_num(scores), side="right")
    n_labels = labels.shape[1]
    hist_pos = np.zeros((n_labels, bins), dtype=np.int64)
    hist_neg = np.zeros((n_labels, bins), dtype=np.int64)
    for j in range(n_labels):
        hist_pos[j] = np.bincount(idx[known[:, j] & (labels[:, j] == 1), j], minlength=bins)
        hist_neg[j] = np.bincount(idx[known[:, j] & (labels[:, j] == 0), j], minlength=bins)
    return hist_pos, hist_neg


def _edges(bins: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, bins + 1)


def k_anonymous(
    hist: np.ndarray, k: int = MIN_BIN_IMAGES, cells: int = SUMMARY_CELLS
) -> np.ndarray:
    """Each row of ``hist`` (counts per fine bin) as a site may send it: the fine bins summed
    into ``cells`` equal public cells, adjacent cells merged from the lowest score up until
    every merged bin holds at least ``k`` images (a short remainder joins the bin below), and
    each merged count spread evenly over the fine bins it covers. A row with fewer than ``k``
    images in all becomes zeros (not sent). Otherwise row totals are kept, and a threshold at
    the edge of a merged bin counts exactly the images above it. The merged bins' edges lie on
    the public cell grid, so an edge locates a group of at least k scores to within one cell,
    not one image's score."""
    hist = np.asarray(hist)
    bins = hist.shape[-1]
    if k < 1 or bins % cells:
        raise ValueError(f"need k >= 1 and cells dividing {bins}, got k={k}, cells={cells}")
    width = bins // cells
    rows = hist.reshape(-1, bins)
    out = np.zeros(rows.shape, dtype=np.float64)
    for j, row in enumerate(rows):
        if row.sum() < k:
            continue
        coarse = row.reshape(cells, width).sum(axis=1)
        cuts = _merge_points(np.cumsum(coarse), k)
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            out[j, lo * width : hi * width] = coarse[lo:hi].sum() / ((hi - lo) * width)
    return out.reshape(hist.shape)


def _merge_points(cumulative: np.ndarray, k: int) -> list[int]:
    """Cell indices where merged bins start (and the end), each merged bin >= k images."""
    cuts, last = [0], 0
    for i, c in enumerate(cumulative):
        if c - last >= k:
            cuts.append(i + 1)
            last = c
    cuts[-1] = len(cumulative)  # a remainder below k joins the last full bin
    return cuts


def validate_site(
    spec: TrialSpec,
    name: str,
    global_state: Mapping[str, Tensor],
    val: SplitData,
    *,
    device: str = "cpu",
) -> SiteValidation:
    """Score the global model on this site's validation split; return only what the site
    sends (:class:`SiteValidation`): its macro AUC and k-anonymous score histograms."""
    started, t0, c0 = _clock()
    model = load_model(spec.model, dict(global_state), num_outputs=val.labels.shape[1])
    scores = predict(model.to(device), val.images, device=device)
    hist_pos, hist_neg = score_histograms(scores, val.labels)
    return SiteValidation(
        name,
        macro_auc(scores, val.labels),
        len(val),
        k_anonymous(hist_pos),
        k_anonymous(hist_neg),
        timing=TaskTiming.since(started, t0, c0),
    )


def site_update_from_cache(
    spec: TrialSpec,
    plan: SitePlan,
    cache_path: str,
    global_state: Mapping[str, Tensor],
    *,
    threads: int = 1,
    **kwargs: Any,
) -> SiteUpdate:
    """:func:`local_update` on the site's cached training split (runs where the data is);
    ``kwargs`` are local_update's (round, key, device, memory settings)."""
    torch.set_num_threads(max(1, threads))
    return local_update(spec, plan, global_state, load_split(cache_path, "train"), **kwargs)


def site_validate_from_cache(
    spec: TrialSpec,
    name: str,
    cache_path: str,
    global_state: Mapping[str, Tensor],
    *,
    device: str = "cpu",
    threads: int = 1,
) -> SiteValidation:
    """:func:`validate_site` on the site's cached validation split."""
    torch.set_num_threads(max(1, threads))
    return validate_site(spec, name, global_state, load_split(cache_path, "val"), device=device)


# ------------------------------------------------------------------------------ aggregation


def fedavg(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Weighted average of state dicts, in float64 and cast back to each tensor's dtype.

    Deterministic (fixed order, no randomness). Sites with weight 0 are skipped entirely, so
    they change nothing, bit for bit; non-floating tensors come from the first positive-weight
    site.
    """
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    if any(not w >= 0 or math.isinf(w) for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    active = [(s, float(w)) for s, w in zip(states, weights, strict=True) if w > 0]
    if not active:
        raise ValueError("fedavg needs at least one positive weight")
    keys = list(active[0][0])
    for s, _ in active[1:]:
        if list(s) != keys:
            raise ValueError("state dicts have different keys")
    total = math.fsum(w for _, w in active)
    out: dict[str, Tensor] = {}
    for key in keys:
        first = active[0][0][key]
        if not first.is_floating_point():
            out[key] = first.detach().clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
        for s, w in active:
            acc += s[key].detach().to(torch.float64) * (w / total)
        out[key] = acc.to(first.dtype)
    return out


def on_public_cells(hist: np.ndarray, cells: int = SUMMARY_CELLS) -> np.ndarray:
    """Pooled k-anonymous histograms summed per public cell: the pooled Youden threshold is
    then chosen among the cells' edges only, where every site's counts are exact (inside a
    merged bin they are spread, and a cut there would only reflect the spreading)."""
    hist = np.asarray(hist)
    return hist.reshape(*hist.shape[:-1], cells, hist.shape[-1] // cells).sum(axis=-1)


def youden_from_histograms(hist_pos: np.ndarray, hist_neg: np.ndarray) -> np.ndarray:
    hist_pos, hist_neg = np.asarray(hist_pos), np.asarray(hist_neg)
    if hist_pos.shape != hist_neg.shape or hist_pos.ndim != 2:
        raise ValueError(f"histograms differ in shape: {hist_pos.shape} vs {hist_neg.shape}")
    bins = hist_pos.shape[1]
    # candidates from the highest threshold down: inf, edge[bins-1], ..., edge[0]
    thresholds = np.r_[np.inf, _edges(bins)[bins - 1 :: -1]]
    out = np.full(hist_pos.shape[0], np.nan)
    for j in range(hist_pos.shape[0]):
        n_pos, n_neg = hist_pos[j].sum(), hist_neg[j].sum()
        if n_pos == 0 or n_neg == 0:
            continue
        tpr = np.r_[0, np.cumsum(hist_pos[j][::-1])] / n_pos
        fpr = np.r_[0, np.cumsum(hist_neg[j][::-1])] / n_neg
        out[j] = thresholds[int(np.argmax(tpr - fpr))]
    return out


# ------------------------------------------------------------------------------ coordinator

UpdateFn = Callable[[int, dict[str, Tensor], list[SitePlan], dict[str, str]], list[SiteUpdate]]
ValidateFn = Callable[[dict[str, Tensor], list[SitePlan]], list[SiteValidation]]


@dataclass
class FederatedResult:
    state_dict: dict[str, Tensor]  # the global model of the selected round
    site_ledgers: dict[str, Ledger]  # every site, in federation order (scope "site")
    ledger: Ledger  # the site ledger with the largest epsilon_spent
    history: list[dict[str, float]] = field(default_factory=list)
    best_round: int = 0
    thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0))  # pooled Youden (L,)
    val_macro_auc: float = math.nan  # of the selected round: weighted mean over sites
    train_seconds: float = 0.0
    resumed_from_round: int = 0  # 0 = trained from scratch


@dataclass
class _FedState:
    """What the coordinator carries between rounds (and a checkpoint restores). ``keys`` are
    the sites' secret stream keys for DP trials: the checkpoint holding them is private."""

    global_state: dict[str, Tensor]
    keys: dict[str, str]
    site_steps: dict[str, int]
    history: list[dict[str, float]] = field(default_factory=list)
    round: int = 0
    best_auc: float = -math.inf
    best_round: int = 0
    best_state: dict[str, Tensor] | None = None
    best_hist: tuple[np.ndarray, np.ndarray] | None = None
    site_weights: dict[str, list] = field(default_factory=dict)  # (source, pos_weight) per site

    def checkpoint(self, spec: TrialSpec, plans: Sequence[SitePlan]) -> dict[str, Any]:
        hist = self.best_hist
        return {
            "key": spec.key,
            "round": self.round,
            "model": self.global_state,
            "site_keys": dict(self.keys),
            "site_steps": dict(self.site_steps),
            "site_noise": {p.name: [p.noise_multiplier, p.sample_rate] for p in plans},
            "site_weights": dict(self.site_weights),
            "history": self.history,
            "best_auc": self.best_auc,
            "best_round": self.best_round,
            "best_state": self.best_state,
            "best_hist_pos": None if hist is None else torch.from_numpy(hist[0]),
            "best_hist_neg": None if hist is None else torch.from_numpy(hist[1]),
        }

    @classmethod
    def restore(cls, saved: Mapping[str, Any]) -> _FedState:
        pos, neg = saved["best_hist_pos"], saved["best_hist_neg"]
        return cls(
            global_state=dict(saved["model"]),
            keys=dict(saved["site_keys"]),
            site_steps={k: int(v) for k, v in saved["site_steps"].items()},
            history=list(saved["history"]),
            round=int(saved["round"]),
            best_auc=saved["best_auc"],
            best_round=int(saved["best_round"]),
            best_state=saved["best_state"],
            best_hist=None if pos is None else (pos.numpy(), neg.numpy()),
            site_weights=dict(saved.get("site_weights", {})),
        )


def site_keys(spec: TrialSpec, plans: Sequence[SitePlan]) -> dict[str, str]:
    """Each site's stream key: 256 bits of OS entropy for DP trials (secret), else the public
    trial seed (non-private training is reproducible from the grid)."""
    import secrets

    return {p.name: secrets.token_hex(32) if spec.is_private else str(spec.seed) for p in plans}


def _fresh_state(spec: TrialSpec, plans: Sequence[SitePlan], init_state, keys) -> _FedState:
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, num_outputs=len(LABELS))
    if init_state is not None:
        model.load_state_dict(dict(init_state))
    return _FedState(
        global_state={k: v.detach().clone() for k, v in model.state_dict().items()},
        keys=dict(keys) if keys is not None else site_keys(spec, plans),
        site_steps={p.name: 0 for p in plans},
    )


def run_federation(
    spec: TrialSpec,
    plans: Sequence[SitePlan],
    *,
    update: UpdateFn,
    validate: ValidateFn,
    checkpoint: CheckpointStore | None = None,
    init_state: Mapping[str, Tensor] | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    keys: Mapping[str, str] | None = None,
) -> FederatedResult:
    """FedAvg for ``rounds`` rounds; select the round with the best weighted validation AUC.

    ``keys`` injects the sites' stream keys (tests: a replayable run); a sweep never does, so
    DP sites draw theirs from OS entropy (:func:`site_keys`).

    Each round the positive-weight sites train from the global model (``update``), their
    weights are averaged, and each validates the average on its own data (``validate``).
    A checkpoint is saved before round 1 (it holds the sites' keys, so a round re-run after a
    crash replays the same noise) and after every round; a saved one is resumed after checking
    that it belongs to this trial and every site's (sigma, q, steps) are what the plan says.
    Sites' epsilons cover all rounds, not only up to the selected one.
    """
    t0 = time.perf_counter()
    fed = federation_of(spec)
    plans = list(plans)
    if [p.name for p in plans] != [s.name for s in fed.sites]:
        raise ValueError(
            f"plans {[p.name for p in plans]} do not match the federation's sites "
            f"{[s.name for s in fed.sites]}"
        )
    active = [p for p in plans if p.active]
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None and "site_keys" not in saved:
        saved = None  # written before site keys existed (public-seed noise): start over
    if saved is not None:
        _check_checkpoint(spec, plans, saved)
        st = _FedState.restore(saved)
        if st.history:  # wall-clock time keeps counting across a resume
            t0 -= st.history[-1]["seconds"]
    else:
        st = _fresh_state(spec, plans, init_state, keys)
        if checkpoint is not None:
            checkpoint.save(st.checkpoint(spec, plans))
    first_round = st.round + 1
    for r in range(first_round, fed.rounds + 1):
        record = _round(spec, st, active, r, update, validate, t0)
        if checkpoint is not None:
            checkpoint.save(st.checkpoint(spec, plans))
        if on_round is not None:
            on_round(record)
    assert st.best_state is not None and st.best_hist is not None
    ledgers = {p.name: site_ledger(spec, p, st.site_steps[p.name], st.site_weights) for p in plans}
    return FederatedResult(
        state_dict={k: v.detach().cpu() for k, v in st.best_state.items()},
        site_ledgers=ledgers,
        ledger=max(ledgers.values(), key=lambda led: led.epsilon_spent),
        history=st.history,
        best_round=st.best_round,
        thresholds=youden_from_histograms(*(on_public_cells(h) for h in st.best_hist)),
        val_macro_auc=float(st.best_auc),
        train_seconds=time.perf_counter() - t0,
        resumed_from_round=first_round - 1,
    )


def _round(spec, st: _FedState, active, r: int, update, validate, t0: float) -> dict[str, Any]:
    """One FedAvg round: site updates, the average, the sites' validations, round selection."""
    norm = [p.weight / math.fsum(q.weight for q in active) for p in active]
    updates = update(r, st.global_state, active, st.keys)
    _check_updates(active, updates, r)
    for u in updates:
        st.site_steps[u.name] += u.steps
        st.site_weights[u.name] = [u.loss_weights, list(u.pos_weight)]
    st.global_state = fedavg([u.state for u in updates], [p.weight for p in active])
    validations = validate(st.global_state, active)
    if [v.name for v in validations] != [p.name for p in active]:
        raise RuntimeError(f"round {r}: validations came back for {validations!r}")
    val_auc = _weighted_mean([v.macro_auc for v in validations], norm)
    record = {  # plain Python numbers: checkpoints load with weights_only=True
        "epoch": r,  # the key progress reports and Tune read
        "round": r,
        "train_loss": _weighted_mean([u.train_loss for u in updates], norm),
        "val_macro_auc": val_auc,
        "epsilon": _largest_epsilon(spec, active, st.site_steps),
        "steps": max(st.site_steps[p.name] for p in active),
        "seconds": time.perf_counter() - t0,
        # the sites' local training CPU time this round, summed
        "site_cpu_seconds": math.fsum(u.timing.cpu_seconds for u in updates),
        # the round's site tasks (training, validation) as [start, end] wall-clock times
        "site_tasks": [x.timing.interval for x in [*updates, *validations]],
    }
    st.history.append(record)
    st.round = r
    score = -math.inf if math.isnan(val_auc) else val_auc
    if st.best_state is None or score > (-math.inf if math.isnan(st.best_auc) else st.best_auc):
        st.best_auc, st.best_round, st.best_state = val_auc, r, st.global_state
        st.best_hist = (
            np.sum([v.hist_pos for v in validations], axis=0),
            np.sum([v.hist_neg for v in validations], axis=0),
        )
    return record


def site_ledger(
    spec: TrialSpec, plan: SitePlan, steps: int, site_weights: Mapping[str, list] | None = None
) -> Ledger:
    """A site's privacy record over all its steps. A zero-weight site took part in nothing
    and spent nothing (epsilon 0), private trial or not."""
    source, values = (site_weights or {}).get(plan.name, ["", []])
    common = dict(loss_weights=source, pos_weight=tuple(float(v) for v in values))
    if spec.is_private:
        ledger = privacy.make_ledger(
            epsilon_target=spec.epsilon,
            delta=plan.delta,
            plan=plan.noise_plan(steps),
            max_grad_norm=spec.training.max_grad_norm,
            accountant=spec.training.accountant,
            **common,
        )
        if not plan.active:  # never trained: no release at all, not even the counts
            ledger = dataclasses.replace(ledger, epsilon_spent=0.0, epsilon_rdp=0.0, mechanisms=())
    else:
        ledger = Ledger.non_private(steps=steps, sample_rate=plan.sample_rate, **common)
        if not plan.active:
            ledger = dataclasses.replace(ledger, epsilon_spent=0.0, epsilon_rdp=0.0)
    return dataclasses.replace(ledger, scope="site", site=plan.name)


def _largest_epsilon(spec: TrialSpec, active: list[SitePlan], site_steps: dict[str, int]) -> float:
    if not spec.is_private:
        return math.inf
    # sites of equal size share (sigma, q, steps, delta): one accountant call per distinct ledger
    plans = {(p.noise_plan(site_steps[p.name]), p.delta) for p in active}
    return max(privacy.epsilon_of(spec.training.accountant, pl.mechanisms, d)[0] for pl, d in plans)


def _weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Mean over the finite values, their weights renormalised; NaN if none is finite."""
    pairs = [(v, w) for v, w in zip(values, weights, strict=True) if math.isfinite(v)]
    total = math.fsum(w for _, w in pairs)
    if not pairs or total <= 0:
        return math.nan
    return math.fsum(v * w for v, w in pairs) / total


def _check_updates(active: list[SitePlan], updates: list[SiteUpdate], r: int) -> None:
    """Raise unless every active site reported, in plan order, exactly its planned accounting."""
    if [u.name for u in updates] != [p.name for p in active]:
        raise RuntimeError(
            f"round {r}: updates came back for {[u.name for u in updates]}, expected "
            f"{[p.name for p in active]}"
        )
    for p, u in zip(active, updates, strict=True):
        planned = (p.noise_multiplier, p.sample_rate, p.steps_per_round)
        if (u.noise_multiplier, u.sample_rate, u.steps) != planned:
            raise RuntimeError(
                f"round {r}: site {p.name!r} reported (sigma, q, steps) = "
                f"{(u.noise_multiplier, u.sample_rate, u.steps)}, planned {planned}"
            )


def _check_checkpoint(spec: TrialSpec, plans: list[SitePlan], saved: Mapping[str, Any]) -> None:
    """Refuse a checkpoint of another trial, or one whose sites were sampled, noised or
    counted differently from the plan: resuming never re-calibrates and never recounts."""
    if saved.get("key") != spec.key:
        raise ValueError(f"checkpoint belongs to trial {saved.get('key')!r}, not {spec.key!r}")
    done = int(saved["round"])
    noise, steps = saved["site_noise"], saved["site_steps"]
    if set(noise) != {p.name for p in plans} or set(steps) != {p.name for p in plans}:
        raise ValueError(
            f"checkpoint has sites {sorted(noise)}, the plan {[p.name for p in plans]}; "
            "refusing to resume"
        )
    for p in plans:
        stored = tuple(float(x) for x in noise[p.name])
        if stored != (p.noise_multiplier, p.sample_rate):
            raise ValueError(
                f"site {p.name!r}: checkpoint has (sigma, q) = {stored}, the plan "
                f"{(p.noise_multiplier, p.sample_rate)}; refusing to resume (a site's noise is "
                "never re-calibrated mid-training)"
            )
        if int(steps[p.name]) != done * p.steps_per_round:
            raise ValueError(
                f"site {p.name!r}: checkpoint counts {int(steps[p.name])} steps after round "
                f"{done}, the plan {done * p.steps_per_round}; refusing to resume"
            )
