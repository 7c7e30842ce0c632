"""Tuned cells: the best of K candidates, each trained from a configuration drawn from the
grid's ``tuning.space`` (Papernot and Steinke 2022; docs/tuning-design.md).

With a ``tuning:`` section every single-site cell (source, epsilon, seed; DP and non-DP alike,
the fair baseline) becomes one coordinator trial of this kind: it draws K and K
configurations from OS entropy, trains the candidates, scores them on the validation split
and releases the winner only. Its key is the untuned cell's fields plus the section as
written, so a grid without the section plans exactly what it did before (pinned keys hold).

The space is a plain description in Ray Tune's conventions (``tune.loguniform``,
``tune.uniform``, ``tune.choice``, ``tune.randint``); sampling is numpy from OS entropy here
(kinds/ stays ray- and torch-free). Only ``logical_batch`` and ``epochs`` change the privacy
curve, so they must take finitely many values: each combination is a run shape the per-run
noise is calibrated for (``selection.tuning.calibrate``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from privdom_ray.config import (
    SearchDomain,
    SweepSpec,
    TrainingConfig,
    TrialSpec,
    TuningConfig,
    content_key,
)
from privdom_ray.kinds import Checker, PlanContext, TrialKind, register
from privdom_ray.kinds.standard import single_site
from privdom_ray.privacy import count_noise_multiplier, poisson_rate, steps_per_epoch
from privdom_ray.selection import runs as run_dists
from privdom_ray.selection.runs import secret_generator
from privdom_ray.selection.tuning import (
    VALIDATION_SHARES,
    CandidateNoise,
    RunShape,
    TuningPlan,
    calibrate,
)

# ------------------------------------------------------------------------------ the space


@dataclass(frozen=True)
class Sampler:
    """One of Ray Tune's search-space conventions: how its arguments are checked, how a value
    is drawn, and (for the finite ones) every value it can give."""

    check: Callable[[tuple], str]  # "" when the arguments are valid, else what is expected
    draw: Callable[[tuple, np.random.Generator], Any]
    values: Callable[[tuple], list] | None = None  # None: a continuous range


def _bounds(positive: bool) -> Callable[[tuple], str]:
    def check(args: tuple) -> str:
        ok = len(args) == 2 and args[0] < args[1] and (args[0] > 0 or not positive)
        low = "0 < " if positive else ""
        return "" if ok else f"[low, high] with {low}low < high"

    return check


def _check_randint(args: tuple) -> str:
    ok = len(args) == 2 and all(float(a).is_integer() for a in args) and args[0] < args[1]
    return "" if ok else "[low, high] integers with low < high (high excluded, as tune.randint)"


#: The samplers a space entry may name, as ``{<name>: [args]}`` (Ray Tune's ``tune.<name>``).
SAMPLERS: dict[str, Sampler] = {
    "loguniform": Sampler(
        _bounds(positive=True), lambda a, g: float(math.exp(g.uniform(math.log(a[0]),
                                                                     math.log(a[1]))))),
    "uniform": Sampler(_bounds(positive=False), lambda a, g: float(g.uniform(a[0], a[1]))),
    "choice": Sampler(
        lambda a: "" if len(a) >= 1 and len(set(a)) == len(a) else "a non-empty list of "
        "distinct values",
        lambda a, g: a[int(g.integers(len(a)))],
        lambda a: list(a),
    ),
    "randint": Sampler(
        _check_randint, lambda a, g: int(g.integers(int(a[0]), int(a[1]))),
        lambda a: list(range(int(a[0]), int(a[1]))),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Tunable:
    """A training hyperparameter a space may search: the samplers it allows, its values'
    type and rule. ``shape``: it changes the privacy curve (finite values only)."""

    samplers: tuple[str, ...]
    integer: bool
    shape: bool = False


#: The hyperparameters a space may hold (training fields; the rest stay the grid's).
TUNABLE: dict[str, Tunable] = {
    "lr": Tunable(("loguniform", "uniform", "choice"), integer=False),
    "max_grad_norm": Tunable(("loguniform", "uniform", "choice"), integer=False),
    "logical_batch": Tunable(("choice", "randint"), integer=True, shape=True),
    "epochs": Tunable(("choice", "randint"), integer=True, shape=True),
}
#: The only search: candidates drawn independently from the fixed space (the theorem's Q).
SEARCHES = ("random",)
#: Keys of other tuners a user may reach for, refused with the reason.
ADAPTIVE = {
    "scheduler": "a scheduler (ASHA, HyperBand, PBT, median stopping) stops or mutates "
    "candidates by their validation results",
    "search_alg": "a search algorithm (BayesOpt, Optuna, HyperOpt, BOHB) picks the next "
    "configuration from the previous candidates' validation results",
    "num_samples": "K is drawn at random from tuning.runs and kept secret; a fixed count is "
    "not covered by the Papernot-Steinke bound",
}
WHY_RANDOM = (
    "adaptive search would select on private validation data outside the accounting (the "
    "Papernot-Steinke bound covers candidates drawn independently from a fixed space)"
)
SECTION_KEYS = ("space", "runs", "search", "score", "thresholds", "validation_shares")
DEFAULT_RUNS_SPEC = (("distribution", "logarithmic"), ("mean", run_dists.DEFAULT_MEAN))
SHAPE_LIMIT = 64  # run shapes (logical_batch x epochs values) one space may hold


def parse_section(c: Checker, raw: Mapping, training: TrainingConfig) -> TuningConfig | None:
    """``tuning:`` the space, the distribution of K, the validation releases; None without
    the section. Every problem names its key and the fix."""
    section = raw.get("tuning")
    if section is None:
        return None
    if not isinstance(section, Mapping):
        c.add("tuning", section, f"a mapping with the keys {list(SECTION_KEYS)}")
        return None
    for k, v in section.items():
        if k in ADAPTIVE:
            c.add(f"tuning.{k}", v, f"no tuning.{k}: {ADAPTIVE[k]}, and {WHY_RANDOM}; remove it")
        elif k not in SECTION_KEYS:
            c.add(f"tuning.{k}", v, f"one of the known keys {list(SECTION_KEYS)} (typo?)")
    search = section.get("search", "random")
    if search not in SEARCHES:
        c.add("tuning.search", search, f"'random' (or no key): {WHY_RANDOM}")
    space = _parse_space(c, section.get("space"))
    _check_shapes(c, space)
    if training.privacy_unit == "patient":
        c.add("training.privacy_unit", "patient", "'image' with a tuning section (tuned "
              "cells do not yet count training patients for their run shapes)")  # fmt: skip
    return TuningConfig(
        space=space,
        runs=_parse_runs(c, section.get("runs")),
        search="random",
        score_bound=_positive(c, section, "score", "bound", 1.0),
        bins=int(_positive(c, section, "thresholds", "bins", 20, integer=True)),
        validation_shares=_parse_shares(c, section.get("validation_shares")),
    )


def _parse_space(c: Checker, space: Any) -> tuple[SearchDomain, ...]:
    if not isinstance(space, Mapping) or not space:
        c.add("tuning.space", space, "a mapping of hyperparameters to samplers, e.g. "
              "{lr: {loguniform: [1.0e-4, 3.0e-3]}, max_grad_norm: {choice: [0.5, 1.5]}}")  # fmt: skip
        return ()
    out = []
    for name, entry in space.items():
        key = f"tuning.space.{name}"
        if name not in TUNABLE:
            c.add(key, entry, f"a key of {list(TUNABLE)} (the training hyperparameters a "
                  "space may search)")  # fmt: skip
            continue
        tunable = TUNABLE[name]
        if not isinstance(entry, Mapping) or len(entry) != 1:
            c.add(key, entry, f"one sampler of {list(tunable.samplers)}, e.g. {{choice: [..]}}")
            continue
        ((sampler, args),) = entry.items()
        if sampler not in tunable.samplers:
            finite = (
                " (it changes the privacy curve: finitely many values)" if tunable.shape else ""
            )
            c.add(key, entry, f"one of the samplers {list(tunable.samplers)}{finite}")
            continue
        parsed = _parse_args(c, f"{key}.{sampler}", args, tunable)
        if parsed is not None:
            out.append(SearchDomain(str(name), sampler, parsed))
    return tuple(sorted(out, key=lambda d: d.name))


def _parse_args(c: Checker, key: str, args: Any, tunable: Tunable) -> tuple | None:
    kind = "positive integers" if tunable.integer else "positive numbers"
    numeric = isinstance(args, list) and all(
        isinstance(a, int | float) and not isinstance(a, bool) and math.isfinite(a) for a in args
    )
    if not numeric:
        c.add(key, args, f"a list of {kind}")
        return None
    if tunable.integer and not all(float(a).is_integer() for a in args):
        c.add(key, args, f"a list of {kind}")
        return None
    values = tuple(int(a) if tunable.integer else float(a) for a in args)
    sampler = key.rsplit(".", 1)[1]
    problem = SAMPLERS[sampler].check(values)
    if problem or any(v <= 0 for v in values if sampler != "uniform"):
        c.add(key, args, problem or f"a list of {kind}")
        return None
    if sampler == "uniform" and values[0] <= 0:
        c.add(key, args, "[low, high] with 0 < low < high (the hyperparameter is positive)")
        return None
    return values


def _check_shapes(c: Checker, space: Sequence[SearchDomain]) -> None:
    n = math.prod(len(_finite(d)) for d in space if TUNABLE[d.name].shape)
    if n > SHAPE_LIMIT:
        c.add("tuning.space", "logical_batch x epochs", f"at most {SHAPE_LIMIT} combinations "
              f"of logical_batch and epochs values (each is a run shape; this space has {n})")  # fmt: skip


def _parse_runs(c: Checker, runs: Any) -> tuple[tuple[str, Any], ...]:
    if runs is None:
        return DEFAULT_RUNS_SPEC
    allowed = sorted(run_dists.RUN_DISTRIBUTIONS)
    if not isinstance(runs, Mapping):
        c.add("tuning.runs", runs, f"a mapping {{distribution: one of {allowed}, mean: E[K]}}")
        return DEFAULT_RUNS_SPEC
    spec = {str(k): v if k == "distribution" else _number(v) for k, v in runs.items()}
    unknown = set(spec) - {"distribution", "mean", "eta", "gamma", "mu"}
    if unknown or "distribution" not in spec:
        c.add("tuning.runs", dict(runs), f"{{distribution: one of {allowed}, mean: E[K]}} "
              "(eta and gamma for truncated_negative_binomial, mu for poisson)")  # fmt: skip
        return DEFAULT_RUNS_SPEC
    try:
        run_dists.run_distribution(spec)
    except (KeyError, ValueError, TypeError) as exc:
        detail = f"'eta' is missing ({exc})" if isinstance(exc, KeyError) else str(exc)
        c.add("tuning.runs", dict(runs), f"a valid distribution of K: {detail}")
        return DEFAULT_RUNS_SPEC
    return tuple(sorted(spec.items()))


def _number(v: Any) -> Any:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


def _positive(
    c: Checker, section: Mapping, name: str, field: str, default: float, integer: bool = False
) -> float:
    sub = section.get(name)
    if sub is None:
        return default
    value = sub.get(field, default) if isinstance(sub, Mapping) else None
    extra = set(sub) - {field} if isinstance(sub, Mapping) else set()
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    if integer:
        ok = ok and float(value).is_integer() and value >= 2
    if not ok or extra:
        what = "an integer >= 2" if integer else "a positive number"
        c.add(f"tuning.{name}", sub, f"{{{field}: {what}}}")
        return default
    return float(value)


def _parse_shares(c: Checker, shares: Any) -> tuple[tuple[str, float], ...]:
    if shares is None:
        return ()
    ok = isinstance(shares, Mapping) and set(shares) <= set(VALIDATION_SHARES)
    ok = ok and all(isinstance(v, int | float) and v >= 0 for v in shares.values())
    if not ok or not sum(shares.values()) > 0:
        c.add("tuning.validation_shares", shares, f"a mapping over {sorted(VALIDATION_SHARES)} "
              "of numbers >= 0, not all 0 (each release's share of the validation budget)")  # fmt: skip
        return ()
    return tuple(sorted((str(k), float(v)) for k, v in shares.items()))


def _finite(domain: SearchDomain) -> list:
    values = SAMPLERS[domain.sampler].values
    assert values is not None, domain
    return values(domain.args)


# ------------------------------------------------------------------------------ planning


def plan(ctx: PlanContext) -> Iterator[TrialSpec]:
    """One tuned trial per single-site cell (source, epsilon, seed), DP and non-DP alike."""
    tuning = ctx.spec.tuning
    if tuning is None:
        return
    for source in ctx.spec.sources:
        for epsilon in ctx.spec.epsilons:
            for seed in ctx.spec.seeds:
                cell = single_site(ctx, source, epsilon, seed, "standard")
                yield dataclasses.replace(cell, tuning=tuning)


def runs_of(tuning: TuningConfig) -> run_dists.RunDistribution:
    """The distribution of K a section names (its registry: ``selection.run_distribution``)."""
    return run_dists.run_distribution(dict(tuning.runs))


def shape_values(tuning: TuningConfig, training: TrainingConfig) -> dict[str, list[int]]:
    """Every value of the curve-changing hyperparameters: the space's, else the grid's one."""
    space = {d.name: d for d in tuning.space}
    return {
        name: sorted(_finite(space[name])) if name in space else [getattr(training, name)]
        for name, t in TUNABLE.items()
        if t.shape
    }


def run_shapes(tuning: TuningConfig, training: TrainingConfig, units: int) -> list[RunShape]:
    """The run shapes of the space on ``units`` training units: (q, steps) of every
    (logical_batch, epochs) combination, as the trainer's Poisson sampler will take them."""
    values = shape_values(tuning, training)
    shapes = set()
    for batch in values["logical_batch"]:
        q = poisson_rate(units, batch)
        for epochs in values["epochs"]:
            shapes.add(RunShape(q, epochs * steps_per_epoch(q)))
    return sorted(shapes, key=lambda s: (s.sample_rate, s.steps))


