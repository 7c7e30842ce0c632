"""Audit twins: a one-run canary audit of a cell (``audit:`` in the grid).

A twin trains exactly like the cell it audits (same source, epsilon, seed, hyper-parameters
and mechanism) but with m canaries in its training set, each included by a secret fair coin;
afterwards the auditor guesses the coins from the twin's output, and the correct guesses give
a 95% lower bound on epsilon (``audit_bound``). Its model is never released and never enters
the transfer matrices; its audit result is attached to the audited cell's rows.

The kind's folder: here its grid section, its cells and the kind; ``result`` its part of the
run record and what is recomputed from it; ``report`` its section of the report.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from privdom_ray.config import (
    AUDIT_CELLS,
    AUDIT_KINDS,
    DEFAULT_DELTA,
    AuditConfig,
    AuditSpec,
    SweepSpec,
    TrainingConfig,
    TrialSpec,
)
from privdom_ray.kinds import (
    Checker,
    PlanContext,
    ReportFigure,
    ReportSection,
    TrialKind,
    register,
)
from privdom_ray.kinds.audit.figure import audit_plot
from privdom_ray.kinds.audit.report import audit_section
from privdom_ray.kinds.audit.result import (
    TwinCheck,
    TwinRun,
    check_twin,
    columns,
    twin_result,
)
from privdom_ray.kinds.standard import single_site

INPUT_CANARIES = 1000  # ``auto`` for input canaries: each included one is a training image
#: The columns a twin adds to the audited cell's rows (null where the cell has no twin).
AUDIT_COLUMNS = (
    "audit_epsilon_lower",
    "audit_epsilon_lower_replay",
    "audit_epsilon_max",
    "audit_power_noise_scale",
    "audit_noise_ratio",
    "audit_noise_check",
    "audit_canaries",
    "audit_guesses",
    "audit_correct",
    "audit_kind",
    "audit_twin_epsilon",
)


@dataclass(frozen=True)
class AuditCell:
    """A single-site cell an audit twin may be given: public identity only, no data."""

    source: str
    epsilon: float
    seed: int

    def describe(self) -> str:
        return f"{self.source} ε={self.epsilon:g} seed {self.seed}"


def eligible(spec: SweepSpec) -> list[AuditCell]:
    """The cells ``audit.sources`` x ``audit.epsilons`` x seeds name (empty lists: all)."""
    audit = spec.audit
    if audit is None:
        return []
    return [
        AuditCell(source, float(epsilon), seed)
        for source in audit.sources or spec.sources
        for epsilon in audit.epsilons or spec.epsilons
        for seed in spec.seeds
    ]


def choose(spec: SweepSpec) -> list[AuditCell]:
    """The cells that get a twin, from the grid alone (never from data, so the choice itself
    reveals nothing): ``all``; ``per_epsilon`` = a sample of one per epsilon; N = a sample of
    N spread over the epsilons, in ascending order (the smallest epsilon gets the extra
    twins first). Within an epsilon the cell taken is the one whose source, then seed, has
    the fewest twins so far, ties broken by a public hash of ``cells_seed`` and the cell, so
    twins spread over sources and seeds and the choice is the same on every machine."""
    cells = eligible(spec)
    if spec.audit is None or spec.audit.cells == "all":
        return cells
    wanted = spec.audit.cells
    strata: dict[float, list[AuditCell]] = {}
    for cell in sorted(cells, key=lambda c: _rank(spec.audit.cells_seed, c)):
        strata.setdefault(cell.epsilon, []).append(cell)
    n = len(strata) if wanted == "per_epsilon" else min(int(wanted), len(cells))
    by_source: Counter[str] = Counter()
    by_seed: Counter[int] = Counter()
    chosen: list[AuditCell] = []
    while len(chosen) < n:
        for epsilon in sorted(strata):
            left = strata[epsilon]
            if not left or len(chosen) == n:
                continue
            # min keeps the first of equals: the stratum is in hash order
            pick = min(left, key=lambda c: (by_source[c.source], by_seed[c.seed]))
            left.remove(pick)
            chosen.append(pick)
            by_source[pick.source] += 1
            by_seed[pick.seed] += 1
    picked = set(chosen)
    return [c for c in cells if c in picked]  # in grid order


def _rank(cells_seed: int, cell: AuditCell) -> str:
    text = json.dumps([cells_seed, cell.source, repr(cell.epsilon), cell.seed])
    return hashlib.sha256(text.encode()).hexdigest()


def plan(ctx: PlanContext) -> Iterator[TrialSpec]:
    """The twins of the chosen cells."""
    for cell in choose(ctx.spec):
        yield _twin(ctx, cell)


def kept(ctx: PlanContext) -> Iterator[TrialSpec]:
    """The twins of the cells not chosen: read when an earlier run finished them (a folder
    from before ``audit.cells``, or a grid whose choice changed), never trained."""
    chosen = set(choose(ctx.spec))
    for cell in eligible(ctx.spec):
        if cell not in chosen:
            yield _twin(ctx, cell)


def _twin(ctx: PlanContext, cell: AuditCell) -> TrialSpec:
    audit = ctx.spec.audit
    assert audit is not None
    spec = single_site(ctx, cell.source, cell.epsilon, cell.seed, "audit")
    m = canaries(audit.canaries, audit.kind, cell.epsilon, spec.delta)
    return dataclasses.replace(spec, audit=AuditSpec(m, audit.kind, audit.auditor_seed))


def note(spec: SweepSpec, trials: Sequence[TrialSpec]) -> str:
    """``plan``'s line on the twins: how many cells are audited, by which rule, which ones."""
    cells = eligible(spec)
    if not cells:
        return ""
    chosen = choose(spec)
    planned = {(t.source, float(t.epsilon), t.seed) for t in trials if t.kind == "audit"}
    left = set(cells) - set(chosen)
    kept_n = sum((c.source, c.epsilon, c.seed) in planned for c in left)
    assert spec.audit is not None
    names = "; ".join(c.describe() for c in chosen[:12]) + ("; ..." if len(chosen) > 12 else "")
    line = (
        f"audit twins: {len(chosen)} of {len(cells)} audit cells (audit.cells: "
        f"{spec.audit.cells}, cells_seed {spec.audit.cells_seed}): {names}; "
        f"{len(cells) - len(chosen)} not audited"
    )
    if kept_n:
        line += f" ({kept_n} of them have a finished twin from an earlier run: read, not trained)"
    return line


