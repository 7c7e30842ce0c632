"""Trial kinds: what a trial is for, as a registry like domain kinds.

A kind (a :class:`TrialKind` object) declares how its trials are planned from a grid, which
trainer trains them, which sites trained its model, what it adds to the tables, its part of the
run record and its report sections, and how its results are used (evaluated on targets? rows
in the transfer matrices? weights released?).
Adding a kind is adding one module (or folder) here that calls :func:`register`; nothing
outside kinds/ and the store branches on the kind (tests/test_architecture.py searches).
Torch-free: a kind names its trainer; the training side (``trial.TRAINERS``) holds them.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from privdom_ray.config import DEFAULT_DELTA, GridError, Site, SweepSpec, TrialSpec


@dataclass(frozen=True)
class PlanContext:
    """What a kind's planner may use: the grid and what is known of its data."""

    spec: SweepSpec
    fingerprints: Mapping[str, str]
    n_train: Mapping[str, int]
    init: str = "scratch"  # the resolved initialisation of trained-from-grid trials
    public_pos_weight: tuple[float, ...] = ()  # training.pos_weight "public", resolved


class Checker(Protocol):
    """What a kind's grid section is checked with (grid.py's collector: every problem is
    recorded, a usable default returned, and the grid refused with all of them at once)."""

    def add(self, key: str, value: Any, allowed: str) -> None: ...

    def section(self, raw: Mapping, key: str, cls: type) -> Any: ...

    def named(
        self, section: str, i: int, entry: Any, known: tuple[str, ...], required: str
    ) -> tuple[str, str] | None: ...


#: When a kind's grid section is read, in this order (``TrialKind.section_phase``); each phase
#: sees what the grid parsed before it (``common``): "before-names" nothing (it is read before
#: the sources and targets: a pretraining domain is neither by default); "after-names" the
#: domain ``names``, the ``private`` ones (not the pretraining domain), ``sources`` and
#: ``targets``; "after-common" also ``epsilons``, ``seeds`` and ``training``.
SECTION_PHASES = ("before-names", "after-names", "after-common")


@dataclass(frozen=True)
class BatchFit:
    """One logical batch that must fit its training set (``grid.check_sample_rates``): the
    grid ``key`` that sets it, the batch, the training ``units`` it samples from, their
    ``unit`` ("images" or "patients") and ``where`` (words: which data)."""

    key: str
    batch: int
    units: int
    unit: str
    where: str