def tuning_plan(spec: TrialSpec, units: int) -> TuningPlan | None:
    """A DP tuned cell's privacy plan (per-run-shape sigma, validation noise; the label-count
    release composed on top); None for a non-DP cell. Deterministic in the spec and the
    training size: the trainer computes it once and keeps it in its private checkpoint."""
    tuning = spec.tuning
    if tuning is None or not spec.is_private:
        return None
    shapes = tuple(run_shapes(tuning, spec.training, units))
    return _calibrated(spec.epsilon, spec.delta, shapes, tuning.runs, tuning_fixed(spec),
                       tuning.validation_shares)  # fmt: skip


def tuning_fixed(spec: TrialSpec) -> tuple[tuple[float, float, int], ...]:
    """The releases a DP tuned cell makes once, before its candidates, as (sigma, q, steps):
    the label counts its loss weights come from (``dp_counts``; the untuned cell's share of
    the budget), shared by every candidate."""
    if not spec.is_private or spec.loss_weight_source != "dp_counts":
        return ()
    budget = spec.training.pos_weight_budget
    return ((count_noise_multiplier(spec.epsilon, spec.delta, budget), 1.0, 1),)


@functools.lru_cache(maxsize=64)
def _calibrated(epsilon, delta, shapes, runs, fixed, shares) -> TuningPlan:
    return calibrate(
        epsilon=epsilon, delta=delta, shapes=list(shapes), runs=run_dists.run_distribution(
            dict(runs)), fixed=list(fixed), validation_shares=dict(shares) or VALIDATION_SHARES,
    )  # fmt: skip