def canaries(requested: int | str, kind: str, epsilon: float, delta: float) -> int:
    """The twin's m: the grid's number, or for ``auto`` gradient canaries enough for the bound
    to exceed the cell's epsilon (``audit_bound.canaries_for``; a non-private cell is audited
    at the default delta, like its twin). The resolved m is in the twin's key."""
    if requested != "auto":
        return int(requested)
    if kind == "input":
        return INPUT_CANARIES
    return _canaries_for(float(epsilon), float(delta or DEFAULT_DELTA))


@functools.lru_cache(maxsize=64)
def _canaries_for(epsilon: float, delta: float) -> int:
    from privdom_ray.audit_bound import canaries_for

    return canaries_for(epsilon, delta)


def audited(twin: TrialSpec) -> TrialSpec:
    """The standard cell a twin audits (its key names the rows the result is attached to)."""
    return dataclasses.replace(twin, variant="standard", audit=None).with_key()


def parse_section(
    c: Checker,
    raw: Mapping,
    sources: list[str],
    epsilons: list[float],
    seeds: tuple[int, ...],
    training: TrainingConfig,
) -> AuditConfig | None:
    """``audit:`` audit twins for the (source, epsilon, seed) cells it names (default: all of
    them) and chooses (``cells``: one per epsilon by default, ``all``, or a number)."""
    if not raw.get("audit"):
        return None
    audit = c.section(raw, "audit", AuditConfig)
    if audit.canaries != "auto" and (not isinstance(audit.canaries, int) or audit.canaries < 20):
        c.add("audit.canaries", audit.canaries, "'auto' (recommended) or an integer >= 20")
    if audit.kind not in AUDIT_KINDS:
        c.add("audit.kind", audit.kind, f"one of {list(AUDIT_KINDS)}")
    if audit.kind == "input" and training.privacy_unit == "patient":
        c.add("audit.kind", "input", "'gradient' with privacy_unit: patient")
    unknown = [s for s in audit.sources if s not in sources]
    if unknown:
        c.add("audit.sources", unknown, f"sources of this grid: {sources}")
    missing = [e for e in audit.epsilons if e not in epsilons]
    if missing:
        c.add("audit.epsilons", list(audit.epsilons), f"epsilons of this grid: {epsilons}")
    n_cells = len(audit.sources or sources) * len(audit.epsilons or epsilons) * len(seeds)
    _check_audit_cells(c, audit, n_cells)
    return audit


