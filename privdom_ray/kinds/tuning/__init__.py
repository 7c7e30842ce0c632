"""Tuned cells: the best of K candidates, each trained from a configuration drawn from the
grid's ``tuning.space`` (Papernot and Steinke 2022; docs/tuning-design.md).

With a ``tuning:`` section every single-site cell (source, epsilon, seed; DP and non-DP alike,
the fair baseline) becomes one coordinator trial of this kind: it draws K and K
configurations from OS entropy, trains the candidates, scores them on the validation split
and releases the winner only. Its key is the untuned cell's fields plus the section as
written, so a grid without the section plans exactly what it did before (pinned keys hold).

The space is a plain description in Ray Tune's conventions (``tune.loguniform``,
``tune.uniform``, ``tune.choice``, ``tune.randint``); sampling is numpy from OS entropy here
(kinds/ stays ray- and torch-free). Only ``logical_batch`` and ``epochs`` change the privacy
curve, so they must take finitely many values: each combination is a run shape the per-run
noise is calibrated for (``selection.tuning.calibrate``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from privdom_ray.config import SweepSpec, TrainingConfig, TrialSpec, content_key
from privdom_ray.kinds import BatchFit, Checker, PlanContext, ReportSection, TrialKind, register
from privdom_ray.kinds.standard import single_site
from privdom_ray.kinds.tuning.ledger import (  # noqa: F401 (re-exported: kinds.tuning's names)
    EXACT_TOL,
    PARALLEL_STATEMENT,
    UPGRADED_TOL,
    candidate_noise,
    check_selection,
    ledger_check,
    recompute_tolerance,
    run_shapes,
    selection_entry,
    tuning_fixed,
    tuning_plan,
)
from privdom_ray.kinds.tuning.report import (  # noqa: F401 (re-exported)
    K_SECRET,
    search_json,
    tuned_validation_note,
    tuning_section,
)
from privdom_ray.kinds.tuning.section import (  # noqa: F401 (re-exported)
    ADAPTIVE,
    DEFAULT_RUNS_SPEC,
    SAMPLERS,
    SEARCHES,
    TUNABLE,
    Sampler,
    Tunable,
    parse_section,
    runs_of,
    sample_configuration,
    shape_values,
    validation_shares,
)
from privdom_ray.selection import runs as run_dists


def plan(ctx: PlanContext) -> Iterator[TrialSpec]:
    """One tuned trial per single-site cell (source, epsilon, seed), DP and non-DP alike."""
    tuning = ctx.spec.tuning
    if tuning is None:
        return
    for source in ctx.spec.sources:
        for epsilon in ctx.spec.epsilons:
            for seed in ctx.spec.seeds:
                cell = single_site(ctx, source, epsilon, seed, "standard")
                yield dataclasses.replace(cell, tuning=tuning)


# ------------------------------------------------------------------------------ candidates


def candidate_name(spec: TrialSpec, index: int) -> str:
    """A candidate's name in the dashboard and logs (private, like K: ``<cell>_cand03``)."""
    return f"{spec.name}_cand{index:02d}"


def candidate_key(spec: TrialSpec, config: TrainingConfig, index: int) -> str:
    """A candidate's key: the tuned cell's key (its fields and the section), its drawn
    configuration and its index among the K."""
    return content_key({"cell": spec.key, "candidate": index,
                        "training": dataclasses.asdict(config)})  # fmt: skip


def note(spec: SweepSpec, trials: Sequence[TrialSpec]) -> str:
    """``plan``'s line: tuned cells, E[K] and the 95% quantile of K, expected trainings."""
    tuning = spec.tuning
    tuned = [t for t in trials if t.tuning is not None]
    if tuning is None or not tuned:
        return ""
    runs = runs_of(tuning)
    mean, q95 = runs.mean(), run_dists.quantile(runs, 0.95)
    space = ", ".join(f"{d.name} {d.sampler}{list(d.args)}" for d in tuning.space)
    return (
        f"tuned cells: {len(tuned)} (random search over {space}); K ~ "
        f"{dict(tuning.runs)['distribution']}, E[K] = {mean:.3g} per cell, 95% quantile "
        f"{q95}: about {len(tuned) * mean:,.0f} candidate trainings expected (K is drawn from "
        "OS entropy and kept private)"
        + (
            "; audit twins audit the untuned cells' training, not the tuned release"
            if spec.audit is not None
            else ""
        )
    )


