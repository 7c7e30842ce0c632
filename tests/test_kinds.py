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


@dataclasses.dataclass(frozen=True)
class _Shuffle:
    """The made-up kind's part of its run record (trial.json's ``shuffle``)."""

    permutation_seed: int


def _shuffled_section(view) -> str:
    """The made-up kind's report section: its trials, from the report's view."""
    rows = view.full[view.full["variant"] == "shuffled_test"].drop_duplicates("trial_key")
    return f"{len(rows)} shuffled-label trials: {', '.join(sorted(rows['source']))}\n"


class _Shuffled(kinds.TrialKind):
    """A made-up control (one non-private trial per source), written as a new kind would be:
    a subclass and a ``register`` call; it trains like a single-site trial, records the seed
    of its label permutation (its own record part) and adds a report section."""

    name = "shuffled_test"
    description = "test-only control"
    in_matrices = False
    released = False

    def plan(self, ctx):
        from privdom_ray.kinds.standard import single_site

        for source in ctx.spec.sources:
            yield single_site(ctx, source, math.inf, 0, self.name)

    record_keys = ("shuffle",)

    def record_part(self, data):
        return _Shuffle(int(data["shuffle"]["permutation_seed"])) if "shuffle" in data else None

    def record_json(self, part):
        return {"shuffle": {"permutation_seed": part.permutation_seed}}

    def report_sections(self):
        title = "Shuffled-label controls"
        return (kinds.ReportSection("shuffled", title, _shuffled_section, after="other"),)


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


# ------------------------------------------------------------------ a kind's own grid section


class _Pooled(kinds.TrialKind):
    """A made-up kind that owns a grid section read in the "after-names" phase: one pooled
    federation of the private domains the section names (``federations: [a, b]``). It holds
    the ``federations`` section because a section is kept in the SweepSpec field of its name
    (a new section adds its field to config.py); the federated kind is set aside meanwhile."""

    name = "pooled_test"
    trainer = "federated"
    data = "sites"
    section = "federations"
    section_phase = "after-names"
    section_help = "test-only: domain names pooled into one federation"
    sourceless = True
    seen: dict = {}

    def parse_section(self, c, raw, common):
        from privdom_ray.config import FederationConfig

        self.seen = dict(common)
        value = raw.get(self.section)
        if value is None:
            return ()
        if not isinstance(value, list) or any(s not in common["private"] for s in value):
            c.add(self.section, value, f"a list of domain names from {common['private']}")
            return ()
        return (FederationConfig(name="pooled", sites=tuple(value)),)

    def check_training(self, c, section, training):
        if section and training.epochs > 3:
            c.add("training.epochs", training.epochs, "at most 3 epochs with a pooled section")

    def plan(self, ctx):
        return iter(())


@pytest.fixture
def pooled():
    saved = dict(kinds.REGISTRY)  # the registry's order is the planner's: restore it whole
    del kinds.REGISTRY["federated"]
    kind = kinds.register(_Pooled())
    yield kind
    kinds.REGISTRY.clear()
    kinds.REGISTRY.update(saved)