def sample_configuration(
    tuning: TuningConfig, training: TrainingConfig, rng: np.random.Generator | None = None
) -> TrainingConfig:
    """One candidate's training configuration: every space entry drawn (OS entropy unless a
    test injects ``rng``: a seeded sequence would tell which draw won), the rest the grid's."""
    g = secret_generator(rng)
    drawn = {d.name: SAMPLERS[d.sampler].draw(d.args, g) for d in tuning.space}
    drawn = {k: int(v) if TUNABLE[k].integer else float(v) for k, v in drawn.items()}
    return dataclasses.replace(training, **drawn)


# ------------------------------------------------------------------------------ candidates


def candidate_name(spec: TrialSpec, index: int) -> str:
    """A candidate's name in the dashboard and logs (private, like K: ``<cell>_cand03``)."""
    return f"{spec.name}_cand{index:02d}"


def candidate_key(spec: TrialSpec, config: TrainingConfig, index: int) -> str:
    """A candidate's key: the tuned cell's key (its fields and the section), its drawn
    configuration and its index among the K."""
    return content_key({"cell": spec.key, "candidate": index,
                        "training": dataclasses.asdict(config)})  # fmt: skip


def candidate_noise(plan: TuningPlan, config: TrainingConfig, units: int) -> CandidateNoise:
    """The calibrated noise of the run shape ``config`` trains with on ``units`` units."""
    q = poisson_rate(units, config.logical_batch)
    shape = (q, config.epochs * steps_per_epoch(q))
    for c in plan.candidates:
        if (c.sample_rate, c.steps) == shape:
            return c
    raise ValueError(f"no run shape (q, steps) = {shape} in the plan's {len(plan.candidates)} "
                     "shapes: the configuration is not from this space")  # fmt: skip


