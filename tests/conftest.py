"""Helpers shared by the test files: the command line, small learnable splits, a synthetic domain.

One torch thread per process: the suite runs on 2 shared cores, beside sweeps that start
their own workers, and oversubscribed BLAS threads make timings swing 10-20x.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from privdom_ray.cache import SplitData  # noqa: E402
from privdom_ray.manifest import LABELS  # noqa: E402

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
