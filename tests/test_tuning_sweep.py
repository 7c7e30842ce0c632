"""A tuned grid through the real sweep (Ray Tune, the coordinator trial, candidates as named
Ray tasks), then ``audit`` and ``export`` from the command line (issue 26)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from conftest import launch_here
from helpers.tuned import MEAN_K, tuned_sweep

from privdom_ray.selection.tuning import TuningPlan

pytestmark = pytest.mark.slow  # a real sweep: about 60 s on the shared 2-core machine


def test_a_tuned_grid_trains_audits_and_exports_with_its_rdp_guarantee(
    tmp_path: Path, tmp_path_factory, worker_id
):
    """The sweep is helpers.tuned's, shared with test_tuning_redteam (read-only: the export
    goes to this test's folder); ``audit`` and ``export`` run launch.main in-process."""
    out = tuned_sweep(tmp_path_factory, worker_id) / "out"
    table = pd.read_parquet(out / "transfer.parquet")
    assert set(table["variant"]) == {"standard"}  # a tuned cell is the grid's cell
    assert table["train_seconds"].isna().all()  # the cell's wall time would tell K
    for name in ("report.md", "transfer.parquet"):
        assert not re.search(rb"cand\d\d", (out / name).read_bytes())  # no candidate names
    text = (out / "report.md").read_text()  # the tuning section: the search and E[K], no K
    assert "Honest tuning" in text and "K drawn would void" in text
    assert f"**E[K] = {MEAN_K}**" in text
    assert "DP releases on the source's validation split" in text
    audit = launch_here("audit", str(out), cwd=tmp_path)
    assert "0 problem(s)" in audit.stdout and " rdp " in audit.stdout
    ledgers = [json.loads(p.read_text()) for p in out.glob("trials/*/ledger.json")]
    (dp,) = [d for d in ledgers if d["accountant"] == "rdp"]
    assert dp["selection"]["runs"]["distribution"] == "truncated_negative_binomial"
    assert 0 < dp["epsilon_spent"] <= 2.0
    # export composes the tuned bound (RDP) with the site's other releases
    launch_here("export", str(out), "--to", "shared", cwd=tmp_path)
    shared = tmp_path / "shared"
    sites = pd.read_parquet(shared / "guarantees.parquet").set_index("training_site")
    own = TuningPlan.from_dict(dp["selection"]).epsilon_total  # recomputed, not read
    assert sites.loc["a", "accountant"] == "rdp" and sites.loc["a", "dp_models"] == 1
    assert own <= sites.loc["a", "epsilon"] <= 2.0 * (1 + 1e-9)
    rows = pd.read_parquet(shared / "transfer.parquet")
    dp_rows = rows[rows["epsilon_target"] == 2]
    assert dp_rows["guarantee"].str.endswith("(RDP)").all()
    assert dp_rows["epsilon_release"].iloc[0] == pytest.approx(own, rel=1e-9)
    assert "Papernot-Steinke" in (shared / "PRIVACY.md").read_text()
    cards = [json.loads(p.read_text()) for p in shared.rglob("card.json")]
    (card,) = [c for c in cards if c["accountant"] == "rdp"]  # the tuned DP model's card
    assert "inside this model's epsilon" in card["youden_thresholds"]["privacy"]
    assert "inside this model's epsilon" in card["selected_epoch"]["privacy"]
    assert card["training_sets"]["a"]["accountant"] == "rdp"
    for path in shared.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".parquet"):
            data = path.read_bytes()  # K, candidates and their results stay home
            assert not re.search(rb"cand\d\d", data) and b"tuning_results" not in data, path
