"""Helpers shared by the test files: the command line, small learnable splits, a synthetic domain.

One torch thread per process: the suite runs on 2 shared cores, beside sweeps that start
their own workers, and oversubscribed BLAS threads make timings swing 10-20x.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from privdom_ray.cache import SplitData  # noqa: E402
from privdom_ray.config import EvaluationConfig  # noqa: E402
from privdom_ray.manifest import LABELS  # noqa: E402
from privdom_ray.stats import evaluation, results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def launch(*args: str, cwd: Path, expect: int | None = 0, timeout: float = 420):
    """Run ``launch.py`` like a user; ``expect`` is the exit code to assert (None: any)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )
    if expect is not None:
        assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def toy_split(n: int, size: int = 16, seed: int = 0) -> SplitData:
    """Images whose label 0 is a bright square: learnable, so AUC is meaningful; some labels
    masked."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, len(LABELS))) < 0.4).astype(np.float32)
    images = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
    images[labels[:, 0] == 1, 4:12, 4:12] = 250
    labels[rng.random((n, len(LABELS))) < 0.1] = np.nan  # some masked labels
    return SplitData(images, labels, np.array(["F", "M"] * (n // 2)), rng.uniform(20, 90, n))


def synthetic_domain(name: str, site: str, n_patients: int = 50) -> dict:
    """A grid entry for a generated synthetic site under ``data/<name>``."""
    return {
        "name": name,
        "kind": "synthetic",
        "root": f"data/{name}",
        "options": {"site": site, "n_patients": n_patients},
    }


# ------------------------------------------------------------------- finished trials, no training


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
    spec: Any = None,
    info: dict | None = None,
) -> str:
    """A finished trial written through the trial store; ``evals`` maps target ->
    (fingerprint, test, scores). ``done=False`` leaves it as a crash before its ``done`` marker;
    targets in ``incomplete`` get an evaluation without eval.json (a half-written one);
    ``patient_groups=False`` writes predictions as evaluations did before patient groups.
    ``spec``: a planned TrialSpec to write instead of the one built from source, epsilon and
    seed; ``info``: more fields of its record (e.g. an audit twin's ``audit`` result)."""
    import torch

    from privdom_ray.config import TrainingConfig, TrialSpec
    from privdom_ray.imaging import Preprocessing
    from privdom_ray.privacy import MECHANISM_VERSION, Ledger
    from privdom_ray.store import TrialStore

    private = math.isfinite(epsilon)
    spec = spec or TrialSpec(
        source=source, data_fingerprint=f"fp{source}", epsilon=epsilon,
        delta=1e-5 if private else 0.0, seed=seed, model="resnet9",
        training=TrainingConfig(epochs=2, lr=1e-3), preprocessing=Preprocessing(image_size=16),
    ).with_key()  # fmt: skip
    common = dict(steps=8, sample_rate=0.25, loss_weights="dp_counts" if private else "exact")
    if private:
        ledger = Ledger(
            epsilon_target=epsilon, epsilon_spent=0.99 * epsilon, epsilon_rdp=epsilon,
            delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.5, accountant="prv",
            accountant_requested="prv", poisson_sampling=True, randomness="os-entropy",
            mechanism_version=MECHANISM_VERSION, **common,
        )  # fmt: skip
    else:
        ledger = Ledger.non_private(**common)
    store = TrialStore(output)
    record = {"spec": spec.to_json(), "best_epoch": 2, "train_seconds": 1.0, "val_macro_auc": 0.8,
              **(info or {})}  # fmt: skip
    store.write_trained(
        spec.key, state_dict={"w": torch.zeros(1)}, ledger=ledger.as_dict(), history=[],
        thresholds=[0.5] * len(LABELS), labels=LABELS, record=record,
    )  # fmt: skip
    for target, (fp, test, scores) in evals.items():
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
        store.write_eval(
            spec.key, target, fp, metrics=pd.DataFrame([r.as_dict() for r in rows]),
            predictions=pred, info={"n_test": len(scores), "n_boot": N_BOOT,
                                    "resampling_unit": unit, "eval_seconds": 0.1},
            model=store.model_digest(spec.key),
        )  # fmt: skip
        if target in incomplete:  # a crash before the evaluation was complete
            (store.evaluation(spec.key, target, fp).path / "eval.json").unlink()
    if not done:  # a crash before the done marker
        (store.folder(spec.key) / "done").unlink()
    return spec.key


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
    results.write_json(  # the plan's targets: their current data versions
        output / "plan.json", {"targets": [{"name": d, "fingerprint": f"fp{d}"} for d in domains]}
    )
    return keys


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for a test (per-sample gradient checks are exact and fast there);
    the previous setting is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items) -> None:
    """Tests that start a Ray cluster (marked ``ray``) are slow too: ``-m "not slow"`` is the
    quick suite (no Ray, no sweeps)."""
    for item in items:
        if item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.slow)


