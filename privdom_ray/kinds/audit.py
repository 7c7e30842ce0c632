"""Audit twins: a one-run canary audit of a cell (``audit:`` in the grid).

A twin trains exactly like the cell it audits (same source, epsilon, seed, hyper-parameters
and mechanism) but with m canaries in its training set, each included by a secret fair coin;
afterwards the auditor guesses the coins from the twin's output, and the correct guesses give
a 95% lower bound on epsilon (``audit_bound``). Its model is never released and never enters
the transfer matrices; its audit result is attached to the audited cell's rows.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from privdom_ray.config import (
    AUDIT_CELLS,
    AUDIT_KINDS,
    DEFAULT_DELTA,
    AuditConfig,
    AuditSpec,
    SweepSpec,
    TrainingConfig,
    TrialSpec,
    format_epsilon,
)
from privdom_ray.kinds import Checker, PlanContext, ReportSection, TrialKind, register
from privdom_ray.kinds.standard import single_site
from privdom_ray.markdown import missing, num
from privdom_ray.markdown import table as markdown_table
from privdom_ray.privacy import Ledger

if TYPE_CHECKING:
    import pandas as pd

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
        return check_twin(_result(record), ledger, record.spec.name)

    def row_columns(self, record: Any) -> dict[str, Any]:
        """The audited cell's ``audit_*`` columns (a twin without a result: nulls)."""
        result = _result(record)
        return {} if result is None else columns(result, record.ledger)

    record_keys = ("audit",)

    def record_part(self, data: Mapping[str, Any]) -> TwinRun | None:
        return None if data.get("audit") is None else TwinRun.of(data["audit"])

    def record_json(self, part: TwinRun) -> dict[str, Any]:
        return {"audit": dict(part.audit)}

    def report_sections(self) -> tuple[ReportSection, ...]:
        title = "Canary audit: an empirical lower bound on epsilon"
        return (ReportSection("audit", title, audit_section, after="other"),)


register(AuditTwin())


# --------------------------------------------------------------------------------------------
# A twin's result: what the table shows and what ``launch.py audit`` checks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TwinRun:
    """A twin's part of its run record (trial.json's ``audit``): its canary audit's result as
    the twin wrote it (``audit_bound``'s record, a nested document; ``check_twin`` and
    ``columns`` recompute from its counts and never trust its numbers)."""

    audit: Mapping[str, Any]

    @classmethod
    def of(cls, result: Any) -> TwinRun:
        if not isinstance(result, Mapping):
            raise ValueError(f"audit: {result!r} is not a mapping")
        return cls(dict(result))


def _result(record: Any) -> Mapping[str, Any] | None:
    """The twin's result from its record (a store.TrialRecord), None without one."""
    part = record.info.part
    return part.audit if isinstance(part, TwinRun) else None


@dataclass(frozen=True)
class TwinCheck:
    """A twin's audit recomputed from its counts, against the epsilon its ledger's mechanisms
    give (recomputed too): ``problem`` is non-empty when the bound exceeds it or a noise test
    fails (a broken implementation), or the stored bound is not what its counts give."""

    kind: str
    spent: float
    lower: float
    epsilon_max: float
    problem: str
    checked: bool  # a DP twin (a non-private one claims nothing to refute)


