"""The domain's files: ``images/``, ``synthetic.json`` and ``labels.csv`` (last), generated in a
hidden temp folder and moved into place so a root appears complete or not at all.

Separate from the adapter: how files reach the disk safely, not how they are read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from privdom_ray.domains.synthetic.population import _draw_findings, _draw_patient
from privdom_ray.domains.synthetic.profiles import SITES, SyntheticOptions
from privdom_ray.domains.synthetic.render import _Grid, _render
from privdom_ray.manifest import LABELS, ManifestError

GENERATOR_VERSION = 1
LABELS_FILE = "labels.csv"
INFO_FILE = "synthetic.json"
IMAGES_DIR = "images"
TMP_PREFIX = ".synthetic-tmp-"
STALE_TMP_SECONDS = 3600.0


CSV_COLUMNS: tuple[str, ...] = ("file", "patient_id", "sex", "age", *LABELS)


def generate(root: Path, options: SyntheticOptions) -> None:
    """Write the domain into ``root`` so that it appears complete or not at all.

    A missing ``root`` is generated as a hidden sibling folder and renamed into place in one
    step. An existing (usually empty) ``root`` gets a hidden temp folder inside it whose
    ``images/`` and ``synthetic.json`` are moved in first and ``labels.csv`` last: until that
    last rename the root is not a domain, and the next call generates again.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root.parent, f".{root.name}{TMP_PREFIX}")
    if not root.exists():
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}{TMP_PREFIX}", dir=root.parent))
        try:
            _write_domain(tmp, options)
            try:
                os.rename(tmp, root)  # atomic; fails if root appeared meanwhile (not empty)
                return
            except OSError:
                if not root.is_dir():
                    raise
            _install(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    _remove_stale_tmp(root, TMP_PREFIX)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root))
    try:
        _write_domain(tmp, options)
        _install(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_domain(folder: Path, options: SyntheticOptions) -> None:
    """Write images, ``synthetic.json`` and ``labels.csv`` into ``folder`` (not yet in place)."""
    (folder / IMAGES_DIR).mkdir()
    rows = []
    for record, image in generate_images(options):
        Image.fromarray(image, mode="L").save(folder / record["file"], format="PNG")
        rows.append(record)
    table = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    table.to_csv(folder / LABELS_FILE, index=False, float_format="%.1f", lineterminator="\n")
    info = {"generator_version": GENERATOR_VERSION, "options": dataclasses.asdict(options)}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def _install(tmp: Path, root: Path) -> None:
    """Move a finished domain from ``tmp`` into the existing ``root``, ``labels.csv`` last."""
    if (root / LABELS_FILE).exists():  # a concurrent generation finished first
        return
    images = root / IMAGES_DIR
    if images.exists():
        if not (root / INFO_FILE).exists():
            raise ManifestError(
                f"synthetic domain {str(root)!r} has an {IMAGES_DIR}/ folder but no "
                f"{LABELS_FILE} and was not made by this generator; refusing to overwrite it"
            )
        os.rename(images, tmp / "stale-images")  # left by an interrupted generation
    os.replace(tmp / INFO_FILE, root / INFO_FILE)
    os.rename(tmp / IMAGES_DIR, images)
    os.replace(tmp / LABELS_FILE, root / LABELS_FILE)


def _remove_stale_tmp(folder: Path, prefix: str) -> None:
    """Delete temp folders of generations that died long ago (young ones may still be running)."""
    now = time.time()
    for path in folder.glob(f"{prefix}*"):
        try:
            if path.is_dir() and now - path.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def generate_images(options: SyntheticOptions) -> Iterator[tuple[dict, np.ndarray]]:
    """Yield ``(csv_record, uint8 image)`` for every image of the domain, deterministically.

    Each patient has its own random stream (seed, site, patient index), so patient ``i`` is the
    same whatever ``n_patients`` is.
    """
    site = SITES[options.site]
    site_code = zlib.crc32(options.site.encode())
    grid = _Grid(options.file_size)
    for index in range(options.n_patients):
        rng = np.random.default_rng(np.random.SeedSequence([options.seed, site_code, index]))
        patient = _draw_patient(rng, site, options, index)
        for k in range(patient["n_images"]):
            finding = _draw_findings(rng, site, patient)
            image = _render(rng, grid, site, patient, finding)
            record = {
                "file": f"{IMAGES_DIR}/{patient['patient_id']}_{k}.png",
                "patient_id": patient["patient_id"],
                "sex": patient["sex"],
                "age": patient["age_recorded"],
            }
            record.update(finding["labels"])
            yield record, image
