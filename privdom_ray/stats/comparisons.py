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
    per test site T (:data:`DROP_DEFINITIONS`): each model's OWN drop from on-domain to
    off-domain AUC (``drop``, the PRIMARY endpoint's quantity), and its two parts: the
    on-domain AUC (``on_domain_auc``: DP - non-DP is DP's on-domain cost) and the mean
    off-domain AUC (``off_domain_auc``: DP's off-domain cost). Identity: Δdrop = Δon - Δoff.
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
paired only on the same target *fingerprint* (same test rows in the same order) and
identical labels; a mismatch skips the model with a :class:`ComparisonWarning`. Only
finished trials (``done``) and complete evaluations (``eval.json``) are read. Folders written
before predictions carried ``patient_group`` are resampled by image, and ``resampling_unit``
says so. The tables are aggregates: no ids, paths or per-image (or per-patient) values.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from privdom_ray import atomic
from privdom_ray.config import EvaluationConfig, parse_epsilon
from privdom_ray.kinds import kind_of
from privdom_ray.stats import evaluation, inference, metrics, resampling, results, thresholds
from privdom_ray.store import TrialRecord, TrialStore

COMPARISONS = "comparisons.parquet"
RELIABILITY = "reliability.parquet"

PAIRED_DELTA = "paired_delta"
AUC_DROP = "auc_drop"
FAIRNESS_GAP = "fairness_gap"
ACROSS_SEEDS = "across_seeds"
PRIMARY_QUANTITY = "drop"
ON_DOMAIN = "on_domain_auc"
OFF_DOMAIN = "off_domain_auc"

DROP_DEFINITIONS = {
    "drop": (
        "AUC_eps(T->T) - mean_{S != T} AUC_eps(S->T): the model's OWN drop on test site T, its "
        "on-domain AUC (trained on T) minus the mean AUC on T of the models trained on the "
        "other sources, all at the row's epsilon. value_dp - value_nondp is the PRIMARY "
        "endpoint: DP's drop minus non-DP's drop (the paper's 'AUC drop from "
        "single-institution to cross-institution performance', DP vs non-DP)"
    ),
    ON_DOMAIN: (
        "AUC_eps(T->T): the on-domain AUC; DP - non-DP is DP's on-domain cost (negative: DP "
        "loses AUC at home)"
    ),
    OFF_DOMAIN: (
        "mean_{S != T} AUC_eps(S->T): the mean off-domain AUC on T; DP - non-DP is DP's "
        "off-domain cost. The paper's own arithmetic (non-DP on-domain AUC minus DP "
        "off-domain AUC as the 'DP drop') cancels the on-domain term and measures only this"
    ),
}


@dataclass(frozen=True)
class Quantity:
    """What a row compares: ``worse_if`` is the direction in which the DP side is worse
    (None: no direction, so no non-inferiority test); ``margin`` whether it is in AUC units
    (and gets the equivalence test); ``level`` whether each side's value is a level in
    [0, 1] (an AUC, a Brier score: its CI is on the logit scale) rather than a difference."""

    worse_if: str | None
    margin: bool
    meaning: str
    level: bool = False


QUANTITIES = {
    "delta_auc": Quantity("lower", True, "AUC(DP) - AUC(non-DP): a lower AUC is worse", True),
    "delta_brier": Quantity("higher", False, "Brier(DP) - Brier(non-DP): higher is worse", True),
    PRIMARY_QUANTITY: Quantity("higher", True, "drop(DP) - drop(non-DP): a larger drop is worse"),
    ON_DOMAIN: Quantity("lower", True, "on-domain AUC(DP) - AUC(non-DP): DP's on-domain cost",
                        True),
    OFF_DOMAIN: Quantity("lower", True, "mean off-domain AUC(DP) - (non-DP): DP's off-domain "
                         "cost", True),
    "auc_gap_sex": Quantity(None, True, "gap(DP) - gap(non-DP), gap = AUC(F) - AUC(M)"),
    "auc_gap_age": Quantity(None, True, "gap(DP) - gap(non-DP), gap = AUC(oldest) - AUC(youngest)"),
}  # fmt: skip

# Columns of comparisons.parquet, in order, with their meaning (the table in docs/outputs.md).
COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "comparison": (pa.string(), "paired_delta, auc_drop, fairness_gap or across_seeds"),
    "quantity": (pa.string(), "what is compared: delta_auc, delta_brier, drop, on_domain_auc, "
                 "off_domain_auc (DROP_DEFINITIONS), auc_gap_sex, auc_gap_age"),
    "endpoint": (pa.string(), "primary (drop(DP) - drop(non-DP) per test site, macro AUC, all "
                 "test images) or exploratory"),
    "is_summary": (pa.bool_(), "the row that answers the comparison: the per-seed row with "
                   "one seed, the across_seeds row with several"),
    "test": (pa.string(), "how CI and p were obtained (paired patient/image jackknife t, or "
             "t interval over seeds: between-seed + shared test variance)"),
    "model": (pa.string(), "network architecture of the compared trials"),
    "source": (pa.string(), "training site of both models; null for auc_drop"),
    "target": (pa.string(), "test site (its test split, one fingerprint)"),
    "on_domain": (pa.bool_(), "the target's data trained the model; null for auc_drop"),
    "seed": (pa.int64(), "training seed shared by the DP and non-DP models; null across seeds"),
    "n_seeds": (pa.int64(), "seeds behind the row"),
    "label": (pa.string(), "one of the five labels, or macro (mean over the row's label set)"),
    "subgroup": (pa.string(), "all, sex=F, sex=M, age=[lo,hi); for gaps the two subgroups"),
    "epsilon": (pa.float64(), "target epsilon of the DP side; inf on rows of a non-DP value"),
    "epsilon_spent": (pa.float64(), "epsilon spent by the DP model (auc_drop: the test site's "
                      "own DP model); across seeds: mean"),
    "accountant": (pa.string(), "accountant that produced epsilon_spent"),
    "n": (pa.int64(), "test images with a known label (label rows) or in the subgroup (macro)"),
    "n_pos": (pa.int64(), "positives (label rows) or positive image-label pairs of the set"),
    "n_patients": (pa.int64(), "units (patients, or images) behind the row"),
    "resampling_unit": (pa.string(), "patient, or image where the test set has no patient "
                        "groups (VinDr, or evaluations written before they existed)"),
    "n_labels": (pa.int64(), "labels in the macro's set (1 or 0 on label rows): for a subgroup "
                 "the labels valid in every subgroup of its family (sex, age), so macros side "
                 "by side average the same labels"),
    "value_dp": (pa.float64(), "the DP side's quantity: AUC, Brier, drop or gap "
                 "(across seeds: mean over seeds)"),
    "value_dp_lo": (pa.float64(), "lower CI bound of value_dp"),
    "value_dp_hi": (pa.float64(), "upper CI bound of value_dp"),
    "value_nondp": (pa.float64(), "the non-DP side's quantity"),
    "value_nondp_lo": (pa.float64(), "lower CI bound of value_nondp"),
    "value_nondp_hi": (pa.float64(), "upper CI bound of value_nondp"),
    "auc_on": (pa.float64(), "drop rows: the on-domain AUC in the DP side's drop"),
    "auc_off_mean": (pa.float64(), "drop rows: mean AUC on the test site of the other "
                     "sources' models at the row's epsilon"),
    "auc_off_lo": (pa.float64(), "lower CI bound of auc_off_mean"),
    "auc_off_hi": (pa.float64(), "upper CI bound of auc_off_mean"),
    "n_off": (pa.int64(), "auc_drop: other sources averaged in the off-domain mean"),
    "delta": (pa.float64(), "value_dp - value_nondp (across seeds: mean of per-seed deltas)"),
    "delta_lo": (pa.float64(), "lower bound of the (ci) CI of delta"),
    "delta_hi": (pa.float64(), "upper bound of the (ci) CI of delta"),
    "df": (pa.float64(), "degrees of freedom of the t rule behind delta's CI and p"),
    "p_value": (pa.float64(), "two-sided p of delta = 0 (same rule as the CI: p <= 1 - ci "
                "exactly when the CI excludes 0)"),
    "q_value": (pa.float64(), "exploratory rows: Benjamini-Hochberg q of p_value within the "
                "family q_family"),
    "q_family": (pa.string(), "the BH family of the row's q-values: \"comparison, quantity\""),
    "worse_if": (pa.string(), "direction of delta in which DP is worse: higher, lower, or "
                 "null (gaps: no direction)"),
    "margin": (pa.float64(), "equivalence margin in AUC units (null: no equivalence test)"),
    "tost_lo": (pa.float64(), "lower bound of the 1 - 2 alpha CI of delta (TOST; unadjusted "
                "for multiplicity)"),
    "tost_hi": (pa.float64(), "upper bound of the 1 - 2 alpha CI of delta (TOST)"),
    "margin_confirmable": (pa.float64(), "the smallest equivalence margin these data confirm: "
                           "max(|tost_lo|, |tost_hi|); unadjusted (the row's own 1 - 2 alpha "
                           "CI, as the every-site intersection-union test reads it): the "
                           "primary per-site verdict reads Holm-adjusted p's, so a site whose "
                           "CI lies inside the margin can still be inconclusive after Holm"),
    "tost_half_width": (pa.float64(), "half the 1 - 2 alpha CI's width: the smallest margin "
                        "this test set could confirm were delta exactly 0 (the design)"),
    "p_tost": (pa.float64(), "TOST p: max of the one-sided p's of delta <= -m and >= +m"),
    "q_tost": (pa.float64(), "exploratory rows: BH q of p_tost within q_family"),
    "p_tost_holm": (pa.float64(), "primary rows: p_tost Holm-adjusted across test sites per "
                    "(model, epsilon): the per-site claim"),
    "p_tost_iut": (pa.float64(), "primary rows: the largest unadjusted p_tost of the test "
                   "sites of its (model, epsilon): the intersection-union test of 'equivalent "
                   "at every site' (no adjustment)"),
    "n_sites": (pa.int64(), "primary rows: test sites in the (model, epsilon) family: every "
                "site with a drop of its own, with or without a primary estimate at this "
                "epsilon (one without leaves p_tost_iut null)"),
    "p_noninf": (pa.float64(), "one-sided p of 'DP worse by margin or more'"),
    "q_noninf": (pa.float64(), "exploratory rows: BH q of p_noninf within q_family"),
    "p_value_holm": (pa.float64(), "primary rows: p_value Holm-adjusted as p_tost_holm"),
    "p_noninf_holm": (pa.float64(), "primary rows: p_noninf Holm-adjusted as p_tost_holm"),
    "verdict": (pa.string(), "equivalent within ±m, different, non-inferior or inconclusive "
                "(inference.verdict; primary rows: on the three Holm-adjusted p's; exploratory "
                "rows: on the three BH q-values); null without a margin or a value"),
    "t_stat": (pa.float64(), "across_seeds: paired t statistic of value_dp vs value_nondp"),
    "p_t": (pa.float64(), "across_seeds: paired t test p across seeds, CONDITIONAL on this "
            "test set (test patients treated as fixed; secondary: the paper's test)"),
    "sd_dp": (pa.float64(), "across_seeds: SD over seeds of the DP side"),
    "sd_nondp": (pa.float64(), "across_seeds: SD over seeds of the non-DP side"),
    "delta_sd": (pa.float64(), "across_seeds: SD over seeds of the per-seed deltas"),
    "ci": (pa.float64(), "confidence level of the CIs (delta_lo/hi, value_*_lo/hi)"),
    "null_reason": (pa.string(), "why a value of the row is null"),
}  # fmt: skip
SCHEMA = pa.schema([(name, dtype) for name, (dtype, _) in COLUMNS.items()])

RELIABILITY_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("source", pa.string()),
        ("target", pa.string()),
        ("on_domain", pa.bool_()),
        ("seed", pa.int64()),
        ("epsilon", pa.float64()),
        ("label", pa.string()),  # a label, or "pooled" (all known image-label pairs)
        ("bin", pa.int64()),
        ("bin_lo", pa.float64()),
        ("bin_hi", pa.float64()),
        ("n", pa.int64()),  # image-label pairs in the bin
        ("mean_score", pa.float64()),
        ("observed", pa.float64()),  # fraction positive
    ]
)