def check_twin(result: Mapping[str, Any] | None, ledger: Mapping[str, Any], name: str) -> TwinCheck:
    """Recompute the twin's deciding bound (``audit_bound.recompute``: never the stored number)
    and compare it with the epsilon recomputed from the twin's ledger."""
    from privdom_ray.audit_bound import recompute
    from privdom_ray.privacy import epsilon_of, ledger_mechanisms

    if result is None:
        return TwinCheck("", math.nan, math.nan, math.nan, "audit twin without a result", True)
    lower, top = recompute(result)
    private = ledger["accountant"] != "none"
    spent, problems = math.inf, [_noise_problem(result.get("noise"), name)]
    if private:
        try:
            spent, _ = epsilon_of(
                ledger["accountant"], ledger_mechanisms(ledger), float(ledger["delta"])
            )
        except Exception as exc:  # noqa: BLE001 - a tampered ledger fails the accountants
            spent = math.nan  # its ledger line names the field; no bound is compared
            problems.append(f"canary audit: the twin's epsilon cannot be recomputed "
                            f"({type(exc).__name__}: {exc}) ({name})")  # fmt: skip
    if abs(lower - float(result["epsilon_lower"])) > 2e-3:
        problems.append(
            f"canary audit: the stored epsilon_lower {float(result['epsilon_lower']):.4g} is not "
            f"what its counts give ({lower:.4g}); the record was changed ({name})"
        )
    if lower > spent:
        problems.append(
            f"canary audit ({result['kind']}, m={result['m']}, "
            f"{result.get('attack', 'standard')} attack): epsilon_lower {lower:.3g} > epsilon "
            f"spent {spent:.3g} at 95% confidence: the DP implementation or its accounting is "
            f"broken ({name})"
        )
    problem = "; ".join(p for p in problems if p)
    return TwinCheck(str(result["kind"]), spent, lower, top, problem, private)


def _noise_problem(noise: Mapping[str, Any] | None, name: str) -> str:
    """The twin's noise tests, decided again from its sums (``audit_bound.NoiseCheck``)."""
    from privdom_ray.audit_bound import NoiseCheck

    if not noise:
        return ""
    check = NoiseCheck(int(noise["units"]), float(noise["sum_squares"]),
                       noise["replay_z"], float(noise["alpha"]))  # fmt: skip
    if check.too_little:
        return (
            f"noise check: the twin added {check.ratio:.3g} times the noise its ledger states "
            f"(sum of squares {check.sum_squares:.6g} over {check.units} noised coordinates, "
            f"below {check.floor:.6g} at level {check.alpha:g}): the DP implementation is "
            f"broken ({name})"
        )
    if check.follows_seed:
        return (
            f"noise check: the twin's noise follows the public seed (replay z = "
            f"{check.replay_z:.3g}): the DP implementation is broken ({name})"
        )
    return ""


def columns(result: Mapping[str, Any], ledger: Ledger) -> dict[str, Any]:
    """The audited cell's ``audit_*`` columns from its twin's result (results.audit_columns).
    Twins from before version 2 (m = 1000, Steinke et al.'s bound, no replay, no power) keep
    their numbers; their attainable maximum is computed from m."""
    from privdom_ray.audit_bound import guess_grid, max_lower

    spent = ledger.epsilon_spent
    out = {
        "audit_epsilon_lower": float(result["epsilon_lower"]),
        "audit_canaries": int(result["m"]),
        "audit_guesses": int(result["guesses"]),
        "audit_correct": int(result["correct"]),
        "audit_kind": str(result["kind"]),
        "audit_twin_epsilon": float(spent),
        "audit_epsilon_lower_replay": None,
        "audit_power_noise_scale": None,
        "audit_noise_ratio": None,
        "audit_noise_check": None,
    }
    if result.get("version", 1) == 1:
        m, delta = int(result["m"]), float(result.get("delta", 0.0))
        top = max_lower(m, delta, grid=guess_grid(m, top=()), binomial=True)
        return {**out, "audit_epsilon_max": top}
    replay = result["attacks"].get("replay")
    power, noise = result.get("power") or {}, result.get("noise") or {}
    return {
        **out,
        "audit_epsilon_max": float(result["epsilon_max"]),
        "audit_epsilon_lower_replay": None if replay is None else float(replay["epsilon_lower"]),
        "audit_power_noise_scale": power.get("noise_scale"),
        "audit_noise_ratio": _noise_check(noise).ratio if noise else None,
        "audit_noise_check": _noise_verdict(noise) if noise else None,
    }


