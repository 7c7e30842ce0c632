"""``run_federation()``: the coordinator's rounds, model selection on the pooled validation
summaries, resumable checkpoints, and each site's privacy ledger.

Separate from the sites: it sees only what sites send (weights, counts, summaries); how and where
a site's work runs is injected.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from privdom_ray import privacy
from privdom_ray.config import TrialSpec
from privdom_ray.federated.aggregate import fedavg, on_public_cells, youden_from_histograms
from privdom_ray.federated.plan import SitePlan, federation_of
from privdom_ray.federated.site import SiteUpdate
from privdom_ray.federated.validation import SiteValidation
from privdom_ray.manifest import LABELS
from privdom_ray.models import build_model
from privdom_ray.privacy import Ledger
from privdom_ray.train.epochs import (
    CheckpointStore,
)

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
