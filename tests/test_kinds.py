"""Trial kinds as plugins: every kind is an object with real methods, named by
``TrialSpec.kind`` (never part of the key), trained by a trainer the training side holds."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest
import yaml

from privdom_ray import kinds
from privdom_ray.config import Federation, Site, TrainingConfig, TrialSpec
from privdom_ray.imaging import Preprocessing
from privdom_ray.trial import TRAINERS, trainer_of


def _spec(**kw) -> TrialSpec:
    base = dict(
        source="a", data_fingerprint="fp", epsilon=1.0, delta=1e-5, seed=0, model="resnet9",
        training=TrainingConfig(), preprocessing=Preprocessing(),
    )  # fmt: skip
    return TrialSpec(**{**base, **kw})


def test_every_registered_kind_resolves_to_a_trainer():
    assert set(kinds.REGISTRY) == {"standard", "clip_only", "pretrain", "federated", "audit", "tuning"}
    for kind in kinds.REGISTRY.values():
        assert isinstance(kind, kinds.TrialKind)
        assert callable(TRAINERS[kind.trainer]), kind.name
    assert trainer_of(_spec()) is TRAINERS["single_site"]
    assert trainer_of(_spec(variant="audit")).__name__ == "train_audit_twin"


def test_the_kind_names_the_trial_and_stays_out_of_its_key():
    fed = Federation((Site("a", "fa", 2.0, 1e-5), Site("b", "fb", 0.0, 1e-5)), 2, 1)
    spec = _spec()
    assert spec.kind == "standard" and kinds.kind_of(spec).name == "standard"
    assert _spec(variant="clip_only", epsilon=math.inf).kind == "clip_only"
    assert _spec(federation=fed).kind == "federated"
    # a property derived from the keyed fields: the hashed identity does not hold it
    assert "kind" not in spec.identity() and "kind" not in spec.to_json()
    assert spec.with_key().key == dataclasses.replace(spec, key="x").with_key().key


def test_one_rule_names_the_sites_that_trained_a_model():
    fed = Federation((Site("a", "fa", 2.0, 1e-5), Site("b", "fb", 0.0, 1e-5)), 2, 1)
    assert kinds.training_sites(_spec(source="x")) == ("x",)
    # a member with weight 0 contributes nothing to the model
    assert kinds.training_sites(_spec(source="fed", federation=fed)) == ("a",)
    assert kinds.kind_of(_spec(federation=fed)).members(_spec(federation=fed)) == fed.sites
    assert kinds.kind_of(_spec()).members(_spec()) == ()


# ------------------------------------------------------------------------------ adding a kind


class _Shuffled(kinds.TrialKind):
    """A made-up control (one non-private trial per source), written as a new kind would be:
    a subclass and a ``register`` call; it trains like a single-site trial."""

    name = "shuffled_test"
    description = "test-only control"
    in_matrices = False
    released = False

    def plan(self, ctx):
        from privdom_ray.kinds.standard import single_site

        for source in ctx.spec.sources:
            yield single_site(ctx, source, math.inf, 0, self.name)


@pytest.fixture
def shuffled():
    kind = kinds.register(_Shuffled())
    yield kind
    del kinds.REGISTRY[kind.name]


def _grid(tmp_path):
    from helpers.grids import synthetic_domain

    from privdom_ray.grid import load_grid

    domains = [synthetic_domain(n, n, n_patients=20) for n in ("a", "b")]
    grid = {"output": "out", "domains": domains, "epsilons": [1, "inf"], "seeds": [0]}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    return load_grid(tmp_path / "g.yaml")


def test_a_new_kind_is_planned_counted_and_trained_without_other_edits(tmp_path, shuffled):
    """Registering one TrialKind object is all a new kind takes: the planner, the cost model,
    the cell planner, the trainer registry and the table's row rules pick it up."""
    from privdom_ray import costs, planning
    from privdom_ray.report.view import in_matrices, row_kinds
    from privdom_ray.store import TrialStore

    spec = _grid(tmp_path)
    fps, n_train = {"a": "fp-a", "b": "fp-b"}, {"a": 50, "b": 60}
    trials = kinds.plan_trials(spec, fps, n_train)
    new = [t for t in trials if t.kind == "shuffled_test"]
    assert [t.name for t in new] == ["a_shuffled-test_seed0", "b_shuffled-test_seed0"]
    assert kinds.kind_of(new[0]) is shuffled and trainer_of(new[0]) is TRAINERS["single_site"]
    # standard keys do not move when a kind is added; the new trials have keys of their own
    before = {t.key for t in trials if t.kind == "standard"}
    assert len(before) == 4 and not before & {t.key for t in new}

    splits = {d: {"train": n, "val": 10, "test": 20} for d, n in n_train.items()}
    cost = costs.estimate(spec, splits, fps)
    assert cost.trainings["shuffled_test"] == 2 and cost.trainings["standard"] == 4
    assert cost.train_images["plain"] == spec.training.epochs * (50 + 60) * 2  # inf + control

    caches = {d: str(tmp_path / "cache" / d) for d in ("a", "b")}
    plan = planning.plan_cells(spec, trials, TrialStore(spec.output), caches, fps, log=str)
    cells = {c.spec.key: c for c in plan.cells}
    for t in new:  # trained from its source's cache and tested on the targets, like a cell
        assert cells[t.key].source_cache == caches[t.source]
        assert [r.name for r in cells[t.key].targets] == ["a", "b"]

    # its rows are controls in the report (the table's variant column names the kind)
    rows = pd.DataFrame({"source": ["a", "a"], "variant": ["standard", "shuffled_test"],
                         "training_sites": ["a", "a"]})  # fmt: skip
    assert [k.name for k in row_kinds(rows)] == ["standard", "shuffled_test"]
    assert in_matrices(rows).tolist() == [True, False]


@pytest.mark.slow
def test_a_new_kind_is_trained_by_the_trainer_it_names(tmp_path, shuffled):
    """The new kind's trial runs through trial.run_cell's path (its kind's trainer, the real
    single-site training) and its record reads back with its kind and training sites."""
    from conftest import write_cache

    from privdom_ray.cell import Cell
    from privdom_ray.config import EvaluationConfig
    from privdom_ray.store import TrialStore
    from privdom_ray.trial import Executor

    cache = write_cache(tmp_path / "cache" / "a")
    spec = _spec(
        epsilon=math.inf, delta=0.0, variant="shuffled_test", preprocessing=Preprocessing(image_size=16),
        training=TrainingConfig(epochs=1, logical_batch=32, physical_batch=32),
    ).with_key()  # fmt: skip
    cell = Cell(spec=spec, output=str(tmp_path / "out"), source_cache=str(cache), targets=(),
                evaluation=EvaluationConfig())  # fmt: skip
    store = TrialStore(cell.output)
    store.folder(spec.key).mkdir(parents=True)
    trainer_of(spec)(cell, store, None, "test", Executor())
    record = store.read(spec.key)
    assert record.spec.kind == "shuffled_test" and record.training_sites == ("a",)
    assert store.model_path(spec.key).is_file()