@dataclass(frozen=True)
class TunedRun:
    """A tuned cell's part of the run record: the winner's searched hyperparameters (the
    released configuration, covered by the bound; the record's ``selection`` says how it was
    chosen, with E[K]). Nothing else of the search (K, the other candidates, their scores and
    timings) is in a record."""

    configuration: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, config: Any) -> TunedRun:
        if not isinstance(config, Mapping):
            raise TypeError(f"tuned_configuration {config!r} is not a mapping")
        return cls(tuple(sorted((str(k), float(v)) for k, v in config.items())))

    def to_json(self) -> dict[str, Any]:
        return {"tuned_configuration": dict(self.configuration)}


class Tuned(TrialKind):
    name = "tuning"
    description = "the best of K DP candidates drawn from a search space (Papernot-Steinke)"
    trainer = "tuning"
    coordinator = True
    section = "tuning"
    section_phase = "after-common"  # it reads the grid's training section
    section_help = (
        "honest tuning: every cell the best of K candidates from a search space "
        "{space, runs, search: random, score, thresholds, validation_shares}"
    )
    record_keys = ("tuned_configuration",)

    def parse_section(self, c: Checker, raw: Mapping, common: Mapping[str, Any]) -> Any:
        return parse_section(c, raw, common["training"])

    def batch_fits(
        self, sweep: SweepSpec, n_train: Mapping[str, int], n_patients: Mapping[str, int] | None
    ) -> Iterator[BatchFit]:
        """Every logical batch the space can draw must fit every source (the grid's own batch
        is checked by the grid)."""
        if sweep.tuning is None:
            return
        batches = shape_values(sweep.tuning, sweep.training)["logical_batch"]
        for source in sweep.sources:
            if source in n_train:
                for batch in batches:
                    yield BatchFit("tuning.space.logical_batch", batch, n_train[source],
                                   "images", f"source {source!r}")  # fmt: skip

    def plan(self, ctx: PlanContext) -> Iterator[TrialSpec]:
        return plan(ctx)

    def note(self, spec: SweepSpec, trials: Sequence[TrialSpec]) -> str:
        return note(spec, trials)

    def work(self, spec: TrialSpec) -> tuple[float, float]:
        assert spec.tuning is not None, spec.name
        epochs = shape_values(spec.tuning, spec.training)["epochs"]
        return runs_of(spec.tuning).mean(), float(np.mean(epochs))

    def ledger_check(self, record: Any, ledger: Mapping[str, Any]) -> Any:
        """The stored selection recomputed, the calibration rerun (exact unless the record
        was trained with other numerical libraries than the installed ones)."""
        units = record.info.units or record.info.n_train or 0
        tol = recompute_tolerance(record.info.versions or {})
        return ledger_check(record.spec, units, ledger, tol)

    def label(self, spec: TrialSpec) -> str:
        return "standard"  # a tuned cell is the grid's cell: the same rows and matrices

    def record_part(self, data: Mapping[str, Any]) -> TunedRun | None:
        value = data.get("tuned_configuration")
        if value is None:
            return None
        return value if isinstance(value, TunedRun) else TunedRun.of(value)

    def record_json(self, part: TunedRun) -> dict[str, Any]:
        return part.to_json()

    def own_columns(self, record: Any) -> dict[str, Any]:
        """The search (public ``tuning`` column) and the winner's searched hyperparameters in
        the table's ``lr``/``logical_batch``/``epochs`` columns (the grid's are not the model's;
        the winner's configuration is part of the released output the bound covers)."""
        tuning = record.spec.tuning
        assert tuning is not None, record.spec.name
        runs = runs_of(tuning)
        part = record.info.part
        won = dict(part.configuration) if isinstance(part, TunedRun) else {}
        columns = {k: int(won[k]) if TUNABLE[k].integer else float(won[k])
                   for k in ("lr", "logical_batch", "epochs") if k in won}  # fmt: skip
        search = search_json(tuning, runs.mean(), run_dists.quantile(runs, 0.95))
        return {**columns, "tuning": search}

    def report_sections(self) -> tuple[ReportSection, ...]:
        return (
            ReportSection("tuning", "Honest tuning: what was searched and what it cost",
                          tuning_section, after="privacy"),
            ReportSection("tuning_privacy", "", tuned_validation_note, part_of="privacy"),
        )  # fmt: skip


register(Tuned())
