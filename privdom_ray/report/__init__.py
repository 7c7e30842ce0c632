"""Turn the aggregate tables into what a reader looks at: verdicts, transfer matrices, figures.

ONE pipeline: :class:`~privdom_ray.report.view.ReportView` is built once from the aggregate
tables only (``transfer.parquet`` and, when present, ``comparisons.parquet`` and
``reliability.parquet``; never trial folders, so a report can be drawn anywhere the parquet
files are copied), and every output renders that view: the console summary
(:func:`transfer_matrices_text`, printed at the end of a sweep) and ``report.md``
(:func:`write_report`) are lists of :class:`~privdom_ray.report.sections.Section` functions
over the same view, and the figures draw the same matrices and comparison rows. A section is
added by registering one function (:func:`register_section`); a trial kind contributes its
own (``TrialKind.report_sections``: the canary audit is the audit twins', the federated
models' part of "other" the federation's), collected by :func:`sections` at each render.

The package, in the order of the flow: :mod:`.view` (the tables -> :class:`ReportView`),
:mod:`.formatting` (numbers, CIs, verdicts, tables), the sections (:mod:`.sections`: the
primary endpoint and the transfer matrices; :mod:`.secondary`: thresholded metrics,
calibration, fairness, paired deltas and controls; :mod:`.guarantees`: what the epsilon
covers), :mod:`.figures`, and here the registry (with the kinds' sections),
the console summary and ``report.md``.

Missing cells are shown as missing ("—"), never dropped; a metric that exists but is
undefined (too few positives) reads "n/a". matplotlib is imported only for the figures.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

from privdom_ray import atomic, kinds
from privdom_ray.config import format_epsilon
from privdom_ray.folder import FIGURES, REPORT
from privdom_ray.markdown import missing as _missing
from privdom_ray.report import page
from privdom_ray.report.figures import _draw_figures
from privdom_ray.report.formatting import (
    MISSING,
    _plain_matrix,
    _privacy_note,
    _value,
    _verdict,
)
from privdom_ray.report.guarantees import _section_privacy
from privdom_ray.report.secondary import (
    _section_calibration,
    _section_fairness,
    _section_other,
    _section_paired,
    _section_thresholded,
)
from privdom_ray.report.sections import (
    Section,
    _every_site,
    _on_off_means,
    _section_conclusions,
    _section_drop,
    _section_headline,
    _section_label_matrices,
    _section_matrices,
    _section_test_sets,
)
from privdom_ray.report.view import ReportView
from privdom_ray.stats import quantities

# ------------------------------------------------------------------------------ console


def _console_matrices(view: ReportView) -> str:
    out = []
    for eps in view.eps:
        used = sorted(view.df.loc[view.df["epsilon_target"] == eps, "accountant"].dropna().unique())
        how = " (no DP)" if math.isinf(eps) else f" (epsilon by {', '.join(used)} accountant)"
        out.append(f"### epsilon = {format_epsilon(eps)}{how}\n")
        out.append(_plain_matrix(view, eps))
        out.append(_on_off_means(view, eps))
    return "\n".join(out)


def _console_verdicts(view: ReportView) -> str:
    """The primary endpoint's verdicts, one line per (epsilon, test site)."""
    if view.cmp is None:
        return ""
    lines = []
    for eps in view.finite_eps:
        per_site = []
        for t in view.targets:
            r = view.summary(quantities.PRIMARY_QUANTITY, target=t, epsilon=eps)
            if r is not None and not _missing(r.get("delta")):
                per_site.append(f"- epsilon = {format_epsilon(eps)}, test site {t}: Δdrop "
                                f"{_value(r, 'delta', 3, True)}: {_verdict(r)}")  # fmt: skip
        if per_site:
            every = _every_site(view, eps).strip()
            lines += [*per_site, f"- epsilon = {format_epsilon(eps)}: {every}"]
    return "\n".join(lines) + "\n" if lines else ""


# ------------------------------------------------------------------------------ registry


