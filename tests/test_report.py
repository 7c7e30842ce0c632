"""report.write_report on real sweep outputs built with the results helpers (no mocks)."""

from __future__ import annotations

import math
import re

import pytest
from PIL import Image
from test_comparisons import build_output, compute

from privdom_ray import comparisons, report, results


def _sweep(tmp_path, **kw):
    """A finished output folder: trials, transfer.parquet and comparisons.parquet."""
    keys = build_output(tmp_path, **kw)
    _, df = results.aggregate(tmp_path, keys, "test-sweep")
    with pytest.warns(comparisons.ComparisonWarning) if kw.get("skip") else _nothing():
        comparisons.write(tmp_path, compute(tmp_path, keys))
    return df


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _matrix_rows(md: str, heading_start: str) -> dict[str, list[str]]:
    """The rows of the first markdown table after the heading starting with heading_start."""
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(heading_start))
    rows = {}
    for line in lines[i + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("| **"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("*")] = cells[1:]
    return rows


def test_report_has_matrices_drop_table_fairness_and_figures(tmp_path):
    df = _sweep(tmp_path, skip=(("b", 1.0, 0, "a"),))  # b (eps 1) never finished on a
    md = report.write_report(tmp_path)
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == md
    assert not list(tmp_path.glob(".report.md.*"))

    # (1) one matrix per epsilon with CIs; the missing cell is "—", not dropped
    assert "## 1. Transfer matrices" in md
    dp = _matrix_rows(md, "### ε = 1 ")
    nondp = _matrix_rows(md, "### ε = inf (no DP)")
    assert set(dp) == set(nondp) == {"a", "b", "c"}
    assert dp["b"][0] == report.MISSING  # b -> a at eps 1
    assert report.MISSING not in nondp["b"][0]
    auc_aa = df[
        (df["source"] == "a")
        & (df["target"] == "a")
        & (df["epsilon_target"] == 1.0)
        & (df["label"] == "macro")
        & (df["subgroup"] == "all")
    ].iloc[0]
    expect = f"{auc_aa['auc']:.3f} [{auc_aa['auc_lo']:.2f}, {auc_aa['auc_hi']:.2f}]"
    assert dp["a"][0] == expect
    assert "ε spent 0.99 by the prv accountant" in md

    # (2) the drop table: every test site, non-DP vs DP drops and p-values
    assert "## 2. AUC drop" in md
    drop_rows = _matrix_rows(md, "### ε = 1 vs non-DP")
    assert set(drop_rows) == {"a", "b", "c"}
    for site in ("b", "c"):
        assert all(c != report.MISSING for c in drop_rows[site])  # complete sites
        assert re.fullmatch(r"<0\.001|[01]\.\d+", drop_rows[site][6])  # p (same eps)
    assert "AUC drop, DP vs non-DP" in md and ", P = " in md

    # (3) fairness and (4) paired deltas
    assert "## 3. Fairness" in md and "sex=F" in md and "age=[40,70)" in md
    assert "## 4. Paired ΔAUC" in md and "a → a (on-domain)" in md
    assert "| b → a | — | — | — | — | — |" in md  # the unfinished pair is shown, as missing

    # figures: one heatmap per epsilon, AUC vs epsilon, subgroup bars, drop bars
    names = {
        "transfer_matrix_eps-1.png",
        "transfer_matrix_eps-inf.png",
        "auc_vs_epsilon.png",
        "subgroup_auc.png",
        "auc_drop.png",
    }
    assert {p.name for p in (tmp_path / "figures").iterdir()} == names
    for name in names:
        path = tmp_path / "figures" / name
        assert path.stat().st_size > 0 and f"(figures/{name})" in md
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_report_with_several_seeds_uses_means_and_t_tests(tmp_path):
    _sweep(tmp_path, domains=("a", "b"), seeds=(0, 1), n=120)
    md = report.write_report(tmp_path, figures=False)
    assert not (tmp_path / "figures").exists()
    assert "mean macro AUC over the 2 seeds" in md
    assert "paired Student t tests across seeds" in md
    dp = _matrix_rows(md, "### ε = 1 ")
    assert re.fullmatch(r"\d\.\d{3} \[\d\.\d{2}, \d\.\d{2}\] ±\d\.\d{3}", dp["a"][0])
    assert re.search(
        r"\| a → a \(on-domain\) \| [\d.]+ \| [\d.]+ \| [+-][\d.]+ ±[\d.]+ \(2 seeds\)", md
    )


def test_report_without_comparisons_or_dp(tmp_path):
    keys = build_output(tmp_path, domains=("a", "b"), epsilons=(math.inf,), n=100)
    results.aggregate(tmp_path, keys, "nondp-only")
    md = report.write_report(tmp_path)
    assert "comparisons.parquet: not found" in md
    assert "No DP trials" in md and "### ε = inf (no DP)" in md
    assert (tmp_path / "figures" / "transfer_matrix_eps-inf.png").is_file()
    assert not (tmp_path / "figures" / "auc_drop.png").exists()
    # the console summary keeps working on the same table
    assert "### epsilon = inf (no DP)" in report.transfer_matrices_text(results.load(tmp_path))


def test_report_on_empty_table_and_missing_table(tmp_path):
    with pytest.raises(FileNotFoundError):
        report.write_report(tmp_path)
    results.aggregate(tmp_path, [], "empty")
    md = report.write_report(tmp_path)
    assert "transfer table is empty" in md
