"""A private site (e.g. UKA-CXR) described by one generic CSV: kind ``csv``.

Layout: ``root/labels.csv`` (option ``file``: another name, relative to ``root`` or absolute)::

    path,patient_id,sex,age,cardiomegaly,pleural_effusion,pneumonia,atelectasis,healthy,split
    images/p001_1.png,P001,F,63,1,0,,0,0,train
    images/p002_1.dcm,P002,male,045Y,0,1,0,1,0,test

- ``path``: image file relative to ``root`` (or absolute); extensions .png .jpg .jpeg (8- or
  16-bit) and .dcm .dicom. Files missing on disk are skipped at decode time.
- ``patient_id``: non-empty; every image of a patient must share one split.
- ``sex``: F / M / U or female / male / unknown (any case); blank -> U.
- ``age``: years (``63``, ``63.5``) or a DICOM age (``045Y``); blank, negative or > 120 ->
  missing.
- the five labels: ``1`` / ``0`` (``1.0`` / ``0.0``) or blank; blank is masked (NaN, left out
  of the loss) by default, or 0 with ``blank: zeros``.
- ``split`` (optional): ``train`` / ``val`` / ``test`` (``valid``, ``validation``, ``validate``
  mean ``val``). Without the column, patients are split 70/10/20 by salted hash; with only
  train and test, a patient-wise 10 % of train is carved as val.

Extra columns are ignored; a row with more fields than the header is an error (naming its line).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from privdom_ray.domains import register
from privdom_ray.domains._common import (
    BLANK_POLICIES,
    carve_validation,
    check_bool,
    check_choice,
    frame_of,
    hash_split,
    join_paths,
    parse_age,
    read_csv,
    require_some_images,
)
from privdom_ray.imaging import DECODERS
from privdom_ray.manifest import LABELS, ManifestError

REQUIRED = ("path", "patient_id", "sex", "age", *LABELS)
SEX_CODES = {
    "F": "F",
    "FEMALE": "F",
    "M": "M",
    "MALE": "M",
    "U": "U",
    "UNKNOWN": "U",
    "O": "U",
    "OTHER": "U",
}
SPLIT_CODES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "validate": "val",
    "test": "test",
}
SALT = "csv"


@dataclass(frozen=True)
class CsvOptions:
    """``file``: the label CSV (relative to root, or absolute). ``blank``: blank labels ->
    ``mask`` (NaN) | ``zeros``. ``check_images``: fail when none of the listed images exists.
    """

    file: str = "labels.csv"
    blank: str = "mask"
    check_images: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.file, str) or not self.file.strip():
            raise ValueError(f"option file={self.file!r} must be a non-empty file name or path")
        check_choice("blank", self.blank, BLANK_POLICIES)
        check_bool("check_images", self.check_images)


@register(
    "csv", CsvOptions, description="generic site CSV: path,patient_id,sex,age,<5 labels>[,split]"
)
def build(root: Path, options: CsvOptions) -> pd.DataFrame:
    """Read the site CSV, validate every column and return the manifest rows."""
    source = (root / options.file).expanduser()
    raw = _read_rows(source)
    path, patient = _ids(source, raw)
    # validated in a fixed order, so a file with several problems always reports the same one
    sex = _sex(source, raw)
    labels = _labels(source, raw, options.blank)
    split = _split(source, raw, patient)
    out = frame_of(
        path=join_paths(root, path),
        patient_id=patient,
        split=split,
        sex=sex,
        age=parse_age(raw["age"]),
        labels=labels,
    )
    if options.check_images:
        require_some_images(out["path"], root=root, source=source, domain="csv")
    return out


def _read_rows(source: Path) -> pd.DataFrame:
    """The CSV as strings, with the required columns present and at least one row.

    Why: every value is parsed (and its errors reported) by this module, not guessed by pandas.
    """
    if not source.is_file():
        raise ManifestError(
            f"{source}: label file not found. Fix: write a CSV with the header "
            f"{','.join(REQUIRED)}[,split] there, or set the domain's option file: <name>"
        )
    raw = read_csv(
        source,
        required=REQUIRED,
        optional=["split"],
        dtype={
            "path": "string",
            "patient_id": "string",
            "sex": "string",
            "age": "string",
            "split": "string",
            **{label: "string" for label in LABELS},
        },
        fix=f"use the header {','.join(REQUIRED)}[,split]",
        strict_fields=True,
    )
    if raw.empty:
        raise ManifestError(f"{source}: no rows")
    return raw


def _ids(source: Path, raw: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Stripped ``path`` and ``patient_id``: both non-blank, each path with a known decoder.

    Why: a blank id would merge unrelated images into one patient, and an unknown extension
    would only fail later, at decode time inside a training run.
    """
    path = raw["path"].str.strip()
    patient = raw["patient_id"].str.strip()
    for column, values in (("path", path), ("patient_id", patient)):
        blank = values.isna() | (values == "")
        if blank.any():
            raise ManifestError(
                f"{source}: column {column!r} is blank on line {_line(blank)}. Fix: fill it in"
            )
    ext = path.str.extract(r"(\.[^./\\]+)$", expand=False).str.lower()
    unknown = ~ext.isin(list(DECODERS)).fillna(False)
    if unknown.any():
        raise ManifestError(
            f"{source}: column 'path' value {path[unknown].iloc[0]!r} (line {_line(unknown)}) has no "
            f"image decoder; allowed extensions: {sorted(DECODERS)}"
        )
    return path, patient