SECTIONS: list[Section] = [
    Section("headline", "Does DP change transfer? Equivalence verdicts", _section_headline),
    Section("conclusions", "What these tests can and cannot conclude", _section_conclusions),
    Section("privacy", "What this epsilon covers", _section_privacy),
    Section("test_sets", "Test sets: images, patients and prevalence", _section_test_sets),
    Section(
        "matrices",
        "Transfer matrices (macro AUC over the labels; rows = trained on, columns = tested on)",
        _section_matrices,
    ),  # fmt: skip
    Section("label_matrices", "Per-label transfer matrices", _section_label_matrices),
    Section(
        "drop",
        "AUC drop from on-domain to off-domain: each side's own drop, DP's costs",
        _section_drop,
    ),
    Section("thresholded", "Thresholded metrics at the source's threshold", _section_thresholded),
    Section("calibration", "Calibration", _section_calibration),
    Section("fairness", "Fairness: subgroup gaps and DP's effect on them", _section_fairness),
    Section("paired", "Paired ΔAUC = AUC(DP) − AUC(non-DP) (exploratory)", _section_paired),
    Section("other", "Controls, federated models and membership inference", _section_other),
]

CONSOLE: list[Section] = [
    Section(
        "matrices",
        "Transfer matrices (macro AUC, rows = trained on, columns = tested on)",
        _console_matrices,
    ),  # fmt: skip
    Section(
        "verdicts",
        "Primary endpoint: drop(DP) - drop(non-DP) per test site (see report.md)",
        _console_verdicts,
    ),
    Section("other", "", _section_other),
]


def register_section(section: Section, *, after: str | None = None) -> None:
    """Add a report section after the one keyed ``after`` (at the end when None)."""
    if section.key in {s.key for s in sections()}:
        raise ValueError(f"a section {section.key!r} exists already")
    _insert(SECTIONS, section, after)


def sections(base: Iterable[Section] | None = None, *, parts_only: bool = False) -> list[Section]:
    """The report's sections (``SECTIONS``, or ``base``) with the registered kinds' (in
    registry order): a kind's section after the one it names, a kind's part opening the body
    of the section it belongs to (``parts_only``: the parts alone, as the console shows them).
    Collected at each render: a kind registered after this module was imported contributes."""
    out = list(SECTIONS if base is None else base)
    parts: dict[str, list[Callable[[ReportView], str]]] = {}
    for kind in kinds.REGISTRY.values():
        for decl in kind.report_sections():
            if decl.part_of:
                parts.setdefault(decl.part_of, []).append(decl.render)
            elif parts_only:
                continue
            elif any(s.key == decl.key for s in out):
                raise ValueError(f"kind {kind.name!r}: a section {decl.key!r} exists already")
            else:
                _insert(out, Section(decl.key, decl.title, decl.render), decl.after)
    return [_opened(s, parts[s.key]) if s.key in parts else s for s in out]


def _insert(into: list[Section], section: Section, after: str | None) -> None:
    keys = [s.key for s in into]
    if after is not None and after not in keys:
        raise ValueError(f"section {section.key!r} follows {after!r}, which is not a section")
    into.insert(keys.index(after) + 1 if after is not None else len(into), section)


def _opened(section: Section, parts: list[Callable[[ReportView], str]]) -> Section:
    """``section`` whose body opens with the kinds' parts (empty ones left out)."""

    def body(view: ReportView) -> str:
        texts = (*(part(view) for part in parts), section.render(view))
        return "\n".join(t for t in texts if t)

    return dataclasses.replace(section, render=body)


def render(view: ReportView, sections: Iterable[Section], *, numbered: bool = True) -> str:
    """Markdown of ``sections`` over one view (empty bodies are left out)."""
    parts, k = [], 0
    for section in sections:
        body = section.render(view)
        if not body.strip():
            continue
        if section.title:
            k += 1
            parts.append(f"## {f'{k}. ' if numbered else ''}{section.title}\n")
        parts.append(body)
    return "\n".join(parts)


