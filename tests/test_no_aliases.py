"""No compatibility aliases: every importer names the module that defines what it imports.

Issue 25 split modules into packages and gave the output folder's names one home
(``privdom_ray/folder.py``); while branches were in flight, the old homes kept aliases
(``TRIALS = folder.TRIALS``) and package ``__init__`` files re-exported their submodules'
private names. An alias hides where a name lives and keeps working after it moves again, so
two spellings drift apart. These checks read the source (``ast``, milliseconds): a package
keeps its public names (``privdom_ray.privacy.Ledger``), but no module re-exports a private
name or aliases a name of ``folder.py``, and nothing imports a private or folder name through
a module that only imports it itself.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = "privdom_ray.folder"
# where importers of the package live (launch.py is a script at the root)
IMPORTERS = ("privdom_ray", "tests", "benchmarks", "experiments", "launch.py")


@dataclass
class Module:
    """What one source file binds and uses, read from its syntax tree."""

    name: str  # dotted, e.g. privdom_ray.store (a package's __init__) or tests.test_store
    tree: ast.Module
    defined: set[str] = field(default_factory=set)  # bound at module level, not by an import
    imported: dict[str, str] = field(default_factory=dict)  # local name -> "module.name"
    used: set[str] = field(default_factory=set)  # names read outside import statements

    @classmethod
    def parse(cls, name: str, source: str) -> Module:
        module = cls(name, ast.parse(source))
        for node in ast.walk(module.tree):
            if isinstance(node, ast.ImportFrom):  # absolute: the code has no relative imports
                for alias in node.names:
                    module.imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        module.imported[alias.asname] = alias.name
            elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Store):
                module.used.add(node.id)
        for stmt in _top_level(module.tree.body):
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                module.defined.add(stmt.name)
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                for target in targets:
                    module.defined |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        return module

    def all_names(self) -> list[str]:
        """The strings of ``__all__`` (empty when the module has none)."""
        for stmt in _top_level(self.tree.body):
            if isinstance(stmt, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in stmt.targets
            ):
                return [e.value for e in ast.walk(stmt.value) if isinstance(e, ast.Constant)]
        return []


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Module-level statements, also those under a module-level if/try/with."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, (ast.If, ast.With, ast.Try)):
            yield from _top_level(stmt.body)
        if isinstance(stmt, (ast.If, ast.Try)):
            yield from _top_level(stmt.orelse)
        if isinstance(stmt, ast.Try):
            yield from _top_level(stmt.finalbody)
            for handler in stmt.handlers:
                yield from _top_level(handler.body)


def _dotted(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and parts[0] == "privdom_ray":
        parts.pop()
    return ".".join(parts)


def load(root: Path = ROOT) -> dict[str, Module]:
    """Every Python file of the package and of its importers under ``root``, by dotted name."""
    paths: list[Path] = []
    for where in IMPORTERS:
        path = root / where
        paths += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.is_file() else []
    modules = {}
    for path in paths:
        if ".venv" in path.parts:
            continue
        name = _dotted(path, root)
        modules[name] = Module.parse(name, path.read_text(encoding="utf-8"))
    return modules


# ------------------------------------------------------------------------------ the checks


def private_reexports(module: Module) -> list[str]:
    """Private names of another module imported here only to be importable from here."""
    found = []
    for local, origin in module.imported.items():
        private = origin.rsplit(".", 1)[-1].startswith("_")
        if private and origin.startswith("privdom_ray.") and local not in module.used:
            found.append(f"{module.name}: imports {origin} without using it (a re-export)")
    found += [f"{module.name}: __all__ lists {n}" for n in module.all_names() if n.startswith("_")]
    return found


def _folder_name(node: ast.expr, module: Module) -> str | None:
    """``folder.X`` (the module under any local name) or a name imported from it: the origin."""
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and module.imported.get(node.value.id) == FOLDER
    ):
        return f"{FOLDER}.{node.attr}"
    if isinstance(node, ast.Name) and module.imported.get(node.id, "").startswith(FOLDER + "."):
        return module.imported[node.id]
    return None


def folder_aliases(module: Module) -> list[str]:
    """Module-level names bound to a name of ``folder.py`` (``TRIALS = folder.TRIALS``, also in
    a tuple assignment, or an import renaming it)."""
    if module.name == FOLDER:
        return []
    found = []
    for stmt in _top_level(module.tree.body):
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            values = stmt.value.elts if isinstance(stmt.value, ast.Tuple) else [stmt.value]
            for value in values:
                if origin := _folder_name(value, module):
                    found.append(f"{module.name}:{stmt.lineno}: an alias of {origin}")
        if isinstance(stmt, ast.ImportFrom) and stmt.module == FOLDER:
            for alias in stmt.names:
                if alias.asname and alias.asname != alias.name:
                    found.append(
                        f"{module.name}:{stmt.lineno}: imports {alias.name} as {alias.asname}"
                    )
    return found


def _passed_on(modules: dict[str, Module], home: str, name: str) -> str | None:
    """Where ``home.name`` really comes from, when ``home`` only imports it and it is private
    or a folder name (a submodule or a name ``home`` defines is its own)."""
    module = modules.get(home)
    if module is None or f"{home}.{name}" in modules or name in module.defined:
        return None
    origin = module.imported.get(name)
    if origin and (name.startswith("_") or origin.startswith(FOLDER + ".")):
        return origin
    return None


def indirect_imports(importer: Module, modules: dict[str, Module]) -> list[str]:
    """Private or folder names this file imports (or reads as ``module.NAME``) through a module
    that is not their home."""
    found = []
    for node in ast.walk(importer.tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("privdom_ray"):
            for alias in node.names:
                if origin := _passed_on(modules, node.module or "", alias.name):
                    found.append(
                        f"{importer.name}:{node.lineno}: import {origin}, not via {node.module}"
                    )
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            home = importer.imported.get(node.value.id)
            if home and (origin := _passed_on(modules, home, node.attr)):
                found.append(f"{importer.name}:{node.lineno}: use {origin}, not {home}.{node.attr}")
    return found


def violations(modules: dict[str, Module]) -> list[str]:
    found = []
    for name, module in modules.items():
        if name.startswith("privdom_ray"):
            found += private_reexports(module) + folder_aliases(module)
        found += indirect_imports(module, modules)
    return found


# ------------------------------------------------------------------------------ tests


def test_no_module_keeps_an_alias_or_reexports_a_private_name():
    modules = load()
    assert "privdom_ray.store" in modules and "launch" in modules  # the files were found
    assert violations(modules) == []


def _modules(**sources: str) -> dict[str, Module]:
    return {name.replace("__", "."): Module.parse(name.replace("__", "."), src)
            for name, src in sources.items()}  # fmt: skip


def test_the_checks_find_the_aliases_issue_25_removed():
    """The shapes the old code had (store/__init__ re-exporting ``_MODEL``, ``TRIALS =
    folder.TRIALS``, export's tuple alias, a test reading ``results.TRANSFER``) are found;
    importing from the real home, or a private name the package uses itself, is not."""
    modules = _modules(
        privdom_ray__folder="TRIALS = 'trials'\nTRANSFER = 'transfer.parquet'\n",
        privdom_ray__store__records="_MODEL = 'model.pt'\n_json = 1\n",
        privdom_ray__store=(
            "from privdom_ray.store.records import _MODEL, _json\n"
            "from privdom_ray.folder import TRIALS\n"
            "def path(root):\n    return root / TRIALS / _json\n"
        ),
        privdom_ray__stats__results=(
            "from privdom_ray import folder\nfrom privdom_ray import folder as f\n"
            "TRANSFER = folder.TRANSFER\nA, B = f.TRIALS, f.TRANSFER\nNAME = 'x' + folder.TRIALS\n"
            "from privdom_ray.folder import GUARANTEES\ndef g():\n    return GUARANTEES\n"
        ),
        privdom_ray__lease="from privdom_ray.folder import TRIALS as DIR\n",
        tests__test_x=(
            "from privdom_ray.stats import results\nfrom privdom_ray.store import _json, TRIALS\n"
            "from privdom_ray.store.records import _MODEL\nx = results.GUARANTEES, results.TRANSFER\n"
        ),
    )
    found = violations(modules)
    assert len(found) == 8, "\n".join(found)
    text = "\n".join(found)
    assert "privdom_ray.store: imports privdom_ray.store.records._MODEL without using it" in text
    assert "_json without using" not in text  # the package uses it: not a re-export
    assert "results:3: an alias of privdom_ray.folder.TRANSFER" in text
    assert text.count("results:4: an alias of") == 2 and "results:5" not in text
    assert "lease:1: imports TRIALS as DIR" in text
    assert "test_x:2: import privdom_ray.store.records._json, not via privdom_ray.store" in text
    assert "test_x:2: import privdom_ray.folder.TRIALS, not via privdom_ray.store" in text
    assert "use privdom_ray.folder.GUARANTEES, not privdom_ray.stats.results.GUARANTEES" in text
    assert "test_x:3" not in text  # imported from its home
