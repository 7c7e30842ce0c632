"""Grid validation: every bad value is reported with its key, value and what is allowed."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from privdom_ray.config import GridError, TrialSpec
from privdom_ray.grid import load_grid
from privdom_ray.kinds import plan_trials as plan

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
    "training": {"epochs": 1, "logical_batch": 32, "physical_batch": 16},
}


def write(tmp_path: Path, grid: dict) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def errors_of(tmp_path: Path, **changes) -> list[str]:
    grid = {**BASE, **changes}
    with pytest.raises(GridError) as info:
        load_grid(write(tmp_path, grid))
    return info.value.errors


def test_valid_grid_resolves_paths_and_defaults(tmp_path):
    spec = load_grid(write(tmp_path, BASE))
    assert spec.output == (tmp_path / "out").resolve()
    assert spec.cache_dir == spec.output / "cache"
    assert spec.domains[0].root == (tmp_path / "data" / "a").resolve()
    assert spec.epsilons == (1.0, math.inf)
    assert spec.sources == spec.targets == ("a", "b")
    assert spec.training.physical_batch == 16
    assert spec.ray.dashboard_host == "127.0.0.1"


def test_out_flag_overrides_output(tmp_path):
    spec = load_grid(write(tmp_path, BASE), output=str(tmp_path / "elsewhere"))
    assert spec.output == (tmp_path / "elsewhere").resolve()


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"epsilons": [0]}, "epsilons[0]: 0"),
        ({"epsilons": [-1, "inf"]}, "epsilons[0]: -1"),
        ({"epsilons": ["lots"]}, "epsilons[0]: 'lots'"),
        ({"delta": 1.5}, "delta: 1.5"),
        ({"delta": 0}, "delta: 0"),
        ({"domains": []}, "domains: []"),
        ({"model": "vgg"}, "model: 'vgg'"),
        ({"seeds": [0, 0]}, "seeds[1]: 0"),
        ({"epoch": 3}, "epoch: 3"),  # typo of a top-level key
        ({"training": {"logical_batch": 0}}, "training.logical_batch: 0"),
        ({"training": {"physical_batch": -4}}, "training.physical_batch: -4"),
        ({"training": {"logical_batch": 16, "physical_batch": 32}}, "training.physical_batch: 32"),
        ({"training": {"epocs": 2}}, "training.epocs: 2"),
        ({"training": {"accountant": "gdp"}}, "training.accountant: 'gdp'"),
        ({"preprocessing": {"geometry": "fisheye"}}, "preprocessing.geometry: 'fisheye'"),
        ({"resources": {"cpu": 0}}, "resources.cpu: 0"),
        ({"resources": {"memory_format": "nhwc"}}, "resources.memory_format: 'nhwc'"),
        ({"sources": ["zz"]}, "sources: ['zz']"),
    ],
)
def test_each_bad_value_is_named(tmp_path, changes, needle):
    errors = errors_of(tmp_path, **changes)
    assert any(needle in e for e in errors), errors
    assert all("expected" in e for e in errors)


def test_bad_domains_are_named(tmp_path):
    domains = [
        {"name": "a", "kind": "dicomland", "root": "x"},
        {"name": "b", "kind": "chexpert", "root": "does/not/exist"},
        {"name": "c", "kind": "synthetic", "root": "c", "option": {}},
        {"name": "d", "kind": "synthetic"},
        {"name": "e", "kind": "synthetic", "root": "e", "options": {"site": "mars"}},
    ]
    errors = errors_of(tmp_path, domains=domains)
    text = "\n".join(errors)
    assert "domains[a].kind: 'dicomland'" in text and "synthetic" in text
    assert "domains[b].root: 'does/not/exist'" in text
    assert "domains[0].option" not in text and "domains[c].option: {}" in text
    assert "domains[d].root: None" in text
    assert "domains[e].options" in text and "mars" in text


def test_all_errors_reported_at_once(tmp_path):
    errors = errors_of(tmp_path, epsilons=[0], delta=2, model="vgg")
    assert len(errors) == 3


def test_cli_exit_code_2_and_message(tmp_path):
    path = write(tmp_path, {**BASE, "epsilons": [0]})
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "--grid", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "epsilons[0]: 0" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written for a bad grid


def test_trial_key_ignores_targets_and_tracks_what_trains(tmp_path):
    spec_all = load_grid(write(tmp_path, BASE))
    spec_one = load_grid(write(tmp_path, {**BASE, "targets": ["a"]}))
    fps, n = {"a": "f1", "b": "f2"}, {"a": 500, "b": 500}
    keys_all = [t.key for t in plan(spec_all, fps, n)]
    assert keys_all == [t.key for t in plan(spec_one, fps, n)]
    assert len(set(keys_all)) == 4
    # a different data fingerprint or learning rate changes the key
    assert plan(spec_all, {"a": "f9", "b": "f2"}, n)[0].key != keys_all[0]
    spec_lr = load_grid(write(tmp_path, {**BASE, "training": {**BASE["training"], "lr": 0.5}}))
    assert plan(spec_lr, fps, n)[0].key != keys_all[0]
    # the spec survives a JSON round trip with its key
    t = plan(spec_all, fps, n)[1]
    assert TrialSpec.from_json(t.to_json()).with_key().key == t.key


def test_delta_must_be_below_one_over_n(tmp_path):
    from privdom_ray.kinds import check_deltas

    spec = load_grid(write(tmp_path, {**BASE, "delta": 0.01}))
    with pytest.raises(GridError) as info:
        check_deltas(spec, {"a": 200, "b": 50})
    assert "1/N_train" in str(info.value) and "'a'" in str(info.value)


def test_shipped_grids_are_valid_apart_from_dataset_roots():
    """experiments/*.yaml stay in step with the grid schema (paper.yaml only lacks the data)."""
    load_grid(ROOT / "experiments" / "demo.yaml")
    with pytest.raises(GridError) as info:
        load_grid(ROOT / "experiments" / "paper.yaml")
    assert info.value.errors and all(".root:" in e for e in info.value.errors)
    assert len(info.value.errors) == 6  # five sites + the MIMIC pretraining domain


def test_large_delta_only_when_explicitly_allowed(tmp_path):
    from privdom_ray.kinds import check_deltas

    spec = load_grid(write(tmp_path, {**BASE, "delta": 0.01, "allow_large_delta": True}))
    check_deltas(spec, {"a": 200, "b": 50})  # accepted, as asked
    assert errors_of(tmp_path, allow_large_delta="yes") == [
        "allow_large_delta: 'yes' is not allowed; expected true or false"
    ]


def test_physical_batch_auto(tmp_path):
    spec = load_grid(
        write(tmp_path, {**BASE, "training": {**BASE["training"], "physical_batch": "auto"}})
    )
    assert spec.training.physical_batch == 0  # resolved per trial from the memory budget


def fed(**changes) -> dict:
    return {"name": "ab", "sites": ["a", "b"], "rounds": 2, **changes}


@pytest.mark.parametrize(
    ("federation", "needle"),
    [
        (fed(sites=["a", "zz"]), "federations[ab].sites: ['zz']"),
        (fed(sites=[]), "federations[ab].sites: []"),
        (fed(name="a"), "federations[a].name: 'a' is not allowed; expected a name used by no"),
        (fed(weights={"a": 1}), "federations[ab].weights: {'a': 1}"),
        (fed(weights={"a": 0, "b": 0}), "at least one site with a positive weight"),
        (fed(weights={"a": -1, "b": 1}), "to a number >= 0"),
        (fed(rounds=0), "federations[ab].rounds: 0 is not allowed; expected an integer >= 1"),
        (fed(local_epochs="x"), "federations[ab].local_epochs: 'x'"),
        (fed(round=3), "federations[ab].round: 3 is not allowed; expected one of"),
    ],
)
def test_bad_federations_are_reported(tmp_path, federation, needle):
    errors = errors_of(tmp_path, federations=[federation])
    assert any(needle in e for e in errors), errors


def test_federations_plan_one_trial_per_epsilon_and_seed_with_site_weights(tmp_path):
    spec = load_grid(write(tmp_path, {**BASE, "sources": [], "federations": [fed()]}))
    assert spec.sources == () and spec.trained_domains == ("a", "b")
    trials = plan(spec, {"a": "fa", "b": "fb"}, {"a": 300, "b": 100})
    assert [t.name for t in trials] == ["ab_eps1_seed0", "ab_epsinf_seed0"]
    dp, nondp = trials
    assert [(s.name, s.weight) for s in dp.federation.sites] == [("a", 300.0), ("b", 100.0)]
    assert dp.training.epochs == 2  # rounds x local epochs
    assert dp.delta == 1e-5 and all(s.delta == 0 for s in nondp.federation.sites)
    # the key depends on the sites' data and weights, not on how many run at once
    other = load_grid(
        write(tmp_path, {**BASE, "sources": [], "federations": [fed(parallel_sites=1)]})
    )
    assert plan(other, {"a": "fa", "b": "fb"}, {"a": 300, "b": 100})[0].key == dp.key
    assert plan(spec, {"a": "fa", "b": "fX"}, {"a": 300, "b": 100})[0].key != dp.key
    weighted = load_grid(
        write(tmp_path, {**BASE, "sources": [], "federations": [fed(weights={"a": 1, "b": 0})]})
    )
    assert plan(weighted, {"a": "fa", "b": "fb"}, {"a": 300, "b": 100})[0].key != dp.key
    assert TrialSpec.from_json(dp.to_json()) == dp  # round-trips through trial.json


def test_empty_sources_need_federations(tmp_path):
    errors = errors_of(tmp_path, sources=[])
    assert any("sources: [] is not allowed" in e for e in errors), errors


def test_federation_slots_split_a_cluster_smaller_than_the_federation():
    from privdom_ray.config import Federation, FederationConfig, Resources, Site
    from privdom_ray.kinds.federated import site_slots

    three = Federation(tuple(Site(n, "f", 1.0, 0.0) for n in "abc"), rounds=2, local_epochs=1)
    config = FederationConfig("abc", ("a", "b", "c"))
    assert site_slots(config, three, Resources(cpu=0.29), cap=10) == (3, 0.29, 0.0)
    slots, cpu, gpu = site_slots(config, three, Resources(cpu=1, gpu=0.5), cap=2)
    assert (slots, cpu, gpu) == (3, 0.6666, 0.3333)
    assert slots * cpu <= 2 and slots * gpu <= 1  # fits what the cluster has
    whole = FederationConfig("abc", ("a", "b", "c"), parallel_sites=2)
    assert site_slots(whole, three, Resources(cpu=1), cap=2) == (2, 1, 0)


def test_cells_run_longest_first_with_federations_ahead_of_single_sites(tmp_path):
    from privdom_ray.cell import Cell
    from privdom_ray.config import EvaluationConfig
    from privdom_ray.sweep import longest_first

    spec = load_grid(write(tmp_path, {**BASE, "federations": [fed()]}))
    n_train = {"a": 300, "b": 100}
    trials = plan(spec, {"a": "fa", "b": "fb"}, n_train)
    cells = [Cell(t, "", "", (), EvaluationConfig()) for t in trials]
    order = [c.spec.name for c in longest_first(cells, n_train)]
    # federation (400 images x 2 epochs) > DP a > non-DP a > DP b > non-DP b; DP costs more
    assert order == [
        "ab_eps1_seed0",
        "ab_epsinf_seed0",
        "a_eps1_seed0",
        "a_epsinf_seed0",
        "b_eps1_seed0",
        "b_epsinf_seed0",
    ]
    # equal work keeps the grid's order
    same = {"a": 100, "b": 100}
    singles = [c for c in cells if c.spec.federation is None]
    assert [c.spec.name for c in longest_first(singles, same)] == [
        "a_eps1_seed0",
        "b_eps1_seed0",
        "a_epsinf_seed0",
        "b_epsinf_seed0",
    ]


def test_grid_vocabulary_matches_the_registries_and_needs_no_torch():
    from privdom_ray import dpstep, grid
    from privdom_ray.models import MODELS

    assert set(grid.MODEL_NAMES) == set(MODELS)
    assert grid.DP_MODE_NAMES == dpstep.DP_MODES
    code = "import sys, privdom_ray.grid, privdom_ray.trainable; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # Tune's trial process and grid checks stay light
