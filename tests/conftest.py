"""Fixtures and helpers shared by the test files: the command line, small learnable splits,
a real finished sweep trained without Ray (finished trials from synthetic scores, and the tiny
grids, are in ``tests/helpers/``).

One torch thread per process: the suite runs on 2 shared cores, beside sweeps that start
their own workers, and oversubscribed BLAS threads make timings swing 10-20x.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# The sweeps the tests launch start no Ray dashboard (its process and the actors it brings cost
# each embedded cluster ~5 CPU seconds on 2 cores); test_sweep turns it on to check its address.
os.environ.setdefault("PRIVDOM_RAY_DASHBOARD", "0")

import contextlib  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from helpers.shared import built_once  # noqa: E402
from helpers.trials import EV  # noqa: E402

from privdom_ray.cache import SplitData  # noqa: E402
from privdom_ray.manifest import LABELS  # noqa: E402
from privdom_ray.stats import results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def launch(
    *args: str, cwd: Path, expect: int | None = 0, timeout: float = 420, env: dict | None = None
):
    """Run ``launch.py`` like a user; ``expect`` is the exit code to assert (None: any);
    ``env``: variables set on top of this process's environment."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    if expect is not None:
        assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@functools.cache
def _launch_module() -> ModuleType:
    """``launch.py`` loaded as a module (it is a script at the repository's root)."""
    spec = importlib.util.spec_from_file_location("privdom_launch", ROOT / "launch.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch_here(
    *args: str,
    cwd: Path,
    expect: int | None = 0,
    timeout: float | None = None,
    env: dict | None = None,
) -> subprocess.CompletedProcess[str]:
    """``launch.py``'s ``main`` run in this process, as :func:`launch` runs the script: same
    arguments, exit code (an uncaught exception is 1, with its traceback on stderr, as the
    interpreter gives it), stdout and stderr. For a test that runs many short commands (audit,
    export) on one folder: a fresh interpreter costs each ~5 CPU seconds on 2 cores (torch,
    imported by opacus's accountants, and the accountants' first calibrations); here they are
    paid once. Sweeps may run here too (Ray starts and stops with the call); a test that
    kills or pauses a driver, or fences one (``os._exit``), needs :func:`launch`. ``env``: set for the
    call, then restored; ``timeout`` is :func:`launch`'s, unused here (nothing to kill)."""
    out, err = io.StringIO(), io.StringIO()
    patch = pytest.MonkeyPatch()
    for name, value in (env or {}).items():
        patch.setenv(name, value)
    with contextlib.ExitStack() as stack:
        stack.callback(patch.undo)
        stack.enter_context(contextlib.chdir(cwd))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            code = _launch_module().main(list(args))
        except SystemExit as exc:  # argparse's errors and --help
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # noqa: BLE001 - what the interpreter would print, exit 1
            traceback.print_exc()
            code = 1
    proc = subprocess.CompletedProcess(
        ["launch.py", *args], code, out.getvalue(), err.getvalue()
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


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for a test (per-sample gradient checks are exact and fast there);
    the previous setting is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def calibrated_once():
    """Each DP noise calibration once per module that asks for it: a pure function of
    (epsilon, delta, q, steps, accountant, count fraction), a bisection over the PRV accountant
    of 3-7 s on 2 cores, that a module training the same configuration again would repeat. The
    real ``calibrate``, memoised for the module's in-process trainings (a run whose q or steps
    differ gets its own calibration; subprocesses and Ray workers calibrate as ever)."""
    from privdom_ray.train import epochs

    patch = pytest.MonkeyPatch()
    patch.setattr(epochs, "calibrate", functools.lru_cache(maxsize=None)(epochs.calibrate))
    yield
    patch.undo()


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
    from privdom_ray import atomic, integrity, report
    from privdom_ray.cell import Cell, TargetRef
    from privdom_ray.config import AuditSpec, Federation, Site, TrainingConfig, TrialSpec
    from privdom_ray.folder import TABLES
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
    atomic.write_json(
        output / "plan.json",
        {"targets": [{"name": t.name, "fingerprint": t.fingerprint} for t in targets]},
    )
    results.aggregate(output, keys, "real", targets)
    comparisons.write_all(output, comparisons.compute_all(output, keys, EV, targets=targets))
    report.write_report(output)
    integrity.seal_files(output, list(TABLES))  # as the sweep's driver does
    return output, {s.name: s.key for s in specs}


@pytest.fixture(scope="session")
def real_output(tmp_path_factory, worker_id) -> tuple[Path, dict[str, str]]:
    """:func:`build_real_output` once per test run, shared by the xdist workers (read-only:
    copy it to change it): test_audit and test_export may run on different workers."""

    def build(work: Path) -> dict:
        output, names = build_real_output(work)
        return {"output": str(output), "names": names}

    built = built_once(tmp_path_factory, worker_id, "real", build)
    return Path(built["output"]), built["names"]
