"""One real sweep, trained through ``launch.py`` once per test run and read by test_sweep and
test_federated_sweep: two sources (a, b) at epsilon 1 and inf, their clip-only controls, the
audit twin of a at epsilon 1, a federation ``ab`` of sites a and b at both epsilons, and a
held-out target c; 16-pixel images, one epoch, with the Ray dashboard on (as a user gets it).

The build is shared between the xdist workers (:func:`helpers.shared.built_once`) and between
the two modules in one process, so it is read-only: a test that changes it (a rerun, a tampered
ledger, an export) works on :func:`copy_of` it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from helpers.grids import synthetic_domain
from helpers.shared import built_once

GRID: dict[str, Any] = {
    "name": "tiny",
    "output": "out",
    "domains": [synthetic_domain(s, s) for s in "abc"],
    "sources": ["a", "b"],  # c: a held-out target of every model
    "federations": [{"name": "ab", "sites": ["a", "b"], "rounds": 2, "local_epochs": 1}],
    "epsilons": [1, "inf"],
    "controls": ["clip_only"],
    "seeds": [0],
    "training": {"epochs": 1, "logical_batch": 32, "physical_batch": 16},
    "preprocessing": {"image_size": 16},
    "evaluation": {"n_boot": 10, "min_positives": 1, "min_negatives": 1},  # tiny test splits
    "ray": {"num_cpus": 2},
    "audit": {"canaries": 200, "sources": ["a"], "epsilons": [1]},  # one audit twin
}


def single_site(grid: dict[str, Any]) -> dict[str, Any]:
    """``grid`` without its federations (a rerun that adds an epsilon trains no federation)."""
    return {k: v for k, v in grid.items() if k != "federations"}


@dataclass(frozen=True)
class Sweep:
    work: Path  # the grid file, data/ and out/ (read-only: copy it to change it)
    stdout: str  # what ``launch.py --grid grid.yaml`` printed

    @property
    def out(self) -> Path:
        return self.work / "out"


def _build(work: Path) -> dict[str, str]:
    from conftest import launch

    (work / "grid.yaml").write_text(yaml.safe_dump(GRID))
    # with the Ray dashboard, as a user gets it (conftest turns it off for the other sweeps)
    proc = launch("--grid", "grid.yaml", cwd=work, env={"PRIVDOM_RAY_DASHBOARD": "1"})
    return {"work": str(work), "stdout": proc.stdout}


_BUILT: dict[str, dict[str, str]] = {}  # this process's build, by the run's temporary root


def trained_sweep(tmp_path_factory: Any, worker_id: str) -> Sweep:
    """The shared sweep, trained once per test run (per process without xdist)."""
    root = str(tmp_path_factory.getbasetemp())
    if root not in _BUILT:
        _BUILT[root] = built_once(tmp_path_factory, worker_id, "tiny-sweep", _build)
    built = _BUILT[root]
    return Sweep(Path(built["work"]), built["stdout"])


def copy_of(sweep: Sweep, dest: Path) -> Sweep:
    """A private copy of the sweep's folder (data, grid, output; links kept as links) to
    change."""
    shutil.copytree(sweep.work, dest, symlinks=True)
    return Sweep(dest, sweep.stdout)
