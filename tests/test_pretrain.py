"""Two-stage sweeps: public pretraining first, then private fine-tuning from its weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import launch_here
from helpers import folders
from helpers.grids import synthetic_domain

from privdom_ray.checks import check_weights_file
from privdom_ray.config import GridError
from privdom_ray.grid import load_grid
from privdom_ray.kinds import plan_trials as plan
from privdom_ray.models import build_model


def domains(n: int = 40) -> list[dict]:
    return [
        synthetic_domain("pub", "d", n),
        synthetic_domain("a", "a", n),
        synthetic_domain("b", "b", n),
    ]


GRID = {
    "name": "pre",
    "output": "out",
    "domains": domains(),
    "pretrain": {"domain": "pub", "epochs": 1, "logical_batch": 16, "physical_batch": 16},
    "epsilons": [2],
    "seeds": [0],
    "training": {"init": "pretrain", "epochs": 1, "logical_batch": 16, "physical_batch": 16},
    "preprocessing": {"image_size": 16},
    "evaluation": {"n_boot": 10, "min_positives": 1, "min_negatives": 1},  # tiny test splits
    "ray": {"num_cpus": 2},
}


def write(tmp_path: Path, grid: dict, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(grid))
    return path


def test_pretraining_domain_is_public_and_keys_follow_it(tmp_path):
    spec = load_grid(write(tmp_path, GRID))
    assert spec.sources == spec.targets == ("a", "b")  # not trained on privately, not a target
    fps, n = {"pub": "p1", "a": "f1", "b": "f2"}, {"a": 100, "b": 100}
    trials = plan(spec, fps, n)
    assert trials[0].variant == "pretrain" and math.isinf(trials[0].epsilon)
    assert all(t.init == f"pretrain:{trials[0].key}" for t in trials[1:])
    longer = load_grid(
        write(tmp_path, {**GRID, "pretrain": {**GRID["pretrain"], "epochs": 2}}, "g2.yaml")
    )
    assert [t.key for t in plan(longer, fps, n)][1:] != [t.key for t in trials][1:]
    scratch = load_grid(
        write(tmp_path, {**GRID, "training": {**GRID["training"], "init": "scratch"}}, "g3.yaml")
    )
    assert {t.init for t in plan(scratch, fps, n)[1:]} == {"scratch"}


def test_init_pretrain_needs_a_pretrain_section(tmp_path):
    grid = {k: v for k, v in GRID.items() if k != "pretrain"}
    with pytest.raises(GridError) as info:
        load_grid(write(tmp_path, grid))
    assert any(e.startswith("training.init: 'pretrain'") for e in info.value.errors)


def test_weights_file_checks(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(build_model("resnet9").state_dict(), good)
    assert len(check_weights_file(good, "resnet9")) == 16

    cases = {
        "garbage.pt": (b"not a torch file", "is not a readable weights file"),
        "resnet18.pt": (None, "does not fit model 'resnet9'"),
        "list.pt": ([torch.zeros(2)], "must hold a state_dict"),
    }
    for name, (content, needle) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is None:
            torch.save(build_model("resnet18").state_dict(), path)
        else:
            torch.save(content, path)
        with pytest.raises(GridError) as info:
            check_weights_file(path, "resnet9")
        assert needle in str(info.value) and name in str(info.value)

    missing = {**GRID, "training": {**GRID["training"], "init": "nowhere.pt"}}
    with pytest.raises(GridError) as info:
        load_grid(write(tmp_path, missing))
    assert "training.init: 'nowhere.pt'" in str(info.value)


def test_bad_weights_file_stops_the_cli_before_any_trial(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 10)
    grid = {**GRID, "training": {**GRID["training"], "init": "bad.pt"}}
    write(tmp_path, {k: v for k, v in grid.items() if k != "pretrain"})
    proc = launch_here("--grid", "grid.yaml", cwd=tmp_path, expect=2)  # main(), in-process
    assert "bad.pt" in proc.stderr and "readable weights" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
def test_pretraining_runs_once_before_its_dependents(tmp_path):
    """Both sweeps run launch.main in-process (Ray still trains in its own workers): nothing
    here needs a driver in a separate process."""
    write(tmp_path, GRID)
    out = launch_here("--grid", "grid.yaml", cwd=tmp_path).stdout
    assert out.index("running 1 pretraining") < out.index("running 2 cells")
    trials = folders.trained_keys(tmp_path / "out")
    pre = [k for k in trials if folders.info(tmp_path / "out", k)["spec"]["variant"] == "pretrain"]
    assert len(pre) == 1 and len(trials) == 3
    finished = folders.commit_stamps(tmp_path / "out")
    for key in trials:
        if key == pre[0]:
            continue
        assert folders.ledger(tmp_path / "out", key)["initialization"] == f"pretrain:{pre[0]}"
        assert finished[key] > finished[pre[0]]

    # a re-run with one more epsilon reuses the pretraining and trains only the new cells
    write(tmp_path, {**GRID, "epsilons": [2, "inf"]})
    second = launch_here("--grid", "grid.yaml", cwd=tmp_path).stdout
    assert "running 2 cells" in second and "running 1 pretraining" not in second
    assert folders.commit_stamps(tmp_path / "out")[pre[0]] == finished[pre[0]]
