"""DP-vs-non-DP comparisons from the per-image predictions of finished trials.

The transfer table holds one AUC per (trial, target, label, subgroup) with its own CI; it
cannot say whether two models differ, because their CIs are not independent (same test
patients). This module goes back to the predictions kept in each trial folder and compares
models *on the same patients* of the same test set. Rows (``comparison``):

``paired_delta``
    every finite-epsilon model vs the ``inf`` (non-DP) model of the same source and seed on
    the same target: ``delta_auc`` (per label, macro and subgroup; on- and off-domain),
    and ``delta_brier`` (calibration, subgroup "all"). There is no ECE comparison: the binned
    ECE is biased upwards and its bootstrap CI covered a calibrated model's ECE in 0 of 300
    simulations (statistics red team); the Brier score is a proper scoring rule without that
    bias.
``auc_drop``
    per test site T (:data:`~privdom_ray.stats.quantities.DROP_DEFINITIONS`): each model's OWN
    drop from on-domain to off-domain AUC (``drop``, the PRIMARY endpoint's quantity), and its
    two parts: the on-domain AUC (``on_domain_auc``: DP - non-DP is DP's on-domain cost) and the
    mean off-domain AUC (``off_domain_auc``: DP's off-domain cost). Identity: Δdrop = Δon -
    Δoff.
``fairness_gap``
    female - male (``auc_gap_sex``) and oldest - youngest age bin (``auc_gap_age``) macro AUC
    of each model on each target, with both subgroups on the test set's patients JOINTLY,
    and DP's effect on the gap (gap_DP - gap_nonDP, paired).
``across_seeds``
    with >= 2 seeds, for every comparison above: the mean over seeds of the per-seed values,
    inferred for the mean over training randomness by :func:`inference.pool_seeds` (a t
    interval whose variance adds the between-seed variance to the test noise the seeds share;
    Satterthwaite df). The paired t test across seeds (the paper's test) is a secondary
    column (``p_t``), CONDITIONAL on the test set: it treats the test patients as fixed and
    covered the mean over training randomness 40-85% of the time (statistics red team).

Inference (:mod:`privdom_ray.stats.inference`, evaluation protocol 4): every statistic here is a
linear combination of AUCs (or Brier scores) on one test set, and each AUC's
leave-one-patient-out values are computed exactly (:func:`resampling.jackknife_auc`); the same
combination of those values gives the statistic's jackknife variance, so the pairing (same
patients for every model) is kept exactly. CI, p and TOST come from one t rule with the
Satterthwaite df of the rarer class's patients (:func:`inference.infer_t`); value CIs of
AUCs and Brier scores are on the logit scale. Every term of a test site's drop is an AUC on
THAT site's test patients (on-domain: the site's own model; off-domain: the other sources'
models, all tested on T), so one jackknife over T's patients carries them all; different
test sites are different patients, so their statistics are independent (what the
intersection-union test below may assume, and Holm does not need).

The PRIMARY endpoint is the paper's claim ("DP-DT ... showed no evidence of a difference
from non-DP-DT in the AUC drop from single-institution to cross-institution performance"):
per test site T and epsilon, drop(DP) - drop(non-DP) with each model's own drop (macro, all
test images, the ``is_summary`` row), tested for equivalence within ``±margin`` (TOST), for
difference and for non-inferiority. Two claims are read from it:

* per site: the three p's are Holm-adjusted across the test sites per (model, epsilon)
  before the verdict reads them (a claim about one named site among several);
* every site at once ("DP costs nothing in transfer at every site"): an intersection-union
  test, no adjustment: ``p_tost_iut`` = the largest unadjusted TOST p of the sites, so the
  claim holds when every site's 90% CI lies inside the margin.

Every other p-value is exploratory: its verdict reads Benjamini-Hochberg q-values (of the
difference, TOST and non-inferiority p's) within the family (comparison, quantity): every
label, subgroup, source, target, epsilon and seed of that quantity together.

Default margin, 0.02 AUC (``evaluation.equivalence_margin``): the paper found that DP costs
about 0.03-0.05 AUC on-domain while it moves off-domain AUC by <= 0.013. A margin below the
on-domain cost means the test can refute equivalence where DP demonstrably costs something
(it is not a rubber stamp). ``margin_confirmable`` (the 90% CI's farthest bound) and
``tost_half_width`` (the margin the design could confirm were the difference exactly 0) say
what each test set could have shown; ``launch.py plan`` prints the test-set size a margin
needs.

Units: within test set T and subgroup g every model is scored on g's rows and the patients
of g are the jackknife's units (images where a domain has no patient ids). Models are
paired only on the same target *fingerprint* (same test rows in the same order) and identical
labels; a mismatch skips the model with a
:class:`~privdom_ray.stats.quantities.ComparisonWarning`. Only finished trials (``done``) and
complete evaluations (``eval.json``) are read. Folders written before predictions carried
``patient_group`` are resampled by image, and ``resampling_unit`` says so. The tables are
aggregates: no ids, paths or per-image (or per-patient) values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from privdom_ray import atomic
from privdom_ray.config import EvaluationConfig
from privdom_ray.folder import COMPARISONS, RELIABILITY
from privdom_ray.stats.comparison_rows import _finalize, _frame, _rows
from privdom_ray.stats.estimates import _Item, _test_set_items
from privdom_ray.stats.quantities import (
    _DEFAULT,
    RELIABILITY_SCHEMA,
    SCHEMA,
)
from privdom_ray.stats.study import Study, load_study

# ============================================================================ API


@dataclass
class Tables:
    """The aggregate tables of a sweep's comparisons (no ids, no per-image rows)."""

    comparisons: pd.DataFrame
    reliability: pd.DataFrame