_DEFAULT = EvaluationConfig()


class ComparisonWarning(UserWarning):
    """A model or evaluation was left out of a comparison (and why)."""


def _warn(msg: str) -> None:
    warnings.warn(msg, ComparisonWarning, stacklevel=3)


# ============================================================================ loading


@dataclass(frozen=True)
class ModelInfo:
    """What a comparison needs to know about one finished trial."""

    key: str
    source: str
    epsilon: float
    seed: int
    model: str
    epsilon_spent: float | None
    accountant: str | None
    sites: tuple[str, ...]  # the domains whose data trained the model

    @property
    def single_site(self) -> bool:
        return self.sites == (self.source,)


@dataclass
class TestSet:
    """One target's test split as every compared model saw it (same rows, same labels)."""

    target: str
    fingerprint: str
    labels: tuple[str, ...]
    y: np.ndarray  # (n, L), NaN = unknown
    sex: np.ndarray
    age: np.ndarray
    clusters: np.ndarray | None  # patient group per row; None = image level
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # model key -> (n, L)

    @property
    def unit(self) -> str:
        return "image" if self.clusters is None else "patient"


@dataclass
class Study:
    models: dict[str, ModelInfo]
    tests: list[TestSet]


def load_study(output: Path, keys: Sequence[str], targets: Sequence[Any] | None = None) -> Study:
    """The ONE place that reads trials (through the trial store): valid trials of the kinds
    that enter the matrices (one per cell) and their current evaluations, grouped into test
    sets of one data version per target. ``targets`` (name, fingerprint) default to the last
    plan's; without one, each target's most common data version is used."""
    store = TrialStore(output)
    if targets is None:
        targets = results.planned_targets(Path(output)) or None
    models: dict[str, ModelInfo] = {}
    cells: dict[tuple, str] = {}
    evals: dict[str, dict[tuple[str, str], Any]] = {}
    for key in sorted(dict.fromkeys(keys)):
        record = store.valid(key)
        if record is None or not kind_of(record.spec).in_matrices:
            continue  # controls (clip-only), pretraining and audit twins are not compared
        info = _model_info(record)
        cell = (info.source, info.epsilon, info.seed, info.model)
        if cell in cells:
            _warn(f"trials {cells[cell]} and {info.key} are the same cell {cell}; using the first")
            continue
        cells[cell], models[info.key] = info.key, info
        found = store.current(key, targets) if targets is not None else store.evaluations(key)
        evals[key] = {(ev.target, ev.fingerprint): ev for ev in found}
    tests = []
    for target, fp in _chosen_fingerprints(evals):
        ts = None
        for key in sorted(k for k in evals if (target, fp) in evals[k]):
            ev = evals[key][(target, fp)]
            ts = _add_predictions(ts, target, fp, key, ev.predictions(), ev.resampling_unit)
        if ts is not None:
            tests.append(ts)
    return Study(models, tests)