class TrialKind:
    """A kind of trial: how its trials are planned, trained, counted and shown.

    One object per kind, registered by its module. The defaults are a single-site trial's; a
    kind overrides the attributes and methods that differ. Nothing outside ``kinds/`` (and the
    store) reads the fields that tell kinds apart: they ask the trial's kind.
    """

    name: str = ""
    description: str = ""
    # the trainer, by its name in the training side's registry (``trial.TRAINERS``): kinds/
    # stays torch-free and below train/federated, and a kind that trains like another one
    # names that trainer and needs no edit outside its module (tests check every name resolves)
    trainer: str = "single_site"
    # where its training data is: "source" (its domain's cache), "own" (a cache entry of its
    # own, under the trial's name: other preprocessing), or "sites" (a federation's members)
    data: str = "source"
    evaluated: bool = True  # tested on the grid's targets
    in_matrices: bool = True  # its rows are the models of the transfer matrices and comparisons
    released: bool = True  # its weights are part of the shareable set (with a valid guarantee)
    stage: int = 1  # stages run in order (0: pretraining, which others start from)
    coordinator: bool = False  # coordinates its own tasks from Tune's trial process
    # columns it adds to the rows of the trial it is attached to (``attached_to``); null on
    # the rows of trials without one (stats/results.py: AUDIT_COLUMNS, privacy class "audit")
    columns: tuple[str, ...] = ()
    # the grid section it owns ("" for none), also the SweepSpec field its parse is kept in
    section: str = ""
    # when that section is read: one of SECTION_PHASES (not ``stage``, the training order)
    section_phase: str = "after-common"
    section_help: str = ""  # what the section holds (the grid's list of top-level keys)
    # a grid with this section may say `sources: []`: its trials train without a single
    # source (a federation's sites), so a grid of them alone trains no single-site model
    sourceless: bool = False

    def parse_section(self, c: Checker, raw: Mapping, common: Mapping[str, Any]) -> Any:
        """Its grid section, checked (None when the grid has none); ``common``: what the grid
        parsed before its ``section_phase`` (``SECTION_PHASES`` says what each phase sees)."""
        return None

    def check_training(self, c: Checker, section: Any, training: Any) -> None:
        """Check the grid's ``training`` section (a config.TrainingConfig) against this kind's
        parsed section (e.g. a federation protects images, not patients); read while the
        training section is, so an after-common section is not parsed yet (None)."""

    def batch_fits(
        self, sweep: SweepSpec, n_train: Mapping[str, int], n_patients: Mapping[str, int] | None
    ) -> Iterator[BatchFit]:
        """The logical batches of its section's trials that must fit their training sets,
        beyond the grid's sources (``grid.check_sample_rates``); counts of domains absent
        from ``n_train`` are not known yet and are skipped."""
        return iter(())

    def plan(self, ctx: PlanContext) -> Iterator[TrialSpec]:
        """The grid's trials of this kind (keys not set)."""
        raise NotImplementedError

    def kept(self, ctx: PlanContext) -> Iterator[TrialSpec]:
        """Trials the grid no longer asks for but whose finished results are still read (never
        trained: ``plan_trials`` takes them only when finished), e.g. twins of cells not chosen."""
        return iter(())

    def note(self, spec: SweepSpec, trials: Sequence[TrialSpec]) -> str:
        """A line for ``launch.py plan`` about this kind's trials ("" for none)."""
        return ""

    def work(self, spec: TrialSpec) -> tuple[float, float]:
        """(expected trainings, expected epochs of each) of one trial: what ``plan`` counts
        (a tuned cell: E[K] candidates, kinds/tuning.py)."""
        return 1.0, float(spec.training.epochs)

    def members(self, spec: TrialSpec) -> tuple[Site, ...]:
        """The sites that train together in one trial (a federation's); () for one source."""
        return ()

    def member_runs(self, part: Any) -> Mapping[str, Any]:
        """Each member's run as its record's ``part`` holds it (name -> a run with ``n_train``
        and ``steps``, e.g. ``kinds.federated.SiteRun``): what audit recomputes a member's
        ledger from; {} for a one-source kind."""
        return {}

    def training_sites(self, spec: TrialSpec) -> tuple[str, ...]:
        """The domains whose training data made the model: the one rule every module uses
        (a member with weight 0 contributes nothing)."""
        members = self.members(spec)
        return tuple(s.name for s in members if s.weight > 0) if members else (spec.source,)

    def slots(self, sweep: SweepSpec, spec: TrialSpec, cap: int) -> tuple[int, float, float]:
        """(task slots, cpu and gpu per slot) the trial holds; ``cap``: the cluster's slots."""
        return 1, sweep.resources.cpu, sweep.resources.gpu

    def label(self, spec: TrialSpec) -> str:
        """The table's ``variant`` column: the spec's variant as written ("standard" for a
        federation too, so tables written before kinds keep their values; ``row_kind``)."""
        return spec.variant

    def canary_check(self, record: Any, ledger: Mapping[str, Any]) -> Any:
        """Its one-run canary audit recomputed (a ``kinds.audit.TwinCheck``) against the
        ledger document as stored (``store.ledger_document``: certifying code reads the claim,
        not its typed parse), or None for a kind without one (``launch.py audit`` reports it)."""
        return None

    def ledger_check(self, record: Any, ledger: Mapping[str, Any]) -> Any:
        """Its own recomputation of a DP ledger document, as (problems, recomputed epsilon),
        for a kind whose ledger is not one training run's (a tuned cell's); None: audit
        rebuilds the run from the spec (``privacy.expected_ledger``)."""
        return None

    def own_columns(self, record: Any) -> dict[str, Any]:
        """Values of the transfer table's kind-owned public columns on its own rows
        (``stats/results.py``: ``KIND_COLUMNS``; a tuned cell's ``tuning``); {}: null."""
        return {}

    def attached_to(self, spec: TrialSpec) -> str | None:
        """The key of the trial whose table rows take this trial's ``columns`` (None: own rows)."""
        return None

    def row_columns(self, record: Any) -> dict[str, Any]:
        """This trial's ``columns`` for the rows it is attached to (a store.TrialRecord)."""
        return {}

    # its part of the run record (trial.json): the store reads and writes it through these
    #: the keys of trial.json its part owns (``RunRecord.part``; written where they always were)
    record_keys: tuple[str, ...] = ()

    def record_part(self, data: Mapping[str, Any]) -> object | None:
        """Its typed part of a run record from the ``record_keys`` trial.json holds (those
        present; a writer may pass typed values), None for none; ValueError, TypeError or
        KeyError for a damaged one (the store refuses the record)."""
        return None

    def record_json(self, part: Any) -> dict[str, Any]:
        """``part`` as trial.json holds it (its keys, JSON values): what ``record_part`` reads."""
        return {}

    def report_sections(self) -> tuple[ReportSection, ...]:
        """The report sections it contributes (report/ collects them when it renders)."""
        return ()

    def report_figures(self) -> tuple[ReportFigure, ...]:
        """The report figures it contributes (report/figures.py draws them after its own)."""
        return ()