def _noise_check(noise: Mapping[str, Any]):
    """The twin's noise tests rebuilt from their sums (a stored ratio or verdict is not read)."""
    from privdom_ray.audit_bound import NoiseCheck

    return NoiseCheck(int(noise["units"]), float(noise["sum_squares"]),
                      noise["replay_z"], float(noise["alpha"]))  # fmt: skip


def _noise_verdict(noise: Mapping[str, Any]) -> str:
    """The noise tests in words (recomputed from their sums, like ``launch.py audit``)."""
    check = _noise_check(noise)
    if check.too_little:
        return "too little noise"
    return "noise follows the public seed" if check.follows_seed else "ok"


# --------------------------------------------------------------------------------------------
# Its report section: the canary audit (the report's registry collects it)
# --------------------------------------------------------------------------------------------


def audit_rows(view: Any) -> pd.DataFrame:
    full = view.full
    if "audit_epsilon_lower" not in full.columns:
        return full.iloc[:0]
    rows = full[full["audit_epsilon_lower"].notna()].drop_duplicates("trial_key")
    return rows.sort_values(["source", "epsilon_target", "seed"])


def audit_max(r: Mapping[str, Any]) -> float:
    """The most the twin's m canaries can show; tables written before the column existed had
    version-1 twins (Steinke et al.'s bound over 7 symmetric rules), computed here from m."""
    if not missing(r.get("audit_epsilon_max")):
        return float(r["audit_epsilon_max"])
    from privdom_ray.audit_bound import guess_grid, max_lower

    m, delta = int(r["audit_canaries"]), float(r.get("delta") or 1e-5)
    return max_lower(m, delta, grid=guess_grid(m, top=()), binomial=True)


def _audit_power(r: Mapping[str, Any]) -> str:
    """What the twin's audit would catch (80% of simulated runs), in words."""
    spent = r["audit_twin_epsilon"]
    if missing(spent) or not math.isfinite(spent) or r.get("audit_kind") != "gradient":
        return "—"
    replay = not missing(r.get("audit_epsilon_lower_replay"))
    scale = r.get("audit_power_noise_scale")
    if not replay:
        return "not estimated (twin from before the power estimate; re-run it)"
    if missing(scale):
        return "nothing: not even a build without noise"
    return f"noise ×≤{scale:.2f}, and noise replayed from the public seed"


def _audit_verdict(r: Mapping[str, Any], top: float) -> str:
    spent, lower = r["audit_twin_epsilon"], r["audit_epsilon_lower"]
    if missing(spent) or not math.isfinite(spent):
        return "no DP: shows what leaks"
    if lower > spent:
        return "**BROKEN: above ε spent**"
    noise = r.get("audit_noise_check")
    if not missing(noise) and noise != "ok":
        return f"**BROKEN: {noise}**"
    if top <= spent:
        return f"cannot tell: m = {int(r['audit_canaries'])} caps the bound at {top:.2f} ≤ ε spent"
    scale = r.get("audit_power_noise_scale")
    if missing(r.get("audit_epsilon_lower_replay")) or missing(scale):
        return "no evidence of a broken build, at unknown power"
    return "no evidence of a broken build"


