"""A real tuned sweep (issue 26: Ray Tune, the coordinator trial, candidates as named Ray tasks)
trained once per test run and shared by test_tuning_sweep and test_tuning_redteam, which may
run on different xdist workers (:func:`helpers.shared.built_once`). Read-only: a test that
edits it copies it first (``shutil.copytree``), and exports go outside it.

The grid: sites a and b, source a at epsilon 2 and inf, a search over the learning rate,
the clipping norm and two run shapes (epochs 1 or 2), K geometric with E[K] = 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from helpers.grids import tiny_grid
from helpers.shared import built_once

MEAN_K = 2  # E[K] of the grid's run distribution (the report states it)
TUNING = {
    "space": {"lr": {"loguniform": [1.0e-4, 3.0e-3]}, "max_grad_norm": {"choice": [0.5, 1.5]},
              "epochs": {"choice": [1, 2]}},  # two run shapes: one candidate entry each
    "runs": {"distribution": "geometric", "mean": MEAN_K},
}  # fmt: skip

_BUILT: dict[str, Path] = {}  # without xdist: once per session, not once per module


def tuned_grid() -> dict[str, Any]:
    grid = tiny_grid("tuned", ["a", "b"], n_patients=50, epochs=2, image_size=16,
                     max_failures=0, epsilons=(2, "inf"))  # fmt: skip
    grid.update(sources=["a"], model="smallcnn", tuning=TUNING)
    return grid


def _build(root: Path) -> dict[str, str]:
    from conftest import launch  # a real ``launch.py --grid`` run, as a user starts it

    (root / "grid.yaml").write_text(yaml.safe_dump(tuned_grid()))
    launch("--grid", "grid.yaml", cwd=root, timeout=1200)
    return {"root": str(root)}


def tuned_sweep(tmp_path_factory: Any, worker_id: str) -> Path:
    """The folder holding ``grid.yaml`` and the finished sweep's ``out``."""
    if worker_id == "master" and "root" in _BUILT:
        return _BUILT["root"]
    root = Path(built_once(tmp_path_factory, worker_id, "tuned", _build)["root"])
    _BUILT["root"] = root
    return root