@dataclass(frozen=True)
class ReportSection:
    """A report section a kind contributes. ``render`` takes the report's view (duck-typed:
    ``report.view.ReportView``'s public tables and selections; kinds/ sits below report/) and
    returns markdown ("" leaves the section out). ``after``: the key of the section it follows
    (None: at the end); ``part_of``: a section's key whose body this one opens instead (no
    heading of its own; parts in kind order before the section's own body)."""

    key: str
    title: str
    render: Callable[[Any], str]
    after: str | None = None
    part_of: str = ""


@dataclass(frozen=True)
class ReportFigure:
    """A report figure a kind contributes: ``file`` under figures/, and ``draw(view, new)``
    (the report's view, duck-typed; ``new(figsize, **subplots)`` gives a matplotlib figure
    and its axes on the Agg canvas) returning the figure, or None when the study has nothing
    to draw (report/figures.py saves it)."""

    file: str
    draw: Callable[[Any, Callable[..., Any]], Any]


REGISTRY: dict[str, TrialKind] = {}


def register(kind: TrialKind) -> TrialKind:
    if kind.name in REGISTRY:
        raise RuntimeError(f"trial kind {kind.name!r} registered twice")
    REGISTRY[kind.name] = kind
    return kind


class UnknownKind(LookupError):
    """A trial (or table row) of a kind this version does not register: written by a newer
    privdom-ray, or an edited record. Not damage: its folder is never set aside (a newer
    version's trial must survive); certifying commands name it and stop. A LookupError, so
    that ``launch.py`` prints it as an error line and no store check takes it for damage."""

    def __init__(self, kind: str, trial: str, key: str = "") -> None:
        self.kind, self.trial, self.key = kind, trial, key
        where = f"move trials/{key} aside" if key else "rebuild the tables with this version"
        super().__init__(
            f"{trial}: unknown trial kind {kind!r} (this version knows {sorted(REGISTRY)}); "
            f"written by a newer privdom-ray? upgrade privdom-ray to read it; else {where}"
        )


def kind_of(spec: TrialSpec) -> TrialKind:
    """A trial's kind (``TrialSpec.kind`` names it); ``UnknownKind`` for one not registered."""
    kind = REGISTRY.get(spec.kind)
    if kind is None:
        raise UnknownKind(spec.kind, f"trial {spec.key or '(no key)'} ({spec.name})", spec.key)
    return kind


def training_sites(spec: TrialSpec) -> tuple[str, ...]:
    """The domains whose training data made the trial's model (its kind's rule)."""
    return kind_of(spec).training_sites(spec)


def row_kind(variant: Any, source: Any, training_sites: Any) -> TrialKind:
    """A table row's kind (tables hold ``variant`` and ``training_sites``, not the kind): a
    variant other than "standard" names it; a standard row whose model was trained on other
    domains than its source is a federation's (tables from before federations: no sites).
    ``UnknownKind`` for a variant no kind registers (a newer version's table)."""
    if isinstance(variant, str) and variant not in REGISTRY:
        raise UnknownKind(variant, f"a table row of source {source!r}")
    if isinstance(variant, str) and variant != "standard":
        return REGISTRY[variant]
    if isinstance(training_sites, str) and training_sites and training_sites != source:
        return REGISTRY["federated"]
    return REGISTRY["standard"]


