"""The output folder's names and its typed plan (``privdom_ray.folder``).

A plan written by any version must still be read (the legacy fixture holds only targets; a
plan of today's format holds cells, run id and caches), and no module of the package spells a
top-level file name of the output folder itself: they all name paths through ``folder``.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from privdom_ray import folder
from privdom_ray.folder import Plan, PlanDamaged, PlannedCell, PlannedTarget, SweepFolder
from privdom_ray.stats import results

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "fixtures" / "legacy_output"

# plan.json exactly as sweep.prepare wrote it at d22e33d (before the typed Plan)
MAIN_PLAN = {
    "sweep": "demo",
    "run_id": "20261203-173600-42",
    "cells": [
        {"key": "aaaa1111", "name": "site_a_eps1_seed0", "evaluated": True},
        {"key": "bbbb2222", "name": "site_a_eps1_seed0_audit", "evaluated": False},
    ],
    "targets": [{"name": "site_a", "fingerprint": "fp1", "data": "b2:abc"}],
    "caches": {"site_a": "cache/site_a-123", "site_b": "/elsewhere/site_b-456"},
}


def test_legacy_plan_is_read(tmp_path):
    out = tmp_path / "out"
    shutil.copytree(LEGACY, out)
    plan = SweepFolder(out).read_plan()
    assert plan is not None
    assert plan.targets == (PlannedTarget("a", "fpa", ""),)
    assert plan.cells == () and dict(plan.caches) == {} and plan.sweep == ""
    assert results.planned_targets(out) == [PlannedTarget("a", "fpa", "")]


def test_plan_of_todays_format_is_read_and_written_back_the_same(tmp_path):
    (tmp_path / folder.PLAN).write_text(json.dumps(MAIN_PLAN))
    out = SweepFolder(tmp_path)
    plan = out.read_plan()
    assert plan is not None and plan.sweep == "demo" and plan.run_id == MAIN_PLAN["run_id"]
    assert plan.cells[1] == PlannedCell("bbbb2222", "site_a_eps1_seed0_audit", False)
    assert plan.targets == (PlannedTarget("site_a", "fp1", "b2:abc"),)
    assert plan.cache_paths(tmp_path) == {
        "site_a": tmp_path / "cache" / "site_a-123",
        "site_b": Path("/elsewhere/site_b-456"),  # an absolute entry stays absolute
    }
    out.plan.unlink()
    out.write_plan(plan)
    assert json.loads(out.plan.read_text()) == MAIN_PLAN
    assert Plan.read(out.plan) == plan


def test_no_plan_and_a_damaged_plan(tmp_path):
    out = SweepFolder(tmp_path)
    assert out.read_plan() is None and results.planned_targets(tmp_path) == []
    out.plan.write_text('{"targets": [{"name": "a"}]}')  # no fingerprint
    with pytest.raises(PlanDamaged):
        out.read_plan()
    out.plan.write_text("{not json")
    with pytest.raises(PlanDamaged):
        out.read_plan()


def test_relative_paths_inside_the_folder_only(tmp_path):
    out = SweepFolder(tmp_path)
    assert out.relative(tmp_path / "cache" / "x") == "cache/x"
    assert out.relative(Path("/elsewhere/x")) == "/elsewhere/x"


def _names() -> set[str]:
    return {v for k, v in vars(folder).items() if k.isupper() and isinstance(v, str)}


def test_no_module_spells_an_output_folder_name():
    """The names are folder.py's: a string literal equal to one elsewhere is a second spelling
    (docstrings and messages may mention them; they are not equal to the bare name)."""
    names = _names() - {folder.CACHE, folder.MODELS, folder.TRIALS}  # also common words
    found = []
    for path in sorted((ROOT / "privdom_ray").rglob("*.py")):
        if path.name == "folder.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "spell these through privdom_ray.folder:\n" + "\n".join(found)
