"""Selection on private data as accounted DP releases: hyperparameter tuning, checkpoints,
thresholds.

- ``rdp``: Renyi-DP curves (DP-SGD via Opacus, Gaussian, exponential mechanism), sequential
  and parallel composition, conversion to (epsilon, delta).
- ``runs``: the distribution of K (truncated negative binomial, Poisson), drawn from OS
  entropy, and the Papernot-Steinke bound of releasing the best of K runs.
- ``validation``: the releases on the validation split, each a pure numpy function with its
  sensitivity: a candidate's clipped-loss score, the epoch, the per-label thresholds.
- ``tuning``: a tuned cell's plan: per-run noise calibrated to the cell's target, the
  validation budget the training curve leaves free, and the recomputation ``audit`` needs.

Pure modules: no Ray, no Tune, no torch at import (Opacus is imported when a curve is
computed). docs/tuning-design.md describes how the sweep will wire them.
"""

from privdom_ray.selection.rdp import ACCOUNTANT, ORDERS, parallel, rdp_to_epsilon
from privdom_ray.selection.runs import (
    DEFAULT_RUNS,
    PoissonRuns,
    TruncatedNegativeBinomial,
    run_distribution,
)
from privdom_ray.selection.tuning import (
    RunShape,
    TuningPlan,
    ValidationNoise,
    calibrate,
    expected_trainings,
)

__all__ = [
    "ACCOUNTANT",
    "DEFAULT_RUNS",
    "ORDERS",
    "PoissonRuns",
    "RunShape",
    "TruncatedNegativeBinomial",
    "TuningPlan",
    "ValidationNoise",
    "calibrate",
    "expected_trainings",
    "parallel",
    "rdp_to_epsilon",
    "run_distribution",
]
