"""The import rules of the package, checked by import-linter (contracts in pyproject.toml).

The layers follow design.md's flow (config and grid at the bottom, report and export on top),
Ray is imported only by the edge modules (sweep, trainable, ray_decode), a trial reaches no
Ray, the statistics never import the training code, and no two modules or packages import
each other. The check builds the import graph of this checkout in a fresh interpreter (about
3 s), so a new cycle or a Ray import outside the edges fails the test command.
"""

from __future__ import annotations

import ast
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


# ------------------------------------------------------------------------------ kinds

PACKAGE = ROOT / "privdom_ray"
KIND_FIELDS = {"federation", "variant"}  # TrialSpec's fields that tell kinds apart
# modules that may read them: the kinds themselves, the store (records), config (where the
# fields are defined and TrialSpec.kind derives the name), and federated/, the federated
# kind's training (only its trainer calls it)
KIND_OWNERS = ("kinds/", "store/", "config.py", "federated/")
# a kind-name literal compared with something that is not a kind: training.init's values
# ("pretrain" = start from the grid's pretraining) and the privacy class "audit" of columns
NOT_KIND_SETTINGS = ("init", "cls", "privacy_class")


def _kind_names() -> set[str]:
    from privdom_ray import kinds

    return set(kinds.REGISTRY)


def _trainers() -> set[str]:
    """The functions trial.TRAINERS holds: a kind's own trainer reads its kind's fields."""
    tree = ast.parse((PACKAGE / "trial" / "__init__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "TRAINERS":
            return {v.id for v in node.value.values}
    raise AssertionError("trial/__init__.py holds no TRAINERS registry")


def _names_in(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
    }


def _kind_branches(path: Path, names: set[str], trainers: set[str]) -> list[str]:
    """``file:line`` of each raw kind test in ``path``: a read of ``.federation``,
    ``.variant`` or a trial's ``.audit`` field, or a kind's name compared with a value."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef) and f.name in trainers
        for n in ast.walk(f)
    }
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    hits = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Attribute) and (
            node.attr in KIND_FIELDS
            or (node.attr == "audit" and _names_in(node.value) & {"spec", "t", "trial"})
        ):
            hits.append(f"{where}:{node.lineno}: .{node.attr}")
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            consts = [c for s in sides for c in ast.walk(s) if isinstance(c, ast.Constant)]
            named = any(c.value in names for c in consts if isinstance(c.value, str))
            if named and not _names_in(node) & set(NOT_KIND_SETTINGS):
                hits.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return hits


def test_no_module_outside_the_kinds_branches_on_a_kind():
    """Issue 25: a kind's behaviour is asked of its TrialKind (kinds.kind_of(spec)), never
    worked out again from raw fields; this search names each place that does."""
    names, trainers = _kind_names(), _trainers()
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if not rel.startswith(KIND_OWNERS):
            hits += _kind_branches(path, names, trainers)
    assert not hits, "modules outside kinds/ branch on a trial's kind:\n" + "\n".join(hits)


def test_the_search_finds_a_raw_kind_test(tmp_path):
    """The search above can fail: a module that tests the raw fields is named, file:line."""
    path = tmp_path / "probe.py"
    path.write_text(
        "def f(spec, record):\n"
        "    if spec.federation is None:\n"
        "        return spec.variant == 'audit'\n"
        "    return record.spec.audit, spec.training.init == 'pretrain'\n"
    )
    hits = [h.split(": ", 1)[0] for h in _kind_branches(path, _kind_names(), set())]
    assert sorted(hits) == ["probe.py:2", "probe.py:3", "probe.py:3", "probe.py:4"]
