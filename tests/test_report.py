"""report.write_report on real aggregate tables built from synthetic predictions (no mocks).

The trial folders come from conftest's builder (through the trial store); transfer.parquet is
aggregated from them by results.aggregate, and comparisons.parquet / reliability.parquet are
computed by comparisons.compute_all on the same folders.
"""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest
from helpers.trials import EV, build_output
from PIL import Image

from privdom_ray import report
from privdom_ray.folder import COMPARISONS, RELIABILITY
from privdom_ray.manifest import LABELS
from privdom_ray.report.formatting import MISSING, _p
from privdom_ray.report.sections import Section
from privdom_ray.report.view import ReportView
from privdom_ray.stats import comparisons, quantities, results
from privdom_ray.stats.study import study_of


def write_transfer(output, keys, sweep: str = "test-sweep") -> pd.DataFrame:
    """transfer.parquet of the finished trials, by the sweep's own aggregator."""
    _, df = results.aggregate(output, keys, sweep)
    return results.load(output)


def _sweep(tmp_path, **kw):
    """A finished output folder: trials, transfer.parquet, comparisons and reliability."""
    keys = build_output(tmp_path, **kw)
    df = write_transfer(tmp_path, keys)
    if kw.get("skip"):
        with pytest.warns(quantities.ComparisonWarning):
            tables = comparisons.compute_all(tmp_path, keys, EV)
    else:
        tables = comparisons.compute_all(tmp_path, keys, EV)
    comparisons.write_all(tmp_path, tables)
    return df, tables.comparisons


def _rows(md: str, heading_start: str, after: str = "") -> dict[str, list[str]]:
    """The body rows of the first markdown table after the heading starting with
    heading_start (the first one after the heading ``after``), keyed by their first cell
    (bold marks stripped)."""
    lines = md.splitlines()
    i0 = next(k for k, line in enumerate(lines) if line.startswith(after)) if after else 0
    i = next(k for k, line in enumerate(lines) if k >= i0 and line.startswith(heading_start))
    rows, body = {}, False
    for line in lines[i + 1 :]:
        if line.startswith("#") or (body and not line.startswith("|")):
            break
        if line.startswith("|---"):
            body = True
        elif body:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault(cells[0].strip("*"), cells[1:])
    return rows


def _one(df: pd.DataFrame, **where) -> dict:
    sel = df
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, (where, len(sel))
    return sel.iloc[0].to_dict()


def _val(x: float, lo: float, hi: float, digits: int = 3, sign: bool = False) -> str:
    f = f"{{:+.{digits}f}}" if sign else f"{{:.{digits}f}}"
    return f"{f.format(x)} [{f.format(lo)}, {f.format(hi)}]"