def compute_tables(study: Study, evaluation: EvaluationConfig = _DEFAULT) -> Tables:
    """All comparison rows and reliability bins of a loaded study (pure: no file access)."""
    items: list[_Item] = []
    reliability: list[dict[str, Any]] = []
    for ts in study.tests:
        per_items, per_rel = _test_set_items(ts, study.models, evaluation)
        items += per_items
        reliability += per_rel
    df = _finalize(_frame(_rows(items, evaluation), SCHEMA), evaluation)
    return Tables(df, _frame(reliability, RELIABILITY_SCHEMA))


def _config(evaluation: EvaluationConfig | None, overrides: dict[str, Any]) -> EvaluationConfig:
    ev = evaluation or _DEFAULT
    if "age_bins" in overrides:
        overrides = {**overrides, "age_bins": tuple(float(b) for b in overrides["age_bins"])}
    return dataclasses.replace(ev, **overrides)


def compute_all(
    output: Path,
    keys: Sequence[str],
    evaluation: EvaluationConfig | None = None,
    *,
    targets: Sequence[Any] | None = None,
    **overrides,
) -> Tables:
    """Comparisons and reliability bins of the finished trials ``keys`` on ``targets``'
    current data versions (default: the last plan's).

    ``evaluation`` should be the grid's settings (so the resamples coincide with the ones
    behind the transfer table's CIs); keyword ``overrides`` replace single fields of it.
    """
    study = load_study(Path(output), keys, targets)
    return compute_tables(study, _config(evaluation, overrides))


def compute(
    output: Path, keys: Sequence[str], evaluation: EvaluationConfig | None = None, **overrides
) -> pd.DataFrame:
    """The comparisons table only (see :func:`compute_all`)."""
    return compute_all(output, keys, evaluation, **overrides).comparisons


def write(output: Path, df: pd.DataFrame) -> Path:
    """Write ``<output>/comparisons.parquet`` atomically with the documented schema."""
    path = Path(output) / COMPARISONS
    atomic.write_parquet(path, _arrow(df, SCHEMA))
    return path


def arrow_tables(tables: Tables) -> dict[str, pa.Table]:
    """The two tables as they are written (the documented schemas applied), by file name:
    what a reader of the files gets back, so a report can be rendered from them in memory."""
    return {
        COMPARISONS: _arrow(tables.comparisons, SCHEMA),
        RELIABILITY: _arrow(tables.reliability, RELIABILITY_SCHEMA),
    }


def write_all(output: Path, tables: Tables | dict[str, pa.Table]) -> list[Path]:
    """Write comparisons.parquet and reliability.parquet (atomically, each); ``tables``: the
    computed tables or their :func:`arrow_tables`."""
    arrow = arrow_tables(tables) if isinstance(tables, Tables) else tables
    paths = []
    for name, table in arrow.items():
        atomic.write_parquet(Path(output) / name, table)
        paths.append(Path(output) / name)
    return paths


def _arrow(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(df.loc[:, schema.names], schema=schema, preserve_index=False)


def load(output: str | Path) -> pd.DataFrame | None:
    """``<output>/comparisons.parquet`` as a DataFrame, or None when it was not written."""
    path = Path(output) / COMPARISONS
    return pd.read_parquet(path) if path.is_file() else None


def load_reliability(output: str | Path) -> pd.DataFrame | None:
    """``<output>/reliability.parquet`` as a DataFrame, or None when it was not written."""
    path = Path(output) / RELIABILITY
    return pd.read_parquet(path) if path.is_file() else None
