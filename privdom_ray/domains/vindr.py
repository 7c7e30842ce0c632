"""VinDr-CXR (PhysioNet v1.0.0): ``annotations/image_labels_{train,test}.csv`` + ``.dicom`` files.

``root`` is the ``vindr-cxr/1.0.0/`` folder (label CSVs in ``root/annotations`` or ``root``,
images in ``root/train/<image_id>.dicom`` and ``root/test/<image_id>.dicom``).

Training images carry one row per radiologist (3 each): ``aggregation: majority`` (default,
privacydomain's rule: positive when the mean vote >= 0.5, i.e. >= 2 of 3) or ``any`` (positive
when any radiologist marked it). Test labels are the published consensus, used as they are
(``Other disease`` is accepted for ``Other diseases``; a ``rad_id`` column is ignored). Blank
votes count as 0. Every VinDr image is PA, so there is no view filter.

VinDr publishes no patient identifiers: each image is its own patient. Official split:
``train/`` -> train (a 10 % share carved as val), ``test/`` -> test.

Sex and age exist only in the DICOM headers (``PatientSex`` M/F/O/empty, ``PatientAge`` like
``045Y``): with ``demographics: true`` each header is read (pixels skipped) in a thread pool;
``O``, empty, missing, ``000Y`` and unreadable files give U / missing age.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from privdom_ray.domains import register
from privdom_ray.domains._common import (
    carve_validation,
    check_bool,
    check_choice,
    find_file,
    frame_of,
    join_paths,
    map_sex,
    parse_age,
    read_csv,
    require_some_images,
)
from privdom_ray.manifest import LABELS

if TYPE_CHECKING:
    import pydicom

LABEL_COLUMNS = {
    "cardiomegaly": "Cardiomegaly",
    "pleural_effusion": "Pleural effusion",
    "pneumonia": "Pneumonia",
    "atelectasis": "Atelectasis",
    "healthy": "No finding",
}
AGGREGATIONS = ("majority", "any")
SALT = "vindr"
HEADER_THREADS = 8


@dataclass(frozen=True)
class VinDrOptions:
    """``aggregation``: ``majority`` (>= 2 of 3 radiologists) | ``any`` (>= 1 of 3), for the
    training labels. ``demographics``: read PatientSex/PatientAge from each DICOM header
    (false: sex U, age missing, no file reads). ``check_images``: fail when none of the
    listed DICOMs exists.
    """

    aggregation: str = "majority"
    demographics: bool = True
    check_images: bool = True

    def __post_init__(self) -> None:
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_bool("demographics", self.demographics)
        check_bool("check_images", self.check_images)


@register(
    "vindr",
    VinDrOptions,
    description="VinDr-CXR: image_labels_{train,test}.csv + DICOMs",
    patient_ids=False,  # no patient identifiers are published
)
def build(root: Path, options: VinDrOptions) -> pd.DataFrame:
    frames = []
    for part in ("train", "test"):
        csv = find_file(
            root,
            [f"image_labels_{part}.csv"],
            what=f"VinDr-CXR image_labels_{part}.csv",
            fix="point root at the vindr-cxr/1.0.0 folder (annotations/ train/ test/)",
            subdirs=("annotations", ""),
        )
        raw = read_csv(
            csv,
            required=["image_id", *LABEL_COLUMNS.values()],
            dtype={"image_id": "string"},
            fix="use VinDr-CXR's own annotations CSV",
        )
        image = raw["image_id"].str.strip()
        votes = raw[list(LABEL_COLUMNS.values())].apply(pd.to_numeric, errors="coerce").fillna(0.0)
        votes = (votes > 0).astype("float32")  # any nonzero vote is a positive vote
        grouped = votes.groupby(image.to_numpy(), sort=True)
        # the test consensus has one row per image, so aggregating it is the identity
        agg = grouped.mean() >= 0.5 if options.aggregation == "majority" else grouped.max() > 0
        labels = agg.astype("float32").rename(columns={v: k for k, v in LABEL_COLUMNS.items()})
        ids = pd.Series(labels.index, dtype="string")
        frames.append(
            frame_of(
                path=join_paths(root / part, ids + ".dicom"),
                patient_id=ids,
                split=pd.Series(part, index=ids.index),
                sex=pd.Series("U", index=ids.index),
                age=pd.Series(np.nan, index=ids.index),
                labels=labels[list(LABELS)],
            )
        )
    df = pd.concat(frames, ignore_index=True)
    df["split"] = carve_validation(df["split"], df["patient_id"], salt=SALT)
    if options.check_images:
        require_some_images(df["path"], root=root, source=root / "annotations", domain="vindr")
    if options.demographics:
        with ThreadPoolExecutor(max_workers=min(HEADER_THREADS, (os.cpu_count() or 1) * 4)) as pool:
            tags = list(pool.map(read_demographics, df["path"]))
        sex, age = zip(*tags, strict=True) if tags else ((), ())
        df["sex"] = map_sex(pd.Series(sex, dtype="string"), {"M": "M", "F": "F"}).to_numpy()
        df["age"] = parse_age(pd.Series(age, dtype="string"), zero_is_missing=True).to_numpy()
    return df


def read_demographics(path: str) -> tuple[str | None, str | None]:
    """(PatientSex, PatientAge) raw strings from one DICOM header; (None, None) if unreadable."""
    import pydicom  # only DICOM domains pay for the import

    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["PatientSex", "PatientAge"]
        )
    except (OSError, pydicom.errors.InvalidDicomError, ValueError, EOFError):
        return None, None
    return _value(ds, "PatientSex"), _value(ds, "PatientAge")


def _value(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)  # a keyword gives the element's value, None when absent
    return None if value is None else str(value).strip() or None