def audit_section(view: Any) -> str:
    """Audit twins: the empirical lower bound on epsilon next to the epsilon spent, what the
    audit could show at most, and what it would catch."""
    rows = audit_rows(view)
    if rows.empty:
        return ""
    table = []
    for r in rows.to_dict("records"):
        top = audit_max(r)
        table.append([
            f"{r['source']}, ε = {format_epsilon(r['epsilon_target'])}, seed {r['seed']}",
            num(r["audit_twin_epsilon"], 2), f"{r['audit_kind']}, m = {int(r['audit_canaries'])}",
            num(r["audit_epsilon_lower"], 2), num(r.get("audit_epsilon_lower_replay"), 2),
            num(top, 2), _audit_power(r), num(r.get("audit_noise_ratio"), 3),
            _audit_verdict(r, top),
        ])  # fmt: skip
    head = ["cell", "ε spent", "canaries", "ε lower (95%)", "replay attack", "most m canaries "
            "can show", "catches (80% of simulated runs)", "noise measured / stated",
            "verdict"]  # fmt: skip
    return "\n".join([
        "Each audited cell has a twin trained the same way with m canaries, each included by a "
        "secret coin; the auditor guesses the coins from the twin's output, and the correct "
        "guesses give an ε that holds with 95% confidence as a LOWER bound (the f-DP analysis of "
        "Mahloujifar, Melis & Chaudhuri 2025; one-run auditing: Steinke, Nasr & Jagielski "
        "2023). Gradient canaries audit DP-SGD itself (a white-box adversary who sees every "
        "noised update); input canaries audit only the final model (black box) and give far "
        "weaker bounds. A twin attacks twice, each at 2.5%: with its plain scores, and after "
        "subtracting the noise a build that drew it from the public seed would have added (the "
        "replay attack); the table's bound is the larger. A bound above the ε spent means the "
        "implementation or the accounting is broken (`launch.py audit` exits 1).",
        "",
        "What an audit can say is limited. No run with m canaries can show more than the "
        "'most' column, so a cell whose ε spent is above it cannot be refuted at all (verdict "
        "'cannot tell'). Below it, a correct build's bound sits well under its ε: the audit "
        "catches gross failures, not small accounting slack. 'Catches' is the audit's power: "
        "the largest factor s such that a build adding only s times the calibrated noise is "
        "caught in 80% of runs, simulated with the twin's own m, q, steps and sigma (without "
        "the real gradients, which only add variance); a build whose noise follows the public "
        "seed is caught whenever a build without noise would be. 'No evidence of a broken "
        "build' is all a passed audit says. The twin also measures the noise it added, at the "
        "coordinates of the excluded canaries: less than its ledger states, or noise that "
        "follows the public seed, is a broken build whatever the bound (two exact tests at "
        "level 1e-6; they test the noise, not ε).",
        "",
        markdown_table(head, table),
        *_audit_coverage(view, rows),
    ]) + "\n"  # fmt: skip


def _audit_coverage(view: Any, audited: pd.DataFrame) -> list[str]:
    """Which single-site cells have a twin's result and which have none, per ε: a cell
    without one was not audited (its ε rests on the accountant alone), never 'passed'."""
    cells = view.split_controls(view.full)[0].drop_duplicates("trial_key")
    done = set(audited["trial_key"])
    missing = cells[~cells["trial_key"].isin(done)]
    if missing.empty:
        return [f"Every single-site cell ({len(cells)}) was audited.", ""]
    table = [
        [view.eps_label(eps), _cell_list(part[part["trial_key"].isin(done)]),
         _cell_list(part[~part["trial_key"].isin(done)])]
        for eps, part in ((e, cells[cells["epsilon_target"] == e]) for e in view.epsilons(cells))
    ]  # fmt: skip
    return [
        f"**Audited: {len(cells) - len(missing)} of {len(cells)} single-site cells; "
        f"NOT audited: {len(missing)}.** A cell without a twin was not audited: its ε rests "
        "on the accountant alone and nothing in this section speaks for it (not 'no evidence "
        "of a broken build'). Which cells get a twin is the grid's `audit.cells` (default: one "
        "per ε, chosen from the grid alone, never from data), or its twin has not finished. A "
        "twin checks the code and the accounting that train every cell, at its own cell's ε, "
        "sample rate and δ.",
        "",
        markdown_table(["ε", "audited (a twin's result above)", "not audited (no twin result)"], table),
    ]


def _cell_list(cells: pd.DataFrame) -> str:
    """ "a seeds 0, 1; b seed 2": cells by source (— for none)."""
    parts = []
    for source, part in cells.groupby("source", sort=True):
        seeds = sorted(int(x) for x in part["seed"])
        parts.append(f"{source} seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
    return "; ".join(parts) or "—"