#: How a tuned cell's validation releases compose with its training (the ledger states it).
PARALLEL_STATEMENT = (
    "validation composes in parallel with training: the patient-wise split is a salted hash "
    "of the patient id, independent of the data, so a neighbour differs in one split only"
)


def selection_entry(plan: TuningPlan, tuning: TuningConfig) -> dict[str, Any]:
    """The ledger's ``selection`` entry of a DP tuned cell: the plan (``TuningPlan.as_dict``:
    K's distribution, one (q, steps, sigma) per run shape, the validation noise, the fixed
    releases, orders, accountant and theorem) plus the score bound, the bins and why
    validation and training compose in parallel."""
    return {**plan.as_dict(), "score_bound": tuning.score_bound, "bins": tuning.bins,
            "composition": PARALLEL_STATEMENT}  # fmt: skip


def check_selection(
    spec: TrialSpec, units: int, stored: Mapping[str, Any], released: tuple[float, float, int]
) -> list[str]:
    """Problems of a tuned cell's ``selection`` entry (none: certified). Recomputes: the plan
    is rebuilt from its mechanisms (``TuningPlan.from_dict``), its epsilon against the
    reported one and the target; its run shapes against the grid's space on ``units``; K's
    distribution, bound, bins and label-count release against the grid; ``released`` (the
    model's own sigma, q, steps) must be one of its shapes."""
    assert spec.tuning is not None, spec.name
    try:
        plan = TuningPlan.from_dict(stored)
    except (KeyError, TypeError, ValueError) as exc:
        return [f"the selection entry cannot be rebuilt: {exc!r}"]
    problems = []
    reported = float(stored.get("epsilon_total", math.nan))
    if not reported >= plan.epsilon_total * (1 - 1e-9):
        problems.append(f"reported epsilon {reported} is below the recomputed "
                        f"{plan.epsilon_total:.6g}")  # fmt: skip
    if plan.epsilon_total > spec.epsilon * (1 + 1e-9):
        problems.append(f"recomputed epsilon {plan.epsilon_total:.6g} exceeds the cell's "
                        f"target {spec.epsilon:g}")  # fmt: skip
    if (plan.epsilon_target, plan.delta) != (spec.epsilon, spec.delta):
        problems.append(f"planned for (epsilon, delta) = ({plan.epsilon_target:g}, "
                        f"{plan.delta:g}), the cell is ({spec.epsilon:g}, {spec.delta:g})")  # fmt: skip
    if stored.get("accountant") != plan.accountant or stored.get("theorem") != plan.theorem:
        problems.append(f"names accountant {stored.get('accountant')!r} and theorem "
                        f"{stored.get('theorem')!r}; the plan is {plan.accountant!r}, "
                        f"{plan.theorem!r}")  # fmt: skip
    problems += _check_against_grid(spec, units, plan, stored, released)
    return problems


