"""Domain adapters: one module per dataset kind, looked up by ``kind`` in a registry.

An adapter turns a dataset's real on-disk files into a manifest (see ``privdom_ray.manifest``).
Adding a kind means adding one module to this folder that calls ``register``; modules are
discovered on import, and nothing else in the project branches on the kind. Modules whose name
starts with ``_`` are helpers, not adapters.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from privdom_ray.manifest import ManifestError, finalize


@dataclass(frozen=True)
class Adapter:
    """A dataset kind: its typed options and the function that builds its manifest.

    ``options`` is a frozen dataclass of the kind's grid options (defaults = recommended policy);
    ``build(root, options)`` returns a DataFrame with the manifest columns.
    """

    kind: str
    options: type
    build: Callable[[Path, Any], pd.DataFrame]
    description: str = ""
    creates_root: bool = False  # True for generators: a missing root is created, not an error
    # False where the dataset publishes no patient ids (each image is its own "patient"): its
    # evaluations resample images, and their rows say so
    patient_ids: bool = True

    @property
    def resampling_unit(self) -> str:
        return "patient" if self.patient_ids else "image"


REGISTRY: dict[str, Adapter] = {}


def register(
    kind: str,
    options: type,
    description: str = "",
    creates_root: bool = False,
    patient_ids: bool = True,
) -> Callable:
    """Decorator that registers ``build(root, options)`` as the adapter of ``kind``."""

    def wrap(build: Callable[[Path, Any], pd.DataFrame]) -> Callable[[Path, Any], pd.DataFrame]:
        if kind in REGISTRY:
            raise RuntimeError(f"domain kind {kind!r} registered twice")
        REGISTRY[kind] = Adapter(kind, options, build, description, creates_root, patient_ids)
        return build

    return wrap


def kinds() -> list[str]:
    return sorted(REGISTRY)


def option_names(kind: str) -> list[str]:
    return [f.name for f in dataclasses.fields(REGISTRY[kind].options)]


def make_options(kind: str, values: dict[str, Any]) -> Any:
    """Build the kind's options dataclass; unknown keys raise ``TypeError`` (caught by the grid)."""
    return REGISTRY[kind].options(**values)


def build_manifest(
    kind: str, root: str | Path, options: Any = None, *, name: str = ""
) -> pd.DataFrame:
    """Build and check one domain's manifest."""
    if kind not in REGISTRY:
        raise ManifestError(f"unknown domain kind {kind!r}; known kinds: {', '.join(kinds())}")
    adapter = REGISTRY[kind]
    root = Path(root).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ManifestError(
            f"domain {name or kind!r}: root {str(root)!r} is a file, not a folder; point the "
            "domain's root at the dataset's folder"
            + (" (a missing one is generated there)" if adapter.creates_root else "")
        )
    if not root.is_dir() and not adapter.creates_root:
        raise ManifestError(f"domain {name or kind!r}: root folder {str(root)!r} does not exist")
    opts = options if options is not None else adapter.options()
    return finalize(adapter.build(root, opts), domain=name or kind)


def _import_adapters() -> None:
    """Import every module of this package so each adapter registers itself (no central list)."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_adapters()

from privdom_ray.domains._summary import summarize  # noqa: E402  (re-exported for launch.py)

__all__ = [
    "REGISTRY",
    "Adapter",
    "ManifestError",
    "build_manifest",
    "kinds",
    "register",
    "summarize",
]