def transfer_matrices_text(df: pd.DataFrame, cmp: pd.DataFrame | None = None) -> str:
    """The console summary: macro matrices per epsilon, the primary verdicts (with ``cmp``),
    federated models, controls and the membership audit (the report's view, compactly)."""
    if df.empty:
        return "(no finished trials yet: the transfer table is empty)"
    return render(ReportView(df, cmp), sections(CONSOLE, parts_only=True), numbered=False)


# ------------------------------------------------------------------------------ report.md


def write_report(output: Path, *, figures: bool = True, view: ReportView | None = None) -> str:
    """Write ``<output>/report.md`` (atomically) and PNG figures under ``<output>/figures/``.

    Reads ``transfer.parquet`` (required), ``comparisons.parquet`` and
    ``reliability.parquet`` (optional: without them the report has no verdicts, CIs of
    differences or reliability diagram, and says so), unless ``view`` holds the tables
    already (the sweep renders the tables it has just built: ``ReportView.of_tables``).
    Returns the markdown.
    """
    output = Path(output)
    view = ReportView.load(output) if view is None else view
    parts = [_header(view)]
    if view.df.empty:
        parts.append("(no finished trials yet: the transfer table is empty)\n")
    else:
        parts.append(render(view, sections()))
        if figures:
            paths = _draw_figures(view, output / FIGURES)
            parts.append("## Figures\n\n" + "\n".join(f"![{p.stem}]({FIGURES}/{p.name})\n"
                                                      for p in paths))  # fmt: skip
    text = "\n".join(parts).rstrip() + "\n"
    atomic.atomic_write(output / REPORT, lambda p: p.write_text(text, encoding="utf-8"))
    page.write_html(
        output, text, epsilons=[format_epsilon(e) for e in view.eps],
        sites=sorted({*map(str, view.sources), *map(str, view.targets)}), labels=view.labels,
    )  # fmt: skip
    return text


def _header(view: ReportView) -> str:
    df = view.df
    if df.empty:
        return "# Sweep report\n"
    sweep = ", ".join(sorted(df["sweep"].dropna().astype(str).unique())) or MISSING
    cmp_state = "present" if view.cmp is not None else "not found (no verdicts, no paired CIs)"
    if view.old_cmp:
        cmp_state = "from an older version (re-run the sweep's command: no retraining)"
    return "\n".join([
        f"# Sweep report: {sweep}",
        "",
        f"- sources: {', '.join(view.sources)}; targets: {', '.join(view.targets)}",
        f"- epsilons: {', '.join(format_epsilon(e) for e in view.eps)}; "
        f"seeds: {', '.join(map(str, view.seeds))}; models: "
        + ", ".join(sorted(df["model"].dropna().astype(str).unique())),
        f"- {df['trial_key'].nunique()} trials; intervals: {_interval_method(df)}; "
        f"unit: {view.unit}",
        "- privacy: " + "; ".join(_privacy_note(df, e) for e in view.finite_eps)
        + ("" if view.finite_eps else "no DP trials"),
        f"- comparisons.parquet: {cmp_state}",
        "",
        'A cell without a row in the tables is printed as "—" (missing), never dropped.',
        "",
    ])  # fmt: skip


def _interval_method(df: pd.DataFrame) -> str:
    """How the transfer table's CIs were made: jackknife t since evaluation protocol 4, the
    percentile bootstrap before (rows without ``ci_df``)."""
    if "ci_df" in df.columns and df["ci_df"].notna().any():
        old = df["ci_df"].isna() & df["auc_lo"].notna()
        if not old.any():
            return f"{_JACKKNIFE} (95%, see section 2)"
        return (f"{_JACKKNIFE}; {old.sum()} rows still from the percentile bootstrap of "
                "older evaluations (re-run the sweep's command to re-evaluate them)")  # fmt: skip
    n_boot = ", ".join(str(int(b)) for b in sorted(df["n_boot"].dropna().unique())) or MISSING
    return (f"percentile bootstrap ({n_boot} resamples), written before the jackknife "
            "intervals: re-run the sweep's command to re-evaluate (no retraining)")  # fmt: skip


_JACKKNIFE = "leave-one-patient-out jackknife t, logit scale"
