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
    # the fixture folders hold 20-55 training images: a batch of 128 would be q > 1 (refused)
    grid["training"]["logical_batch"] = grid["pretrain"]["logical_batch"] = 16
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(grid))
    proc = launch("plan", "paper.yaml", "--images-per-s", "100", "60", "--slots", "8",
                  "--variance", "0.5", cwd=tmp_path)  # fmt: skip
    out = proc.stdout
    assert "needs 10,705 test patients per site (per-patient variance 0.5, given; normal quantiles)" in out
    for name in roots:
        assert f"| {name} |" in out
    # 5 sources x 5 epsilons x 3 seeds, plus the MIMIC pretraining and one audit twin per
    # epsilon (audit.cells: per_epsilon, not one per cell: 75 more); 75 models x 5 targets
    assert "trainings: 81 (5 audit, 1 pretrain, 75 standard); 0 already done, 81 to run" in out
    assert ("audit twins: 5 of 75 audit cells (audit.cells: per_epsilon, cells_seed 0): VDR "
            "ε=10 seed 2; C14 ε=1 seed 2; CPT ε=3 seed 0; UKA ε=inf seed 1; PCH ε=6 seed 1; 70 "
            "not audited") in out  # fmt: skip
    assert "evaluations: 375 (trained models x targets); 0 already done, 375 to run" in out
    assert "(512)" in out and "memory per trial:" in out and "on 8 slot(s)" in out
    assert "60.0 (DP) training images/s per slot (given)" in out
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_bad_grid_is_refused_by_plan_as_by_the_sweep(tmp_path):
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"domains": [], "output": "out"}))
    proc = launch("plan", "g.yaml", cwd=tmp_path, expect=2)
    assert "domains" in proc.stderr and not Path(tmp_path / "out").exists()


def test_plan_sizes_the_test_sets_for_the_primary_endpoint(tmp_path):
    """The test patients ``plan`` asks for give the stated power: simulated test sets of that
    size, inferred by the tables' own t rule, confirm equivalence that often when DP changes
    the drop by exactly 0; the per-patient variance is read from a finished sweep."""
    import math

    import numpy as np
    from helpers.trials import EV, build_output
    from scipy import stats

    from privdom_ray import costs
    from privdom_ray.config import EvaluationConfig
    from privdom_ray.stats import comparisons, inference

    n = costs.units_needed(0.02, 0.5, 0.05, 0.8)  # no df known: the normal formula
    assert n == math.ceil(0.5 * (1.6448536 + 1.2815516) ** 2 / 0.02**2)
    assert costs.power_at(n, 0.02, 0.5, 0.05) == pytest.approx(0.8, abs=0.002)
    # with a pilot's df per patient the t quantiles at n's df: a small df needs more patients
    # (n = 70 at df/patient 0.05 is df 2.5: the normal n gave power 0.70 there)
    small = costs.units_needed(0.02, 0.005, 0.05, 0.8)
    n_t = costs.units_needed(0.02, 0.005, 0.05, 0.8, df_per_unit=0.05)
    assert n_t > small * 1.2 and costs.power_at(small, 0.02, 0.005, 0.05, 0.05) < 0.75
    assert costs.power_at(n_t, 0.02, 0.005, 0.05, 0.05) >= 0.8
    assert costs.power_at(n_t - 1, 0.02, 0.005, 0.05, 0.05) < 0.8
    rng = np.random.default_rng(0)
    for v, d_per, size in ((0.5, math.nan, n), (0.005, 0.05, n_t)):
        se, d = math.sqrt(v / size), costs.df_at(size, d_per)
        d_sim = size - 1.0 if math.isinf(d) else d
        hits = sum(  # an estimated variance with d df, as the tables' jackknife gives
            inference.infer_t(rng.normal(0.0, se), se * se * rng.chisquare(d_sim) / d_sim,
                              d_sim, ci=0.95, margin=0.02).p_tost <= 0.05
            for _ in range(4000)
        )  # fmt: skip
        assert hits / 4000 >= 0.8 - 0.02, (v, d_per, hits)
    assert costs.power_at(n // 4, 0.02, 0.5, 0.05) < 0.2  # a quarter of it is hopeless
    with pytest.raises(ValueError):
        costs.units_needed(0.02, 0.5, 0.05, 1.5)

    with pytest.raises(FileNotFoundError, match="--variance"):
        costs.unit_variance_from(tmp_path)
    keys = build_output(tmp_path, n=150)
    tables = comparisons.compute_all(tmp_path, keys, EV)
    comparisons.write_all(tmp_path, tables)
    uv = costs.unit_variance_from(tmp_path)
    rows = tables.comparisons[tables.comparisons["endpoint"] == "primary"]
    per = [(r.tost_half_width / inference._t_ppf(0.95, r.df)) ** 2 * r.n_patients
           for r in rows.itertuples()]  # fmt: skip
    assert uv.value == pytest.approx(float(np.mean(per))) and "3 primary row(s)" in uv.source
    assert uv.df_per_unit == pytest.approx(float(np.mean((rows.df + 1) / rows.n_patients)))
    assert set(uv.rarer_share) == {"cardiomegaly", "pleural_effusion", "pneumonia",
                                   "atelectasis", "healthy"}  # fmt: skip
    assert all(0 < s <= 0.5 for s in uv.rarer_share.values())
    text = costs.render_sample_size(EvaluationConfig(), {"a": 150, "b": 20_000}, uv, 0.8)
    need = costs.units_needed(0.02, uv.value, 0.05, 0.8, uv.df_per_unit)
    floor = costs.label_floor(uv.rarer_share, 10)
    assert f"needs {max(need, floor):,} test patients per site" in text
    assert "a 150 (power 0." in text and "t quantiles" in text
    # the label floor: the rarest label at 4% keeps >= 10 patients with prob. >= 1 - 0.05/5
    shares = {"rare": 0.04, "common": 0.3}
    f = costs.label_floor(shares, 10, labels=5)
    assert stats.binom.cdf(9, f, 0.04) <= 0.01 < stats.binom.cdf(9, f - 1, 0.04)
    few, f = costs.UnitVariance(0.0036, "given", 0.07, shares), costs.label_floor(shares, 10)
    text = costs.render_sample_size(EvaluationConfig(), {"a": 77}, few, 0.8)
    assert f"needs {f:,} test patients per site (the label floor decides" in text
    assert "a 77 (power 0." in text and f"below the label floor {f:,})" in text
    assert "--variance-from" in costs.render_sample_size(EvaluationConfig(), {}, None, 0.8)
    old = tables.comparisons.drop(columns=["df"])
    old.to_parquet(tmp_path / "comparisons.parquet")
    with pytest.raises(LookupError, match="before the jackknife"):
        costs.unit_variance_from(tmp_path)