# --------------------------------------------------- a real finished sweep, trained without Ray


def write_cache(
    folder: Path, n_train: int = 96, size: int = 16, seed: int = 0, fingerprint: str = ""
) -> Path:
    """A cache entry as cache.build writes it (learnable toy images, two images per patient):
    train, val and test splits, and meta.json (domain = the folder's name)."""
    sizes = {"train": n_train, "val": 40, "test": 60}
    parts = [toy_split(n, size, seed=seed + i) for i, n in enumerate(sizes.values())]
    folder.mkdir(parents=True)
    images = np.concatenate([p.images for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    np.save(folder / "images.npy", images)
    n = len(images)
    rows = pd.DataFrame(
        {
            "path": [f"{i}.png" for i in range(n)],
            "patient_id": [f"{folder.name}-p{i // 2}" for i in range(n)],
            "split": np.repeat(list(sizes), list(sizes.values())),
            "sex": np.array(["F", "M"] * (n // 2 + 1))[:n],
            "age": np.random.default_rng(seed).uniform(20, 90, n),
            **{label: labels[:, j] for j, label in enumerate(LABELS)},
            "ok": True,
        }
    )
    rows.to_parquet(folder / "rows.parquet", index=False)
    meta = {"domain": folder.name, "fingerprint": fingerprint, "n_images": n, "n_skipped": 0}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def build_real_output(work: Path, *, accountant: str = "rdp") -> tuple[Path, dict[str, str]]:
    """A finished sweep output trained for real (real Opacus, real files), without Ray: site
    ``a`` at epsilon 2 and inf, the epsilon-2 cell's audit twin (gradient canaries), and a
    federation ``fed_ab`` of sites a and b at epsilon 2; every model evaluated on a and b;
    transfer, comparisons and reliability tables and the report written. Returns (output,
    {trial name: key}). About a minute on 2 cores (``rdp`` calibrates in a second, PRV in ~10 s).
    """
    from privdom_ray import integrity, report
    from privdom_ray.cell import Cell, TargetRef
    from privdom_ray.config import AuditSpec, Federation, Site, TrainingConfig, TrialSpec
    from privdom_ray.imaging import Preprocessing
    from privdom_ray.stats import comparisons
    from privdom_ray.trial import Executor, run_cell

    output = work / "out"
    caches = {
        s: write_cache(output / "cache" / s, seed=10 * i, fingerprint=f"fp-{s}")
        for i, s in enumerate("ab")
    }
    targets = tuple(TargetRef(s, f"fp-{s}", str(p), "patient") for s, p in caches.items())
    training = TrainingConfig(epochs=2, logical_batch=32, physical_batch=32, accountant=accountant)

    def spec(epsilon: float, **kw) -> TrialSpec:
        return TrialSpec(
            source=kw.pop("source", "a"), data_fingerprint=kw.pop("fingerprint", "fp-a"),
            epsilon=epsilon, delta=1e-5 if math.isfinite(epsilon) else 0.0, seed=0,
            model="resnet9", training=kw.pop("training", training),
            preprocessing=Preprocessing(image_size=16), **kw,
        ).with_key()  # fmt: skip

    fed = Federation(
        sites=tuple(Site(s, f"fp-{s}", 1.0, 1e-5) for s in "ab"), rounds=2, local_epochs=1
    )
    specs = [
        spec(2.0),
        spec(math.inf),
        spec(2.0, variant="audit", audit=AuditSpec(canaries=200, kind="gradient", auditor_seed=0)),
        spec(2.0, source="fed_ab", fingerprint="fp-ab", federation=fed),
    ]
    for s in specs:
        cell = Cell(
            spec=s, output=str(output), source_cache=str(caches["a"]),
            targets=() if s.audit else targets, evaluation=EV, sites=targets,
            site_slots=2 if s.federation else 1,
        )  # fmt: skip
        run_cell(cell, executor=Executor())
    keys = [s.key for s in specs]
    results.write_json(
        output / "plan.json",
        {"targets": [{"name": t.name, "fingerprint": t.fingerprint} for t in targets]},
    )
    results.aggregate(output, keys, "real", targets)
    comparisons.write_all(output, comparisons.compute_all(output, keys, EV, targets=targets))
    report.write_report(output)
    integrity.seal_files(output, list(integrity.SEALED_OUTPUTS))  # as the sweep's driver does
    return output, {s.name: s.key for s in specs}


@pytest.fixture(scope="session")
def real_output(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """:func:`build_real_output` once per test session (read-only: copy it to change it)."""
    return build_real_output(tmp_path_factory.mktemp("real"))
