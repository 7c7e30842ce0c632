"""MIMIC-CXR-JPG v2.x: study-level labels joined to image-level metadata, plus MIMIC-IV patients.

``root`` is the folder holding ``mimic-cxr-2.0.0-{chexpert,negbio,metadata,split}.csv(.gz)``
and ``files/p1X/p1XXXXXXX/sXXXXXXXX/<dicom_id>.jpg``. Demographics come from MIMIC-IV's
``patients.csv(.gz)``, looked for in ``root``, ``root/hosp`` and ``root/core``.

Joins: labels (one row per study) on ``(subject_id, study_id)`` (images of studies without a
label row are dropped), split on ``dicom_id`` (``validate`` -> ``val``), patients on
``subject_id``. Age at the study is ``anchor_age + StudyDate year - anchor_year`` (``age:
study``, relies on MIMIC-CXR sharing MIMIC-IV's per-patient date shift) or ``anchor_age``
(``age: anchor``).
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
    check_bool,
    check_choice,
    chexpert_labels,
    find_file,
    frame_of,
    hash_split,
    join_paths,
    log,
    map_sex,
    normalize_tuple,
    parse_age,
    read_csv,
    require_some_images,
)
from privdom_ray.manifest import ManifestError

LABEL_COLUMNS = CHEXPERT_LABEL_COLUMNS  # MIMIC-CXR uses CheXpert's labeler columns
LABELERS = ("chexpert", "negbio")
SPLITS = ("official", "hash")
AGES = ("study", "anchor")
SPLIT_VALUES = {"train": "train", "validate": "val", "test": "test"}
KEYS = ["subject_id", "study_id"]
SALT = "mimic"


@dataclass(frozen=True)
class MimicOptions:
    """``uncertain``/``blank``: as for CheXpert (default: only 1.0 is positive). ``views``:
    kept ``ViewPosition`` values (default PA, AP; others: LATERAL, LL, AP AXIAL, ...).
    ``labeler``: ``chexpert`` | ``negbio`` label file. ``split``: ``official`` (split.csv,
    ``validate`` -> val) | ``hash`` (patient-wise 70/10/20). ``age``: ``study`` | ``anchor``.
    ``demographics``: require MIMIC-IV ``patients.csv`` (false: sex U, age missing).
    ``check_images``: fail when none of the listed JPEGs exists.
    """

    uncertain: str = "zeros"
    blank: str = "zeros"
    views: tuple[str, ...] = ("PA", "AP")
    labeler: str = "chexpert"
    split: str = "official"
    age: str = "study"
    demographics: bool = True
    check_images: bool = True

    def __post_init__(self) -> None:
        check_choice("uncertain", self.uncertain, UNCERTAIN_POLICIES)
        check_choice("blank", self.blank, BLANK_POLICIES)
        normalize_tuple(self, "views", upper=True)
        check_choice("labeler", self.labeler, LABELERS)
        check_choice("split", self.split, SPLITS)
        check_choice("age", self.age, AGES)
        check_bool("demographics", self.demographics)
        check_bool("check_images", self.check_images)


def _find(root: Path, name: str) -> Path:
    return find_file(
        root,
        [f"mimic-cxr-*-{name}.csv", f"mimic-cxr-*-{name}.csv.gz"],
        what=f"MIMIC-CXR-JPG {name} file (mimic-cxr-2.0.0-{name}.csv.gz)",
        fix="point root at the mimic-cxr-jpg/<version>/ folder that holds the mimic-cxr-*.csv.gz files",
    )


@register(
    "mimic", MimicOptions, description="MIMIC-CXR-JPG v2: chexpert/negbio + metadata + split CSVs"
)
def build(root: Path, options: MimicOptions) -> pd.DataFrame:
    """Join metadata, labels, split and patients into the manifest rows (frontal views only)."""
    study_date = ["StudyDate"] if options.demographics and options.age == "study" else []
    meta_csv, meta = _read_metadata(root, options.views, study_date)
    labels_csv, df = _join_labels(root, options.labeler, meta)
    if options.split == "official":
        df = _join_official_split(root, df)
    else:
        df["split"] = hash_split(df["subject_id"].astype(str), salt=SALT)
    if options.demographics:
        sex, age = _demographics(root, df, with_study_date=bool(study_date))
    else:
        sex = pd.Series("U", index=df.index)
        age = pd.Series(float("nan"), index=df.index)
    out = frame_of(
        path=join_paths(root, _image_paths(df)),
        patient_id=df["subject_id"].astype(str),
        split=df["split"],
        sex=sex,
        age=age,
        labels=chexpert_labels(
            df, LABEL_COLUMNS, uncertain=options.uncertain, blank=options.blank, source=labels_csv
        ),
    )
    if options.check_images:
        require_some_images(out["path"], root=root, source=meta_csv, domain="mimic")
    return out


def _read_metadata(
    root: Path, views: tuple[str, ...], study_date: list[str]
) -> tuple[Path, pd.DataFrame]:
    """The image metadata file and its rows whose ``ViewPosition`` is one of ``views``.

    Why: MIMIC-CXR mixes frontal and lateral films; ``StudyDate`` is only required when the
    age at the study is wanted.
    """
    meta_csv = _find(root, "metadata")
    meta = read_csv(
        meta_csv,
        required=["dicom_id", *KEYS, "ViewPosition", *study_date],
        dtype={"dicom_id": "string", "ViewPosition": "string"},
    )
    meta = _int_keys(meta, meta_csv, KEYS)
    view = meta["ViewPosition"].str.strip().str.upper()
    return meta_csv, meta[view.isin(views).fillna(False).to_numpy()]


def _join_labels(root: Path, labeler: str, meta: pd.DataFrame) -> tuple[Path, pd.DataFrame]:
    """The labeler's file and the images joined to their study's labels.

    Why: labels are per study, images per ``dicom_id``; images of a study without a label row
    cannot be trained on, so they are dropped (and counted in the log).
    """
    labels_csv = _find(root, labeler)
    labels = _int_keys(
        read_csv(labels_csv, required=[*KEYS, *LABEL_COLUMNS.values()]), labels_csv, KEYS
    )
    df = meta.merge(labels.drop_duplicates(KEYS), on=KEYS, how="inner")
    if len(df) < len(meta):
        log.info(
            "mimic: %d images have no study row in %s; dropped",
            len(meta) - len(df),
            labels_csv.name,
        )
    return labels_csv, df


def _join_official_split(root: Path, df: pd.DataFrame) -> pd.DataFrame:
    """Images joined to MIMIC's own split file (``validate`` -> ``val``).

    Why: the official split is what published MIMIC results use; images it does not list are
    dropped rather than guessed into a split.
    """
    split_csv = _find(root, "split")
    split = read_csv(
        split_csv,
        required=["dicom_id", "split"],
        dtype={"dicom_id": "string", "split": "string"},
    )
    mapped = split["split"].str.strip().str.lower().map(SPLIT_VALUES)
    if mapped.isna().any():
        bad = split["split"][mapped.isna()].iloc[0]
        raise ManifestError(
            f"{split_csv}: column 'split' has value {bad!r}; allowed: {list(SPLIT_VALUES)}. "
            "Fix: use MIMIC's own split file, or split: hash"
        )
    split = pd.DataFrame({"dicom_id": split["dicom_id"], "split": mapped}).drop_duplicates(
        "dicom_id"
    )
    n = len(df)
    df = df.merge(split, on="dicom_id", how="inner")
    if len(df) < n:
        log.info("mimic: %d images are not in %s; dropped", n - len(df), split_csv.name)
    return df


def _demographics(
    root: Path, df: pd.DataFrame, *, with_study_date: bool
) -> tuple[pd.Series, pd.Series]:
    """Sex and age of each image's patient from MIMIC-IV's ``patients.csv``.

    Why: MIMIC-CXR itself has no demographics. The age is ``anchor_age`` shifted to the study's
    year (``with_study_date``; MIMIC-CXR shares MIMIC-IV's per-patient date shift) or, without
    it, ``anchor_age`` as is.
    """
    patients_csv = find_file(
        root,
        ["patients.csv", "patients.csv.gz"],
        what="MIMIC-IV patients file",
        fix="copy MIMIC-IV's hosp/patients.csv.gz into root (or root/hosp), "
        "or set demographics: false (sex U, age missing)",
        subdirs=("", "hosp", "core"),
    )
    patients = read_csv(
        patients_csv,
        required=["subject_id", "gender", "anchor_age", "anchor_year"],
        dtype={"gender": "string"},
    )
    patients = _int_keys(patients, patients_csv, ["subject_id"]).drop_duplicates("subject_id")
    info = df[["subject_id"]].merge(patients, on="subject_id", how="left")
    sex = map_sex(info["gender"], {"M": "M", "F": "F"})
    anchor_age = pd.to_numeric(info["anchor_age"], errors="coerce")
    if with_study_date:
        year = pd.to_numeric(df["StudyDate"], errors="coerce").to_numpy() // 10000
        anchor_age = anchor_age + (year - pd.to_numeric(info["anchor_year"], errors="coerce"))
    return sex, parse_age(anchor_age.astype("float64"))


def _image_paths(df: pd.DataFrame) -> pd.Series:
    """``files/p1X/p1XXXXXXX/sXXXXXXXX/<dicom_id>.jpg`` relative to root, per image.

    Why: MIMIC-CXR-JPG lists no paths; its folder layout is derived from the ids.
    """
    subject = df["subject_id"].astype(str)
    return (
        "files/p"
        + subject.str[:2]
        + "/p"
        + subject
        + "/s"
        + df["study_id"].astype(str)
        + "/"
        + df["dicom_id"].str.strip()
        + ".jpg"
    )


def _int_keys(df: pd.DataFrame, source: Path, keys: list[str]) -> pd.DataFrame:
    """Parse id columns as integers so every file joins alike; blank or non-numeric ids fail."""
    for key in keys:
        value = pd.to_numeric(df[key], errors="coerce")
        if value.isna().any():
            bad = df[key][value.isna()].iloc[0]
            raise ManifestError(f"{source}: column {key!r} has non-numeric value {bad!r}")
        df[key] = value.astype("int64")
    return df
