"""The registered ``synthetic`` domain kind: generate the root if ``labels.csv`` is absent,
refuse a root made with other options, read ``labels.csv`` into manifest rows with a
patient-wise split.

Separate from generation: what the domain registry calls; the rest of the package only makes
files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

from privdom_ray.domains import register
from privdom_ray.domains._common import check_field_counts
from privdom_ray.domains.synthetic.files import CSV_COLUMNS, INFO_FILE, LABELS_FILE, generate
from privdom_ray.domains.synthetic.profiles import SITES, SyntheticOptions
from privdom_ray.manifest import LABELS, ManifestError, patient_split


@register(
    "synthetic",
    SyntheticOptions,
    creates_root=True,
    description="seeded synthetic chest radiographs of one simulated site (a, b, c or d; or a "
    "paper-shaped vdr, c14, cpt, uka, pch, mimic), generated into the root on first use",
)
def build(root: Path, options: SyntheticOptions) -> pd.DataFrame:
    """Generate the domain into ``root`` unless ``root/labels.csv`` exists, then read it."""
    root = Path(root).expanduser().resolve()
    if not (root / LABELS_FILE).exists():
        generate(root, options)
    else:
        _check_info(root, options)
    return read_manifest(root, options)


def read_manifest(root: Path, options: SyntheticOptions) -> pd.DataFrame:
    """``root/labels.csv`` -> manifest rows with absolute paths and a patient-wise split."""
    path = root / LABELS_FILE
    fix = f"restore {LABELS_FILE}, or delete the folder to generate the domain again"
    try:
        header = pd.read_csv(path, nrows=0).columns
        check_field_counts(path, len(header), fix)
        table = pd.read_csv(
            path,
            dtype={"file": str, "patient_id": str, "sex": str},
            keep_default_na=False,
            na_values={"age": [""], **{label: [""] for label in LABELS}},
        )
    except ManifestError:
        raise
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ManifestError(f"{path}: cannot read it ({exc}). Fix: {fix}") from None
    missing = [c for c in CSV_COLUMNS if c not in table.columns]
    if missing:
        raise ManifestError(
            f"synthetic domain {str(root)!r}: {LABELS_FILE} lacks columns {missing}"
        )
    site = SITES[options.site]
    split = patient_split(
        table["patient_id"],
        salt=f"synthetic:{options.site}",
        test_frac=site.test_frac,
        val_frac=site.val_frac,
    )
    out = pd.DataFrame(
        {
            "path": [str(root / f) for f in table["file"]],
            "patient_id": table["patient_id"],
            "split": table["patient_id"].map(split),
            "sex": table["sex"].replace("", "U"),
            "age": pd.to_numeric(table["age"], errors="coerce"),
        }
    )
    for label in LABELS:
        out[label] = pd.to_numeric(table[label], errors="coerce").astype("float32")
    return out


def _check_info(root: Path, options: SyntheticOptions) -> None:
    """Refuse to read a root that was generated with other options (a stale or foreign domain)."""
    info_path = root / INFO_FILE
    if not info_path.exists():
        return  # hand-made or hand-edited domain: nothing to compare against
    try:
        made_with = json.loads(info_path.read_text())["options"]
    except (ValueError, KeyError, TypeError):
        return
    wanted = dataclasses.asdict(options)
    if made_with != wanted:
        raise ManifestError(
            f"synthetic domain {str(root)!r} was generated with options {made_with}, not {wanted}; "
            "delete the folder (or point the domain at another root) to generate it again"
        )
