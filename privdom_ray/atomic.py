"""Atomic file writes: a reader sees the old file or the new one, never half of either.

The one place that writes a file in place of another (temporary file in the same folder, then
``os.replace``). The store, the integrity seals, the tables and the report all write through
it; it imports nothing of the package, so every layer may use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write, *, private: bool = False) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers see the old file or the new
    one. ``private`` files (checkpoints: secret generator states) stay readable by the owner
    only; others get the usual permissions (results are meant to be shared)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        if not private:
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=_json_default)))


def write_parquet(path: Path, df: pd.DataFrame | pa.Table) -> None:
    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    atomic_write(path, lambda p: pq.write_table(table, p))


def write_yaml(path: Path, obj: Any) -> None:
    """Human-readable record (round-tripped through JSON so numpy scalars and inf are plain)."""
    import yaml

    plain = json.loads(json.dumps(obj, default=_json_default))
    atomic_write(path, lambda p: p.write_text(yaml.safe_dump(plain, sort_keys=False)))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
