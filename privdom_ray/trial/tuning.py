"""A tuned cell's coordinator (kinds/tuning.py): K and the K configurations are drawn once,
from OS entropy, and written to the cell's private checkpoint before any candidate starts, so
a resume never redraws them (a redraw would be a second, unaccounted selection).

Then the loss weights are released once for every candidate, the K candidates train as
executor calls (named Ray tasks ``<cell>/candNN`` under Tune, like a federation's sites;
:func:`run_candidate`: DP-SGD at its run shape's sigma, then its epoch, score and
thresholds released on the validation split), and only the winner (the lowest released
score) is written: its model, thresholds, configuration and a ledger whose epsilon is the
Papernot-Steinke bound with a ``selection`` entry audit can recompute
(``kinds.tuning.check_selection``). docs/tuning-design.md has the reasoning.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from privdom_ray.cache import SplitData, load_split
from privdom_ray.config import TrainingConfig, TrialSpec
from privdom_ray.kinds import tuning as tuned
from privdom_ray.lossweights import LossWeights
from privdom_ray.models import build_model
from privdom_ray.selection import validation as releases
from privdom_ray.selection.runs import secret_generator
from privdom_ray.selection.tuning import CandidateNoise, TuningPlan
from privdom_ray.stats.thresholds import youden_threshold
from privdom_ray.train import predict
from privdom_ray.train.data import _unwrap
from privdom_ray.train.epochs import (
    CheckpointStore,
    Randomness,
    loss_weights,
    prepare_training,
    train_epoch,
)
from privdom_ray.trial.evaluation import patient_groups

DRAW_VERSION = 1  # what a checkpoint's draw holds; a resume refuses another version


@dataclass(frozen=True)
class Draw:
    """A tuned cell's private draw: K, one configuration per candidate, the privacy plan (a
    ``TuningPlan.as_dict()``; None for a non-DP cell). Never in a shareable file."""

    k: int
    configurations: tuple[TrainingConfig, ...]
    plan: Mapping[str, Any] | None
    version: int = DRAW_VERSION

    def as_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "configurations": [dataclasses.asdict(c) for c in self.configurations],
            "plan": dict(self.plan) if self.plan is not None else None,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Draw:
        if d.get("version") != DRAW_VERSION:
            raise ValueError(f"a tuned cell's draw of version {d.get('version')!r}; this code "
                             f"reads version {DRAW_VERSION}")  # fmt: skip
        configs = tuple(TrainingConfig(**_tuples(c)) for c in d["configurations"])
        if len(configs) != int(d["k"]):
            raise ValueError(f"a draw of K = {d['k']} holds {len(configs)} configurations")
        return cls(int(d["k"]), configs, d["plan"], DRAW_VERSION)


def _tuples(c: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in c.items()}


def draw(spec: TrialSpec, units: int, rng: np.random.Generator | None = None) -> Draw:
    """K from the section's distribution and K configurations from its space, both from OS
    entropy (``rng``: tests only), with the cell's privacy plan (calibrated for ``units``
    training units). Poisson's K = 0 is kept: the cell then releases nothing."""
    assert spec.tuning is not None, spec.name
    g = secret_generator(rng)
    k = tuned.runs_of(spec.tuning).draw(g)
    configs = tuple(tuned.sample_configuration(spec.tuning, spec.training, g) for _ in range(k))
    plan = tuned.tuning_plan(spec, units)
    return Draw(k, configs, plan.as_dict() if plan is not None else None)


def load_or_draw(
    checkpoint: CheckpointStore, spec: TrialSpec, units: int, rng: np.random.Generator | None = None
) -> Draw:
    """The checkpoint's draw, or a new one saved before it is returned: a crash after this
    point resumes with the same K and configurations."""
    state = checkpoint.load()
    if state is not None and "tuning_draw" in state:
        return Draw.from_dict(state["tuning_draw"])
    new = draw(spec, units, rng)
    checkpoint.save({**(state or {}), "tuning_draw": new.as_dict()})
    return new


class PlanDrift(RuntimeError):
    """A candidate did not follow its run shape: the plan's guarantee does not cover it (a
    bug, never a data-dependent failure: it stops the cell instead of scoring the worst)."""


