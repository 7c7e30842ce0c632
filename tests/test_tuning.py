"""Honest tuning wired into the grid (issue 26): the ``tuning`` section, tuned cells' planning
and keys, E[K] in ``plan``, the per-cell privacy plan and the private draw."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from privdom_ray import costs, kinds
from privdom_ray.config import GridError, TrialSpec
from privdom_ray.grid import load_grid
from privdom_ray.kinds import tuning as tuned
from privdom_ray.privacy import poisson_rate, steps_per_epoch
from privdom_ray.selection import TuningPlan, runs
from privdom_ray.selection.tuning import CandidateNoise, RunShape, ValidationNoise

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "name": "t",
    "output": "out",
    "domains": [
        {"name": "a", "kind": "synthetic", "root": "data/a", "options": {"site": "a"}},
        {"name": "b", "kind": "synthetic", "root": "data/b", "options": {"site": "b"}},
    ],
    "epsilons": [1, "inf"],
    "seeds": [0],
    "training": {"epochs": 2, "logical_batch": 32, "physical_batch": 16},
}
TUNING = {
    "space": {
        "lr": {"loguniform": [1.0e-4, 3.0e-3]},
        "max_grad_norm": {"choice": [0.5, 1.5]},
        "logical_batch": {"choice": [32, 64]},
        "epochs": {"choice": [2, 3]},
    },
    "runs": {"distribution": "geometric", "mean": 5},
}
FINGERPRINTS = {"a": "fa", "b": "fb"}
N_TRAIN = {"a": 400, "b": 300}


def grid(tmp_path: Path, **changes):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**copy.deepcopy(BASE), **changes}))
    return load_grid(path)


def errors_of(tmp_path: Path, tuning) -> list[str]:
    with pytest.raises(GridError) as info:
        grid(tmp_path, tuning=tuning)
    return info.value.errors


def with_space(**entries):
    return {**TUNING, "space": {**TUNING["space"], **entries}}


# ------------------------------------------------------------------------------ the section


def test_the_section_parses_into_a_canonical_config(tmp_path):
    spec = grid(tmp_path, tuning=TUNING)
    t = spec.tuning
    assert [d.name for d in t.space] == ["epochs", "logical_batch", "lr", "max_grad_norm"]
    lr = next(d for d in t.space if d.name == "lr")
    assert (lr.sampler, lr.args) == ("loguniform", (1.0e-4, 3.0e-3))
    assert dict(t.runs) == {"distribution": "geometric", "mean": 5.0}
    assert t.search == "random" and t.score_bound == 1.0 and t.bins == 20
    # the default K: logarithmic with E[K] = 10 (selection.runs.DEFAULT_RUNS)
    default = grid(tmp_path, tuning={"space": TUNING["space"]}).tuning
    assert tuned.runs_of(default) == runs.DEFAULT_RUNS


def test_without_the_section_nothing_changes(tmp_path):
    spec = grid(tmp_path)
    assert spec.tuning is None
    trials = kinds.plan_trials(spec, FINGERPRINTS, N_TRAIN)
    assert {t.kind for t in trials} == {"standard"}
    assert all("tuning" not in t.identity() for t in trials)


@pytest.mark.parametrize(
    "tuning, needle",
    [
        ({**TUNING, "search": "bayesopt"}, "tuning.search: 'bayesopt'"),
        ({**TUNING, "search": "asha"}, "select on private validation data"),
        ({**TUNING, "scheduler": "pbt"}, "tuning.scheduler"),
        ({**TUNING, "scheduler": {"type": "hyperband"}}, "stops or mutates candidates"),
        ({**TUNING, "search_alg": "optuna"}, "tuning.search_alg"),
        ({**TUNING, "num_samples": 10}, "K is drawn at random"),
        ({**TUNING, "spce": {}}, "tuning.spce"),
        (with_space(momentum={"uniform": [0.1, 0.9]}), "tuning.space.momentum"),
        (with_space(lr={"loguniform": [0, 1e-3]}), "tuning.space.lr.loguniform"),
        (with_space(lr={"loguniform": [1e-2, 1e-3]}), "low < high"),
        (with_space(lr={"normal": [1e-3, 1e-4]}), "one of the samplers"),
        (with_space(lr={"uniform": [-1, 1]}), "0 < low < high"),
        (with_space(epochs={"uniform": [2, 6]}), "finitely many values"),
        (with_space(logical_batch={"loguniform": [16, 64]}), "tuning.space.logical_batch"),
        (with_space(logical_batch={"choice": [32, 32.5]}), "positive integers"),
        (with_space(epochs={"choice": [0, 2]}), "tuning.space.epochs.choice"),
        (with_space(epochs={"choice": []}), "non-empty list"),
        (with_space(epochs={"randint": [1, 200]}, logical_batch={"randint": [8, 64]}),
         "at most 64 combinations"),
        ({**TUNING, "space": {}}, "tuning.space"),
        ({**TUNING, "runs": {"distribution": "zipf", "mean": 10}}, "tuning.runs"),
        ({**TUNING, "runs": {"distribution": "logarithmic", "mean": 1}}, "must exceed 1"),
        ({**TUNING, "runs": {"distribution": "truncated_negative_binomial", "mean": 5}},
         "'eta' is missing"),
        ({**TUNING, "runs": {"distribution": "poisson", "mean": 0.5}}, "tuning.runs"),
        ({**TUNING, "runs": {"distribution": "poisson", "k": 3}}, "tuning.runs"),
        ({**TUNING, "score": {"bound": 0}}, "tuning.score"),
        ({**TUNING, "thresholds": {"bins": 1}}, "tuning.thresholds"),
        ({**TUNING, "validation_shares": {"score": 0, "thresholds": 0}}, "a number > 0"),
        ({**TUNING, "validation_shares": {"checkpoint": 0}}, "tuning.validation_shares.checkpoint"),
        ({**TUNING, "validation_shares": {"score": -1}}, "omit the key for its default"),
        ({**TUNING, "validation_shares": {"score": math.inf}}, "a number > 0"),
        ({**TUNING, "validation_shares": {"score": True}}, "a number > 0"),
        ({**TUNING, "validation_shares": {}}, "an omitted one is 1"),
        ({**TUNING, "validation_shares": {"auc": 1}}, "tuning.validation_shares.auc"),
        ("random", "tuning: 'random'"),
    ],
)  # fmt: skip
def test_each_bad_tuning_value_is_named_with_its_fix(tmp_path, tuning, needle):
    errors = errors_of(tmp_path, tuning)
    assert any(needle in e for e in errors), errors


def test_adaptive_search_is_refused_because_it_selects_outside_the_accounting(tmp_path):
    for search in ("asha", "pbt", "hyperband", "bayesopt", "optuna"):
        (error,) = errors_of(tmp_path, {**TUNING, "search": search})
        assert "adaptive search would select on private validation data" in error
        assert "expected 'random'" in error  # the fix


def test_tuning_refuses_patient_units_for_now(tmp_path):
    path = tmp_path / "grid.yaml"
    raw = {**copy.deepcopy(BASE), "tuning": TUNING}
    raw["training"]["privacy_unit"] = "patient"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(GridError) as info:
        load_grid(path)
    (error,) = info.value.errors
    assert error.startswith("training.privacy_unit: 'patient'") and "'image'" in error


# ------------------------------------------------------------------------------ planning and keys


def test_every_cell_becomes_one_tuned_coordinator_trial(tmp_path):
    spec = grid(tmp_path, tuning=TUNING)
    trials = kinds.plan_trials(spec, FINGERPRINTS, N_TRAIN)
    assert {t.kind for t in trials} == {"tuning"}
    assert [t.name for t in trials] == [
        "a_eps1_seed0", "a_epsinf_seed0", "b_eps1_seed0", "b_epsinf_seed0"
    ]  # fmt: skip
    kind = kinds.kind_of(trials[0])
    assert kind.coordinator and kind.trainer == "tuning" and kind.label(trials[0]) == "standard"
    # the non-DP cell gets the same search (the fair baseline)
    assert trials[0].tuning == trials[1].tuning == spec.tuning
    assert TrialSpec.from_json(json.loads(json.dumps(trials[0].to_json()))) == trials[0]


def test_a_tuned_key_is_the_cells_key_plus_the_section(tmp_path):
    untuned = kinds.plan_trials(grid(tmp_path), FINGERPRINTS, N_TRAIN)
    tuned_trials = kinds.plan_trials(grid(tmp_path, tuning=TUNING), FINGERPRINTS, N_TRAIN)
    for plain, t in zip(untuned, tuned_trials, strict=True):
        identity = t.identity()
        assert identity.pop("tuning") == dataclasses.asdict(t.tuning)
        assert identity == plain.identity()  # nothing else moves
        assert t.key != plain.key
    other = kinds.plan_trials(
        grid(tmp_path, tuning=with_space(lr={"loguniform": [1e-4, 1e-2]})), FINGERPRINTS, N_TRAIN
    )
    assert other[0].key != tuned_trials[0].key
    # the section's canonical form: key order in the YAML does not matter
    reordered = {"runs": TUNING["runs"], "space": dict(reversed(TUNING["space"].items()))}
    same = kinds.plan_trials(grid(tmp_path, tuning=reordered), FINGERPRINTS, N_TRAIN)
    assert [t.key for t in same] == [t.key for t in tuned_trials]


def test_tuned_keys_are_pinned(tmp_path):
    """Finished tuned cells survive upgrades like untuned ones: these keys must not move
    (a change to TuningConfig, its canonical form or the section's parse would move them)."""
    trials = kinds.plan_trials(grid(tmp_path, tuning=TUNING), FINGERPRINTS, N_TRAIN)
    assert [t.key for t in trials] == [
        "5b9b3971e0a7", "a548c55739bd", "136e490cbfe0", "b3f95cefde1e"
    ]  # fmt: skip


def test_plan_counts_expected_trainings_and_shows_the_quantile(tmp_path):
    spec = grid(tmp_path, tuning=TUNING)
    splits = {n: {"train": N_TRAIN[n], "val": 60, "test": 60} for n in N_TRAIN}
    cost = costs.estimate(spec, splits, FINGERPRINTS)
    dist = runs.run_distribution({"distribution": "geometric", "mean": 5})
    assert cost.trainings == {"tuning": 4}
    assert cost.expected_trainings == pytest.approx(4 * 5.0)
    # images: E[K] x the mean epochs over the space x N_train, per cell
    assert cost.train_images["dp"] == pytest.approx(5.0 * 2.5 * (400 + 300))
    assert cost.train_images["plain"] == pytest.approx(5.0 * 2.5 * (400 + 300))
    text = costs.render(cost, spec)
    assert "E[K] = 5 per cell" in text and f"95% quantile {runs.quantile(dist, 0.95)}" in text
    assert "about 20 candidate trainings expected" in text
    untuned = costs.estimate(grid(tmp_path), splits, FINGERPRINTS)
    assert untuned.expected_trainings == 4 and "tuned cells" not in costs.render(untuned, spec)


# ------------------------------------------------------------------------------ privacy plan


def test_run_shapes_cover_every_batch_and_epoch_combination(tmp_path):
    t = grid(tmp_path, tuning=TUNING).tuning
    training = grid(tmp_path).training
    shapes = tuned.run_shapes(t, training, 400)
    expected = {
        RunShape(poisson_rate(400, b), e * steps_per_epoch(poisson_rate(400, b)))
        for b in (32, 64)
        for e in (2, 3)
    }
    assert set(shapes) == expected and len(shapes) == 4
    # a space without the curve keys has the grid's single shape
    only_lr = grid(tmp_path, tuning={"space": {"lr": TUNING["space"]["lr"]}}).tuning
    q = poisson_rate(400, 32)
    assert tuned.run_shapes(only_lr, training, 400) == [RunShape(q, 2 * steps_per_epoch(q))]


@pytest.mark.slow
def test_the_cells_plan_fits_its_epsilon_and_recomputes(tmp_path):
    spec = grid(tmp_path, tuning=TUNING)
    dp = next(t for t in kinds.plan_trials(spec, FINGERPRINTS, N_TRAIN) if t.is_private)
    plan = tuned.tuning_plan(dp, N_TRAIN["a"])
    assert plan is not None and dp.epsilon * 0.99 <= plan.epsilon_total <= dp.epsilon
    assert len(plan.candidates) == 4 and plan.fixed  # the label counts (dp_counts) on top
    assert plan.theorem.startswith("Papernot-Steinke 2022, Theorem 2")
    again = TuningPlan.from_dict(json.loads(json.dumps(plan.as_dict())))
    assert again.epsilon_total == pytest.approx(plan.epsilon_total, rel=1e-9)
    nondp = next(t for t in kinds.plan_trials(spec, FINGERPRINTS, N_TRAIN) if not t.is_private)
    assert tuned.tuning_plan(nondp, N_TRAIN["a"]) is None


# ------------------------------------------------------------------------------ the draw


def test_configurations_are_drawn_from_the_space(tmp_path):
    spec = grid(tmp_path, tuning=with_space(epochs={"randint": [2, 4]}))
    rng = np.random.default_rng(0)
    drawn = [tuned.sample_configuration(spec.tuning, spec.training, rng) for _ in range(300)]
    assert all(1e-4 <= c.lr <= 3e-3 for c in drawn)
    assert {c.max_grad_norm for c in drawn} == {0.5, 1.5}
    assert {c.logical_batch for c in drawn} == {32, 64}
    assert {c.epochs for c in drawn} == {2, 3}  # randint excludes its high end, as Tune's
    assert all(c.physical_batch == 16 and c.accountant == "prv" for c in drawn)
    logs = np.log10([c.lr for c in drawn])
    assert abs(np.mean(logs) - np.mean(np.log10([1e-4, 3e-3]))) < 0.1  # log-uniform


def test_k_and_configurations_come_from_os_entropy_not_the_seed(tmp_path):
    from privdom_ray.trial.tuning import draw

    spec = grid(tmp_path, tuning={**TUNING, "runs": {"distribution": "geometric", "mean": 50}})
    nondp = next(t for t in kinds.plan_trials(spec, FINGERPRINTS, N_TRAIN) if not t.is_private)
    first, second = draw(nondp, 400), draw(nondp, 400)  # same cell, same public seed
    assert first.plan is None  # a non-DP cell has no privacy plan
    # P[same K] under the geometric with mean 50 is about 1%; same K and same lrs: ~0
    assert (first.k, [c.lr for c in first.configurations]) != (
        second.k, [c.lr for c in second.configurations]
    )  # fmt: skip


class _MemoryCheckpoint:
    def __init__(self) -> None:
        self.state = None
        self.saves = 0

    def load(self):
        return copy.deepcopy(self.state)

    def save(self, state) -> None:
        self.saves += 1
        self.state = copy.deepcopy(state)


def test_a_resume_never_redraws(tmp_path):
    from privdom_ray.store.records import FileCheckpoint
    from privdom_ray.trial.tuning import Draw, load_or_draw

    spec = grid(tmp_path, tuning=TUNING)
    nondp = next(t for t in kinds.plan_trials(spec, FINGERPRINTS, N_TRAIN) if not t.is_private)
    checkpoint = FileCheckpoint(tmp_path / "checkpoint.pt")  # the trial's private file
    first = load_or_draw(checkpoint, nondp, 400)
    assert checkpoint.path.is_file() and (checkpoint.path.stat().st_mode & 0o777) == 0o600
    for _ in range(3):
        assert load_or_draw(checkpoint, nondp, 400) == first
    assert Draw.from_dict(first.as_dict()) == first
    memory = _MemoryCheckpoint()
    load_or_draw(memory, nondp, 400)
    load_or_draw(memory, nondp, 400)
    assert memory.saves == 1  # saved once, before it was returned
    broken = {**first.as_dict(), "k": first.k + 1}
    with pytest.raises(ValueError, match="configurations"):
        Draw.from_dict(broken)


def test_the_demo_tuning_grid_is_valid():
    spec = load_grid(ROOT / "experiments" / "demo_tuning.yaml")
    assert spec.tuning is not None
    assert {d.name for d in spec.tuning.space} == {"lr", "max_grad_norm"}
    assert spec.epsilons == (1.0, 8.0, math.inf)


# ------------------------------------------------------------------------------ candidates, ledger


def test_candidates_are_named_keyed_and_noised_by_their_run_shape(tmp_path):
    spec = grid(tmp_path, tuning=TUNING)
    cell = next(t for t in kinds.plan_trials(spec, FINGERPRINTS, N_TRAIN) if t.is_private)
    assert tuned.candidate_name(cell, 3) == "a_eps1_seed0_cand03"
    rng = np.random.default_rng(1)
    one, two = (tuned.sample_configuration(spec.tuning, spec.training, rng) for _ in range(2))
    keys = {tuned.candidate_key(cell, c, j) for c in (one, two) for j in (0, 1)}
    assert len(keys) == 4 and cell.key not in keys
    q = poisson_rate(400, 64)
    plan = TuningPlan(
        1.0, 1e-5, runs.DEFAULT_RUNS,
        (CandidateNoise(poisson_rate(400, 32), 26, 2.0), CandidateNoise(q, 21, 3.0)),
        ValidationNoise(),
    )  # fmt: skip
    config = dataclasses.replace(one, logical_batch=64, epochs=3)
    assert tuned.candidate_noise(plan, config, 400).noise_multiplier == 3.0
    assert 3 * steps_per_epoch(q) == 21
    with pytest.raises(ValueError, match="not from this space"):
        tuned.candidate_noise(plan, dataclasses.replace(config, epochs=5), 400)


SMALL = {"space": {"lr": {"loguniform": [1.0e-4, 3.0e-3]}, "max_grad_norm": {"choice": [0.5, 1]}},
         "runs": {"distribution": "geometric", "mean": 5}}  # fmt: skip


def test_audit_recomputes_a_tuned_ledger_and_names_each_tampering(tmp_path):
    spec = grid(tmp_path, tuning=SMALL)
    cell = next(t for t in kinds.plan_trials(spec, FINGERPRINTS, N_TRAIN) if t.is_private)
    plan = tuned.tuning_plan(cell, 400)
    entry = json.loads(json.dumps(tuned.selection_entry(plan, cell.tuning)))
    assert entry["composition"].startswith("validation composes in parallel")
    (shape,) = plan.candidates
    released = (shape.noise_multiplier, shape.sample_rate, shape.steps)
    assert tuned.check_selection(cell, 400, entry, released) == []

    def problems(edit=None, units=400, model=released) -> str:
        stored = copy.deepcopy(entry)
        if edit is not None:
            edit(stored)
        return "\n".join(tuned.check_selection(cell, units, stored, model))

    def less_noise(d):
        d["candidates"][0]["noise_multiplier"] *= 0.5

    def other_runs(d):
        d["runs"] = runs.run_distribution({"distribution": "geometric", "mean": 4}).as_dict()

    assert "below the recomputed" in problems(lambda d: d.update(epsilon_total=0.5))
    assert "exceeds the cell's target" in problems(less_noise)
    assert "K's distribution" in problems(other_runs)
    assert "run shapes" in problems(units=800)  # the space on another training set
    assert "names accountant 'prv'" in problems(lambda d: d.update(accountant="prv"))
    assert "score bound and bins" in problems(lambda d: d.update(bins=10))
    assert "once-per-cell releases" in problems(lambda d: d.update(fixed=[]))
    assert "released model's" in problems(model=(shape.noise_multiplier * 0.9, *released[1:]))
    assert "cannot be rebuilt" in problems(lambda d: d.pop("candidates"))


def test_an_omitted_validation_share_takes_its_default_and_keeps_the_key_as_written(tmp_path):
    """An omitted release gets its default share (the DP trainer makes all three); the grid's
    mapping stays as written in the key (a finished non-DP cell of such a grid is not
    retrained), the plan is the one of the mapping written in full."""

    def cell(shares):
        tuning = {**SMALL, "validation_shares": shares} if shares is not None else SMALL
        spec = grid(tmp_path, tuning=tuning)
        return next(t for t in kinds.plan_trials(spec, FINGERPRINTS, N_TRAIN) if t.is_private)

    partial, full, default = cell({"score": 2}), cell({"score": 2, "checkpoint": 1,
                                                       "thresholds": 1}), cell(None)  # fmt: skip
    assert dict(partial.tuning.validation_shares) == {"score": 2.0}
    assert partial.key != full.key
    assert tuned.validation_shares(partial.tuning) == {"score": 2.0, "checkpoint": 1.0,
                                                       "thresholds": 1.0}  # fmt: skip
    v = tuned.tuning_plan(partial, 400).validation
    assert v == tuned.tuning_plan(full, 400).validation
    assert None not in (v.score_noise_multiplier, v.checkpoint_epsilon,
                        v.histogram_noise_multiplier)  # fmt: skip
    assert v.score_noise_multiplier < v.histogram_noise_multiplier  # twice the share
    d = tuned.tuning_plan(default, 400).validation
    assert d.score_noise_multiplier == d.histogram_noise_multiplier


def test_audit_reruns_the_calibration_and_names_each_field_with_both_values(tmp_path):
    """A stored entry whose mechanisms are not the ones the trainer ran (the calibration is
    deterministic in the spec and the training size) is a problem naming the field, the
    stored value and the recomputed one, even when its own epsilon recomputes within target."""
    spec = grid(tmp_path, tuning={**SMALL, "space": {**SMALL["space"],
                                                     "epochs": {"choice": [2, 3]}}})  # fmt: skip
    cell = next(t for t in kinds.plan_trials(spec, FINGERPRINTS, N_TRAIN) if t.is_private)
    plan = tuned.tuning_plan(cell, 400)
    entry = json.loads(json.dumps(tuned.selection_entry(plan, cell.tuning)))
    used = plan.candidates[-1]
    released = used.as_tuple()
    assert tuned.check_selection(cell, 400, entry, released) == []

    def problems(edit, rel_tol=tuned.EXACT_TOL) -> str:
        stored = copy.deepcopy(entry)
        edit(stored)
        return "\n".join(tuned.check_selection(cell, 400, stored, released, rel_tol))

    def other_shape(d):
        d["candidates"][0]["noise_multiplier"] *= 3

    found = problems(other_shape)
    want = plan.candidates[0].noise_multiplier
    assert (
        f"selection candidates[0].noise_multiplier: stored {want * 3!r}, recomputed "
        f"{want!r}" in found
    )
    assert "exceeds" not in found  # within target: only the rerun catches it
    assert "selection validation.checkpoint_epsilon: stored None" in problems(
        lambda d: d["validation"].update(checkpoint_epsilon=None)
    )
    assert "selection runs.mean: stored 1.5" in problems(lambda d: d["runs"].update(mean=1.5))
    assert "selection epsilon_run" in problems(lambda d: d.update(epsilon_run=0.01))
    assert "selection epsilon_total" in problems(lambda d: d.update(epsilon_total=0.9))
    nudge = 1 + 1e-6  # below an upgrade's tolerance, above a same-version recomputation
    assert "noise_multiplier" in problems(lambda d: d["candidates"][0].update(
        noise_multiplier=want * nudge))  # fmt: skip
    assert problems(lambda d: d["candidates"][0].update(noise_multiplier=want * nudge),
                    tuned.UPGRADED_TOL) == ""  # fmt: skip


def test_a_dp_plan_without_a_validation_release_stops_the_cell_before_any_training(tmp_path):
    """A plan checkpointed with a release missing (before shares had to be > 0) would make
    every DP candidate fail after its training: the cell stops with the fix instead."""
    from privdom_ray.trial.tuning import PlanDrift, Releases

    spec = grid(tmp_path, tuning=SMALL)
    cell = next(t for t in kinds.plan_trials(spec, FINGERPRINTS, N_TRAIN) if t.is_private)
    plan = tuned.tuning_plan(cell, 400)
    assert Releases.of(plan, cell).checkpoint_epsilon == plan.validation.checkpoint_epsilon
    old = dataclasses.replace(plan, validation=ValidationNoise(1.0, None, 1.0))
    with pytest.raises(PlanDrift, match="checkpoint_epsilon"):
        Releases.of(old, cell)


def test_the_recomputation_is_exact_unless_a_calibration_package_was_upgraded():
    import importlib.metadata

    now = {p: importlib.metadata.version(p) for p in ("opacus", "numpy", "scipy")}
    assert tuned.recompute_tolerance(now) == tuned.EXACT_TOL
    assert tuned.recompute_tolerance({"torch": "0.0"}) == tuned.EXACT_TOL  # not in the plan
    assert tuned.recompute_tolerance({**now, "numpy": "1.0.0"}) == tuned.UPGRADED_TOL


# ------------------------------------------------------------------------------ one candidate


def _toy_cell(epsilon: float) -> TrialSpec:
    from privdom_ray.config import TrainingConfig, TuningConfig
    from privdom_ray.imaging import Preprocessing

    tuning = TuningConfig(space=(), runs=tuned.DEFAULT_RUNS_SPEC)
    return TrialSpec(
        source="toy", data_fingerprint="x", epsilon=epsilon,
        delta=1e-5 if math.isfinite(epsilon) else 0.0, seed=0, model="smallcnn",
        training=TrainingConfig(epochs=2, logical_batch=16, physical_batch=16, lr=1e-3),
        preprocessing=Preprocessing(image_size=16), tuning=tuning,
    ).with_key()  # fmt: skip


def _toy_val(n: int = 40):
    from conftest import toy_split

    val = toy_split(n, seed=1)
    return dataclasses.replace(val, patient=np.array([f"p{i // 2}" for i in range(n)]))


def test_a_dp_candidate_trains_its_shape_and_releases_on_validation(one_torch_thread):
    from conftest import toy_split

    from privdom_ray.lossweights import LossWeights
    from privdom_ray.trial.tuning import Releases, run_candidate

    cell = _toy_cell(1.0)
    train, val = toy_split(64), _toy_val()
    q = poisson_rate(64, 16)
    noise = CandidateNoise(q, 2 * steps_per_epoch(q), 1.5)
    out = Releases(checkpoint_epsilon=0.5, score_sigma=4.0, histogram_sigma=4.0, bound=1.0,
                   bins=10)  # fmt: skip
    weights = LossWeights("dp_counts", (1.0,) * 5, 2.0)
    result = run_candidate(cell, cell.training, train, val, noise=noise, weights=weights, out=out)
    assert result.epoch in (1, 2) and len(result.history) == 2 and not result.failed
    assert result.score.n_units == 20 and result.score.noise_multiplier == 4.0  # per patient
    assert len(result.thresholds) == 5 and result.state_dict is not None
    # two runs of the same candidate draw their noise from OS entropy: the scores differ
    again = run_candidate(cell, cell.training, train, val, noise=noise, weights=weights, out=out)
    assert again.score.noisy_sum != result.score.noisy_sum
    # a plan for other steps than the loader takes is refused, never silently trained
    wrong = dataclasses.replace(noise, steps=noise.steps + 1)
    with pytest.raises(RuntimeError, match="steps"):
        run_candidate(cell, cell.training, train, val, noise=wrong, weights=weights, out=out)


def test_a_diverged_candidate_scores_worst_and_never_wins(one_torch_thread):
    from conftest import toy_split

    from privdom_ray.lossweights import LossWeights
    from privdom_ray.selection.validation import best_candidate
    from privdom_ray.trial.tuning import Releases, run_candidate

    cell = _toy_cell(math.inf)  # the fair baseline: exact epoch, score and thresholds
    train, val = toy_split(64), _toy_val()
    out = Releases(None, None, None, bound=1.0, bins=20)
    weights = LossWeights("exact", (1.0,) * 5)
    fine = run_candidate(cell, cell.training, train, val, noise=None, weights=weights, out=out)
    diverged_cfg = dataclasses.replace(cell.training, lr=1e12)
    diverged = run_candidate(cell, diverged_cfg, train, val, noise=None, weights=weights, out=out)
    assert 0 < fine.score.noisy_sum < 20 * 1.0
    assert diverged.score.noisy_sum == pytest.approx(20 * 1.0)  # B per validation patient
    assert best_candidate([diverged.score, fine.score]) == 1


def test_nan_predictions_cost_the_bound_not_nothing():
    from privdom_ray.selection.validation import unit_values
    from privdom_ray.trial.tuning import _losses

    labels = np.array([[1.0, 0.0], [np.nan, np.nan], [0.0, 1.0]])
    probs = np.array([[np.nan, np.nan], [np.nan, np.nan], [0.9, 0.1]])
    loss = _losses(probs, labels, bound=1.0)
    assert loss[0] == 1.0 and np.isnan(loss[1]) and loss[2] > 1.0  # clipped later, per unit
    # without the fix the diverged image would be skipped and its patient would score 0
    assert unit_values(loss, np.array([0, 1, 2]))[0] == 1.0


# ------------------------------------------------------------------------------ the cell's loop


def _serial(cell, train, val, calls_seen):
    """The executor's role in-process: each candidate run for real, one after another."""
    from privdom_ray.trial.tuning import run_candidate

    def run_batch(calls, weights, out):
        calls_seen.append([j for j, _, _ in calls])
        return [
            run_candidate(cell, config, train, val, noise=noise, weights=weights, out=out)
            for _, config, noise in calls
        ]

    return run_batch


def test_the_cells_loop_picks_the_best_and_resumes_without_redoing_anything(
    tmp_path, one_torch_thread
):
    from conftest import toy_split

    from privdom_ray.store.records import FileCheckpoint
    from privdom_ray.trial.tuning import Draw, run_tuned

    train, cell, val = toy_split(64), _toy_cell(math.inf), _toy_val()
    configs = tuple(dataclasses.replace(cell.training, lr=lr) for lr in (1e12, 1e-3, 3e-3))
    checkpoint = FileCheckpoint(tmp_path / "checkpoint.pt")
    checkpoint.save({"tuning_draw": Draw(3, configs, None).as_dict()})  # K = 3, as drawn

    class Crash(Exception):
        pass

    seen: list = []
    run = _serial(cell, train, val, seen)

    def crash_after_first(calls, weights, out):
        if seen:
            raise Crash("the node went away")
        return run(calls, weights, out)

    with pytest.raises(Crash):
        run_tuned(cell, train, checkpoint, crash_after_first, batch=1)
    assert seen == [[0]] and len(checkpoint.load()["tuning_results"]) == 1
    result = run_tuned(cell, train, checkpoint, run, batch=2)
    assert seen == [[0], [1, 2]]  # the finished candidate is not trained again
    assert result.draw.k == 3 and result.weights.source == "exact"
    sums = [s.noisy_sum for s in result.scores]
    assert sums[0] == pytest.approx(20.0)  # the diverged lr 1e12: B per patient
    assert result.winner == int(np.argmin(sums)) != 0
    assert result.best["index"] == result.winner and result.best["state"]
    # everything done: a resume trains nothing and finds the same winner
    again = run_tuned(cell, train, checkpoint, run, batch=2)
    assert seen == [[0], [1, 2]] and again.winner == result.winner


def test_k_zero_releases_nothing(tmp_path):
    from conftest import toy_split

    from privdom_ray.store.records import FileCheckpoint
    from privdom_ray.trial.tuning import Draw, run_tuned

    cell = _toy_cell(math.inf)
    checkpoint = FileCheckpoint(tmp_path / "checkpoint.pt")
    checkpoint.save({"tuning_draw": Draw(0, (), None).as_dict()})  # Poisson's K = 0
    seen: list = []
    result = run_tuned(cell, toy_split(32), checkpoint, lambda calls, w, o: seen.append(calls) or [])
    assert result.winner is None and result.best is None and seen == []


@pytest.mark.slow
def test_a_dp_cell_releases_its_label_counts_once_and_trains_each_shape_at_its_sigma(
    tmp_path, one_torch_thread
):
    from conftest import toy_split

    from privdom_ray.config import SearchDomain
    from privdom_ray.lossweights import LossWeights
    from privdom_ray.store.records import FileCheckpoint
    from privdom_ray.trial.tuning import Releases, load_or_draw, run_candidate, run_tuned

    base = _toy_cell(2.0)
    section = dataclasses.replace(
        base.tuning, space=(SearchDomain("epochs", "choice", (1, 2)),),
        runs=(("distribution", "geometric"), ("mean", 2.0)),
    )  # fmt: skip
    cell = dataclasses.replace(base, tuning=section)
    train, val = toy_split(64), _toy_val()
    checkpoint = FileCheckpoint(tmp_path / "checkpoint.pt")
    draw = load_or_draw(checkpoint, cell, len(train))  # OS entropy: K is whatever it is
    seen: list = []

    def run_batch(calls, weights, out):  # the executor's role, in-process
        stored = checkpoint.load()["tuning_weights"]  # released before any candidate runs
        assert LossWeights(**{**stored, "values": tuple(stored["values"])}) == weights
        assert out == Releases.of(TuningPlan.from_dict(draw.plan), cell)
        seen.extend((c.epochs, n) for _, c, n in calls)
        return [run_candidate(cell, c, train, val, noise=n, weights=weights, out=out)
                for _, c, n in calls]  # fmt: skip

    result = run_tuned(cell, train, checkpoint, run_batch, batch=4)
    plan = result.plan
    assert plan is not None and len(plan.candidates) == 2 and plan.epsilon_total <= 2.0
    assert result.weights.source == "dp_counts"
    assert result.weights.count_noise_multiplier == plan.fixed[0][0]  # once, for every one
    assert len(seen) == draw.k == len(result.scores)
    by_steps = {c.steps: c.noise_multiplier for c in plan.candidates}
    for epochs, noise in seen:  # each candidate at its own shape's sigma
        assert noise.steps == epochs * steps_per_epoch(noise.sample_rate)
        assert noise.noise_multiplier == by_steps[noise.steps]
    assert all(s.noise_multiplier == plan.validation.score_noise_multiplier
               for s in result.scores)  # fmt: skip
    assert result.winner is not None and result.best["index"] == result.winner


# ------------------------------------------------------------------------------ the trainer


def _train_cell(tmp_path, epsilon: float):
    from conftest import write_cache

    from privdom_ray.cell import Cell
    from privdom_ray.config import EvaluationConfig, SearchDomain
    from privdom_ray.store import TrialStore
    from privdom_ray.trial import Executor, trainer_of

    cache = tmp_path / "cache" / "a"
    if not cache.exists():
        write_cache(cache, n_train=64)
    base = _toy_cell(epsilon)
    section = dataclasses.replace(
        base.tuning, space=(SearchDomain("lr", "loguniform", (1e-4, 3e-3)),),
        runs=(("distribution", "geometric"), ("mean", 2.0)),
    )  # fmt: skip
    spec = dataclasses.replace(base, tuning=section).with_key()
    cell = Cell(spec=spec, output=str(tmp_path / "out"), source_cache=str(cache), targets=(),
                evaluation=EvaluationConfig())  # fmt: skip
    store = TrialStore(cell.output)
    store.folder(spec.key).mkdir(parents=True, exist_ok=True)
    assert trainer_of(spec).__name__ == "train_tuned"
    trainer_of(spec)(cell, store, None, "test", Executor())
    return spec, store


def _shareable_text(store, key) -> str:
    folder = store.folder(key)
    return (folder / "trial.json").read_text() + (folder / "ledger.json").read_text()


def test_a_tuned_non_dp_cell_releases_its_winner_and_keeps_k_private(tmp_path, one_torch_thread):
    spec, store = _train_cell(tmp_path, math.inf)
    record = store.read(spec.key)
    assert record.spec == spec and record.spec.kind == "tuning"
    assert record.ledger.accountant == "none" and record.info.best_epoch in (1, 2)
    tuned_cfg = dict(record.info.part.configuration)  # the kind's typed record part
    assert set(tuned_cfg) == {"lr"} and 1e-4 <= tuned_cfg["lr"] <= 3e-3
    assert not store.has_checkpoint(spec.key)  # the private draw went with the checkpoint
    text = _shareable_text(store, spec.key)
    assert "tuning_results" not in text and "cand0" not in text and '"k"' not in text
    assert record.info.train_seconds is None  # the cell's wall time would tell K


@pytest.mark.slow
def test_a_tuned_dp_cells_ledger_states_the_bound_and_audit_recomputes_it(
    tmp_path, one_torch_thread
):
    spec, store = _train_cell(tmp_path, 2.0)
    doc = json.loads((store.folder(spec.key) / "ledger.json").read_text())
    selection = doc["selection"]
    assert doc["accountant"] == "rdp" and doc["epsilon_spent"] == selection["epsilon_total"]
    assert 0 < doc["epsilon_spent"] <= 2.0 and doc["randomness"] == "os-entropy"
    assert selection["theorem"].startswith("Papernot-Steinke 2022, Theorem 2")
    released = (doc["noise_multiplier"], doc["sample_rate"], doc["steps"])
    assert tuned.check_selection(spec, 64, selection, released) == []
    assert [m["name"] for m in doc["mechanisms"]] == ["label_counts", "dp_sgd"]
    record = store.read(spec.key)
    assert "within epsilon" in record.info.selection and "K secret" in record.info.selection


@pytest.mark.slow
def test_launch_audit_recomputes_a_tuned_cell_and_flags_an_edited_ledger(
    tmp_path, one_torch_thread
):
    from privdom_ray.audit import audit_output

    spec, store = _train_cell(tmp_path, 2.0)
    (line,) = audit_output(store.output)
    assert line.ok, line.problem
    assert line.accountant == "rdp" and line.recomputed == pytest.approx(line.reported)
    path = store.folder(spec.key) / "ledger.json"
    doc = json.loads(path.read_text())
    for edit, needle in [
        (lambda d: d.update(epsilon_spent=0.5), "below the recomputed bound"),
        (lambda d: d["selection"]["candidates"][0].update(noise_multiplier=0.3), "exceeds"),
        (lambda d: d.pop("selection"), "no selection entry"),
        (lambda d: d.update(accountant="prv"), "accountant 'prv'"),
        (lambda d: d["mechanisms"].pop(0), "mechanisms"),
    ]:
        edited = copy.deepcopy(doc)
        edit(edited)
        problems = "\n".join(tuned.ledger_check(spec, 64, edited)[0])
        assert needle in problems, (needle, problems)


# ------------------------------------------------------------------------------ the report


def test_the_report_states_the_search_and_e_k_never_k_and_keeps_validation_inside():
    """The tuned kind's report sections from a real table frame: the space, K's distribution,
    E[K], per-run sigma and the bound; never a K drawn; and the privacy section's note that a
    tuned DP cell's best_epoch and threshold are DP releases (untuned tables: no note)."""
    from types import SimpleNamespace

    import pandas as pd
    from helpers.trials import tiny_ledger, tiny_spec
    from helpers.tuning import record, tuned_cell

    from privdom_ray import report
    from privdom_ray.stats.results import LEDGER_COLUMNS, SCHEMA

    def row(rec) -> dict:
        cols = kinds.kind_of(rec.spec).own_columns(rec)
        return {"trial_key": rec.key, "source": rec.spec.source, "seed": rec.spec.seed,
                "tuning": None, **{k: getattr(rec.ledger, k) for k in LEDGER_COLUMNS}, **cols}  # fmt: skip

    cell = tuned_cell("a", 2.0, 0)
    plain = record(tiny_spec("b", 1.0, 0), tiny_ledger(1.0))
    assert kinds.kind_of(plain.spec).own_columns(plain) == {}  # untuned rows: null
    assert "tuning" in SCHEMA.names
    searched = json.loads(row(cell)["tuning"])
    assert searched["mean"] == pytest.approx(3.0) and searched["q95"] >= 3
    assert "k" not in searched and "K" not in searched  # E[K] and its quantile, not a draw
    # the sections read the view's full table (duck-typed: kinds/ sits below report/)
    view = SimpleNamespace(full=pd.DataFrame([row(cell), row(plain)]))
    sections = {s.key: s for s in report.sections()}
    keys = [s.key for s in report.sections()]
    assert keys.index("tuning") == keys.index("privacy") + 1
    text = sections["tuning"].render(view)
    assert "lr` loguniform[0.0001, 0.003]" in text and "**E[K] = 3**" in text
    assert "publishing the K drawn would void it" in text
    assert f"{cell.ledger.noise_multiplier:.3f}" in text and "| rdp |" in text
    note = tuned.tuned_validation_note(view)
    assert "inside the cell's ε" in note and "rows whose choices were not DP releases" in note
    untuned_view = SimpleNamespace(full=pd.DataFrame([row(plain)]))
    assert sections["tuning"].render(untuned_view) == ""
    # the table's lr/logical_batch/epochs of a tuned row are the winner's, not the grid's
    won = tuned.TunedRun((("epochs", 3.0), ("lr", 2e-3)))
    winner = dataclasses.replace(cell, info=dataclasses.replace(cell.info, part=won))
    columns = kinds.kind_of(winner.spec).own_columns(winner)
    assert columns["lr"] == 2e-3 and columns["epochs"] == 3 and "logical_batch" not in columns
    assert sections["tuning"].render(untuned_view) == ""
    assert tuned.tuned_validation_note(untuned_view) == ""


def test_every_batch_the_space_can_draw_must_fit_each_source(tmp_path):
    from privdom_ray.grid import check_sample_rates

    spec = grid(tmp_path, tuning=with_space(logical_batch={"choice": [32, 350]}))
    check_sample_rates(spec, {"a": 400, "b": 400})  # both fit
    with pytest.raises(GridError) as info:
        check_sample_rates(spec, N_TRAIN)  # b has 300 training images
    (error,) = info.value.errors
    assert error.startswith("tuning.space.logical_batch: 350 is more than the 300 training")
    assert "source 'b'" in error
