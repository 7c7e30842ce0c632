"""Train one model (DP-SGD via Opacus, or plainly for epsilon = inf) and predict with it.

Pure: no Ray, no Tune, no file layout (a checkpoint store is passed in). It needs torch,
Opacus, numpy and the package's own torch-free modules (config, cache, privacy, lossweights),
so a GPU machine without Ray can run it. Progress leaves through the ``on_epoch`` callback,
so the caller decides whether that becomes a Tune report, a log line, or nothing.

The package, module by module (each names what it owns):

- ``data``: a split as a Dataset, augmentation, the model's input, prediction, loading a model;
- ``patients``: patient-level DP (one Poisson draw per patient, clipping per patient);
- ``epochs``: the run's randomness, the physical batch, loaders, loss weights, the noise plan,
  :func:`prepare_training` and :func:`train_epoch` (shared with the federated sites);
- ``loop``: :func:`run_trial`, the resumable epoch loop, model selection and the trial's ledger.
"""

from privdom_ray.train.data import SplitDataset, augment, load_model, macro_auc, predict
from privdom_ray.train.epochs import (
    CPU_BUDGET_MB,
    GPU_MARGIN,
    CheckpointStore,
    Instrument,
    Randomness,
    Training,
    auto_physical_batch,
    check_accounting,
    loss_weights,
    memory_budget_mb,
    noise_plan,
    prepare_training,
    privacy_units,
    train_epoch,
)
from privdom_ray.train.loop import TrainResult, epsilon_so_far, run_trial, trial_ledger
from privdom_ray.train.patients import noise_only_step

__all__ = [
    "predict",
    "augment",
    "macro_auc",
    "SplitDataset",
    "load_model",
    "noise_only_step",
    "Randomness",
    "Instrument",
    "CPU_BUDGET_MB",
    "GPU_MARGIN",
    "memory_budget_mb",
    "auto_physical_batch",
    "CheckpointStore",
    "Training",
    "prepare_training",
    "train_epoch",
    "loss_weights",
    "privacy_units",
    "noise_plan",
    "check_accounting",
    "TrainResult",
    "run_trial",
    "epsilon_so_far",
    "trial_ledger",
]
