"""Tiny grids of synthetic sites: the smallest sweeps that still train, evaluate and audit.

Plain dicts, as a grid file holds them (tests write them with ``yaml.safe_dump``); no privdom_ray
import, so ``benchmarks/probe_faults.py`` can use them too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def synthetic_domain(name: str, site: str, n_patients: int = 50) -> dict[str, Any]:
    """A grid entry for a generated synthetic site under ``data/<name>``."""
    return {
        "name": name,
        "kind": "synthetic",
        "root": f"data/{name}",
        "options": {"site": site, "n_patients": n_patients},
    }


def tiny_grid(
    name: str,
    sites: Iterable[str],
    *,
    n_patients: int,
    epochs: int,
    image_size: int,
    max_failures: int,
    epsilons: Iterable[float | str] = (2, "inf"),
    seeds: Iterable[int] = (0,),
    batch: int = 16,
    n_boot: int = 10,
) -> dict[str, Any]:
    """A sweep of every synthetic site (named after itself) as source and target, with the
    evaluation's minimum counts at 1 so that a tiny test split still gives every row."""
    return {
        "name": name,
        "output": "out",
        "domains": [synthetic_domain(s, s, n_patients) for s in sites],
        "epsilons": list(epsilons),
        "seeds": list(seeds),
        "training": {"epochs": epochs, "logical_batch": batch, "physical_batch": batch},
        "preprocessing": {"image_size": image_size},
        "evaluation": {"n_boot": n_boot, "min_positives": 1, "min_negatives": 1},
        "ray": {"num_cpus": 2, "max_failures": max_failures},
    }