def _model_info(record: TrialRecord) -> ModelInfo:
    spec, ledger = record.spec, record.ledger
    spent = ledger.get("epsilon_spent")
    return ModelInfo(
        key=record.key,
        source=spec.source,
        epsilon=spec.epsilon,
        seed=spec.seed,
        model=spec.model,
        epsilon_spent=None if spent is None else parse_epsilon(spent),
        accountant=ledger.get("accountant"),
        sites=record.training_sites,
    )


def _chosen_fingerprints(evals: dict[str, dict[tuple[str, str], Any]]) -> list[tuple[str, str]]:
    """Per target, the data version most models were evaluated on (warn about the others)."""
    by_target: dict[str, Counter] = defaultdict(Counter)
    for per_model in evals.values():
        for target, fp in per_model:
            by_target[target][fp] += 1
    out = []
    for target in sorted(by_target):
        counts = by_target[target]
        fp = sorted(counts, key=lambda f: (-counts[f], f))[0]
        if len(counts) > 1:
            others = ", ".join(f for f in sorted(counts) if f != fp)
            _warn(
                f"target {target!r} was evaluated on several test sets; comparing on "
                f"fingerprint {fp} ({counts[fp]} models), ignoring {others}"
            )
        out.append((target, fp))
    return out


def _add_predictions(
    ts: TestSet | None, target: str, fp: str, key: str, df: pd.DataFrame, unit: str
) -> TestSet:
    """Add one model's predictions to the test set (the first one defines it). Without a
    ``patient_group`` column (older evaluations) or with resampling unit "image" (domains
    without patient ids) the rows are resampled as images."""
    if "row" in df.columns and not np.array_equal(df["row"].to_numpy(), np.arange(len(df))):
        df = df.sort_values("row", kind="stable")
    labels = tuple(c[len("score_") :] for c in df.columns if c.startswith("score_"))
    y = df[[f"label_{lab}" for lab in labels]].to_numpy(dtype=np.float64)
    scores = df[[f"score_{lab}" for lab in labels]].to_numpy(dtype=np.float64)
    groups = None
    if "patient_group" in df and unit != "image":
        groups = df["patient_group"].to_numpy(np.int64)
    if ts is None:
        ts = TestSet(
            target, fp, labels, y,
            sex=df["sex"].to_numpy(dtype=object) if "sex" in df else np.full(len(df), "", object),
            age=df["age"].to_numpy(np.float64) if "age" in df else np.full(len(df), np.nan),
            clusters=groups,
        )  # fmt: skip
    elif labels != ts.labels or y.shape != ts.y.shape or not np.array_equal(y, ts.y, True):
        _warn(
            f"trial {key} on {target}-{fp}: the test labels differ from the other models' on "
            "the same fingerprint; left out of the comparisons"
        )
        return ts
    elif (groups is None) != (ts.clusters is None) or (
        groups is not None and not np.array_equal(groups, ts.clusters)
    ):
        _warn(f"trial {key} on {target}-{fp}: patient groups differ; resampling images")
        ts.clusters = None
    ts.scores[key] = scores
    return ts


# ============================================================================ per test set


@dataclass
class Est:
    """A point value, its leave-one-unit-out values (P,) on one test set (or subgroup) and
    the degrees of freedom of its t rule. Sums, differences and means of Ests on the same
    units combine their leave-one-out values, which keeps the pairing exactly."""

    point: float
    loo: np.ndarray
    df: float

    def __sub__(self, other: Est) -> Est:
        return Est(self.point - other.point, self.loo - other.loo, _min_df(self.df, other.df))

    def infer(
        self,
        ci: float,
        margin: float | None = None,
        worse_if: str | None = None,
        level: bool = False,
    ) -> inference.Inference:
        """CI, p (and TOST) by the jackknife t rule; ``level``: a value in [0, 1] whose CI is
        on the logit scale (no test of it)."""  # fmt: skip
        var = inference.jackknife_variance(self.loo)
        if level:
            lo, hi = inference.level_interval(self.point, var, self.df, ci)
            return inference.Inference(inference.opt(self.point), lo, hi, None, self.loo.size,
                                       df=self.df)  # fmt: skip
        return inference.infer_t(self.point, var, self.df, ci=ci, margin=margin,
                                 worse_if=worse_if, n_units=self.loo.size)  # fmt: skip