def ledger_check(
    spec: TrialSpec, units: int, doc: Mapping[str, Any]
) -> tuple[list[str], float] | None:
    """A tuned DP cell's stored ledger document recomputed (None for a non-DP cell): the
    ``selection`` entry (:func:`check_selection`), and the ledger around it: its epsilon is
    the recomputed bound's (accountant rdp), its mechanisms are the label counts and DP-SGD
    at the released model's shape, its randomness OS entropy, its mechanism version current."""
    from privdom_ray.numeric import number_or_nan
    from privdom_ray.privacy import MECHANISM_VERSION, SECRET_RANDOMNESS

    if not spec.is_private:
        return None
    selection = doc.get("selection")
    if not isinstance(selection, Mapping):
        return [
            "a tuned DP cell's ledger has no selection entry: its epsilon is unproven"
        ], math.nan
    try:
        recomputed = TuningPlan.from_dict(selection).epsilon_total
    except (KeyError, TypeError, ValueError):
        recomputed = math.nan
    released = tuple(
        number_or_nan(doc.get(k)) for k in ("noise_multiplier", "sample_rate", "steps")
    )
    problems = check_selection(spec, units, selection, released)  # type: ignore[arg-type]
    spent = number_or_nan(doc.get("epsilon_spent"))
    if not spent >= recomputed * (1 - 1e-9):
        problems.append(f"epsilon_spent {spent} is below the recomputed bound {recomputed:.6g}")
    if doc.get("accountant") != "rdp":
        problems.append(f"accountant {doc.get('accountant')!r}; the bound is an RDP one ('rdp')")
    if (
        doc.get("randomness") != SECRET_RANDOMNESS
        or doc.get("mechanism_version") != MECHANISM_VERSION
    ):
        problems.append(f"randomness {doc.get('randomness')!r}, mechanism_version "
                        f"{doc.get('mechanism_version')!r}: void unless secret and current")  # fmt: skip
    mechanisms = [(m.get("name"), number_or_nan(m.get("noise_multiplier")),
                   number_or_nan(m.get("sample_rate")), number_or_nan(m.get("steps")))
                  for m in doc.get("mechanisms", ()) if isinstance(m, Mapping)]  # fmt: skip
    expected = [("label_counts", *f) for f in tuning_fixed(spec)] + [("dp_sgd", *released)]
    if not _same_mechanisms(mechanisms, expected):
        problems.append(f"mechanisms {mechanisms} are not the cell's fixed releases and the "
                        f"released model's DP-SGD {expected}")  # fmt: skip
    return problems, recomputed