def test_a_new_kinds_grid_section_is_parsed_in_its_phase_without_editing_the_grid(tmp_path, pooled):
    """grid.parse_grid reads a kind's section at the phase the kind names, hands it what the
    grid parsed before that phase, lets it allow `sources: []` and check the training
    section, and lists its key among the top-level keys: no line of grid/ names it."""
    from helpers.grids import synthetic_domain

    from privdom_ray.config import FederationConfig, GridError
    from privdom_ray.grid import parse_grid, top_keys

    sites = (("a", "a"), ("b", "b"), ("p", "c"))
    domains = [synthetic_domain(n, s, n_patients=20) for n, s in sites]
    grid = {"output": "out", "domains": domains, "epsilons": [1], "sources": [],
            "pretrain": {"domain": "p"}, "federations": ["a", "b"], "training": {"epochs": 1}}  # fmt: skip
    spec = parse_grid(grid, base=tmp_path)
    assert spec.federations == (FederationConfig(name="pooled", sites=("a", "b")),)
    assert spec.sources == () and spec.pretrain is not None and spec.pretrain.domain == "p"
    # "after-names": the domain names, the private ones, sources and targets; no training yet
    assert pooled.seen == {"names": ["a", "b", "p"], "private": ["a", "b"], "sources": [],
                           "targets": ["a", "b"]}  # fmt: skip
    assert top_keys()["federations"] == pooled.section_help

    with pytest.raises(GridError) as info:
        parse_grid({**grid, "federations": ["p"], "training": {"epochs": 5}}, base=tmp_path)
    assert info.value.errors == [
        "federations: ['p'] is not allowed; expected a list of domain names from ['a', 'b']"
    ]
    with pytest.raises(GridError) as info:
        parse_grid({**grid, "training": {"epochs": 5}}, base=tmp_path)
    assert info.value.errors == [
        "training.epochs: 5 is not allowed; expected at most 3 epochs with a pooled section"
    ]
    # without a section that trains on sites of its own, `sources: []` is refused as before
    with pytest.raises(GridError, match=r"sources: \[\] is not allowed"):
        parse_grid({**grid, "federations": None}, base=tmp_path)


def test_every_section_phase_is_a_named_one():
    """A typo in a kind's ``section_phase`` would leave its section unread: refuse it here."""
    for kind in kinds.REGISTRY.values():
        assert kind.section_phase in kinds.SECTION_PHASES, kind.name
    phases = {k.section: k.section_phase for k in kinds.REGISTRY.values() if k.section}
    assert phases == {"pretrain": "before-names", "federations": "after-names",
                      "audit": "after-common", "tuning": "after-common"}  # fmt: skip


def test_a_new_kind_reads_and_writes_its_record_part_and_adds_a_report_section(tmp_path, shuffled):
    """The made-up kind's record part goes through the store (typed in, the same typed part out,
    trial.json holding its key; a damaged part damages the trial) and its section appears in
    report.md after the one it names, with no edit outside the kind's definition."""
    import json

    from helpers.trials import (
        build_output,
        make_testset,
        scores_for,
        tiny_spec,
        write_trained,
        write_trial,
    )

    from privdom_ray import report
    from privdom_ray.stats import results
    from privdom_ray.store import TrialStore

    keys = build_output(tmp_path, domains=("a", "b"), n=120)
    test = make_testset(120, seed=10)
    spec = tiny_spec("a", math.inf, 0, variant="shuffled_test")
    assert kinds.kind_of(spec) is shuffled
    evals = {t: (f"fp{t}", test, scores_for(test, 0.5, 7)) for t in ("a", "b")}
    # a writer passes the kind's key as a plain field; the store hands it to the kind
    key = write_trial(tmp_path, source="a", epsilon=math.inf, seed=0, evals=evals, spec=spec,
                      info={"shuffle": {"permutation_seed": 7}})  # fmt: skip
    store = TrialStore(tmp_path)
    info = store.read(key).info
    assert info.part == _Shuffle(7) and "shuffle" not in info.extra
    document = json.loads((store.folder(key) / "trial.json").read_text())
    assert document["shuffle"] == {"permutation_seed": 7}
    # the part given typed (RunRecord.part) or as a plain field: the same trial.json bytes
    given = {"typed": {"part": _Shuffle(7)}, "plain": {"shuffle": document["shuffle"]}}
    for name, fields in given.items():
        write_trained(tmp_path / "parts" / name, spec, None, fields)
    written = [TrialStore(tmp_path / "parts" / n).folder(key) / "trial.json" for n in given]
    assert written[0].read_bytes() == written[1].read_bytes()

    results.aggregate(tmp_path, [*keys, key], "kinds-test")
    md = report.write_report(tmp_path, figures=False)
    head = "Shuffled-label controls\n\n1 shuffled-label trials: a\n"
    assert head in md and md.index("Controls, federated models") < md.index(head)

    document["shuffle"] = {"seed": 7}  # not what the kind reads: the trial is damaged
    store.rewrite(key, "trial.json", json.dumps(document).encode())
    found = store.inspect(key)
    assert found.record is None and found.damage.path.name == "trial.json"
