"""Finished trial folders written through the trial store, from synthetic scores: no
training, no Ray. ``write_trial`` is one trial (a real state_dict, a real ``Ledger``, real
evaluations computed by ``evaluation.evaluate``); ``build_output`` a whole finished sweep.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from privdom_ray import atomic
from privdom_ray.config import EvaluationConfig, TrainingConfig, TrialSpec
from privdom_ray.imaging import Preprocessing
from privdom_ray.manifest import LABELS
from privdom_ray.privacy import MECHANISM_VERSION, Ledger
from privdom_ray.stats import evaluation

N_BOOT = 200
AGE_BINS = (0.0, 40.0, 70.0, math.inf)
EV = EvaluationConfig(n_boot=N_BOOT, seed=0, ci=0.95, age_bins=AGE_BINS)


# ------------------------------------------------------------------------------ builder


def make_testset(n: int, seed: int, per_patient: int = 3) -> dict[str, np.ndarray]:
    """A target's test split: patients with 1..per_patient images, labels (some unknown),
    sex and age per patient, ages in [20, 70) only.

    Cardiomegaly is never positive under 40, so "age=[0,40)" has no positives for it, and
    nobody is 70 or older, so "age=[70,inf)" is empty.
    """
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, per_patient + 1, size=n)
    group = np.repeat(np.arange(n), sizes)[:n]
    n_pat = int(group.max()) + 1
    age = rng.uniform(20, 69.9, n_pat)[group]
    sex = rng.choice(np.array(["F", "M", "U"]), n_pat, p=[0.45, 0.45, 0.1])[group]
    frail = rng.normal(size=n_pat)[group]  # a patient effect: follow-ups are alike
    y = (rng.random((n, len(LABELS))) < 1 / (1 + np.exp(0.6 - 0.8 * frail[:, None]))).astype(float)
    y[age < 40, 0] = 0.0
    y[rng.random((n, len(LABELS))) < 0.05] = np.nan
    return {"y": y, "sex": sex, "age": age, "group": group}


def scores_for(test: dict[str, np.ndarray], strength: float, seed: int) -> np.ndarray:
    """Sigmoid probabilities separating the classes by ``strength`` SDs, with a per-patient
    model error (a model misjudges all images of one patient alike)."""
    rng = np.random.default_rng(seed)
    n_pat = int(test["group"].max()) + 1
    patient_err = rng.normal(scale=0.7, size=(n_pat, len(LABELS)))[test["group"]]
    logit = np.nan_to_num(test["y"]) * strength + patient_err + rng.normal(size=test["y"].shape)
    return 1.0 / (1.0 + np.exp(-(logit - 0.5 * strength)))


def tiny_spec(source: str, epsilon: float, seed: int, **kw: Any) -> TrialSpec:
    """A keyed TrialSpec of a 2-epoch resnet9 on 16-pixel images (data fingerprint
    ``fp<source>``); ``kw`` overrides any other field."""
    private = math.isfinite(epsilon)
    fields: dict[str, Any] = dict(
        source=source, data_fingerprint=f"fp{source}", epsilon=epsilon,
        delta=1e-5 if private else 0.0, seed=seed, model="resnet9",
        training=TrainingConfig(epochs=2, lr=1e-3), preprocessing=Preprocessing(image_size=16),
    )  # fmt: skip
    return TrialSpec(**{**fields, **kw}).with_key()


def tiny_ledger(epsilon: float) -> Ledger:
    """The ledger of a finished 8-step run: DP (PRV, secret randomness, 99% of the target
    spent) when ``epsilon`` is finite, else non-private."""
    private = math.isfinite(epsilon)
    common = dict(steps=8, sample_rate=0.25, loss_weights="dp_counts" if private else "exact")
    if not private:
        return Ledger.non_private(**common)
    return Ledger(
        epsilon_target=epsilon, epsilon_spent=0.99 * epsilon, epsilon_rdp=epsilon,
        delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.5, accountant="prv",
        accountant_requested="prv", poisson_sampling=True, randomness="os-entropy",
        mechanism_version=MECHANISM_VERSION, **common,
    )  # fmt: skip


def write_trained(
    output: Path, spec: TrialSpec, ledger: Ledger | None = None, info: dict | None = None
) -> str:
    """A trained trial (a real one-tensor state_dict, ``ledger`` or :func:`tiny_ledger`,
    thresholds 0.5) committed through ``TrialStore.write_trained``; returns its key."""
    import torch

    from privdom_ray.records import RunRecord
    from privdom_ray.store import TrialStore

    ledger = ledger or tiny_ledger(spec.epsilon)
    record = RunRecord.make(**{"best_epoch": 2, "train_seconds": 1.0, "val_macro_auc": 0.8,
                               **(info or {})})  # fmt: skip
    TrialStore(output).write_trained(
        spec.key, state_dict={"w": torch.zeros(1)}, ledger=ledger, history=[],
        thresholds=[0.5] * len(LABELS), labels=LABELS, record=record, spec=spec,
    )  # fmt: skip
    return spec.key


def write_evaluation(
    output: Path,
    key: str,
    target: str,
    fingerprint: str,
    test: dict[str, np.ndarray],
    scores: np.ndarray,
    *,
    patient_groups: bool = True,
) -> None:
    """One evaluation of trial ``key`` on ``target`` (metrics computed by
    ``evaluation.evaluate`` from ``scores``), bound to the model on disk, through
    ``TrialStore.write_eval``. ``patient_groups=False``: as evaluations were before them."""
    from privdom_ray.store import TrialStore

    pred = pd.DataFrame({"row": np.arange(len(scores))})
    for j, label in enumerate(LABELS):
        pred[f"score_{label}"] = scores[:, j]
        pred[f"label_{label}"] = test["y"][:, j]
    pred["sex"] = test["sex"].astype(str)
    pred["age"] = test["age"]
    if patient_groups:
        pred["patient_group"] = test["group"].astype(np.int64)
    rows = evaluation.evaluate(
        scores, test["y"], np.full(len(LABELS), 0.5), LABELS,
        groups=evaluation.subgroup_masks(test["sex"], test["age"], AGE_BINS), n_boot=N_BOOT,
        seed=0, clusters=test["group"] if patient_groups else None,
        min_positives=EV.min_positives, min_negatives=EV.min_negatives,
    )  # fmt: skip
    unit = "patient" if patient_groups else "image"
    store = TrialStore(output)
    store.write_eval(
        key, target, fingerprint, metrics=pd.DataFrame([r.as_dict() for r in rows]),
        predictions=pred, info={"n_test": len(scores), "n_boot": N_BOOT,
                                "resampling_unit": unit, "eval_seconds": 0.1},
        model=store.model_digest(key),
    )  # fmt: skip


def write_trial(
    output: Path,
    *,
    source: str,
    epsilon: float,
    seed: int,
    evals: dict[str, tuple[str, dict[str, np.ndarray], np.ndarray]],
    done: bool = True,
    incomplete: tuple[str, ...] = (),
    patient_groups: bool = True,
    spec: TrialSpec | None = None,
    info: dict | None = None,
) -> str:
    """A finished trial written through the trial store; ``evals`` maps target ->
    (fingerprint, test, scores). ``done=False`` leaves it as a crash before its ``done`` marker;
    targets in ``incomplete`` get an evaluation without eval.json (a half-written one);
    ``patient_groups=False`` writes predictions as evaluations did before patient groups.
    ``spec``: a planned TrialSpec to write instead of the one built from source, epsilon and
    seed; ``info``: more fields of its record (e.g. an audit twin's ``audit`` result)."""
    from privdom_ray.store import TrialStore

    spec = spec or tiny_spec(source, epsilon, seed)
    key = write_trained(output, spec, tiny_ledger(epsilon), info)
    store = TrialStore(output)
    for target, (fp, test, scores) in evals.items():
        write_evaluation(output, key, target, fp, test, scores, patient_groups=patient_groups)
        if target in incomplete:  # a crash before the evaluation was complete
            (store.evaluation(key, target, fp).path / "eval.json").unlink()
    if not done:  # a crash before the done marker
        (store.folder(key) / "done").unlink()
    return key


def write_twin(output: Path, key: str, audit: Any, result: dict[str, Any]) -> str:
    """A finished audit twin of trial ``key`` (its spec with ``audit``, its ledger and
    thresholds) whose record holds the canary audit's ``result``; returns the twin's key."""
    import dataclasses

    from privdom_ray.store import TrialStore

    trial = TrialStore(output).read(key)
    twin = dataclasses.replace(trial.spec, variant="audit", audit=audit).with_key()
    info = {"best_epoch": 1, "val_macro_auc": 0.5, "audit": result}
    return write_trained(output, twin, trial.ledger, info)


Strength = Callable[[str, str, float, int], float]


def default_strength(source: str, target: str, epsilon: float, seed: int) -> float:
    """Models are better on-domain and without DP; a seed shifts every model a little."""
    base = 1.6 if source == target else 0.9
    dp = -0.35 if math.isfinite(epsilon) else 0.0
    return base + dp + 0.05 * seed


def build_output(
    output: Path,
    *,
    domains: tuple[str, ...] = ("a", "b", "c"),
    epsilons: tuple[float, ...] = (1.0, math.inf),
    seeds: tuple[int, ...] = (0,),
    n: int = 240,
    strength: Strength = default_strength,
    skip: tuple[tuple[str, float, int, str], ...] = (),
    patient_groups: bool = True,
    share_noise: bool = False,
) -> list[str]:
    """A finished sweep: every (source, epsilon, seed) trained and evaluated on every domain.

    ``skip`` lists (source, epsilon, seed, target) evaluations left half-written;
    ``share_noise`` gives models of equal strength identical scores across epsilons.
    """
    tests = {d: make_testset(n, seed=10 + i) for i, d in enumerate(domains)}
    keys = []
    for si, source in enumerate(domains):
        for ei, eps in enumerate(epsilons):
            for seed in seeds:
                evals = {
                    t: (
                        f"fp{t}",
                        tests[t],
                        scores_for(
                            tests[t],
                            strength(source, t, eps, seed),
                            1000 * seed + 100 * si + 10 * ei * (not share_noise) + ti,
                        ),
                    )
                    for ti, t in enumerate(domains)
                }
                incomplete = tuple(t for (s, e, sd, t) in skip if (s, e, sd) == (source, eps, seed))
                keys.append(
                    write_trial(
                        output,
                        source=source,
                        epsilon=eps,
                        seed=seed,
                        evals=evals,
                        incomplete=incomplete,
                        patient_groups=patient_groups,
                    )
                )
    atomic.write_json(  # the plan's targets: their current data versions
        output / "plan.json", {"targets": [{"name": d, "fingerprint": f"fp{d}"} for d in domains]}
    )
    return keys


def tiny_federation(name: str, epsilon: float, seed: int, sites: tuple[str, ...] = ("a",)) -> TrialSpec:
    """A keyed federated TrialSpec (``name`` over ``sites``, equal weights), else as
    :func:`tiny_spec`: a trial of the federated kind, for reads and writes of its record."""
    from privdom_ray.config import Federation, Site

    delta = 1e-5 if math.isfinite(epsilon) else 0.0
    members = tuple(Site(s, f"fp{s}", 1.0, delta) for s in sites)
    return tiny_spec(name, epsilon, seed, federation=Federation(members, rounds=1, local_epochs=1))
