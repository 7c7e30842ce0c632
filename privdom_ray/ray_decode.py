"""The Ray Data pipeline that decodes a domain's images into a cache entry (an edge module).

``cache.build`` owns the entry (its layout, lock, seal and checksums) and calls
:func:`decode_into` to fill ``images.npy``: Ray Data workers decode and preprocess blocks of
rows (:func:`decode_batch`) and hand them back; this process streams the blocks
(``iter_batches``, a few at a time) and is the only writer of the file. Ray is imported here,
in ``sweep`` and in ``trainable`` and nowhere else (an import-linter contract), so reading a
cache and training (``cache.load_split``, ``train``, ``trial``) never need Ray.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from privdom_ray.imaging import Preprocessing, load


def decode_batch(batch: dict[str, np.ndarray], prep: dict) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: decode and preprocess a block of rows, return them."""
    preprocessing = Preprocessing(**prep)
    size = preprocessing.image_size
    images = np.zeros((len(batch["row"]), size, size), dtype=np.uint8)
    ok = np.zeros(len(batch["row"]), dtype=bool)
    errors: list[str] = []
    for i, path in enumerate(batch["path"]):
        try:
            images[i] = load(str(path), preprocessing)
            ok[i] = True
            errors.append("")
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped and counted
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
    return {"row": batch["row"], "image": images, "ok": ok, "error": np.array(errors, dtype=object)}


def _quiet_ray_data() -> None:
    """One line per domain (the sweep's ``[cache]`` line) instead of Ray Data's per-operator
    progress blocks and its start/finish messages, which a user cannot act on."""
    import logging

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_operator_progress_bars = False
    for name in ("ray.data._internal.progress", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.ERROR)  # "bars disabled", "finished in 0.1s"


def decode_into(manifest: pd.DataFrame, prep: Preprocessing, images_path: Path) -> pd.DataFrame:
    """Decode every row with Ray Data; this process alone writes the blocks into the file
    (``cache.Decode``: one row per manifest row, ``row``, ``ok``, ``error``)."""
    import ray.data  # at call time: sweep sets Ray's environment before Ray is first imported

    _quiet_ray_data()
    size = prep.image_size
    images = np.lib.format.open_memmap(
        images_path, mode="w+", dtype=np.uint8, shape=(len(manifest), size, size)
    )
    items = [{"row": i, "path": p} for i, p in enumerate(manifest["path"])]
    blocks = max(1, min(len(items) // 64, 64))
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        decode_batch,
        fn_kwargs={"prep": dataclasses.asdict(prep)},
        batch_size=64,
        batch_format="numpy",
        num_cpus=1,
    )
    parts = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        images[batch["row"]] = batch["image"]
        parts.append(pd.DataFrame({k: batch[k] for k in ("row", "ok", "error")}))
    images.flush()
    del images
    if not parts:
        return pd.DataFrame(columns=["row", "ok", "error"])
    return pd.concat(parts).sort_values("row").reset_index(drop=True)