def _sex(source: Path, raw: pd.DataFrame) -> pd.Series:
    """``sex`` as F / M / U; blank -> U.

    Why: sites spell it differently (``female``, ``M``, ``other``), and an unknown code is
    reported rather than silently read as unknown.
    """
    sex_raw = raw["sex"].str.strip().str.upper().fillna("")
    sex = sex_raw.map({**SEX_CODES, "": "U"})
    if sex.isna().any():
        raise ManifestError(
            f"{source}: column 'sex' has value {raw['sex'][sex.isna()].iloc[0]!r} (line "
            f"{_line(sex.isna())}); allowed: F, M, U, female, male, unknown or blank"
        )
    return sex


def _labels(source: Path, raw: pd.DataFrame, blank: str) -> pd.DataFrame:
    """The five labels as 1.0 / 0.0, blanks masked (NaN) or, with ``blank: zeros``, 0.

    Why: anything else (e.g. CheXpert's uncertain ``-1``) has no agreed meaning in this format,
    so it fails instead of being guessed.
    """
    labels = pd.DataFrame(index=raw.index)
    for label in LABELS:
        text = raw[label].str.strip()
        value = pd.to_numeric(text, errors="coerce")
        bad = (text.notna() & (text != "") & ~value.isin((0.0, 1.0))).fillna(False)
        if bad.any():
            raise ManifestError(
                f"{source}: column {label!r} has value {raw[label][bad].iloc[0]!r} (line "
                f"{_line(bad)}); allowed: 1, 0 or blank"
            )
        labels[label] = value.fillna(0.0) if blank == "zeros" else value
    return labels


def _split(source: Path, raw: pd.DataFrame, patient: pd.Series) -> pd.Series:
    """The site's own split (val carved from train when it has none), else a salted hash split.

    Why: a site's published split must be honoured so results compare, but every domain needs
    train, val and test.
    """
    if "split" not in raw.columns:
        return hash_split(patient, salt=SALT)
    split = raw["split"].str.strip().str.lower().map(SPLIT_CODES)
    if split.isna().any():
        raise ManifestError(
            f"{source}: column 'split' has value {raw['split'][split.isna()].iloc[0]!r} (line "
            f"{_line(split.isna())}); allowed: train, val, test (or drop the column for a "
            "hash split)"
        )
    if "val" not in set(split):
        split = carve_validation(split.astype(str), patient, salt=SALT)
    return split


def _line(mask: pd.Series) -> int:
    """1-based CSV line of the first flagged row (line 1 is the header)."""
    return int(mask.to_numpy().argmax()) + 2