@dataclass(frozen=True)
class Releases:
    """What a candidate releases on the validation split, with which noise: the epoch
    (exponential mechanism), its score (Gaussian) and thresholds (Gaussian histograms); all
    None in a non-DP cell, whose candidates choose and score exactly (the fair baseline)."""

    checkpoint_epsilon: float | None
    score_sigma: float | None
    histogram_sigma: float | None
    bound: float
    bins: int

    @classmethod
    def of(cls, plan: TuningPlan | None, spec: TrialSpec) -> Releases:
        """A DP plan must make all three releases (the grid requires every share > 0): one
        without (a draw checkpointed before that rule) stops the cell with the fix, instead
        of every candidate failing after its training."""
        assert spec.tuning is not None, spec.name
        v = plan.validation if plan is not None else None
        missing = [k for k, x in vars(v).items() if x is None] if v is not None else []
        if missing:
            raise PlanDrift(f"{spec.name}: the checkpointed plan makes no {missing} release "
                            "(a draw from before every validation share had to be > 0); "
                            "delete the cell's private checkpoint to redraw")  # fmt: skip
        return cls(
            v.checkpoint_epsilon if v else None, v.score_noise_multiplier if v else None,
            v.histogram_noise_multiplier if v else None, spec.tuning.score_bound,
            spec.tuning.bins,
        )  # fmt: skip


@dataclass
class CandidateResult:
    """One candidate's outcome. Private (like K): only the winner's state and released
    numbers leave the cell. ``epoch`` is 1-based; ``score.noisy_sum`` is inf for a failure."""

    state_dict: dict[str, torch.Tensor] | None
    epoch: int
    score: releases.ScoreRelease
    thresholds: list[float]
    history: list[dict[str, float]]
    seconds: float
    failed: str = ""
    steps: int = 0  # the steps it took (a DP run: its accountant's count)


def run_candidate(
    spec: TrialSpec,
    config: TrainingConfig,
    train: SplitData,
    val: SplitData,
    *,
    noise: CandidateNoise | None,
    weights: LossWeights,
    out: Releases,
    device: str = "cpu",
    memory_budget_mb: int = 2048,
    randomness: Randomness | None = None,
) -> CandidateResult:
    """Train one candidate of the tuned cell ``spec`` with ``config`` (DP-SGD at ``noise``'s
    sigma and sample rate; plain for a non-DP cell), from the cell's public init seed, with
    the cell's released loss ``weights``; then release its epoch, score and thresholds on
    ``val`` (``out``). A run that takes other steps than its shape raises: the plan is void."""
    t0 = time.perf_counter()
    cand = dataclasses.replace(spec, training=config, tuning=None)
    torch.manual_seed(spec.seed)  # every candidate starts from the cell's public init
    dev = torch.device(device)
    model = build_model(spec.model, num_outputs=train.labels.shape[1]).to(dev)
    optimizer = torch.optim.NAdam(model.parameters(), lr=config.lr)
    rng = randomness or Randomness.for_trial(spec.seed, dev, secret=spec.is_private)
    t = prepare_training(
        cand, model, optimizer, train, randomness=rng, weights=weights.tensor(),
        noise_multiplier=noise.noise_multiplier if noise else None, device=device,
        memory_budget_mb=memory_budget_mb, sample_rate=noise.sample_rate if noise else None,
    )  # fmt: skip
    states, probs, history = [], [], []
    for epoch in range(1, config.epochs + 1):
        losses = train_epoch(t)
        probs.append(predict(_unwrap(t.model), val.images, device=device))
        state = _unwrap(t.model).state_dict()
        states.append({k: v.detach().cpu().clone() for k, v in state.items()})
        mean = float(np.mean(losses)) if losses else math.nan
        history.append({"epoch": epoch, "train_loss": mean, "seconds": time.perf_counter() - t0})
    if noise is not None and t.accounted_steps() != noise.steps:
        raise PlanDrift(f"candidate took {t.accounted_steps()} steps; its shape plans "
                           f"{noise.steps}")  # fmt: skip
    steps = t.accounted_steps() if noise is not None else len(t.loader) * config.epochs
    epoch, score, thresholds = _release(val, probs, out)
    return CandidateResult(states[epoch], epoch + 1, score, thresholds, history,
                           time.perf_counter() - t0, steps=steps)  # fmt: skip