@dataclass
class Pooled:
    """k seeds' estimates (k,) and their leave-one-out values on the same patients (k, P):
    the mean over training randomness, inferred by :func:`inference.pool_seeds`."""

    points: np.ndarray
    loos: np.ndarray
    df: float

    def infer(
        self,
        ci: float,
        margin: float | None = None,
        worse_if: str | None = None,
        level: bool = False,
    ) -> inference.Inference:
        if level:  # an AUC or Brier score: on the logit scale, as a single one
            return inference.pool_seeds_level(self.points, self.loos, ci=ci, df_test=self.df)
        return inference.pool_seeds(self.points, self.loos, ci=ci, margin=margin,
                                    worse_if=worse_if, jackknife=True, df_test=self.df)  # fmt: skip


def _mean(ests: Sequence[Est]) -> Est:
    return Est(float(np.mean([e.point for e in ests])), np.mean([e.loo for e in ests], axis=0),
               _min_df(*(e.df for e in ests)))  # fmt: skip


def _min_df(*dfs: float) -> float:
    """The smallest df; NaN (no interval) when any part has none."""
    return float(np.min(dfs))


@dataclass
class _Group:
    """One subgroup of a test set: its label support, the macro's label set ``ok`` and every
    model's AUCs (+ calibration) as Ests: columns = the labels, then the macro (NaN points
    outside the set)."""

    name: str
    mask: np.ndarray
    support: metrics.LabelSupport
    ok: np.ndarray  # (L,) the macro's labels (shared across the subgroup's family)
    n_patients: np.ndarray  # (L + 1,)
    auc: dict[str, list[Est]] = field(default_factory=dict)
    calib: dict[str, dict[str, list[Est]]] = field(default_factory=dict)


def _columns(point: np.ndarray, loo: np.ndarray, df: np.ndarray, sup, ok, p: int) -> list[Est]:
    """Label columns and the macro over ``ok`` of one statistic (NaN outside the support)."""
    pt = np.where(sup.ok, point, np.nan)
    cols = [Est(float(pt[j]), loo[j], float(df[j])) for j in range(pt.size)]
    if not ok.any():
        return [*cols, Est(math.nan, np.full(p, np.nan), math.nan)]
    var = np.array([inference.jackknife_variance(loo[j]) for j in np.flatnonzero(ok)])
    m_df = evaluation.macro_df(var, df[ok], p)
    return [*cols, Est(float(pt[ok].mean()), loo[ok].mean(axis=0), m_df)]


def _subgroup(ts: TestSet, g: _Group, ev: EvaluationConfig, calib: bool) -> _Group:
    """Every model's per-label and macro AUCs (and Brier scores) on one subgroup's units."""
    y = ts.y[g.mask]
    codes, p = metrics.cluster_codes(_units(ts, g.mask), int(g.mask.sum()))
    known = ~np.isnan(y)
    g.n_patients = np.array([*(np.unique(codes[known[:, j]]).size for j in range(y.shape[1])), p])
    for key, scores in ts.scores.items():
        s = scores[g.mask]
        jk = resampling.jackknife_auc(s, y, codes, n_units=p)
        g.auc[key] = _columns(jk.point, jk.loo, jk.df, g.support, g.ok, p)
        if calib and resampling.are_probabilities(s, y):
            sq = np.where(known, (np.nan_to_num(y) - np.where(known, s, 0.0)) ** 2, 0.0)
            num = np.stack([np.bincount(codes, weights=sq[:, j], minlength=p)
                            for j in range(y.shape[1])])  # fmt: skip
            den = np.stack([np.bincount(codes, weights=known[:, j].astype(np.float64),
                                        minlength=p) for j in range(y.shape[1])])  # fmt: skip
            point, loo = resampling.jackknife_ratio(num, den)
            g.calib[key] = {"delta_brier": _columns(point, loo, jk.df, g.support, g.ok, p)}
    return g


def _cells(ts: TestSet, g: _Group) -> list[dict[str, Any]]:
    """Per label column: the row fields describing the cell (n, positives, patients, ...)."""
    y = ts.y[g.mask]
    sup = g.support
    out = []
    for j, label in enumerate([*ts.labels, "macro"]):
        macro = label == "macro"
        reason = sup.reasons[j] if not macro else None
        if macro and not sup.ok.any():
            reason = (
                f"no label has enough positive and negative {ts.unit}s "
                "(evaluation.min_positives, min_negatives)"
            )
        elif macro and not g.ok.any():
            reason = (f"no label is valid in every {metrics.subgroup_family(g.name)} subgroup "
                      "of this test set: no macro to compare side by side")  # fmt: skip
        out.append(
            {
                "label": label,
                "subgroup": g.name,
                "n": int(y.shape[0]) if macro else int(sup.n_known[j]),
                "n_pos": int(sup.n_pos[g.ok].sum()) if macro else int(sup.n_pos[j]),
                "n_patients": int(g.n_patients[j]),
                "resampling_unit": ts.unit,
                "n_labels": int(g.ok.sum()) if macro else int(sup.ok[j]),
                "null_reason": reason,
            }
        )
    return out


@dataclass
class _Item:
    """One per-seed comparison: the DP and non-DP sides (and their difference) with fields."""

    comparison: str
    quantity: str
    seed: int
    fields: dict[str, Any]
    dp: Est | None = None
    nondp: Est | None = None
    off: Est | None = None  # drop rows: the mean off-domain AUC of the DP side

    @property
    def group_key(self) -> tuple:
        f = self.fields
        return (self.comparison, self.quantity, f.get("model"), f.get("source"), f["target"],
                f["label"], f["subgroup"], f["epsilon"])  # fmt: skip

    @property
    def delta(self) -> Est | None:
        if self.dp is None or self.nondp is None:
            return None
        return self.dp - self.nondp


def _model_fields(m: ModelInfo, target: str) -> dict[str, Any]:
    return {
        "model": m.model,
        "source": m.source,
        "target": target,
        "on_domain": target in m.sites,
        "epsilon": m.epsilon,
        "epsilon_spent": m.epsilon_spent if math.isfinite(m.epsilon) else None,
        "accountant": m.accountant if math.isfinite(m.epsilon) else None,
    }