def test_report_sections_and_numbers_match_the_tables(tmp_path):
    df, cmp = _sweep(tmp_path, skip=(("b", 1.0, 0, "a"),))  # b (eps 1) never finished on a
    md = report.write_report(tmp_path)
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == md
    assert not list(tmp_path.glob(".report.md.*"))
    # every registered section with content, numbered in order (no controls and no audit
    # twins here: no "other", no "audit"; the audit section is tested in test_audit_twin.py;
    # no tuned cells: no "tuning", tested in test_tuning.py)
    view = ReportView.load(tmp_path)
    every = report.sections()  # the report's own and the kinds' (the audit twins': "audit")
    shown = [s for s in every if s.render(view).strip()]
    assert [s.key for s in every if s not in shown] == ["tuning", "other", "audit"]
    heading = {s.key: f"## {k}. {s.title}" for k, s in enumerate(shown, 1)}
    positions = [md.index(h) for h in heading.values()]
    assert positions == sorted(positions)

    # headline: the primary endpoint per test site, as in comparisons.parquet
    head = _rows(md, "### Primary: ε = 1 vs non-DP")
    assert set(head) == {"a", "b", "c"}
    for t in ("b", "c"):
        r = _one(cmp, endpoint="primary", target=t)
        assert r["quantity"] == "drop"  # each side's own drop
        assert head[t][0] == _val(r["value_nondp"], r["value_nondp_lo"], r["value_nondp_hi"])
        assert head[t][1] == _val(r["value_dp"], r["value_dp_lo"], r["value_dp_hi"])
        assert head[t][2] == _val(r["delta"], r["delta_lo"], r["delta_hi"], sign=True)
        assert head[t][3] == f"[{r['tost_lo']:+.3f}, {r['tost_hi']:+.3f}]"
        assert head[t][4] == f"{r['margin_confirmable']:.3f} / {r['tost_half_width']:.3f}"
        holm = [float(v) for v in head[t][5].split(" / ")]  # the p's the verdict read
        assert holm == pytest.approx([r["p_tost_holm"], r["p_value_holm"], r["p_noninf_holm"]],
                                     abs=0.006)  # fmt: skip
        assert head[t][6].startswith(r["verdict"].replace("±m", "±0.02"))
        assert head[t][6].endswith("(1 seed: these trained models only)")  # one seed here
        on = _one(cmp, quantity="on_domain_auc", target=t, epsilon=1.0, label="macro",
                  subgroup="all")  # fmt: skip
        off = _one(cmp, quantity="off_domain_auc", target=t, epsilon=1.0, label="macro",
                   subgroup="all")  # fmt: skip
        assert head[t][7] == _val(on["delta"], on["delta_lo"], on["delta_hi"], sign=True)
        assert head[t][8] == _val(off["delta"], off["delta_lo"], off["delta_hi"], sign=True)
        assert head[t][9] == f"{r['n_patients']} patients"
    assert head["a"][2] == MISSING  # the DP model of b never reached a: no mean off
    # "every site at once" needs every site: a has no primary row
    assert ("Every site at once: no verdict (no primary estimate at test site(s) a; the claim "
            "needs every site)") in md
    assert _one(cmp, endpoint="primary", target="b")["n_sites"] == 3
    assert "intersection-union" in md and "Holm-adjusted across the test sites" in md

    # test sets: images, patients and prevalence from the transfer table
    sets = _rows(md, "Positives per label", after=heading["test_sets"])
    row = _one(df, trial_key=df["trial_key"].iloc[0], target="a", label="cardiomegaly",
               subgroup="all")  # fmt: skip
    assert sets["a"][3].startswith(f"{row['n_pos']} ({row['n_pos'] / row['n']:.0%})")

    # macro matrices with CIs; the missing cell is "—", not dropped
    dp = _rows(md, "### ε = 1 — ")
    assert set(dp) == {"a", "b", "c"} and dp["b"][0] == MISSING
    aa = _one(df, source="a", target="a", epsilon_target=1.0, label="macro", subgroup="all")
    assert dp["a"][0] == f"{aa['auc']:.3f} [{aa['auc_lo']:.2f}, {aa['auc_hi']:.2f}]"
    # per-label matrices (2 decimals), thresholded metrics and calibration of the same cell
    lab = _rows(md, "### pleural_effusion, ε = 1")
    pe = _one(df, source="a", target="a", epsilon_target=1.0, label="pleural_effusion",
              subgroup="all")  # fmt: skip
    assert lab["a"][0] == f"{pe['auc']:.2f} [{pe['auc_lo']:.2f}, {pe['auc_hi']:.2f}]"
    thr = _rows(md, "### ε = 1", after=heading["thresholded"])
    assert thr["a → a (on-domain)"][0] == _val(aa["accuracy"], aa["accuracy_lo"], aa["accuracy_hi"])
    cal = _rows(md, "### ε = 1", after=heading["calibration"])
    assert cal["a → a (on-domain)"][0] == _val(aa["brier"], aa["brier_lo"], aa["brier_hi"])
    db = _one(cmp, quantity="delta_brier", source="a", target="a", label="macro")
    assert cal["a → a (on-domain)"][2] == _val(db["delta"], db["delta_lo"], db["delta_hi"],
                                               sign=True)  # fmt: skip

    # drop table and fairness gaps from comparisons.parquet
    drop = _rows(md, "### ε = 1 vs non-DP — ")
    nd = _one(cmp, quantity="drop", target="c", epsilon=math.inf, label="macro", subgroup="all")
    assert drop["c"][0] == _val(nd["value_nondp"], nd["value_nondp_lo"], nd["value_nondp_hi"])
    gap = _one(cmp, quantity="auc_gap_sex", source="a", target="b", epsilon=1.0)
    gap_row = next(line for line in md.splitlines() if line.startswith("| a → b | sex=F - sex=M"))
    assert _val(gap["delta"], gap["delta_lo"], gap["delta_hi"], sign=True) in gap_row

    # paired ΔAUC: the unfinished pair is shown, as missing
    assert "| b → a | " + " | ".join([MISSING] * 9) + " |" in md
    assert "no difference" not in md.replace('"no difference"', "")
    assert "## 2. What these tests can and cannot conclude" in md
    assert "within the family (comparison, quantity)" in md and "jackknife" in md
    # subgroup macros side by side: one table per family, with its label count
    by_sex = _rows(md, "Macro AUC DP / non-DP by sex", after=heading["fairness"])
    sex_n = _one(df, source="a", target="a", epsilon_target=1.0, label="macro",
                 subgroup="sex=M")["n_labels"]  # fmt: skip
    assert by_sex["a → a (on-domain)"][0] == str(sex_n)
    by_age = _rows(md, "Macro AUC DP / non-DP by age", after=heading["fairness"])
    assert by_age["a → a (on-domain)"][0] == str(len(LABELS) - 1)  # no cardiomegaly under 40
    assert "intervals: leave-one-patient-out jackknife t" in md

    names = {"transfer_matrix_eps-1.png", "transfer_matrix_eps-inf.png", "auc_vs_epsilon.png",
             "subgroup_auc.png", "auc_drop.png", "equivalence.png", "reliability.png"}  # fmt: skip
    assert {p.name for p in (tmp_path / "figures").iterdir()} == names
    for name in names:
        path = tmp_path / "figures" / name
        assert f"(figures/{name})" in md
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_report_with_several_seeds_uses_the_across_seeds_rows(tmp_path):
    _, cmp = _sweep(tmp_path, domains=("a", "b"), seeds=(0, 1), n=120)
    md = report.write_report(tmp_path, figures=False)
    assert not (tmp_path / "figures").exists()
    assert "mean macro AUC over the 2 seeds" in md and "between-seed variance" in md
    assert "2 seeds cannot pin down training variability" in md
    dp = _rows(md, "### ε = 1 — ")
    assert re.fullmatch(r"\d\.\d{3} \[\d\.\d{2}, \d\.\d{2}\] ±\d\.\d{3}", dp["a"][0])
    r = _one(cmp, comparison="across_seeds", quantity="drop", target="a", label="macro",
             subgroup="all", epsilon=1.0)  # fmt: skip
    assert r["endpoint"] == "primary" and r["n_seeds"] == 2
    head = _rows(md, "### Primary: ε = 1 vs non-DP")
    assert head["a"][2] == _val(r["delta"], r["delta_lo"], r["delta_hi"], sign=True)