def attached(records: Iterable[Any]) -> dict[str, Any]:
    """{trial key: the record of the trial attached to it} (an audit twin, by the key of the
    cell it audits), from trial records (store.TrialRecord; None is skipped)."""
    out = {}
    for record in records:
        if record is not None:
            key = kind_of(record.spec).attached_to(record.spec)
            if key is not None:
                out[key] = record
    return out


def plan_trials(
    spec: SweepSpec,
    fingerprints: Mapping[str, str],
    n_train: Mapping[str, int],
    *,
    init_file_hash: str = "",
    public_pos_weight: tuple[float, ...] = (),
    finished: Callable[[str], bool] | None = None,
) -> list[TrialSpec]:
    """Every trial of the grid, stage by stage (pretraining first), keys set; then the kinds'
    ``kept`` trials for which ``finished(key)`` holds (none without ``finished``).

    ``init_file_hash`` identifies a user-supplied weights file (``training.init: <path>``).
    """
    ctx = PlanContext(spec, fingerprints, n_train, public_pos_weight=public_pos_weight)
    early = [t.with_key() for k in _kinds(stage=0) for t in k.plan(ctx)]
    pre = early[0] if early else None  # pretraining: the stage others start from
    if spec.training.init == "pretrain":
        assert pre is not None
        init = f"pretrain:{pre.key}"
    elif spec.init_path is not None:
        init = f"file:{init_file_hash}"
    else:
        init = "scratch"
    ctx = dataclasses.replace(ctx, init=init)
    trials = early + [t.with_key() for k in _kinds(stage=1) for t in k.plan(ctx)]
    if finished is None:
        return trials
    planned = {t.key for t in trials}
    kept = [t.with_key() for k in REGISTRY.values() for t in k.kept(ctx)]
    return trials + [t for t in kept if t.key not in planned and finished(t.key)]


def plan_notes(spec: SweepSpec, trials: Sequence[TrialSpec]) -> list[str]:
    """The kinds' lines for ``launch.py plan`` (e.g. which cells the audit twins cover)."""
    notes = (k.note(spec, trials) for k in REGISTRY.values())
    return [n for n in notes if n]


def own_data_trials(spec: SweepSpec, fingerprints: Mapping[str, str]) -> list[TrialSpec]:
    """Trials that train on a cache entry of their own (``data = "own"``: under the trial's
    name, with their own preprocessing; the pretraining trial), keys set: the driver decodes
    them before anything else. Planned from the grid and fingerprints alone."""
    ctx = PlanContext(spec, fingerprints, {})
    return [t.with_key() for k in REGISTRY.values() if k.data == "own" for t in k.plan(ctx)]


def _kinds(stage: int) -> list[TrialKind]:
    return [k for k in REGISTRY.values() if k.stage == stage]


def resolve_delta(spec: SweepSpec, source: str, n_train: int) -> float:
    """The delta a source trains with: per-domain, else the grid's, else min(1e-5, 1/(10 N)).

    A delta >= 1/N_train permits a mechanism that publishes one whole record outright, so it
    is refused rather than silently weakened (checked by ``check_deltas`` before any trial).
    """
    d = spec.domain(source).delta or spec.delta
    return d if d is not None else min(DEFAULT_DELTA, 1.0 / (10 * max(n_train, 1)))


def check_deltas(spec: SweepSpec, n_train: Mapping[str, int]) -> None:
    if spec.allow_large_delta:
        return
    errors = []
    for s in spec.trained_domains:
        delta = resolve_delta(spec, s, n_train[s])
        if delta >= 1.0 / n_train[s] and any(math.isfinite(e) for e in spec.epsilons):
            errors.append(
                f"domains[{s}].delta: {delta:g} is not allowed; expected below 1/N_train = "
                f"1/{n_train[s]} = {1.0 / n_train[s]:.3g} for source {s!r} (a delta that large "
                "allows publishing a whole record; set allow_large_delta: true to accept it)"
            )
    if errors:
        raise GridError(str(spec.grid_path), errors)


def _import_kinds() -> None:
    """Import every module of this package so each kind registers itself, in a fixed order."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_kinds()
