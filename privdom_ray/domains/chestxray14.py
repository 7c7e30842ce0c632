"""NIH ChestX-ray14: ``Data_Entry_2017_v2020.csv`` (or the original ``Data_Entry_2017.csv``),
the headerless ``train_val_list.txt`` / ``test_list.txt``, and PNGs in either layout.

Images are found with ONE walk of ``root`` (``images_XXX/images/*.png`` as on Kaggle, or a flat
``images/`` from the NIH Box tarballs, or anything else): a file-name -> path index, then a dict
lookup per row. Listed images not on disk keep a ``root/images/<name>`` path and are skipped by
the decode stage; a domain with none on disk is an error.

The v2020 file is preferred when both exist (its ages were recomputed). The original file's
trailing comma gives an ``Unnamed: 11`` column, which is ignored. Ages like ``058Y`` are read
as 58; ages above 100 (outliers up to 414 in the 2017 file) are missing.

Split ``official`` (default): ``test_list.txt`` -> test, ``train_val_list.txt`` -> train with a
patient-wise 10 % carved as val; images in neither list are dropped. ``hash``: patient-wise
70/10/20 by salted hash of ``Patient ID``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from privdom_ray.domains import register
from privdom_ray.domains._common import (
    carve_validation,
    check_choice,
    find_file,
    frame_of,
    hash_split,
    labels_from_tokens,
    log,
    map_sex,
    normalize_tuple,
    parse_age,
    read_csv,
    read_lines,
    walk_files,
)
from privdom_ray.manifest import ManifestError

RULES = {
    "cardiomegaly": lambda t: "Cardiomegaly" in t,
    "pleural_effusion": lambda t: "Effusion" in t,
    "pneumonia": lambda t: "Pneumonia" in t,
    "atelectasis": lambda t: "Atelectasis" in t,
    "healthy": lambda t: "No Finding" in t,
}
REQUIRED = (
    "Image Index",
    "Finding Labels",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
)
SPLITS = ("official", "hash")
SALT = "chestxray14"


@dataclass(frozen=True)
class ChestXray14Options:
    """``split``: ``official`` (train_val_list.txt / test_list.txt) | ``hash``.
    ``views``: kept ``View Position`` values, from PA and AP (every NIH image is frontal).
    """

    split: str = "official"
    views: tuple[str, ...] = ("PA", "AP")

    def __post_init__(self) -> None:
        check_choice("split", self.split, SPLITS)
        normalize_tuple(self, "views", allowed=("PA", "AP"), upper=True)


def _tokens(cell: str) -> frozenset[str]:
    return frozenset(tok.strip() for tok in str(cell).split("|"))


@register(
    "chestxray14",
    ChestXray14Options,
    description="NIH ChestX-ray14: Data_Entry_2017(_v2020).csv + PNGs",
)
def build(root: Path, options: ChestXray14Options) -> pd.DataFrame:
    entries = find_file(
        root,
        [
            "Data_Entry_2017_v2020.csv",
            "Data_Entry_2017_v2020.csv.gz",
            "Data_Entry_2017.csv",
            "Data_Entry_2017.csv.gz",
        ],
        what="NIH ChestX-ray14 label file",
        fix="point root at the folder holding Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv)",
    )
    raw = read_csv(
        entries,
        required=REQUIRED,
        dtype={
            "Image Index": "string",
            "Finding Labels": "string",
            "Patient Gender": "string",
            "View Position": "string",
            "Patient Age": "string",
            "Patient ID": "string",
        },
        fix="use NIH's own Data_Entry CSV",
    )
    raw["Image Index"] = raw["Image Index"].str.strip()
    raw = raw[
        raw["View Position"].str.strip().str.upper().isin(options.views).fillna(False).to_numpy()
    ]
    patient = raw["Patient ID"].str.strip().str.lstrip("0").replace("", "0")

    if options.split == "official":
        split = _official_split(root, raw["Image Index"])
        keep = split.notna().to_numpy()
        if not keep.all():
            log.warning(
                "chestxray14: %d images are in neither split list; dropped", int((~keep).sum())
            )
        raw, patient, split = raw[keep], patient[keep], split[keep]
        split = carve_validation(split.astype(str), patient, salt=SALT)
    else:
        split = hash_split(patient, salt=SALT)

    index = walk_files(root, (".png",))
    names = raw["Image Index"]
    found = names.map(index)
    if found.notna().sum() == 0:
        raise ManifestError(
            f"domain 'chestxray14': none of the {len(names)} images listed in {entries} was found "
            f"under {root} (looked in every subfolder for e.g. {names.iloc[0] if len(names) else '?'}). "
            "Fix: point root at the folder holding images_001/images/... or images/"
        )
    path = found.fillna(str(root / "images") + "/" + names)
    return frame_of(
        path=path,
        patient_id=patient,
        split=split,
        sex=map_sex(raw["Patient Gender"], {"M": "M", "F": "F"}),
        age=parse_age(raw["Patient Age"], max_age=100.0),
        labels=labels_from_tokens(raw["Finding Labels"], _tokens, RULES),
    )


def _official_split(root: Path, names: pd.Series) -> pd.Series:
    fix = "put NIH's train_val_list.txt and test_list.txt next to the Data_Entry CSV, or use split: hash"
    train_list = find_file(root, ["train_val_list.txt"], what="NIH train_val_list.txt", fix=fix)
    test_list = find_file(root, ["test_list.txt"], what="NIH test_list.txt", fix=fix)
    train, test = set(read_lines(train_list)), set(read_lines(test_list))
    both = train & test
    if both:
        raise ManifestError(
            f"{next(iter(sorted(both)))} is listed in both {train_list} and {test_list}. "
            "Fix: use NIH's own split lists"
        )
    in_test, in_train = names.isin(test).to_numpy(), names.isin(train).to_numpy()
    return pd.Series(
        np.where(in_test, "test", np.where(in_train, "train", None)), index=names.index
    )
