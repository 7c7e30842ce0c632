"""CheXpert v1.0 / v1.0-small (``train.csv``, ``valid.csv`` and JPEGs under ``train/``, ``valid/``).

``root`` is the folder holding ``train.csv`` (``CheXpert-v1.0-small/``) or its parent. ``Path``
values carry the top folder (``CheXpert-v1.0-small/train/...``); it is stripped and the rest is
joined to the folder of ``train.csv``, as torchxrayvision does.

Split (``split`` option):

- ``hash`` (default): a patient-wise split of ``train.csv`` alone, 70/10/20 (train/val/test)
  by salted hash of ``patientNNNNN``. This follows privacydomain, which tested on its own
  patient-wise 20 % of train, because the official ``valid.csv`` (234 images, 200 patients,
  a handful of positives per finding) is too small for a test set; ``valid.csv`` is not used.
- ``official``: ``train.csv`` -> train (a patient-wise 10 % of it carved as val) and
  ``valid.csv`` -> test (radiologist-consensus labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from privdom_ray.domains import register
from privdom_ray.domains._common import (
    BLANK_POLICIES,
    CHEXPERT_LABEL_COLUMNS,
    UNCERTAIN_POLICIES,
    carve_validation,
    check_bool,
    check_choice,
    chexpert_labels,
    find_file,
    frame_of,
    hash_split,
    join_paths,
    map_sex,
    normalize_tuple,
    parse_age,
    read_csv,
    require_some_images,
)
from privdom_ray.manifest import ManifestError

LABEL_COLUMNS = CHEXPERT_LABEL_COLUMNS
VIEWS = ("PA", "AP", "LL", "RL", "LATERAL")  # AP/PA column for frontals; LATERAL for laterals
SPLITS = ("hash", "official")
SUBDIRS = ("", "CheXpert-v1.0-small", "CheXpert-v1.0")
REQUIRED = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABEL_COLUMNS.values())
SALT = "chexpert"


@dataclass(frozen=True)
class CheXpertOptions:
    """``uncertain``: -1.0 -> ``zeros`` | ``ones`` | ``mask`` (NaN, left out of the loss).
    ``blank`` (finding not mentioned) -> ``zeros`` | ``mask``; ``No Finding`` blank is always 0.
    Defaults: only 1.0 is positive. ``views``: kept views, from PA, AP, LL, RL (the ``AP/PA``
    value of frontal images) and LATERAL. ``split``: ``hash`` | ``official`` (module doc).
    ``check_images``: fail when none of the listed JPEGs exists (sampled, then one walk).
    """

    uncertain: str = "zeros"
    blank: str = "zeros"
    views: tuple[str, ...] = ("PA", "AP")
    split: str = "hash"
    check_images: bool = True

    def __post_init__(self) -> None:
        check_choice("uncertain", self.uncertain, UNCERTAIN_POLICIES)
        check_choice("blank", self.blank, BLANK_POLICIES)
        normalize_tuple(self, "views", allowed=VIEWS, upper=True)
        check_choice("split", self.split, SPLITS)
        check_bool("check_images", self.check_images)


@register(
    "chexpert", CheXpertOptions, description="CheXpert v1.0(-small): train.csv/valid.csv + JPEGs"
)
def build(root: Path, options: CheXpertOptions) -> pd.DataFrame:
    fix = "point root at the CheXpert-v1.0-small (or CheXpert-v1.0) folder that holds train.csv"
    train_csv = find_file(root, ["train.csv"], what="CheXpert train.csv", fix=fix, subdirs=SUBDIRS)
    base = train_csv.parent
    frames = [_read(train_csv, base, options)]
    if options.split == "hash":
        frames[0]["split"] = hash_split(frames[0]["patient_id"], salt=SALT)
    else:
        valid_csv = base / "valid.csv"
        if not valid_csv.is_file():
            raise ManifestError(
                f"{valid_csv} not found; split: official uses valid.csv as the test set. "
                "Fix: add valid.csv next to train.csv, or use split: hash"
            )
        train = frames[0]
        train["split"] = carve_validation(
            pd.Series("train", index=train.index), train["patient_id"], salt=SALT
        )
        test = _read(valid_csv, base, options)
        test["split"] = "test"
        frames.append(test)
    df = pd.concat(frames, ignore_index=True)
    if options.check_images:
        require_some_images(df["path"], root=base, source=train_csv, domain="chexpert")
    return df


def _read(csv: Path, base: Path, options: CheXpertOptions) -> pd.DataFrame:
    raw = read_csv(
        csv,
        required=REQUIRED,
        dtype={"Path": "string", "Sex": "string", "Frontal/Lateral": "string", "AP/PA": "string"},
        fix="use CheXpert's own train.csv/valid.csv",
    )
    frontal = raw["Frontal/Lateral"].str.strip().str.lower() == "frontal"
    view = raw["AP/PA"].str.strip().str.upper().where(frontal, "LATERAL")
    raw = raw[view.isin(options.views).fillna(False).to_numpy()]
    rel = (
        raw["Path"].str.strip().str.replace(r"^(?:\./)?CheXpert-v1\.0(?:-small)?/", "", regex=True)
    )
    # regex replace + fullmatch run vectorised in Arrow (str.extract loops in Python)
    patient = raw["Path"].str.replace(r"^.*?(patient\d+).*$", r"\1", regex=True)
    bad_rows = ~patient.str.fullmatch(r"patient\d+").fillna(False)
    if bad_rows.any():
        bad = raw["Path"][bad_rows].iloc[0]
        raise ManifestError(
            f"{csv}: column 'Path' value {bad!r} has no patientNNNNN folder; "
            "Fix: use CheXpert's own CSV, whose paths look like "
            "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
        )
    labels = chexpert_labels(
        raw, LABEL_COLUMNS, uncertain=options.uncertain, blank=options.blank, source=csv
    )
    return frame_of(
        path=join_paths(base, rel),
        patient_id=patient,
        split=pd.Series("train", index=raw.index),
        sex=map_sex(raw["Sex"], {"Male": "M", "Female": "F"}),
        age=parse_age(raw["Age"], zero_is_missing=True),
        labels=labels,
    )