def _losses(probs: np.ndarray, labels: np.ndarray, bound: float) -> np.ndarray:
    """Per-image validation loss; a diverged model's image (a NaN prediction) scores the
    worst, B (per_image_loss alone would give NaN, which unit_values skips: a diverged
    candidate would then look perfect)."""
    loss = releases.per_image_loss(np.nan_to_num(probs, nan=0.5), labels)
    broken = ~np.isfinite(probs).all(axis=1) & ~np.isnan(labels).all(axis=1)
    return np.where(broken, bound, loss)


def _release(
    val: SplitData, probs: list[np.ndarray], out: Releases
) -> tuple[int, releases.ScoreRelease, list[float]]:
    """(0-based epoch, score, thresholds) on V: DP releases with ``out``'s noise, or exact."""
    codes = patient_groups(val, "patient")  # one term per patient: sensitivity B either way
    per_image = np.column_stack([_losses(p, val.labels, out.bound) for p in probs])
    values = releases.unit_values(per_image, codes)
    probs = [np.nan_to_num(p, nan=0.5) for p in probs]
    if out.score_sigma is None:  # non-DP: the same rule without noise
        sums = [releases.loss_statistic(values[:, e], out.bound) for e in range(values.shape[1])]
        epoch = int(np.argmin(sums))
        score = releases.ScoreRelease(sums[epoch], values.shape[0], out.bound, 0.0)
        labels = val.labels
        return epoch, score, [youden_threshold(probs[epoch][:, j], labels[:, j])
                              for j in range(labels.shape[1])]  # fmt: skip
    assert out.checkpoint_epsilon is not None and out.histogram_sigma is not None
    epoch = releases.select_checkpoint(values, out.checkpoint_epsilon, out.bound).index
    score = releases.release_score(values[:, epoch], out.score_sigma, out.bound)
    found = releases.release_thresholds(
        probs[epoch], val.labels, codes, out.histogram_sigma, out.bins
    ).thresholds
    return epoch, score, [float(x) for x in found]


def candidate_from_cache(
    *,
    spec: TrialSpec,
    config: TrainingConfig,
    noise: CandidateNoise | None,
    weights: LossWeights,
    out: Releases,
    cache_path: str,
    device: str = "cpu",
    threads: int = 1,
    memory_budget_mb: int = 2048,
) -> CandidateResult:
    """One candidate as an executor call (a named Ray task ``<cell>/candNN`` under Tune):
    its data read from the cell's cache where it runs. A failure of the training itself
    (divergence, a numerical error) is the candidate's output: it scores the worst, and is
    never retried until something succeeds; a :class:`PlanDrift` or a lost worker stops the
    cell, which resumes from its checkpoint."""
    torch.set_num_threads(max(1, threads))
    train, val = load_split(cache_path, "train"), load_split(cache_path, "val")
    t0 = time.perf_counter()
    try:
        return run_candidate(spec, config, train, val, noise=noise, weights=weights, out=out,
                             device=device, memory_budget_mb=memory_budget_mb)  # fmt: skip
    except PlanDrift:
        raise
    except Exception as exc:  # noqa: BLE001 - a candidate's failure is its (worst) score
        return failed_candidate(out, len(np.unique(patient_groups(val, "patient"))),
                                f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)  # fmt: skip


def failed_candidate(out: Releases, n_units: int, why: str, seconds: float) -> CandidateResult:
    """A candidate that failed: no model, the worst score (inf), nothing released."""
    sigma = out.score_sigma or 0.0
    score = releases.ScoreRelease(math.inf, n_units, out.bound, sigma)
    return CandidateResult(None, 0, score, [], [], seconds, failed=why)


#: One batch of candidates: ([(index, configuration, noise)], the cell's released loss
#: weights, its validation releases) -> their results, in order.
RunBatch = Callable[
    [Sequence[tuple[int, TrainingConfig, CandidateNoise | None]], LossWeights, "Releases"], list
]


@dataclass
class TunedResult:
    """A tuned cell's outcome: the draw, the released loss weights, every candidate's score
    (private) and the winner (None: K = 0, or every candidate failed: nothing released)."""

    draw: Draw
    plan: TuningPlan | None
    weights: LossWeights
    scores: list[releases.ScoreRelease]
    winner: int | None
    best: dict[str, Any] | None  # {"index", "state", "epoch", "thresholds"} of the winner


