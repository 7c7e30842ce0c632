"""``launch.py plan``: the cost of a grid before it runs (no Ray, no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import ROOT, launch
from cxr_fixtures import (
    write_chestxray14,
    write_chexpert,
    write_csv_site,
    write_mimic,
    write_padchest,
    write_vindr,
)


@pytest.mark.slow
def test_plan_of_the_paper_grid_on_fixture_folders(tmp_path):
    roots = {
        "MIMIC": write_mimic(tmp_path / "mimic"),
        "VDR": write_vindr(tmp_path / "vindr"),
        "C14": write_chestxray14(tmp_path / "c14"),
        "CPT": write_chexpert(tmp_path / "cpt"),
        "UKA": write_csv_site(tmp_path / "uka"),
        "PCH": write_padchest(tmp_path / "pch"),
    }
    grid = yaml.safe_load((ROOT / "experiments" / "paper.yaml").read_text())
    for d in grid["domains"]:
        d["root"] = str(roots[d["name"]])
    grid["output"] = str(tmp_path / "out")
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(grid))
    proc = launch("plan", "paper.yaml", "--images-per-s", "100", "60", "--slots", "8", cwd=tmp_path)
    out = proc.stdout
    for name in roots:
        assert f"| {name} |" in out
    # 5 sources x 5 epsilons x 3 seeds, plus the MIMIC pretraining; 75 models x 5 targets
    assert "trainings: 76 (1 pretrain, 75 standard); 0 already done, 76 to run" in out
    assert "evaluations: 375 (trained models x targets); 0 already done, 375 to run" in out
    assert "(512)" in out and "memory per trial:" in out and "on 8 slot(s)" in out
    assert "60.0 (DP) training images/s per slot (given)" in out
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_bad_grid_is_refused_by_plan_as_by_the_sweep(tmp_path):
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"domains": [], "output": "out"}))
    proc = launch("plan", "g.yaml", cwd=tmp_path, expect=2)
    assert "domains" in proc.stderr and not Path(tmp_path / "out").exists()
