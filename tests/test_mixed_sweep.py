"""A mixed sweep: a synthetic domain plus two domains in real dataset formats, one with broken images."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from conftest import launch_here
from cxr_fixtures import BROKEN_MISSING, BROKEN_TRUNCATED, write_chexpert, write_padchest

pytestmark = pytest.mark.ray


def test_mixed_sweep_runs_end_to_end_and_counts_broken_images(tmp_path):
    cpt = write_chexpert(tmp_path / "chexpert", broken=True)
    pch = write_padchest(tmp_path / "padchest")
    grid = {
        "name": "mixed",
        "output": "out",
        "domains": [
            {
                "name": "syn",
                "kind": "synthetic",
                "root": "syn",
                "options": {"site": "a", "n_patients": 40},
            },
            {"name": "cpt", "kind": "chexpert", "root": str(cpt)},
            {"name": "pch", "kind": "padchest", "root": str(pch)},
        ],
        "sources": ["syn", "cpt"],
        "epsilons": ["inf"],
        "seeds": [0],
        "training": {"epochs": 1, "logical_batch": 16, "physical_batch": 16},
        "preprocessing": {"image_size": 16},
        "evaluation": {"n_boot": 10, "min_positives": 1, "min_negatives": 1},  # tiny test splits
        "ray": {"num_cpus": 2},
    }
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    proc = launch_here("--grid", "grid.yaml", cwd=tmp_path)  # main(), in-process; Ray trains
    broken = BROKEN_MISSING + BROKEN_TRUNCATED
    assert f"[cache] cpt: skipped {broken} unreadable image(s)" in proc.stdout
    skipped = pd.read_csv(next((tmp_path / "out" / "cache").glob("cpt-*")) / "skipped.csv")
    assert len(skipped) == broken and skipped["error"].str.len().gt(0).all()

    df = pd.read_parquet(tmp_path / "out" / "transfer.parquet")
    macro = df[(df["label"] == "macro") & (df["subgroup"] == "all")]
    assert set(zip(macro["source"], macro["target"], strict=True)) == {
        (s, t) for s in ("syn", "cpt") for t in ("syn", "cpt", "pch")
    }