def _nondp_partner(models: Sequence[ModelInfo]) -> dict[str, ModelInfo]:
    """DP model key -> the non-DP model of the same source, seed and architecture."""
    ref = {(m.source, m.seed, m.model): m for m in models if math.isinf(m.epsilon)}
    return {
        m.key: ref[(m.source, m.seed, m.model)]
        for m in models
        if math.isfinite(m.epsilon) and (m.source, m.seed, m.model) in ref
    }


def _paired_items(ts: TestSet, groups: list[_Group], models: list[ModelInfo]) -> list[_Item]:
    partner = _nondp_partner(models)
    items = []
    for dp in sorted(models, key=lambda m: (m.source, m.seed, m.epsilon)):
        ref = partner.get(dp.key)
        if ref is None:
            continue  # non-DP, or no non-DP model of this source and seed on this test set
        base = _model_fields(dp, ts.target)
        for g in groups:
            sides = [("delta_auc", g.auc)]
            if dp.key in g.calib and ref.key in g.calib:
                sides.append(
                    ("delta_brier", {k: g.calib[k]["delta_brier"] for k in (dp.key, ref.key)})
                )
            for j, cell in enumerate(_cells(ts, g)):
                for quantity, per_model in sides:
                    items.append(
                        _Item(PAIRED_DELTA, quantity, dp.seed, {**base, **cell},
                              dp=per_model[dp.key][j], nondp=per_model[ref.key][j])
                    )  # fmt: skip
    return items


@dataclass
class _DropSide:
    """On-domain and off-domain models on test site T for one (epsilon, seed, model)."""

    on: ModelInfo | None = None
    off: list[ModelInfo] = field(default_factory=list)

    def aucs(self, g: _Group, j: int) -> tuple[Est | None, Est | None]:
        on = g.auc[self.on.key][j] if self.on is not None else None
        off = _mean([g.auc[m.key][j] for m in self.off]) if self.off else None
        return on, off


def _drop_sides(ts: TestSet, models: list[ModelInfo]) -> dict[tuple, _DropSide]:
    sides: dict[tuple[float, int, str], _DropSide] = {}
    for m in models:
        if not m.single_site:
            continue  # a federation is neither the target's own model nor an outside one
        side = sides.setdefault((m.epsilon, m.seed, m.model), _DropSide())
        if m.source == ts.target:
            side.on = m
        else:
            side.off.append(m)
    return sides