def test_report_without_comparisons_or_dp(tmp_path):
    keys = build_output(tmp_path, domains=("a", "b"), epsilons=(math.inf,), n=100)
    df = write_transfer(tmp_path, keys)
    md = report.write_report(tmp_path)
    assert "comparisons.parquet: not found" in md
    assert "No DP trials" in md and "### ε = inf (no DP)" in md
    assert (tmp_path / "figures" / "transfer_matrix_eps-inf.png").is_file()
    assert not (tmp_path / "figures" / "auc_drop.png").exists()
    console = report.transfer_matrices_text(df)
    assert "### epsilon = inf (no DP)" in console and "Primary endpoint" not in console


def test_console_and_report_render_one_view_and_sections_register(tmp_path, monkeypatch):
    df, cmp = _sweep(tmp_path, domains=("a", "b"), n=150)
    console = report.transfer_matrices_text(df, cmp)
    view = ReportView.load(tmp_path)
    value = view.matrix(1.0).loc["a", "b"]
    assert f"| a | {view.matrix(1.0).loc['a', 'a']:.3f} | {value:.3f} |" in console
    md = report.write_report(tmp_path, figures=False)
    assert f"{value:.3f} [" in _rows(md, "### ε = 1 — ")["a"][1]
    primary = cmp[cmp["endpoint"] == "primary"]
    assert all(f"test site {t}: Δdrop" in console for t in primary["target"])
    monkeypatch.setattr(report, "SECTIONS", list(report.SECTIONS))
    report.register_section(
        Section("canary", "Canary audit", lambda v: f"{len(v.targets)} targets\n"),
        after="headline",
    )
    md = report.write_report(tmp_path, figures=False)
    assert "## 2. Canary audit\n\n2 targets" in md
    with pytest.raises(ValueError):
        report.register_section(Section("canary", "again", lambda v: ""))