def run_tuned(
    spec: TrialSpec,
    train: SplitData,
    checkpoint: CheckpointStore,
    run_batch: RunBatch,
    *,
    batch: int = 1,
    device: str = "cpu",
    rng: np.random.Generator | None = None,
) -> TunedResult:
    """A tuned cell's loop: the draw (or the checkpoint's), the loss weights released once
    for every candidate (kept: a resume never releases them again), the K candidates in
    batches of ``batch`` (each batch's results checkpointed with the best model so far), then
    the winner: the lowest released score, the first on ties, a failure never."""
    units = len(train)
    draw = load_or_draw(checkpoint, spec, units, rng)
    plan = TuningPlan.from_dict(draw.plan) if draw.plan is not None else None
    state = checkpoint.load() or {}
    if "tuning_weights" in state:
        w = state["tuning_weights"]
        weights = LossWeights(w["source"], tuple(w["values"]), w["count_noise_multiplier"])
    else:
        counts = plan.fixed[0][0] if plan is not None and plan.fixed else 0.0
        secret = Randomness.for_trial(spec.seed, device, secret=spec.is_private).release
        weights = loss_weights(spec, train, secret, counts)
        state["tuning_weights"] = dataclasses.asdict(weights)
        checkpoint.save(state)
    results: list[dict[str, Any]] = list(state.get("tuning_results", []))
    best = state.get("tuning_best")
    todo = list(range(len(results), draw.k))
    out = Releases.of(plan, spec)
    for start in range(0, len(todo), max(1, batch)):
        chunk = todo[start : start + max(1, batch)]
        calls = [(j, draw.configurations[j], _noise(plan, draw.configurations[j], units))
                 for j in chunk]  # fmt: skip
        for j, r in zip(chunk, run_batch(calls, weights, out), strict=True):
            results.append(_summary(r))
            if r.state_dict is not None and (best is None or r.score.noisy_sum
                                             < results[best["index"]]["noisy_sum"]):  # fmt: skip
                best = {"index": j, "state": r.state_dict, "epoch": r.epoch, "steps": r.steps,
                        "thresholds": r.thresholds, "history": r.history}  # fmt: skip
        state.update(tuning_results=results, tuning_best=best)
        checkpoint.save(state)
    scores = [releases.ScoreRelease(r["noisy_sum"], r["n_units"], r["bound"], r["sigma"])
              for r in results]  # fmt: skip
    winner = releases.best_candidate(scores) if scores else None
    if winner is not None and results[winner]["failed"]:
        winner, best = None, None  # every candidate failed: nothing to release
    assert winner is None or (best is not None and best["index"] == winner)
    return TunedResult(draw, plan, weights, scores, winner, best)


def _noise(plan: TuningPlan | None, config: TrainingConfig, units: int) -> CandidateNoise | None:
    return tuned.candidate_noise(plan, config, units) if plan is not None else None


def _summary(r: CandidateResult) -> dict[str, Any]:
    """What the checkpoint keeps of a candidate (plain numbers: weights_only loads it)."""
    return {"noisy_sum": float(r.score.noisy_sum), "n_units": int(r.score.n_units),
            "bound": float(r.score.bound), "sigma": float(r.score.noise_multiplier),
            "epoch": int(r.epoch), "seconds": float(r.seconds), "failed": r.failed}  # fmt: skip


class NoRelease(RuntimeError):
    """A tuned cell that releases no model: Poisson's K = 0, or every candidate failed."""


