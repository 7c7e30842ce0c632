"""The import rules of the package, checked by import-linter (contracts in pyproject.toml).

The layers follow design.md's flow (config and grid at the bottom, report and export on top),
Ray is imported only by the edge modules (sweep, trainable, ray_decode), a trial reaches no
Ray, the statistics never import the training code, and no two modules or packages import
each other. The check builds the import graph of this checkout in a fresh interpreter (about
3 s), so a new cycle or a Ray import outside the edges fails the test command.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the `lint-imports` entry point, run by this interpreter (the venv's, no `uv run` needed);
# run from the repository root, whose privdom_ray is the one analysed
_LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def test_import_contracts_are_kept():
    done = subprocess.run(
        [sys.executable, "-c", _LINT, "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, f"import contracts broken (lint-imports):\n{report}"
    assert "0 broken" in report, report


def test_the_contracts_cover_cycles_ray_and_layers():
    """The rules issue 25 asks for stay declared (a contract deleted to pass is a failure)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contracts = {c["id"]: c for c in config["contracts"]}
    assert contracts["acyclic"]["type"] == "acyclic_siblings"
    assert contracts["acyclic"]["ancestors"] == ["privdom_ray"]
    assert contracts["ray-edges"]["protected_modules"] == ["ray"]
    assert contracts["flow"]["type"] == "layers" and contracts["flow"]["exhaustive"]
    assert not any(c.get("ignore_imports") for c in contracts.values())
