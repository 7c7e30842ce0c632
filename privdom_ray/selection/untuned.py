"""DP model selection of an untuned DP trial (issue 26): the epoch by the exponential
mechanism and the thresholds from noisy histograms on the source's validation split, with
noise calibrated so that these releases alone fit within the trial's training epsilon at its
delta. Training (on T) and these releases (on V) compose in parallel, so the trial's epsilon
stays its training epsilon. The ledger's ``validation`` entry says so and trial.json's
``selection`` names the rule (``DP_SELECTION``); ``audit`` recomputes the entry
(:func:`check_validation`) and checks that the two agree. Pure: no torch (train/selection.py
makes the releases), below kinds/ so that audit and export can read it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from privdom_ray.selection import rdp
from privdom_ray.selection.tuning import ValidationNoise, split_validation, validation_budget_at
from privdom_ray.selection.validation import HISTOGRAM_BINS, LOSS_BOUND

#: How a trial chose its epoch and thresholds (trial.json's ``selection``): exactly, or by the
#: DP releases of the ledger's validation entry (DP single-site trials since issue 26).
#: Stored in trial.json and compared exactly by ``audit`` with the ledger: never reword them
#: (a finished trial keeps the words it was written with); a new rule gets a new constant.
EXACT_SELECTION = "best validation macro AUC (source val split); epsilon covers all epochs"
DP_SELECTION = (
    "epoch by the exponential mechanism on the clipped per-patient validation loss, thresholds "
    "from noisy validation histograms (source val split): DP releases in the ledger's "
    "validation entry, in parallel with training; epsilon covers all epochs and both releases"
)

#: The two releases of an untuned trial (no score: one model, nothing to rank) share V's budget.
VALIDATION_SHARES = {"checkpoint": 1.0, "thresholds": 1.0}
#: How the validation releases compose with training (the ledger's entry states it).
COMPOSITION = (
    "validation composes in parallel with training: the patient-wise train/validation split is "
    "a salted hash of the patient id, independent of the data, so a neighbour differs in one "
    "split only; the trial's epsilon is max(training, validation) = its training epsilon"
)
MECHANISMS = (
    "epoch: exponential mechanism (Gumbel report-noisy-max) over the epochs on the per-patient "
    "validation loss clipped to [0, bound]; thresholds: Youden on per-label validation score "
    "histograms with Gaussian noise (L2 sensitivity sqrt(labels))"
)


def validation_noise(epsilon_train: float, delta: float) -> ValidationNoise:
    """The epoch's bounded-range epsilon and the histograms' noise multiplier whose composition
    (RDP, converted at ``delta``) spends at most ``epsilon_train``: deterministic in the
    training epsilon the spec and N_train give, so audit recomputes it."""
    rho = validation_budget_at(epsilon_train, delta)
    return split_validation(rho, VALIDATION_SHARES)


def validation_epsilon(noise: ValidationNoise, delta: float) -> float:
    """The validation releases' own epsilon at ``delta`` (RDP accountant)."""
    return float(rdp.rdp_to_epsilon(noise.rdp(), delta)[0])


def validation_entry(
    noise: ValidationNoise, *, epsilon_train: float, delta: float, bound: float, bins: int,
    n_labels: int,
) -> dict[str, Any]:  # fmt: skip
    """The ledger's ``validation`` entry: the releases' noise and parameters, their own epsilon
    (accountant rdp), the training epsilon they were fitted under and the composition."""
    return {
        "noise": dataclasses.asdict(noise),
        "bound": float(bound),
        "bins": int(bins),
        "n_labels": int(n_labels),
        "epsilon": validation_epsilon(noise, delta),
        "epsilon_budget": float(epsilon_train),
        "delta": float(delta),
        "accountant": rdp.ACCOUNTANT,
        "mechanisms": MECHANISMS,
        "composition": COMPOSITION,
    }


def check_validation(
    stored: Any, *, epsilon_train: float, epsilon_spent: float, delta: float, n_labels: int,
    rel_tol: float = 1e-9,
) -> list[str]:  # fmt: skip
    """Problems of a stored ``validation`` entry (none: certified). Its noise is recomputed
    from ``epsilon_train`` (the expected ledger's, from the spec and the recounted N_train),
    never read: less noise than that (a larger epoch epsilon, a smaller histogram sigma) or
    other parameters fail, and its own epsilon, recomputed, must not exceed the ledger's."""
    if not isinstance(stored, Mapping) or not isinstance(stored.get("noise"), Mapping):
        return [f"the validation entry {stored!r} is not a mapping with its noise"]
    want = validation_noise(epsilon_train, delta)
    try:
        have = ValidationNoise(**stored["noise"])
        recomputed = validation_epsilon(have, delta)
    except (TypeError, ValueError) as exc:
        return [f"the validation entry's noise cannot be rebuilt: {exc!r}"]
    problems = []
    for name in ("score_noise_multiplier", "checkpoint_epsilon", "histogram_noise_multiplier"):
        a, b = getattr(have, name), getattr(want, name)
        if (a is None) != (b is None) or (
            a is not None and not math.isclose(float(a), b, rel_tol=rel_tol)  # type: ignore[arg-type]
        ):
            problems.append(f"validation noise {name} {a!r} (recomputed {b!r})")
    expected = {"bound": LOSS_BOUND, "bins": HISTOGRAM_BINS, "n_labels": n_labels,
                "accountant": rdp.ACCOUNTANT}  # fmt: skip
    problems += [f"validation {k} {stored.get(k)!r} (expected {v!r})"
                 for k, v in expected.items() if stored.get(k) != v]  # fmt: skip
    reported = stored.get("epsilon")
    if not isinstance(reported, int | float) or reported < recomputed * (1 - 1e-9):
        problems.append(f"validation epsilon {reported!r} is below the recomputed "
                        f"{recomputed:.6g}")  # fmt: skip
    if recomputed > epsilon_spent * (1 + rel_tol):
        problems.append(f"the validation releases' epsilon {recomputed:.6g} exceeds the "
                        f"trial's epsilon_spent {epsilon_spent:.6g}")  # fmt: skip
    return problems
