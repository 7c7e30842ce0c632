"""The ``tuning:`` grid section: a search space over training hyperparameters in Ray Tune's
conventions (``tune.loguniform``, ``tune.uniform``, ``tune.choice``, ``tune.randint``), random
search only, the distribution of K and the validation releases (docs/tuning-design.md).

Sampling is numpy from OS entropy here (kinds/ stays ray- and torch-free). Only
``logical_batch`` and ``epochs`` change the privacy curve, so they must take finitely many
values: each combination is a run shape the per-run noise is calibrated for.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from privdom_ray.config import SearchDomain, TrainingConfig, TuningConfig
from privdom_ray.kinds import Checker
from privdom_ray.selection import runs as run_dists
from privdom_ray.selection.runs import secret_generator
from privdom_ray.selection.tuning import VALIDATION_SHARES

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
    """The shares as written (part of the key); an omitted release takes its default share
    (:func:`validation_shares`). Every share must be > 0: a DP candidate makes all three
    releases (the score selects, the epoch and thresholds are the model's), so a release
    with no budget has no noise and the candidate could release nothing."""
    if shares is None:
        return ()
    names = sorted(VALIDATION_SHARES)
    if not isinstance(shares, Mapping) or not shares:
        c.add("tuning.validation_shares", shares, f"a mapping over {names} of numbers > 0 "
              "(each release's share of the validation budget; an omitted one is 1)")  # fmt: skip
        return ()
    ok = True
    for k, v in shares.items():
        if k not in VALIDATION_SHARES:
            c.add(f"tuning.validation_shares.{k}", v, f"one of {names} (typo?)")
            ok = False
        elif not (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                  and v > 0):  # fmt: skip
            c.add(f"tuning.validation_shares.{k}", v, "a number > 0: a DP candidate makes "
                  f"all of {names}, each needs noise from a share of the budget (omit the key "
                  "for its default share, 1)")  # fmt: skip
            ok = False
    return tuple(sorted((str(k), float(v)) for k, v in shares.items())) if ok else ()


def validation_shares(tuning: TuningConfig) -> dict[str, float]:
    """Every validation release's share of the budget: the section's, the default (1) for a
    release it leaves out."""
    return {**VALIDATION_SHARES, **dict(tuning.validation_shares)}


def _finite(domain: SearchDomain) -> list:
    values = SAMPLERS[domain.sampler].values
    assert values is not None, domain
    return values(domain.args)


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


def sample_configuration(
    tuning: TuningConfig, training: TrainingConfig, rng: np.random.Generator | None = None
) -> TrainingConfig:
    """One candidate's training configuration: every space entry drawn (OS entropy unless a
    test injects ``rng``: a seeded sequence would tell which draw won), the rest the grid's."""
    g = secret_generator(rng)
    drawn = {d.name: SAMPLERS[d.sampler].draw(d.args, g) for d in tuning.space}
    drawn = {k: int(v) if TUNABLE[k].integer else float(v) for k, v in drawn.items()}
    return dataclasses.replace(training, **drawn)
