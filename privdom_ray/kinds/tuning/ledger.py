"""A tuned cell's privacy: its run shapes, the calibrated plan (per-run sigma, validation
noise, the label-count release on top), the ledger's ``selection`` entry, and audit's
recomputation of a stored one (docs/tuning-design.md, "How audit recomputes").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from privdom_ray.config import TrainingConfig, TrialSpec, TuningConfig
from privdom_ray.kinds.tuning.section import runs_of, shape_values, validation_shares
from privdom_ray.privacy import count_noise_multiplier, poisson_rate, steps_per_epoch
from privdom_ray.selection import runs as run_dists
from privdom_ray.selection.tuning import (
    CandidateNoise,
    RunShape,
    TuningPlan,
    calibrate,
)


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
    shares = tuple(sorted(validation_shares(tuning).items()))
    return _calibrated(spec.epsilon, spec.delta, shapes, tuning.runs, tuning_fixed(spec),
                       shares)  # fmt: skip


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
            dict(runs)), fixed=list(fixed), validation_shares=dict(shares),
    )  # fmt: skip


def candidate_noise(plan: TuningPlan, config: TrainingConfig, units: int) -> CandidateNoise:
    """The calibrated noise of the run shape ``config`` trains with on ``units`` units."""
    q = poisson_rate(units, config.logical_batch)
    shape = (q, config.epochs * steps_per_epoch(q))
    for c in plan.candidates:
        if (c.sample_rate, c.steps) == shape:
            return c
    raise ValueError(f"no run shape (q, steps) = {shape} in the plan's {len(plan.candidates)} "
                     "shapes: the configuration is not from this space")  # fmt: skip


#: How close a stored mechanism must be to the calibration rerun: exact (to rounding) when
#: audited with the numerical libraries it was trained with; an upgrade may move the
#: calibration's last digits (its own tolerance is 0.5% of epsilon), as for untuned ledgers.
EXACT_TOL, UPGRADED_TOL = 1e-9, 0.01
CALIBRATION_PACKAGES = ("opacus", "numpy", "scipy")


def recompute_tolerance(versions: Mapping[str, str]) -> float:
    """:data:`EXACT_TOL` when every package the calibration runs on that the record names
    is the installed one; :data:`UPGRADED_TOL` otherwise (a finished sweep survives an
    upgrade; a tampered sigma, validation noise or E[K] moves far more)."""
    import importlib.metadata

    for pkg in CALIBRATION_PACKAGES:
        if pkg not in versions:
            continue
        try:
            installed = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover
            installed = ""
        if str(versions[pkg]) != installed:
            return UPGRADED_TOL
    return EXACT_TOL


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
    spec: TrialSpec,
    units: int,
    stored: Mapping[str, Any],
    released: tuple[float, float, int],
    rel_tol: float = EXACT_TOL,
) -> list[str]:
    """Problems of a tuned cell's ``selection`` entry (none: certified). Recomputes: the plan
    is rebuilt from its mechanisms (``TuningPlan.from_dict``), its epsilon against the
    reported one and the target; its run shapes against the grid's space on ``units``; K's
    distribution, bound, bins and label-count release against the grid; ``released`` (the
    model's own sigma, q, steps) must be one of its shapes. And the calibration is rerun
    (:func:`tuning_plan`, deterministic): an entry listing other mechanisms than the ones the
    trainer ran (less validation noise, more noise on a shape the model did not use, another
    E[K]) recomputes to a smaller epsilon, so its mechanisms must be the plan's, to
    ``rel_tol``."""
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
    problems += _check_against_plan(spec, units, plan, stored, rel_tol)
    return problems


def ledger_check(
    spec: TrialSpec, units: int, doc: Mapping[str, Any], rel_tol: float = EXACT_TOL
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
    problems = check_selection(spec, units, selection, released, rel_tol)  # type: ignore[arg-type]
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


def _check_against_plan(spec, units, plan: TuningPlan, stored, rel_tol: float) -> list[str]:
    """The stored mechanisms against :func:`tuning_plan` rerun from the grid's spec on
    ``units``: each run shape's (sigma, q, steps), the validation releases' noise, the stated
    E[K] and the stated epsilons, every mismatch named with both values."""
    try:
        expected = tuning_plan(spec, units)
    except (ValueError, RuntimeError) as exc:
        return [f"the calibration cannot be rerun from the grid on {units} units: {exc}"]
    assert expected is not None, spec.name
    where = f"(the calibration rerun from the grid on {units} training units)"
    found = sorted(plan.candidates, key=lambda c: (c.sample_rate, c.steps))
    if len(found) != len(expected.candidates):
        return [f"{len(found)} run shapes in the selection entry, {len(expected.candidates)} "
                f"{where}"]  # fmt: skip
    pairs: list[tuple[str, Any, Any]] = []
    for i, (f, e) in enumerate(zip(found, expected.candidates, strict=True)):
        pairs += [(f"candidates[{i}].{name}", getattr(f, name), getattr(e, name))
                  for name in ("noise_multiplier", "sample_rate", "steps")]  # fmt: skip
    pairs += [(f"validation.{name}", getattr(plan.validation, name),
               getattr(expected.validation, name))
              for name in ("score_noise_multiplier", "checkpoint_epsilon",
                           "histogram_noise_multiplier")]  # fmt: skip
    runs = stored.get("runs")
    pairs += [
        ("runs.mean", runs.get("mean") if isinstance(runs, Mapping) else None,
         expected.runs.mean()),
        ("epsilon_run", stored.get("epsilon_run"), expected.epsilon_run),
        ("epsilon_total", stored.get("epsilon_total"), expected.epsilon_total),
    ]  # fmt: skip
    return [f"selection {name}: stored {got!r}, recomputed {want!r} {where}"
            for name, got, want in pairs if not _close(got, want, rel_tol)]  # fmt: skip


def _close(got: Any, want: Any, rel_tol: float) -> bool:
    if got is None or want is None:
        return got is None and want is None
    try:
        return math.isclose(float(got), float(want), rel_tol=rel_tol)
    except (TypeError, ValueError):
        return False