def _drop_items(ts: TestSet, groups: list[_Group], models: list[ModelInfo]) -> list[_Item]:
    sides = _drop_sides(ts, models)
    items = []
    for (eps, seed, model), side in sorted(sides.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        nondp = sides.get((math.inf, seed, model))
        same_off = nondp is not None and sorted(m.source for m in nondp.off) == sorted(
            m.source for m in side.off
        )
        if nondp is not None and math.isfinite(eps) and not same_off:
            _warn(
                f"AUC drop on {ts.target} (seed {seed}, epsilon {eps:g}): the off-domain "
                f"sources differ between DP {sorted(m.source for m in side.off)} and non-DP "
                f"{sorted(m.source for m in nondp.off)}; DP-vs-non-DP difference left null"
            )
        base = {"model": model, "target": ts.target, "epsilon": eps, "n_off": len(side.off),
                "epsilon_spent": side.on.epsilon_spent if side.on and math.isfinite(eps) else None,
                "accountant": side.on.accountant if side.on and math.isfinite(eps) else None}  # fmt: skip
        for g in groups:
            for j, cell in enumerate(_cells(ts, g)):
                items += _drop_cell(side, nondp, same_off, g, j, {**base, **cell}, seed)
    return items


def _drop_cell(
    side: _DropSide, nondp: _DropSide | None, same_off: bool, g: _Group, j: int, fields, seed
) -> list[_Item]:
    """The drop rows of one (test site, epsilon, seed, subgroup, label column): each model's
    own drop, and its on-domain and off-domain parts."""
    on, off = side.aucs(g, j)
    drop = on - off if on is not None and off is not None else None
    if math.isinf(fields["epsilon"]):
        row = {**fields, "auc_on": on.point if on else None}
        return [_Item(AUC_DROP, PRIMARY_QUANTITY, seed, row, nondp=drop, off=off)]
    if nondp is None:
        row = {**fields, "auc_on": on.point if on else None}
        return [_Item(AUC_DROP, PRIMARY_QUANTITY, seed, row, dp=drop, off=off)]
    ref_on, ref_off = nondp.aucs(g, j)
    off_fields = dict(fields)
    if not same_off:  # the on-domain difference stands: only the off-domain side is unpaired
        off_fields["null_reason"] = ("the off-domain sources of the DP and non-DP drops "
                                     "differ (a missing evaluation): no DP-vs-non-DP "
                                     "difference of the off-domain mean or the drop")  # fmt: skip
        ref_off = None
    ref = ref_on - ref_off if ref_on is not None and ref_off is not None else None
    row = {**fields, "auc_on": on.point if on else None}
    row["null_reason"] = off_fields.get("null_reason") or _missing_side(drop, ref, fields)
    on_fields = {**fields, "null_reason": fields.get("null_reason")
                 or _missing_side(on, ref_on, fields, "on-domain AUC")}  # fmt: skip
    return [
        _Item(AUC_DROP, PRIMARY_QUANTITY, seed, row, dp=drop, nondp=ref, off=off),
        _Item(AUC_DROP, ON_DOMAIN, seed, on_fields, dp=on, nondp=ref_on),
        _Item(AUC_DROP, OFF_DOMAIN, seed, off_fields, dp=off, nondp=ref_off),
    ]


def _missing_side(dp: Est | None, nondp: Est | None, fields, what: str = "") -> str | None:
    """Why a drop row's DP-vs-non-DP difference is null when one side has no value (an
    evaluation it needs, the site's own model's or an outside one's, is missing)."""
    gone = [name for name, e in (("DP", dp), ("non-DP", nondp)) if e is None]
    if not gone:
        return None
    return (f"no {' or '.join(gone)} {what or 'AUC drop'} on {fields['target']} (an "
            "evaluation it needs is missing, e.g. the site's own model's): no DP-vs-non-DP "
            "difference")  # fmt: skip


def _gap_pairs(age_bins: Sequence[float]) -> dict[str, tuple[str, str]]:
    """Quantity -> (subgroup a, subgroup b) of the gap a - b: female - male, oldest -
    youngest age bin (the grid's first and last bins)."""
    names = [k for k in evaluation.subgroup_masks([], [], age_bins) if k.startswith("age=")]
    return {"auc_gap_sex": ("sex=F", "sex=M"), "auc_gap_age": (names[-1], names[0])}


def _gap_items(ts: TestSet, models: list[ModelInfo], ev: EvaluationConfig) -> list[_Item]:
    """Macro AUC gaps per model with both subgroups on the test set's patients JOINTLY (one
    jackknife over every patient), and DP's effect on the gap vs its non-DP partner."""
    masks = evaluation.subgroup_masks(ts.sex, ts.age, ev.age_bins)
    codes, p = metrics.cluster_codes(ts.clusters, len(ts.y))
    partner = _nondp_partner(models)
    items = []
    for quantity, (a, b) in _gap_pairs(ev.age_bins).items():
        ma, mb = masks[a], masks[b]
        ok = (
            metrics.label_support(ts.y[ma], ev.min_positives, ev.min_negatives, _units(ts, ma)).ok
            & metrics.label_support(ts.y[mb], ev.min_positives, ev.min_negatives, _units(ts, mb)).ok
        )
        gaps = {m.key: _gap(ts, m.key, (codes, p), (ma, mb), ok) for m in models
                if m.key in ts.scores}  # fmt: skip
        cell = {"label": "macro", "subgroup": f"{a} - {b}", "n": int((ma | mb).sum()),
                "n_patients": int(np.unique(codes[ma | mb]).size),
                "resampling_unit": ts.unit, "n_labels": int(ok.sum()),
                "null_reason": None if ok.any() else f"no label has enough positive and "
                f"negative {ts.unit}s in both {a} and {b}"}  # fmt: skip
        for m in models:
            if m.key not in gaps:
                continue
            fields = {**_model_fields(m, ts.target), **cell}
            if math.isinf(m.epsilon):
                items.append(_Item(FAIRNESS_GAP, quantity, m.seed, fields, nondp=gaps[m.key]))
            elif m.key in partner and partner[m.key].key in gaps:
                ref = gaps[partner[m.key].key]
                items.append(_Item(FAIRNESS_GAP, quantity, m.seed, fields, gaps[m.key], ref))
    return items


def _gap(ts: TestSet, key: str, units: tuple, masks: tuple, ok: np.ndarray) -> Est:
    """Macro AUC(a) - macro AUC(b) over the labels ``ok`` of both, each subgroup's AUCs with
    leave-one-out values over ALL the test set's units (a unit outside a subgroup leaves its
    AUC unchanged), so the two sides are differenced patient by patient."""
    codes, p = units
    sides = []
    for mask in masks:
        s, y = ts.scores[key][mask], ts.y[mask]
        jk = resampling.jackknife_auc(s, y, codes[mask], n_units=p)
        sup = metrics.label_support(y, 1, 1)
        sides.append(_columns(jk.point, jk.loo, jk.df, sup, ok, p)[-1])
    return sides[0] - sides[1]


def _reliability_rows(ts: TestSet, models: list[ModelInfo], bins: int) -> list[dict[str, Any]]:
    """Reliability-diagram bins per model: aggregates of test predictions only."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    for m in models:
        s = ts.scores.get(m.key)
        if s is None or not resampling.are_probabilities(s, ts.y):
            continue
        n, ssum, pos = thresholds.reliability_bins(s, ts.y, bins)
        per = {lab: (n[j], ssum[j], pos[j]) for j, lab in enumerate(ts.labels)}
        per["pooled"] = (n.sum(axis=0), ssum.sum(axis=0), pos.sum(axis=0))
        for label, (cnt, tot, npos) in per.items():
            for k in range(bins):
                rows.append({
                    "model": m.model, "source": m.source, "target": ts.target,
                    "on_domain": ts.target in m.sites, "seed": m.seed, "epsilon": m.epsilon,
                    "label": label, "bin": k, "bin_lo": edges[k], "bin_hi": edges[k + 1],
                    "n": int(cnt[k]),
                    "mean_score": tot[k] / cnt[k] if cnt[k] else None,
                    "observed": npos[k] / cnt[k] if cnt[k] else None,
                })  # fmt: skip
    return rows


def _units(ts: TestSet, mask: np.ndarray) -> np.ndarray | None:
    """The patient of each row of ``mask`` (None: the test set is resampled by image)."""
    return None if ts.clusters is None else ts.clusters[mask]


def _test_set_items(ts: TestSet, models: dict[str, ModelInfo], ev: EvaluationConfig):
    """Every per-seed comparison item of one test set (all models on the same units). A
    subgroup's macro averages the labels valid in every subgroup of its family, as the
    transfer table's (``metrics.shared_label_sets``)."""
    members = [models[k] for k in ts.scores]
    masks = {"all": np.ones(len(ts.y), dtype=bool)}
    masks.update(evaluation.subgroup_masks(ts.sex, ts.age, ev.age_bins))
    support = {name: metrics.label_support(ts.y[m], ev.min_positives, ev.min_negatives,
                                           _units(ts, m)) for name, m in masks.items()}  # fmt: skip
    shared = metrics.shared_label_sets({name: sup.ok for name, sup in support.items()})
    groups = [
        _subgroup(ts, _Group(name, mask, support[name],
                             support[name].ok if name == "all" else shared[name],
                             np.zeros(0)), ev, calib=name == "all")
        for name, mask in masks.items()
    ]  # fmt: skip
    items = _paired_items(ts, groups, members) + _drop_items(ts, groups, members)
    items += _gap_items(ts, members, ev)
    return items, _reliability_rows(ts, members, ev.calibration_bins)


# ============================================================================ rows


def _test_name(unit: str, seeds: int) -> str:
    if seeds > 1:
        return f"t interval over seeds (between-seed + shared {unit}-jackknife variance), paired"
    return f"paired {unit} jackknife t (the same {unit}s left out for every model)"


def _row(
    comparison: str,
    quantity: str,
    fields: dict[str, Any],
    sides: tuple[Any, Any, Any, Any],
    ev: EvaluationConfig,
) -> dict[str, Any]:
    """One table row: CIs of both sides and of the off-domain mean; CI, p, TOST and verdict
    of their difference (``sides`` = dp, nondp, delta, off: Est or Pooled)."""
    dp, nondp, delta, off = sides
    q = QUANTITIES[quantity]
    margin = ev.equivalence_margin if q.margin else None
    row = {**fields, "comparison": comparison, "quantity": quantity, "worse_if": q.worse_if,
           "margin": margin, "ci": ev.ci}  # fmt: skip
    for name, est, level in (("value_dp", dp, q.level), ("value_nondp", nondp, q.level),
                             ("auc_off", off, True)):  # fmt: skip
        if est is not None and ev.n_boot:
            r = est.infer(ev.ci, level=level)
            col = "auc_off_mean" if name == "auc_off" else name
            row[col], row[f"{name}_lo"], row[f"{name}_hi"] = r.estimate, r.lo, r.hi
        elif est is not None:
            row["auc_off_mean" if name == "auc_off" else name] = inference.opt(_point(est))
    if delta is None:
        return row
    if not ev.n_boot:  # evaluation.n_boot = 0: no CIs, no tests
        row["delta"] = inference.opt(_point(delta))
        return row
    r = delta.infer(ev.ci, margin, q.worse_if)
    row.update(
        delta=r.estimate, delta_lo=r.lo, delta_hi=r.hi, p_value=r.p_value, df=r.df,
        tost_lo=r.tost_lo, tost_hi=r.tost_hi, p_tost=r.p_tost, p_noninf=r.p_noninf,
        verdict=inference.verdict(r, inference.alpha_of(ev.ci)),
    )  # fmt: skip
    if r.tost_lo is not None:
        row["margin_confirmable"] = max(abs(r.tost_lo), abs(r.tost_hi))
        row["tost_half_width"] = (r.tost_hi - r.tost_lo) / 2.0
    if row["verdict"] is None and r.estimate is not None and margin is not None:
        row["null_reason"] = row.get("null_reason") or (
            "no verdict: the difference has no interval (too few units of the rarer class, "
            "or a leave-one-out value is undefined)"
        )
    return row


def _point(est: Any) -> float:
    return float(np.mean(est.points)) if isinstance(est, Pooled) else est.point


def _per_seed_row(it: _Item, ev: EvaluationConfig) -> dict[str, Any]:
    fields = {**it.fields, "seed": it.seed, "n_seeds": 1,
              "test": _test_name(it.fields["resampling_unit"], 1)}  # fmt: skip
    return _row(it.comparison, it.quantity, fields, (it.dp, it.nondp, it.delta, it.off), ev)


def _pool(ests: list[Est | None]) -> Pooled | None:
    """The seeds' estimates of one side, pooled (None if a seed has none or a NaN point)."""
    if not ests or any(e is None or math.isnan(e.point) for e in ests):
        return None
    return Pooled(np.array([e.point for e in ests]), np.stack([e.loo for e in ests]),
                  _min_df(*(e.df for e in ests)))  # fmt: skip


def _across_row(items: list[_Item], ev: EvaluationConfig) -> dict[str, Any]:
    """The across_seeds row of one comparison: the seeds' mean, inferred by pool_seeds; the
    paired t test across seeds (conditional on the test set) as secondary columns."""
    items = sorted(items, key=lambda it: it.seed)
    first = items[0]
    is_dp = first.dp is not None or first.delta is not None
    used = [it for it in items if (it.delta if is_dp else it.nondp) is not None
            and not math.isnan((it.delta if is_dp else it.nondp).point)]  # fmt: skip
    k = len(used)
    spent = [it.fields["epsilon_spent"] for it in used if it.fields.get("epsilon_spent")]
    fields = {**first.fields, "seed": None, "n_seeds": k,
              "test": _test_name(first.fields["resampling_unit"], 2),
              "epsilon_spent": float(np.mean(spent)) if spent else None,
              "auc_on": float(np.mean([it.fields["auc_on"] for it in used]))
              if used and all(it.fields.get("auc_on") is not None for it in used) else None}  # fmt: skip
    if k < 2:
        fields["null_reason"] = f"{k} seed(s) with a value: needs >= 2"
        return _row(first.comparison, first.quantity, fields, (None, None, None, None), ev)
    sides = tuple(_pool([getattr(it, a) for it in used]) for a in ("dp", "nondp", "delta", "off"))
    row = _row(first.comparison, first.quantity, fields, sides, ev)
    y = np.array([it.nondp.point for it in used])
    row.update(sd_nondp=float(np.std(y, ddof=1)))
    if is_dp:
        x = np.array([it.dp.point for it in used])
        t, p = evaluation.paired_t_test(x, y)
        row.update(sd_dp=float(np.std(x, ddof=1)), delta_sd=float(np.std(x - y, ddof=1)),
                   t_stat=inference.opt(t), p_t=inference.opt(p))  # fmt: skip
    return row


def _rows(items: list[_Item], ev: EvaluationConfig) -> list[dict[str, Any]]:
    rows = [_per_seed_row(it, ev) for it in items]
    groups: dict[tuple, list[_Item]] = defaultdict(list)
    for it in items:
        groups[it.group_key].append(it)
    for key in sorted(groups, key=lambda k: tuple("" if v is None else str(v) for v in k)):
        if len({it.seed for it in groups[key]}) >= 2:
            rows.append({**_across_row(groups[key], ev), "comparison": ACROSS_SEEDS})
    return rows


_GROUP_COLS = ["quantity", "model", "source", "target", "label", "subgroup", "epsilon"]
_P_COLUMNS = ("p_tost", "p_value", "p_noninf")
_Q_OF = {"p_tost": "q_tost", "p_value": "q_value", "p_noninf": "q_noninf"}


def _finalize(df: pd.DataFrame, ev: EvaluationConfig) -> pd.DataFrame:
    """Mark summary rows and the primary endpoint; Holm and the intersection-union test for
    the primary rows, BH q-values (and verdicts on them) for the exploratory ones."""
    if df.empty:
        return df
    key = pd.Series(
        ["|".join(map(str, t)) for t in df[_GROUP_COLS].itertuples(index=False)], index=df.index
    )
    across = df["comparison"] == ACROSS_SEEDS
    df["is_summary"] = across | ~key.isin(set(key[across]))
    family = (
        df["is_summary"]
        & (df["quantity"] == PRIMARY_QUANTITY)
        & (df["label"] == "macro")
        & (df["subgroup"] == "all")
        & np.isfinite(df["epsilon"].astype(float))
    )
    primary = family & df["p_tost"].notna()
    df["endpoint"] = np.where(primary, "primary", "exploratory")
    _primary_tests(df, primary, family, inference.alpha_of(ev.ci))
    _exploratory_q(df, ~primary, across, inference.alpha_of(ev.ci))
    return df


def _primary_tests(df: pd.DataFrame, primary: pd.Series, family: pd.Series, alpha: float) -> None:
    """Per (model, epsilon): the three p's Holm-adjusted across the test sites (the per-site
    verdicts read them: with only the TOST p adjusted, a false "non-inferior" at one of 5
    sites came 22% of the time), and the intersection-union p of "equivalent at every site"
    (the largest unadjusted TOST p: no adjustment is needed for a claim that needs every
    site's test to pass; Holm for it cost power, 0.11 vs 0.40 at 1,000 patients). Every test
    site with a drop of its own (DP or non-DP, at any epsilon) belongs to the family: one
    without a primary estimate at this epsilon leaves p_tost_iut null (no every-site claim
    over the others), with a null_reason naming it."""
    has_drop = family & (df["value_dp"].notna() | df["value_nondp"].notna())
    for (model, eps), idx in df[primary].groupby(["model", "epsilon"]).groups.items():
        for col in _P_COLUMNS:
            df.loc[idx, f"{col}_holm"] = _nan(inference.holm(df.loc[idx, col].tolist()))
        df.loc[idx, "verdict"] = [inference.verdict(_inference_of(r, suffix="_holm"), alpha)
                                  for r in df.loc[idx, _INFERENCE_COLUMNS].to_dict("records")]  # fmt: skip
        sites = set(df.loc[has_drop & (df["model"] == model), "target"])
        missing = sorted(sites - set(df.loc[idx, "target"]))
        df.loc[idx, "n_sites"] = len(sites | set(df.loc[idx, "target"]))
        if not missing:
            df.loc[idx, "p_tost_iut"] = float(df.loc[idx, "p_tost"].max())
            continue
        why = (f"no every-site claim at epsilon {eps:g}: no primary estimate at test site(s) "
               f"{', '.join(map(str, missing))} (p_tost_iut left null)")  # fmt: skip
        _warn(f"primary endpoint ({model}): {why}")
        df.loc[idx, "null_reason"] = [why if pd.isna(r) else f"{r}; {why}"
                                      for r in df.loc[idx, "null_reason"]]  # fmt: skip


def _exploratory_q(df: pd.DataFrame, rows: pd.Series, across: pd.Series, alpha: float) -> None:
    """BH q-values of the difference, TOST and non-inferiority p's within (comparison,
    quantity) families, and the exploratory verdicts read on them."""
    family = df["comparison"].where(~across, ACROSS_SEEDS) + ", " + df["quantity"]
    sel = rows & df["p_value"].notna()
    df.loc[sel, "q_family"] = family[sel]
    for _, idx in df[sel].groupby(family[sel]).groups.items():
        for col in _P_COLUMNS:
            df.loc[idx, _Q_OF[col]] = _nan(inference.bh(df.loc[idx, col].tolist()))
        df.loc[idx, "verdict"] = [inference.verdict(_inference_of(r, q=True), alpha)
                                  for r in df.loc[idx, _INFERENCE_COLUMNS].to_dict("records")]  # fmt: skip


def _nan(values: list[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in values]


_INFERENCE_COLUMNS = [
    "delta",
    "delta_lo",
    "delta_hi",
    "margin",
    "worse_if",
    "tost_lo",
    "tost_hi",
    "df",
    *_P_COLUMNS,
    *(f"{c}_holm" for c in _P_COLUMNS),
    *_Q_OF.values(),
]


def _inference_of(row: dict, *, suffix: str = "", q: bool = False) -> inference.Inference:
    """The row's inference with its adjusted p's: ``suffix`` "_holm" (primary rows) or
    ``q`` (exploratory rows: the BH q-values in place of the p's)."""

    def g(name: str) -> Any:
        col = name
        if name in _P_COLUMNS:
            col = _Q_OF[name] if q else f"{name}{suffix}"
        v = row[col]
        return None if v is None or pd.isna(v) else v

    return inference.Inference(
        g("delta"), g("delta_lo"), g("delta_hi"), g("p_value"), 0,
        g("margin"), g("worse_if"), g("tost_lo"), g("tost_hi"), g("p_tost"), g("p_noninf"),
        g("df"),
    )  # fmt: skip


def _frame(rows: list[dict[str, Any]], schema: pa.Schema) -> pd.DataFrame:
    """Rows -> DataFrame with exactly the schema's columns and types (nulls where n/a):
    column by column (a NaN or None is a null), not value by value (20,000 rows x 70
    columns at the paper's size)."""
    if not rows:
        return schema.empty_table().to_pandas(types_mapper=_NULLABLE.get)
    arrays = []
    for f in schema:
        values = [row.get(f.name) for row in rows]
        if pa.types.is_floating(f.type):
            arr = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
            arrays.append(pa.array(arr, type=f.type, from_pandas=True))
        else:
            arrays.append(pa.array([_py(v) for v in values], type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema).to_pandas(types_mapper=_NULLABLE.get)


_NULLABLE = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}


def _py(v: Any) -> Any:
    """numpy / pandas scalars -> plain Python, NaN / NA -> None (a null in parquet)."""
    if v is None or v is pd.NA:
        return None
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


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
    return _write(Path(output) / COMPARISONS, df, SCHEMA)


def write_all(output: Path, tables: Tables) -> list[Path]:
    """Write comparisons.parquet and reliability.parquet (atomically, each)."""
    return [
        write(output, tables.comparisons),
        _write(Path(output) / RELIABILITY, tables.reliability, RELIABILITY_SCHEMA),
    ]


def _write(path: Path, df: pd.DataFrame, schema: pa.Schema) -> Path:
    df = df.loc[:, schema.names]
    atomic.write_parquet(path, pa.Table.from_pandas(df, schema=schema, preserve_index=False))
    return path


def load(output: str | Path) -> pd.DataFrame | None:
    """``<output>/comparisons.parquet`` as a DataFrame, or None when it was not written."""
    path = Path(output) / COMPARISONS
    return pd.read_parquet(path) if path.is_file() else None


def load_reliability(output: str | Path) -> pd.DataFrame | None:
    """``<output>/reliability.parquet`` as a DataFrame, or None when it was not written."""
    path = Path(output) / RELIABILITY
    return pd.read_parquet(path) if path.is_file() else None
