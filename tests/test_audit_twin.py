"""Audit twins end to end without Ray: a real cache entry, the real trainer, the trial store,
the aggregator and ``launch.py audit``; and a deliberately broken build that must be caught."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from conftest import launch_here, toy_split
from helpers import folders
from helpers.grids import synthetic_domain

from privdom_ray import kinds
from privdom_ray.canaries import Fault
from privdom_ray.cell import Cell
from privdom_ray.config import AuditSpec, EvaluationConfig, TrainingConfig, TrialSpec
from privdom_ray.imaging import Preprocessing
from privdom_ray.kinds.audit import audited
from privdom_ray.manifest import LABELS
from privdom_ray.stats import results
from privdom_ray.store import TrialStore
from privdom_ray.trial import Executor, train_audit_twin

CANARIES = 400
# the twins here train the same DP configuration 3 times, and a test recomputes its plan twice
pytestmark = pytest.mark.usefixtures("calibrated_once")


def write_cache(folder, n_train: int = 96, size: int = 16):
    """A cache entry like cache.build writes (learnable toy images): train and val splits."""
    train, val = toy_split(n_train, size, seed=0), toy_split(32, size, seed=1)
    folder.mkdir(parents=True)
    images = np.concatenate([train.images, val.images])
    np.save(folder / "images.npy", images)
    labels = np.concatenate([train.labels, val.labels])
    rows = pd.DataFrame(
        {
            "path": [f"{i}.png" for i in range(len(images))],
            "patient_id": [f"p{i}" for i in range(len(images))],
            "split": ["train"] * n_train + ["val"] * 32,
            "sex": "F",
            "age": 50.0,
            **{label: labels[:, j] for j, label in enumerate(LABELS)},
            "ok": True,
        }
    )
    rows.to_parquet(folder / "rows.parquet", index=False)
    return folder


def twin_spec(epsilon: float) -> TrialSpec:
    return TrialSpec(
        source="a",
        data_fingerprint="fp-a",
        epsilon=epsilon,
        delta=1e-5 if math.isfinite(epsilon) else 0.0,
        seed=0,
        model="resnet9",
        training=TrainingConfig(epochs=4, logical_batch=32, physical_batch=32, lr=1e-3),
        preprocessing=Preprocessing(image_size=16),
        variant="audit",
        audit=AuditSpec(canaries=CANARIES, kind="gradient", auditor_seed=0),
    ).with_key()


def train_twin(tmp_path, epsilon: float, **kw):
    cache = tmp_path / "cache" / "a"
    if not cache.exists():
        write_cache(cache)
    spec = twin_spec(epsilon)
    cell = Cell(spec=spec, output=str(tmp_path / "out"), source_cache=str(cache), targets=(),
                evaluation=EvaluationConfig())  # fmt: skip
    store = TrialStore(cell.output)
    store.folder(spec.key).mkdir(parents=True, exist_ok=True)
    train_audit_twin(cell, store, None, "test", Executor(), **kw)
    return store.read(spec.key)


@pytest.mark.slow
def test_audit_twins_bound_epsilon_from_below(tmp_path):
    dp = train_twin(tmp_path, 1.0)
    nondp = train_twin(tmp_path, math.inf)
    a_dp, a_nondp = dp.info.audit, nondp.info.audit
    assert a_dp["m"] == a_nondp["m"] == CANARIES and a_dp["kind"] == "gradient"
    assert a_dp["version"] == 2 and set(a_dp["attacks"]) == {"standard", "replay"}
    assert a_dp["score"] == "llr" and a_dp["attacks"]["replay"]["beta"] == 0.025
    assert set(a_nondp["attacks"]) == {"standard"} and a_nondp["score"] == "sum"
    spent = dp.ledger.epsilon_spent
    assert 0 < spent <= 1.0
    assert a_dp["epsilon_lower"] <= spent  # a correct implementation stays below its epsilon
    assert a_nondp["epsilon_lower"] > 2.0  # without noise the canaries are plain to see
    power = a_dp["power"]  # simulated with the twin's own m, q, steps, sigma
    assert power["setting"]["m"] == CANARIES and power["setting"]["steps"] == dp.ledger.steps
    assert power["setting"]["noise_multiplier"] == dp.ledger.noise_multiplier
    assert a_nondp["power"] is None and a_nondp["noise"] is None
    noise = a_dp["noise"]  # the noise really added is what the ledger states, and secret
    assert not noise["too_little"] and not noise["follows_seed"]
    assert noise["ratio"] == pytest.approx(1.0, abs=0.1)
    assert launch_here("audit", "out", cwd=tmp_path).returncode == 0  # main(), in-process
    # nothing of the coins, draws or scores is left in the finished twin
    assert not store_has(tmp_path, dp.key, "checkpoint.pt")
    assert not [v for v in a_dp.values() if isinstance(v, list)]  # no coins, no scores


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, attack",
    [(Fault(noise_scale=0.1), "standard"), (Fault(public_noise=True), "replay")],
    ids=["noise_x0.1", "public_seed_noise"],
)
def test_audit_twins_catch_broken_builds(tmp_path, fault, attack):
    """Broken builds (Python API only): the ledger claims the calibrated noise, the canaries
    prove otherwise; too little noise is caught by the plain attack, noise that follows the
    public seed by the replay, and the noise check sees both."""
    from privdom_ray.train import noise_plan

    broken = train_twin(tmp_path, 1.0, fault=fault)
    spent = broken.ledger.epsilon_spent
    calibrated = noise_plan(twin_spec(1.0), 96)  # what a correct build of this cell states
    assert 0 < spent <= 1.0 and broken.ledger.noise_multiplier == calibrated.noise_multiplier
    audit = broken.info.audit
    assert audit["epsilon_lower"] > spent and audit["attack"] == attack, audit
    noise = audit["noise"]  # the noise check sees it too
    assert noise["too_little"] is (fault.noise_scale < 1)
    assert noise["follows_seed"] is fault.public_noise
    proc = launch_here("audit", "out", cwd=tmp_path, expect=1)  # main(), in-process
    assert f"{attack} attack): epsilon_lower" in proc.stdout and "broken" in proc.stdout
    assert "noise check: " in proc.stdout


def store_has(tmp_path, key: str, name: str) -> bool:
    return (TrialStore(tmp_path / "out").folder(key) / name).exists()


def test_twins_are_planned_keyed_and_attached_to_the_audited_rows(tmp_path):
    """The grid's audit section plans one twin per named cell (its own key, never evaluated,
    never released) and the aggregator puts the twin's result on the audited cell's rows."""
    import yaml

    from privdom_ray.grid import load_grid

    (tmp_path / "g.yaml").write_text(
        yaml.safe_dump(
            {
                "output": "out",
                "domains": [synthetic_domain("a", "a", n_patients=20)],
                "epsilons": [1, 8, "inf"],
                "audit": {"canaries": 100, "epsilons": [1, "inf"]},
            }
        )
    )
    spec = load_grid(tmp_path / "g.yaml")
    trials = kinds.plan_trials(spec, {"a": "fp-a"}, {"a": 50})
    twins = [t for t in trials if t.variant == "audit"]
    assert [t.name for t in twins] == ["a_eps1_seed0_audit", "a_epsinf_seed0_audit"]
    standard = {t.key for t in trials if t.variant == "standard"}
    assert {audited(t).key for t in twins} <= standard
    assert all(t.key not in standard for t in twins)
    kind = kinds.kind_of(twins[0])
    assert not (kind.evaluated or kind.in_matrices or kind.released)
    # keys: the audit settings are part of the twin's, never of the audited cell's
    other = dataclasses.replace(twins[0], audit=dataclasses.replace(twins[0].audit, canaries=7))
    assert other.with_key().key != twins[0].key and audited(other).key == audited(twins[0]).key

    # the twin's result lands on the audited cell's rows (through the real aggregator)
    from helpers.trials import make_testset, scores_for, write_trial, write_twin

    test = make_testset(60, seed=1)
    key = write_trial(tmp_path / "agg", source="a", epsilon=1.0, seed=0,
                      evals={"a": ("fpa", test, scores_for(test, 1.0, 0))})  # fmt: skip
    result = {"epsilon_lower": 0.3, "epsilon_lower_fdp": 0.4, "m": 100, "guesses": 40,
              "correct": 26, "kind": "gradient"}  # fmt: skip
    twin = write_twin(tmp_path / "agg", key, AuditSpec(100, "gradient", 0), result)
    assert audited(folders.record(tmp_path / "agg", twin).spec).key == key
    _, df = results.aggregate(tmp_path / "agg", [key, twin], "t", [_T("a", "fpa")])
    assert set(df["trial_key"]) == {key}  # the twin has no rows of its own
    assert (df["audit_epsilon_lower"] == 0.3).all() and (df["audit_canaries"] == 100).all()

    # the report shows the audited cell once, with its numbers and verdict, and draws the figure
    # (a twin of an older version: its power was never estimated, and the report says so)
    from privdom_ray import report

    md = report.write_report(tmp_path / "agg")
    rows = [line for line in md.splitlines() if line.startswith("| a, ε = 1, seed 0")]
    spent = f"{folders.record(tmp_path / 'agg', key).ledger.epsilon_spent:.2f}"
    top = f"{df['audit_epsilon_max'].iloc[0]:.2f}"
    assert rows == [f"| a, ε = 1, seed 0 | {spent} | gradient, m = 100 | 0.30 | — | {top} | "
                    "not estimated (twin from before the power estimate; re-run it) | — | no "
                    "evidence of a broken build, at unknown power |"]  # fmt: skip
    assert "consistent" not in md
    assert (tmp_path / "agg" / "figures" / "audit_epsilon.png").is_file()


@dataclasses.dataclass(frozen=True)
class _T:
    name: str
    fingerprint: str


def test_the_audit_section_of_a_grid_is_validated(tmp_path):
    import yaml

    from privdom_ray.grid import GridError, load_grid

    base = {
        "output": "out",
        "domains": [synthetic_domain("a", "a", n_patients=20)],
        "epsilons": [1, "inf"],
    }
    bad = {"canaries": 5, "kind": "loss", "sources": ["z"], "epsilons": [3]}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({**base, "audit": bad}))
    with pytest.raises(GridError) as err:
        load_grid(tmp_path / "g.yaml")
    text = str(err.value)
    for needle in ("audit.canaries: 5", "audit.kind: 'loss'", "audit.sources", "audit.epsilons"):
        assert needle in text
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({**base, "audit": {"canaries": "many"}}))
    with pytest.raises(GridError, match="audit.canaries: 'many' is not allowed; expected 'auto'"):
        load_grid(tmp_path / "g.yaml")


def test_auto_canaries_are_chosen_per_cell_and_explicit_ones_kept(tmp_path):
    import yaml

    from privdom_ray.audit_bound import MIN_CANARIES, canaries_for
    from privdom_ray.grid import load_grid

    base = {"output": "out", "domains": [synthetic_domain("a", "a", n_patients=20)],
            "epsilons": [1, 12, "inf"]}  # fmt: skip
    for audit, want in (
        ({}, {1.0: MIN_CANARIES, 12.0: canaries_for(12.0, 1e-5), math.inf: MIN_CANARIES}),
        ({"canaries": 777}, dict.fromkeys((1.0, 12.0, math.inf), 777)),
        ({"kind": "input"}, dict.fromkeys((1.0, 12.0, math.inf), 1000)),
    ):
        (tmp_path / "g.yaml").write_text(yaml.safe_dump({**base, "delta": 1e-5, "audit": {
            "canaries": "auto", **audit}}))  # fmt: skip
        spec = load_grid(tmp_path / "g.yaml")
        twins = [t for t in kinds.plan_trials(spec, {"a": "fp"}, {"a": 50}) if t.audit]
        assert {t.epsilon: t.audit.canaries for t in twins} == want
    assert canaries_for(12.0, 1e-5) > MIN_CANARIES  # a larger epsilon needs more canaries


def _v2_result(m: int, lower: float, top: float, scale: float | None) -> dict:
    """A version-2 twin result as train_audit_twin writes it (numbers chosen by the test)."""
    attack = {"kind": "gradient", "m": m, "included": m // 2, "epsilon_lower": lower,
              "k_plus": 10, "k_minus": 0, "guesses": 10, "correct": 10, "beta": 0.025,
              "delta": 1e-5, "grid_size": 11}  # fmt: skip
    return {"version": 2, "kind": "gradient", "m": m, "epsilon_lower": lower,
            "attack": "standard", "guesses": 10, "correct": 10, "delta": 1e-5, "beta": 0.05,
            "epsilon_max": top, "score": "llr",
            "attacks": {"standard": attack, "replay": {**attack, "epsilon_lower": 0.1}},
            "power": None if scale is None else {"noise_scale": scale}}  # fmt: skip


def test_the_report_never_calls_an_audit_that_cannot_reach_epsilon_consistent(tmp_path):
    """An epsilon-8 cell whose twin's canaries cannot show 8 gets "cannot tell" with the
    attainable maximum; a powered one states what it would catch."""
    from helpers.trials import make_testset, scores_for, write_trial, write_twin

    from privdom_ray import report

    test = make_testset(60, seed=1)
    out = tmp_path / "agg"
    keys = []
    fine = {"units": 10_000, "sum_squares": 10_050.0, "replay_z": 0.4, "alpha": 1e-6}
    quiet = {**fine, "sum_squares": 2_500.0}  # half the noise: broken whatever the bound
    for eps, seed, m, top, scale, noise in (
        (8.0, 0, 1000, 5.1, None, None),
        (1.0, 0, 2**17, 10.0, 0.52, fine),
        (1.0, 1, 2**17, 10.0, 0.52, quiet),
    ):
        key = write_trial(out, source="a", epsilon=eps, seed=seed,
                          evals={"a": ("fpa", test, scores_for(test, 1.0, 0))})  # fmt: skip
        result = {**_v2_result(m, 0.4, top, scale), "noise": noise}
        keys += [key, write_twin(out, key, AuditSpec(m, "gradient", 0), result)]
    _, df = results.aggregate(out, keys, "t", [_T("a", "fpa")])
    audited = df[df["seed"] == 0].drop_duplicates("trial_key").set_index("epsilon_target")
    assert audited.loc[8.0, "audit_epsilon_max"] == 5.1
    assert pd.isna(audited.loc[8.0, "audit_power_noise_scale"])
    assert audited.loc[1.0, "audit_power_noise_scale"] == 0.52
    assert audited.loc[1.0, "audit_epsilon_lower_replay"] == 0.1
    md = report.write_report(out)
    eight = next(line for line in md.splitlines() if line.startswith("| a, ε = 8, seed 0"))
    one = next(line for line in md.splitlines() if line.startswith("| a, ε = 1, seed 0"))
    assert "cannot tell: m = 1000 caps the bound at 5.10 ≤ ε spent" in eight
    assert "consistent" not in md and "no evidence of a broken build |" in one
    assert "noise ×≤0.52, and noise replayed from the public seed" in one
    assert "| 1.002 |" in one and audited.loc[1.0, "audit_noise_check"] == "ok"
    broken = next(line for line in md.splitlines() if line.startswith("| a, ε = 1, seed 1"))
    assert "| 0.500 | **BROKEN: too little noise** |" in broken


def test_launch_audit_recomputes_a_twins_bound_and_noise_tests(tmp_path):
    """``launch.py audit`` never trusts a twin's stored numbers: a bound that is not what its
    counts give, or a noise test that fails, is a problem; a consistent record passes."""
    from helpers.trials import make_testset, scores_for, write_trial

    from privdom_ray.audit_bound import epsilon_lower_fdp
    from privdom_ray.kinds.audit import check_twin
    from privdom_ray.privacy import epsilon_of, ledger_mechanisms

    test = make_testset(30, seed=1)
    key = write_trial(tmp_path, source="a", epsilon=1.0, seed=0,
                      evals={"a": ("fpa", test, scores_for(test, 1.0, 0))})  # fmt: skip
    ledger = folders.ledger(tmp_path, key)
    m = 1000
    lower = epsilon_lower_fdp(m, 10, 10, delta=1e-5, beta=0.025 / 11)
    good = _v2_result(m, lower, 5.1, 0.5)
    good["attacks"]["replay"]["epsilon_lower"] = 0.0
    good["noise"] = {"units": 24_000, "sum_squares": 24_100.0, "replay_z": 0.3, "alpha": 1e-6}
    ok = check_twin(good, ledger, "a_eps1_seed0_audit")
    assert ok.problem == "" and ok.lower == pytest.approx(lower) and ok.checked
    recomputed, _ = epsilon_of(ledger["accountant"], ledger_mechanisms(ledger), ledger["delta"])
    assert ok.spent == recomputed  # the ledger's mechanisms, not its stored epsilon
    assert "not what its counts give" in check_twin({**good, "epsilon_lower": 0.01}, ledger,
                                                   "x").problem  # fmt: skip
    quiet = {**good, "noise": {**good["noise"], "sum_squares": 0.25 * 24_000}}
    assert "added 0.5 times the noise" in check_twin(quiet, ledger, "x").problem
    seeded = {**good, "noise": {**good["noise"], "replay_z": 150.0}}
    assert "follows the public seed" in check_twin(seeded, ledger, "x").problem


# ------------------------------------------------------------------ which cells get a twin


def _grid(tmp_path, audit: dict, **more):
    """A 3-source x 3-epsilon x 2-seed grid (18 audit cells) with ``audit``, loaded for real."""
    import yaml

    from privdom_ray.grid import load_grid

    grid = {"output": "out", "domains": [synthetic_domain(s, s, n_patients=20) for s in "abc"],
            "epsilons": [1, 4, "inf"], "seeds": [0, 1], "audit": audit, **more}  # fmt: skip
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    return load_grid(tmp_path / "g.yaml")


FPS, N_TRAIN = {s: f"fp{s}" for s in "abc"}, dict.fromkeys("abc", 50)


def _twins(spec, fps=FPS, n_train=N_TRAIN, **kw) -> list[TrialSpec]:
    return [t for t in kinds.plan_trials(spec, fps, n_train, **kw) if t.variant == "audit"]


def _cells(twins) -> list[tuple[str, float, int]]:
    return [(t.source, t.epsilon, t.seed) for t in twins]


def test_audit_cells_default_to_one_twin_per_epsilon_spread_over_sources(tmp_path):
    """The default plans one twin per epsilon (3 here, not 18), on three different sources;
    ``all`` is the old behaviour; the choice moves no key (twin or audited cell)."""
    one = _twins(_grid(tmp_path, {"canaries": 100}))
    every = _twins(_grid(tmp_path, {"canaries": 100, "cells": "all"}))
    assert len(every) == 18 and len(one) == 3
    assert sorted(t.epsilon for t in one) == [1.0, 4.0, math.inf]
    assert len({t.source for t in one}) == 3  # the twins spread over the sources
    assert {t.key for t in one} <= {t.key for t in every}  # same keys as under `all`
    standard = {t.key for t in kinds.plan_trials(_grid(tmp_path, {"canaries": 100}), FPS, N_TRAIN)
                if t.variant == "standard"}  # fmt: skip
    assert {audited(t).key for t in one} <= standard
    # the pinned choice for cells_seed 0 (a public hash: the same on every machine)
    assert _cells(one) == [("a", 4.0, 1), ("b", math.inf, 1), ("c", 1.0, 0)]
    # restricted cells: per epsilon of audit.epsilons, within audit.sources
    some = _twins(_grid(tmp_path, {"canaries": 100, "sources": ["b"], "epsilons": [1, 4]}))
    assert sorted(_cells(some))[0][:2] == ("b", 1.0) and [t.epsilon for t in some] == [1.0, 4.0]


def test_a_sample_of_n_cells_is_public_reproducible_and_spread_over_epsilons(tmp_path):
    """``cells: N`` takes N cells, the smallest epsilons first when N is not a multiple of the
    epsilons; the choice depends on the grid and cells_seed only: other data (fingerprints,
    training-set sizes) give the same cells, another cells_seed other ones."""
    spec = _grid(tmp_path, {"canaries": 100, "cells": 5})
    five = _twins(spec)
    assert len(five) == 5
    assert sorted(Counter(t.epsilon for t in five).items()) == [(1.0, 2), (4.0, 2), (math.inf, 1)]
    assert len({t.source for t in five}) == 3 and {t.seed for t in five} == {0, 1}
    other_data = _twins(spec, {s: f"other-{s}" for s in "abc"}, dict.fromkeys("abc", 5000))
    assert _cells(other_data) == _cells(five)
    assert _cells(_twins(spec)) == _cells(five)  # reproducible
    reseeded = _twins(_grid(tmp_path, {"canaries": 100, "cells": 5, "cells_seed": 7}))
    assert _cells(reseeded) != _cells(five)
    assert len(_twins(_grid(tmp_path, {"canaries": 100, "cells": 18}))) == 18


def test_the_audit_cells_option_is_validated(tmp_path):
    from privdom_ray.grid import GridError

    for cells, needle in (
        ("per_eps", "audit.cells: 'per_eps' is not allowed; expected 'per_epsilon' (one twin "
                    "per epsilon: the default), 'all'"),
        (True, "audit.cells: True is not allowed; expected 'per_epsilon'"),
        (0, "audit.cells: 0 is not allowed; expected a number from 1 to 18"),
        (19, "audit.cells: 19 is not allowed; expected a number from 1 to 18, the cells "
             "audit.sources x audit.epsilons x seeds name ('all' for every one"),
    ):  # fmt: skip
        with pytest.raises(GridError) as err:
            _grid(tmp_path, {"cells": cells})
        assert needle in str(err.value)
    with pytest.raises(GridError, match=r"audit.cells: 4 is not allowed; expected a number from 1 "
                                        r"to 2"):  # fmt: skip
        _grid(tmp_path, {"cells": 4, "sources": ["a"], "epsilons": [1]})
    with pytest.raises(GridError, match=r"audit.cells_seed: -1 is not allowed; expected an "
                                        r"integer >= 0"):  # fmt: skip
        _grid(tmp_path, {"cells_seed": -1})


def test_a_folder_with_a_twin_on_every_cell_is_read_without_retraining(tmp_path):
    """An output folder from before ``audit.cells`` (a finished twin on every cell) under the
    new default: the twins of the cells not chosen are kept (planned as finished, never
    trained) and every cell keeps its audit result; a fresh folder gets the chosen twins only,
    and the report names the cells that were not audited instead of leaving them silent."""
    from helpers.trials import make_testset, scores_for, write_trial

    from privdom_ray import planning, report
    from privdom_ray.cell import TargetRef
    from privdom_ray.report.view import eps_label as _eps_label

    small = {"sources": ["a", "b"], "seeds": [0]}  # 6 cells: a, b x 1, 4, inf
    old = kinds.plan_trials(_grid(tmp_path, {"canaries": 100, "cells": "all"}, **small), FPS,
                            N_TRAIN)  # fmt: skip
    out, test = tmp_path / "out", make_testset(60, seed=1)
    result = {
        **_v2_result(100, 0.4, 10.0, 0.5),
        "noise": {"units": 10_000, "sum_squares": 10_050.0, "replay_z": 0.4, "alpha": 1e-6},
    }
    for t in old:  # today's main: a twin on every cell, every model tested on a, b and c
        evals = {} if t.audit else {s: (f"fp{s}", test, scores_for(test, 1.0, 0)) for s in "abc"}
        write_trial(out, source=t.source, epsilon=t.epsilon, seed=t.seed, spec=t, evals=evals,
                    info={"audit": result} if t.audit else None)  # fmt: skip
    spec = _grid(tmp_path, {"canaries": 100}, **small)
    store = TrialStore(out)
    fresh = kinds.plan_trials(spec, FPS, N_TRAIN)
    trials = kinds.plan_trials(spec, FPS, N_TRAIN, finished=lambda k: store.valid(k) is not None)
    assert len([t for t in fresh if t.audit]) == 3
    assert {t.key for t in trials} == {t.key for t in old}  # the 3 others kept, keys unmoved
    assert "3 of them have a finished twin from an earlier run" in kinds.plan_notes(spec, trials)[0]
    targets = [TargetRef(s, f"fp{s}", "") for s in "abc"]
    plan = planning.plan_cells(spec, trials, store, {s: "" for s in "abc"}, FPS,
                               log=lambda _m: None)  # fmt: skip
    assert plan.cells == [] and plan.done == 12  # nothing trained or evaluated again

    # a fresh folder's table (the chosen twins only): the report says which cells have none
    _, df = results.aggregate(out, [t.key for t in fresh], "t", targets)
    md = report.write_report(out)
    assert "**Audited: 3 of 6 single-site cells; NOT audited: 3.**" in md
    chosen = {(t.source, t.epsilon) for t in fresh if t.audit}
    for eps in (1.0, 4.0, math.inf):
        yes = next(s for s in "ab" if (s, eps) in chosen)
        no = "b" if yes == "a" else "a"
        label = _eps_label(eps)
        assert f"| {label} | {yes} seed 0 | {no} seed 0 |" in md
        assert not any(line.startswith(f"| {no}, ε = {label[4:].split(' ')[0]}, seed 0 |")
                       for line in md.splitlines())  # no verdict row for it  # fmt: skip
    # the kept twins: every cell shows its result, read from the old folder
    _, df = results.aggregate(out, [t.key for t in trials], "t", targets)
    assert df.drop_duplicates("trial_key")["audit_epsilon_lower"].notna().sum() == 6
    md = report.write_report(out)
    assert "Every single-site cell (6) was audited." in md and "NOT audited" not in md
    assert md.count("no evidence of a broken build |") == 4  # the 4 DP twins


@pytest.mark.slow
@pytest.mark.ray
def test_a_sweep_over_a_folder_with_a_twin_on_every_cell_retrains_nothing(tmp_path):
    """Through ``launch.py --grid`` on Ray: a folder swept with a twin on every cell (what
    main wrote before ``audit.cells``), swept again under the default: nothing trained, the
    models untouched, every cell's audit result still in the table and the report. The smallest
    grid where the default chooses fewer twins than ``all``: 2 sources x 1 epsilon (2 cells,
    2 twins; the default audits 1); both sweeps run launch.main in-process (Ray still runs
    the cells in its own workers)."""
    import yaml

    grid = {"name": "twins", "output": "out", "epsilons": ["inf"], "seeds": [0],
            "domains": [synthetic_domain("a", "a", 30), synthetic_domain("b", "b", 30)],
            "training": {"epochs": 1, "logical_batch": 16, "physical_batch": 16},
            "preprocessing": {"image_size": 16}, "ray": {"num_cpus": 2},
            "evaluation": {"n_boot": 10, "min_positives": 1, "min_negatives": 1},
            "audit": {"canaries": 200, "cells": "all"}}  # fmt: skip
    (tmp_path / "all.yaml").write_text(yaml.safe_dump(grid))
    launch_here("--grid", "all.yaml", cwd=tmp_path)
    models = folders.model_stamps(tmp_path / "out")
    assert len(models) == 4  # 2 cells and 2 twins
    del grid["audit"]["cells"]  # the default: one twin per epsilon
    (tmp_path / "default.yaml").write_text(yaml.safe_dump(grid))
    proc = launch_here("--grid", "default.yaml", cwd=tmp_path)
    assert "4 already done, 0 to train, 0 trained" in proc.stdout
    after = folders.model_stamps(tmp_path / "out")
    assert after == models
    df = pd.read_parquet(tmp_path / "out" / "transfer.parquet").drop_duplicates("trial_key")
    assert len(df) == 2 and df["audit_epsilon_lower"].notna().all()
    assert "Every single-site cell (2) was audited." in (tmp_path / "out" / "report.md").read_text()
    plan = launch_here("plan", "default.yaml", "--images-per-s", "100", cwd=tmp_path).stdout
    assert "audit twins: 1 of 2 audit cells (audit.cells: per_epsilon" in plan
    assert "1 not audited (1 of them have a finished twin from an earlier run" in plan