def _check_audit_cells(c: Checker, audit: AuditConfig, n_cells: int) -> None:
    """``audit.cells``: a rule name or a number of cells the audit's cells can hold."""
    cells = audit.cells
    number = isinstance(cells, int) and not isinstance(cells, bool)
    if not number and cells not in AUDIT_CELLS:
        c.add(
            "audit.cells", cells,
            "'per_epsilon' (one twin per epsilon: the default), 'all' (a twin for every cell "
            "audit.sources x audit.epsilons x seeds) or a number of cells N >= 1 (a sample "
            "spread over the epsilons, chosen by audit.cells_seed)",
        )  # fmt: skip
    elif number and not 1 <= cells <= n_cells:
        c.add(
            "audit.cells", cells,
            f"a number from 1 to {n_cells}, the cells audit.sources x audit.epsilons x seeds "
            "name ('all' for every one; remove the audit section for no twins)",
        )  # fmt: skip
    if audit.cells_seed < 0:
        c.add("audit.cells_seed", audit.cells_seed, "an integer >= 0 (public: it orders cells)")


class AuditTwin(TrialKind):
    name = "audit"
    description = "a cell's twin with m canaries: a one-run lower bound on its epsilon"
    trainer = "audit_twin"
    evaluated = False
    in_matrices = False
    released = False
    columns = AUDIT_COLUMNS
    section = "audit"
    section_help = ("one-run canary audit twins: {canaries, kind: gradient|input, sources, "
                    "epsilons, cells: per_epsilon|all|N, cells_seed}")  # fmt: skip

    def parse_section(self, c: Checker, raw: Mapping, common: Mapping[str, Any]) -> Any:
        return parse_section(c, raw, common["sources"], common["epsilons"], common["seeds"],
                             common["training"])  # fmt: skip

    def plan(self, ctx: PlanContext) -> Iterator[TrialSpec]:
        return plan(ctx)

    def kept(self, ctx: PlanContext) -> Iterator[TrialSpec]:
        return kept(ctx)

    def note(self, spec: SweepSpec, trials: Sequence[TrialSpec]) -> str:
        return note(spec, trials)

    def attached_to(self, spec: TrialSpec) -> str | None:
        return audited(spec).key

    def canary_check(self, record: Any, ledger: Mapping[str, Any]) -> TwinCheck:
        return check_twin(twin_result(record), ledger, record.spec.name)

    def row_columns(self, record: Any) -> dict[str, Any]:
        """The audited cell's ``audit_*`` columns (a twin without a result: nulls)."""
        result = twin_result(record)
        return {} if result is None else columns(result, record.ledger)

    record_keys = ("audit",)

    def record_part(self, data: Mapping[str, Any]) -> TwinRun | None:
        return None if data.get("audit") is None else TwinRun.of(data["audit"])

    def record_json(self, part: TwinRun) -> dict[str, Any]:
        return {"audit": dict(part.audit)}

    def report_sections(self) -> tuple[ReportSection, ...]:
        title = "Canary audit: an empirical lower bound on epsilon"
        return (ReportSection("audit", title, audit_section, after="other"),)

    def report_figures(self) -> tuple[ReportFigure, ...]:
        return (ReportFigure("audit_epsilon.png", audit_plot),)


register(AuditTwin())
