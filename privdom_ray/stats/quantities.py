"""What the comparisons and reliability tables hold: quantities, drop definitions, columns.

The table file names, the comparison kinds (``paired_delta``, ``auc_drop``, ``fairness_gap``,
``across_seeds``), the primary endpoint's quantity, every column with its type and meaning,
the parquet schemas, and the warning the comparisons raise. What the rows mean:
:mod:`privdom_ray.stats.comparisons`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pyarrow as pa

from privdom_ray.config import EvaluationConfig

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
