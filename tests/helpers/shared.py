"""Build an expensive read-only fixture once per test run, even under pytest-xdist.

Each xdist worker is its own pytest session, so a session fixture would be built once per
worker (twice on 2 cores). The first worker to ask builds it under the run's shared temporary
folder while holding a file lock; the others wait on the lock and read what it built (the
pattern of pytest-xdist's docs, "Making session-scoped fixtures execute only once"). What is
built must be treated as read-only by every test: copy it (``shutil.copytree``) to change it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

DONE = "built.json"  # written last: a folder without it is a build that did not finish


def built_once(
    tmp_path_factory: Any, worker_id: str, name: str, build: Callable[[Path], Any]
) -> Any:
    """``build(folder)`` once per test run; its result must be JSON (it is handed to the other
    workers through a file). ``worker_id`` is xdist's fixture ("master" without xdist: built
    here, nothing shared)."""
    if worker_id == "master":
        return build(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent / f"shared-{name}"
    with FileLock(f"{root}.lock"):
        done = root / DONE
        if done.is_file():
            return json.loads(done.read_text())
        if root.exists():  # a worker's build that failed: start again
            shutil.rmtree(root)
        root.mkdir()
        result = build(root)
        done.write_text(json.dumps(result))
        return result