def test_report_on_empty_table_and_missing_table(tmp_path):
    with pytest.raises(FileNotFoundError):
        report.write_report(tmp_path)
    write_transfer(tmp_path, [])
    md = report.write_report(tmp_path)
    assert "transfer table is empty" in md
    # t-rule p-values have no resampling floor; tiny ones are shown as the bound they are
    assert _p(0.0004) == "< 0.001" and _p(0.0123) == "0.0123"
    assert _p(0.5) == "0.50" and _p(None) == MISSING


def test_a_comparisons_table_of_an_older_version_is_named_not_misread(tmp_path):
    """A finished folder written before this version: its transfer table still renders; its
    comparisons (bootstrap era, the old primary quantity) are flagged with the fix."""
    df, cmp = _sweep(tmp_path, domains=("a", "b"), n=100)
    old = cmp.drop(columns=["df", "p_tost_iut"]).copy()
    old.loc[old["endpoint"] == "primary", "quantity"] = "drop_vs_nondp_ondomain"
    old.to_parquet(tmp_path / "comparisons.parquet")
    md = report.write_report(tmp_path, figures=False)
    assert "comparisons.parquet: from an older version" in md
    assert "re-run the sweep's command, which re-evaluates the stored models" in md
    assert "### ε = 1 — " in md  # the matrices are still there
    assert "drop_vs_nondp_ondomain" not in md


def test_one_pass_gives_the_tables_and_report_of_the_files(tmp_path):
    """The sweep's one pass (trials read once, tables built from that load, the report
    rendered from the tables in memory) gives value for value what the files give: the
    tables read back, and the report rendered from them (``launch.py report``)."""
    keys = build_output(tmp_path, domains=("a", "b"), n=120)
    finished = results.load_finished(tmp_path, keys)
    table, _ = results.table_of(finished, "test-sweep")
    arrow = comparisons.arrow_tables(comparisons.compute_tables(study_of(finished), EV))
    view = ReportView.of_tables(tmp_path, table, arrow[COMPARISONS], arrow[RELIABILITY])
    from_memory = report.write_report(tmp_path, figures=False, view=view)

    results.aggregate(tmp_path, keys, "test-sweep")  # the transfer table's own path
    comparisons.write_all(tmp_path, arrow)
    pd.testing.assert_frame_equal(view.full, results.load(tmp_path))
    pd.testing.assert_frame_equal(view.cmp, comparisons.load(tmp_path))
    pd.testing.assert_frame_equal(view.reliability, comparisons.load_reliability(tmp_path))
    assert report.write_report(tmp_path, figures=False) == from_memory
    assert not view.full.empty and view.cmp is not None and not view.cmp.empty


def test_the_kinds_contribute_sections_and_parts_to_the_registry():
    """The canary audit is the audit twins' section (after "other"); the federation's part opens
    "other" (the console shows the parts, not the kinds' sections); a kind's section that
    follows no section, or repeats a key, is refused when the report is put together."""
    from privdom_ray import kinds
    from privdom_ray.kinds.audit.report import audit_section
    from privdom_ray.kinds.federated import federated_text

    every = report.sections()
    assert [s.key for s in every][-2:] == ["other", "audit"]
    assert "audit" not in [s.key for s in report.SECTIONS] and every[-1].render is audit_section
    decls = kinds.REGISTRY["federated"].report_sections()
    assert [(d.part_of, d.render) for d in decls] == [("other", federated_text)]
    console = report.sections(report.CONSOLE, parts_only=True)
    assert [s.key for s in console] == ["matrices", "verdicts", "other"]

    class Stray(kinds.TrialKind):
        name = "stray_test"

        def __init__(self, section):
            self.section_decl = section

        def report_sections(self):
            return (self.section_decl,)

    for decl in (kinds.ReportSection("stray", "Stray", lambda v: "x\n", after="nowhere"),
                 kinds.ReportSection("audit", "Again", lambda v: "x\n")):  # fmt: skip
        kinds.register(Stray(decl))
        try:
            with pytest.raises(ValueError, match="nowhere|exists already"):
                report.sections()
        finally:
            del kinds.REGISTRY["stray_test"]