def train_tuned(cell: Any, store: Any, report: Any, node: str, executor: Any) -> None:
    """A tuned cell: draw (or resume the draw), run the K candidates through ``executor``
    (named Ray tasks ``<cell>/candNN`` under Tune), release the winner only: its weights,
    configuration, epoch, thresholds and the ledger with its ``selection`` entry. K, the
    other candidates and their scores and timings stay in the private checkpoint, which the
    store deletes with the commit."""
    from privdom_ray.train import memory_budget_mb
    from privdom_ray.trial import _write_trained
    from privdom_ray.trial.evaluation import _prediction_frame

    spec = cell.spec
    train, val = load_split(cell.source_cache, "train"), load_split(cell.source_cache, "val")
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"source {spec.source!r} has {len(train)} train and {len(val)} val "
                         "images; both splits need images")  # fmt: skip
    common = dict(spec=spec, cache_path=cell.source_cache, device=cell.device,
                  threads=cell.threads,
                  memory_budget_mb=memory_budget_mb(cell.memory_budget_mb, cell.device, cell.gpu))  # fmt: skip

    def run_batch(calls, weights: LossWeights, out: Releases) -> list:
        return executor.map(candidate_from_cache, [
            (f"cand{j:02d}", dict(common, config=c, noise=n, weights=weights, out=out))
            for j, c, n in calls
        ])  # fmt: skip

    result = run_tuned(spec, train, store.checkpoint(spec.key), run_batch, device=cell.device,
                       batch=max(1, getattr(cell, "site_slots", 1) or 1))  # fmt: skip
    if result.winner is None or result.best is None:
        raise NoRelease(f"{spec.name}: the tuned cell releases no model (K = 0 or every "
                        "candidate failed; both are outcomes of the private draw)")  # fmt: skip
    best, config = result.best, result.draw.configurations[result.winner]
    model = _load(spec.model, best["state"])
    val_scores = predict(model, val.images, device=cell.device)
    _write_trained(
        cell, store, node, state_dict=best["state"],
        ledger=tuned_ledger(spec, result, config, len(train)), history=best["history"],
        thresholds=best["thresholds"], val_predictions=_prediction_frame(val_scores, val),
        record=_tuned_record(spec, result, config, val_scores, val, len(train)),
    )  # fmt: skip


def _load(name: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from privdom_ray.manifest import LABELS
    from privdom_ray.train import load_model

    return load_model(name, state, num_outputs=len(LABELS))


def tuned_ledger(
    spec: TrialSpec, result: TunedResult, config: TrainingConfig, units: int
) -> dict[str, Any]:
    """The released model's ledger document: its own mechanisms (the label counts, DP-SGD at
    its run shape), and as ``epsilon_spent`` the Papernot-Steinke bound of the whole tuned
    release (accountant ``rdp``; the ``selection`` entry names the theorem and holds what
    audit recomputes it from). A non-DP cell: the plain ledger of the winner's run."""
    from privdom_ray.privacy import Ledger, NoisePlan, make_ledger

    w, best = result.weights, result.best
    assert best is not None
    common = dict(loss_weights=w.source, pos_weight=w.values, privacy_unit="image",
                  initialization=spec.init)  # fmt: skip
    plan = result.plan
    if plan is None:
        rate = config.logical_batch / max(units, 1)
        return Ledger.non_private(steps=best["steps"], sample_rate=rate, **common).as_dict()
    noise = tuned.candidate_noise(plan, config, units)
    counts = plan.fixed[0][0] if plan.fixed else 0.0
    run = NoisePlan(noise.noise_multiplier, noise.sample_rate, noise.steps, counts, "rdp")
    ledger = make_ledger(epsilon_target=spec.epsilon, delta=spec.delta, plan=run,
                         max_grad_norm=config.max_grad_norm, accountant="rdp", **common)  # fmt: skip
    ledger = dataclasses.replace(
        ledger, epsilon_spent=plan.epsilon_total, epsilon_rdp=plan.epsilon_total
    )
    assert spec.tuning is not None
    return {**ledger.as_dict(), "selection": tuned.selection_entry(plan, spec.tuning)}


def _tuned_record(spec, result: TunedResult, config, val_scores, val, units) -> dict[str, Any]:
    """trial.json's fields: what was searched and what won, never K, the other candidates or
    the cell's wall time (they would tell K)."""
    from privdom_ray.train import macro_auc

    assert spec.tuning is not None and result.best is not None
    searched = {d.name: getattr(config, d.name) for d in spec.tuning.space}
    rule = "by its DP validation score" if result.plan else "by its exact validation score"
    return {
        "best_epoch": result.best["epoch"],
        "val_macro_auc": float(macro_auc(val_scores, val.labels)),
        "selection": f"the best of K candidates {rule} (K secret, E[K] = "
        f"{tuned.runs_of(spec.tuning).mean():.3g}); epoch, score and thresholds released on "
        "the source's validation split" + (" within epsilon" if result.plan else ""),
        "tuned_configuration": searched,
        "n_train": units,
        "n_val": len(val),
        "units": units,
    }