def _same_mechanisms(found: list, expected: list) -> bool:
    return len(found) == len(expected) and all(
        a[0] == b[0]
        and all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(a[1:], b[1:], strict=True))
        for a, b in zip(found, expected, strict=True)
    )


def _check_against_grid(spec, units, plan: TuningPlan, stored, released) -> list[str]:
    tuning = spec.tuning
    problems = []
    shapes = {(c.sample_rate, c.steps) for c in plan.candidates}
    expected = {(s.sample_rate, s.steps) for s in run_shapes(tuning, spec.training, units)}
    if shapes != expected:
        problems.append(f"run shapes (q, steps) {sorted(shapes)} are not the space's "
                        f"{sorted(expected)}")  # fmt: skip
    grid_runs, runs = runs_of(tuning).as_dict(), plan.runs.as_dict()
    same = grid_runs.keys() == runs.keys() and all(
        v == runs[k] if isinstance(v, str) else math.isclose(v, runs[k], rel_tol=1e-6)
        for k, v in grid_runs.items()
    )
    if not same:
        problems.append(f"K's distribution {runs} is not the grid's {grid_runs}")
    if (stored.get("score_bound"), stored.get("bins")) != (tuning.score_bound, tuning.bins):
        problems.append(f"score bound and bins ({stored.get('score_bound')}, "
                        f"{stored.get('bins')}) are not the grid's ({tuning.score_bound}, "
                        f"{tuning.bins})")  # fmt: skip
    fixed = tuning_fixed(spec)
    if len(fixed) != len(plan.fixed) or not all(
        np.allclose(a, b, rtol=1e-9) for a, b in zip(fixed, plan.fixed, strict=False)
    ):
        problems.append(f"once-per-cell releases {plan.fixed} are not the cell's {fixed}")
    sigma, q, steps = released
    if not any(math.isclose(sigma, c.noise_multiplier, rel_tol=1e-9)
               and (q, steps) == (c.sample_rate, c.steps) for c in plan.candidates):  # fmt: skip
        problems.append(f"the released model's (sigma, q, steps) = {released} is none of the "
                        "plan's run shapes")  # fmt: skip
    return problems


def note(spec: SweepSpec, trials: Sequence[TrialSpec]) -> str:
    """``plan``'s line: tuned cells, E[K] and the 95% quantile of K, expected trainings."""
    tuning = spec.tuning
    tuned = [t for t in trials if t.tuning is not None]
    if tuning is None or not tuned:
        return ""
    runs = runs_of(tuning)
    mean, q95 = runs.mean(), run_dists.quantile(runs, 0.95)
    space = ", ".join(f"{d.name} {d.sampler}{list(d.args)}" for d in tuning.space)
    return (
        f"tuned cells: {len(tuned)} (random search over {space}); K ~ "
        f"{dict(tuning.runs)['distribution']}, E[K] = {mean:.3g} per cell, 95% quantile "
        f"{q95}: about {len(tuned) * mean:,.0f} candidate trainings expected (K is drawn from "
        "OS entropy and kept private)"
        + (
            "; audit twins audit the untuned cells' training, not the tuned release"
            if spec.audit is not None
            else ""
        )
    )


class Tuned(TrialKind):
    name = "tuning"
    description = "the best of K DP candidates drawn from a search space (Papernot-Steinke)"
    trainer = "tuning"
    coordinator = True
    section = "tuning"
    composable = False  # an RDP bound over K runs: export refuses until guarantee.py composes it

    def parse_section(self, c: Checker, raw: Mapping, common: Mapping[str, Any]) -> Any:
        return parse_section(c, raw, common["training"])

    def plan(self, ctx: PlanContext) -> Iterator[TrialSpec]:
        return plan(ctx)

    def note(self, spec: SweepSpec, trials: Sequence[TrialSpec]) -> str:
        return note(spec, trials)

    def work(self, spec: TrialSpec) -> tuple[float, float]:
        assert spec.tuning is not None, spec.name
        epochs = shape_values(spec.tuning, spec.training)["epochs"]
        return runs_of(spec.tuning).mean(), float(np.mean(epochs))

    def ledger_check(self, record: Any, ledger: Mapping[str, Any]) -> Any:
        return ledger_check(record.spec, record.info.units or record.info.n_train or 0, ledger)

    def label(self, spec: TrialSpec) -> str:
        return "standard"  # a tuned cell is the grid's cell: the same rows and matrices


register(Tuned())
