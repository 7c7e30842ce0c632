"""Helpers shared by the dataset adapters: finding and reading label files, option checks,
vectorised label/sex/age parsing, patient-wise splits, and cheap image-existence checks.

Every user-facing data problem raises ``ManifestError`` with the file, the column or value, and
the fix. Nothing here stats one file per row: image existence is checked on a small sample
first and, only if that sample finds nothing, with one directory walk and a set lookup.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from privdom_ray.manifest import LABELS, ManifestError, carve_val, patient_split

log = logging.getLogger("privdom_ray.domains")

TEST_FRAC = 0.2  # patient share of test in hash splits (privacydomain's 80/20 patient split)
VAL_FRAC = 0.1  # patient share of validation, carved from training
EXISTENCE_SAMPLE = 64  # images probed before falling back to one directory walk


# --------------------------------------------------------------------------- option checks


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming the option, the bad value and the allowed values."""
    if value not in allowed:
        raise ValueError(f"option {name}={value!r} is not allowed; allowed values: {list(allowed)}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"option {name}={value!r} must be true or false")


def normalize_tuple(
    obj: Any,
    name: str,
    *,
    allowed: Sequence[str] | None = None,
    upper: bool = False,
) -> None:
    """Turn a YAML list or a single string into a non-empty tuple of strings, in place.

    ``allowed`` (compared case-insensitively when ``upper``) restricts the values.
    """
    value = getattr(obj, name)
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError(f"option {name}={value!r} must be a non-empty list of strings")
    if not all(isinstance(v, str) and v.strip() for v in items):
        raise ValueError(f"option {name}={value!r} must contain only non-empty strings")
    out = tuple(v.strip().upper() if upper else v.strip() for v in items)
    if allowed is not None:
        canon = {(a.upper() if upper else a): a for a in allowed}
        bad = [v for v in out if v not in canon]
        if bad:
            raise ValueError(
                f"option {name}={value!r}: unknown value(s) {bad}; allowed values: {list(allowed)}"
            )
        out = tuple(canon[v] for v in out)
    object.__setattr__(obj, name, tuple(dict.fromkeys(out)))


# --------------------------------------------------------------------------- label files


def find_file(
    root: Path,
    patterns: Sequence[str],
    *,
    what: str,
    fix: str,
    subdirs: Sequence[str] = ("",),
) -> Path:
    """First file matching one of ``patterns`` (glob patterns) in ``root/<subdir>``.

    Raises ``ManifestError`` listing every place looked at and the fix.
    """
    tried = []
    for sub in subdirs:
        folder = root / sub if sub else root
        for pattern in patterns:
            tried.append(str(folder / pattern))
            if not folder.is_dir():
                continue
            hits = sorted(folder.glob(pattern))
            hits = [h for h in hits if h.is_file()]
            if hits:
                return hits[0]
    raise ManifestError(f"{what} not found; looked for: {', '.join(tried)}. Fix: {fix}")


def read_csv(
    path: Path,
    *,
    required: Sequence[str],
    optional: Sequence[str] = (),
    fix: str = "",
    strict_fields: bool = False,
    **kwargs: Any,
) -> pd.DataFrame:
    """Read only the needed columns of a (possibly gzipped) CSV, checking the header first.

    Unknown columns, including ``Unnamed: *`` ones (a leading index column, a trailing comma),
    are never converted. A missing column raises ``ManifestError`` naming the file, the missing
    columns and the expected header. ``strict_fields``: a row with more fields than the header
    (a comma inside a value shifts every later column) is an error, not silently cut.
    """
    try:
        header = pd.read_csv(path, nrows=0, index_col=False, **_header_kwargs(kwargs)).columns
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ManifestError(
            f"{path}: cannot read CSV header ({exc}). Fix: {fix or 'check the file'}"
        ) from exc
    header = [str(c).strip() for c in header]
    missing = [c for c in required if c not in header]
    if missing:
        expected = ",".join(required)
        raise ManifestError(
            f"{path}: missing required column(s) {missing}; expected a header with at least: "
            f"{expected} (found: {','.join(c for c in header if not c.startswith('Unnamed'))})"
            + (f". Fix: {fix}" if fix else "")
        )
    if strict_fields:
        check_field_counts(path, len(header), fix, **_header_kwargs(kwargs))
    wanted = set(required) | set(optional)
    keep = {c for c in header if c in wanted}
    try:
        df = pd.read_csv(
            path,
            index_col=False,
            usecols=lambda c: str(c).strip() in keep,
            **kwargs,
        )
    except (ValueError, pd.errors.ParserError) as exc:
        raise ManifestError(
            f"{path}: cannot parse CSV ({exc}). Fix: {fix or 'check the file'}"
        ) from exc
    df.columns = [str(c).strip() for c in df.columns]
    return df


def check_field_counts(path: Path, n_fields: int, fix: str = "", **kwargs: Any) -> None:
    """Refuse a CSV with a row of more (non-empty) fields than its header of ``n_fields``,
    naming the line: pandas would either fail without naming the file or cut the row.
    Trailing empty fields (a trailing comma) are accepted. One streaming pass (csv module)."""
    import csv
    import gzip

    gz = str(path).endswith(".gz") or kwargs.get("compression") == "gzip"
    opener = gzip.open if gz else open
    encoding = kwargs.get("encoding") or "utf-8"
    try:
        with opener(path, "rt", newline="", encoding=encoding) as f:
            reader = csv.reader(f, delimiter=kwargs.get("sep") or ",")
            next(reader, None)
            for row in reader:
                if len(row) > n_fields and any(v.strip() for v in row[n_fields:]):
                    raise ManifestError(
                        f"{path}: line {reader.line_num} has {len(row)} fields, more than the "
                        f"header's {n_fields} (a comma inside a value? quote it, or remove the "
                        "extra fields)" + (f". Fix: {fix}" if fix else "")
                    )
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{path}: cannot read it as {encoding} CSV ({exc})") from None


def _header_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k in ("sep", "compression", "encoding")}


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a headerless list file."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- images on disk


def walk_files(root: Path, extensions: Iterable[str] | None = None) -> dict[str, str]:
    """One directory walk: file name -> absolute path (first in sorted walk order wins).

    ``os.walk`` uses ``scandir``, so it costs one ``getdents`` per folder, not one ``stat``
    per file. Symlinked folders are followed (datasets are often linked in).
    """
    exts = None if extensions is None else tuple(e.lower() for e in extensions)
    index: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if (exts is None or name.lower().endswith(exts)) and name not in index:
                index[name] = os.path.join(dirpath, name)
    return index


def all_files(root: Path) -> set[str]:
    """Absolute paths of every file under ``root`` (one walk)."""
    out: set[str] = set()
    for dirpath, _dirnames, filenames in os.walk(root, followlinks=True):
        out.update(os.path.join(dirpath, name) for name in filenames)
    return out


def require_some_images(paths: pd.Series, *, root: Path, source: Path | str, domain: str) -> int:
    """Fail when none of the listed images exists; missing ones are left to the decode stage.

    Probes an evenly spaced sample first (one ``stat`` each); only if none of those exists does
    it walk ``root`` once and look all paths up in a set. Returns the number of probes that hit
    (or, after a walk, the number of existing images).
    """
    n = len(paths)
    if n == 0:
        raise ManifestError(f"domain {domain!r}: {source} lists no usable images (after filters)")
    sample = paths.iloc[np.unique(np.linspace(0, n - 1, min(n, EXISTENCE_SAMPLE)).astype(int))]
    hits = sum(os.path.isfile(p) for p in sample)
    if hits:
        return hits
    existing = int(paths.isin(all_files(root)).sum())
    if existing == 0:
        raise ManifestError(
            f"domain {domain!r}: none of the {n} images listed in {source} exists under {root} "
            f"(first expected: {paths.iloc[0]}). Fix: point the domain's root at the folder that "
            "holds the dataset's images as laid out in the label file."
        )
    log.warning(
        "domain %r: %d of %d listed images exist; the rest will be skipped", domain, existing, n
    )
    return existing


def join_paths(base: Path | str, rel: pd.Series) -> pd.Series:
    """Absolute, normalised ``base/rel`` per row (``rel`` already absolute stays as it is)."""
    base = os.path.normpath(str(base))
    rel = rel.astype(str).str.replace("\\", "/", regex=False)
    absolute = rel.str.startswith("/")
    joined = (base + "/" + rel).where(~absolute, rel)
    dirty = joined.str.contains(r"//|/\./|/\.\./|/\.?$", regex=True)
    if dirty.any():
        joined = joined.copy()
        joined[dirty] = [os.path.normpath(p) for p in joined[dirty]]
    return joined


# --------------------------------------------------------------------------- splits


def hash_split(patient_ids: pd.Series, *, salt: str) -> pd.Series:
    """Deterministic patient-wise train/val/test (70/10/20 of patients) by salted hash."""
    codes, uniques = pd.factorize(patient_ids.astype(str))
    mapping = patient_split(uniques, salt=salt, test_frac=TEST_FRAC, val_frac=VAL_FRAC)
    per_patient = np.array([mapping[str(u)] for u in uniques], dtype=object)
    return pd.Series(per_patient[codes], index=patient_ids.index, dtype=str)


def carve_validation(split: pd.Series, patient_ids: pd.Series, *, salt: str) -> pd.Series:
    """Move a patient-wise share of the training patients to ``val`` (official splits lack one)."""
    train = split == "train"
    val_patients = carve_val(patient_ids[train].unique(), salt=salt, val_frac=VAL_FRAC)
    out = split.copy()
    out[train & patient_ids.isin(val_patients)] = "val"
    return out


# --------------------------------------------------------------------------- values


def map_sex(values: pd.Series, mapping: dict[str, str]) -> pd.Series:
    """Map raw sex codes (case-insensitive, stripped) to F/M/U; unknown codes become U."""
    key = values.astype("string").str.strip().str.upper()
    upper = {k.upper(): v for k, v in mapping.items()}
    return key.map(upper).fillna("U").astype(str)


def parse_age(
    values: pd.Series, *, max_age: float = 120.0, zero_is_missing: bool = False
) -> pd.Series:
    """Years as float from numbers, numeric strings, or DICOM AS strings (``045Y``, ``006M``).

    Missing, unparseable, negative and > ``max_age`` values become NaN; so does 0 when
    ``zero_is_missing`` (CheXpert's and DICOM's placeholder for an unknown age).
    """
    if pd.api.types.is_numeric_dtype(values):
        years = values.astype("float64")
    else:
        text = values.astype("string").str.strip().str.upper()
        parts = text.str.extract(r"^(\d+(?:\.\d+)?)\s*([YMWD]?)$")
        number = pd.to_numeric(parts[0], errors="coerce").astype("float64")
        per_year = parts[1].map({"": 1.0, "Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25})
        years = (number / per_year.astype("float64")).astype("float64")
    bad = (years < 0) | (years > max_age)
    if zero_is_missing:
        bad |= years == 0
    return years.mask(bad).astype("float64")


def labels_from_tokens(
    values: pd.Series,
    parse: Callable[[str], frozenset[str]],
    rules: dict[str, Callable[[frozenset[str]], bool]],
) -> pd.DataFrame:
    """0/1 label columns from a text column, parsing each *distinct* value once.

    ``parse`` turns one cell into a set of exact tokens; ``rules`` maps each manifest label to
    a predicate on that set. Rows share their distinct value's result via ``factorize``, so a
    160k-row file with a few thousand distinct label strings costs a few thousand parses.
    """
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    table = np.zeros((len(uniques) + 1, len(rules)), dtype=np.float32)
    table[-1, :] = np.nan  # sentinel row for NaN cells (-1 indexes it)
    for i, cell in enumerate(uniques):
        tokens = parse(cell)
        table[i] = [float(rule(tokens)) for rule in rules.values()]
    return pd.DataFrame(table[codes], columns=list(rules), index=values.index)


UNCERTAIN_POLICIES = ("zeros", "ones", "mask")
BLANK_POLICIES = ("zeros", "mask")


#: Our labels -> the CheXpert labeler's columns (CheXpert and MIMIC-CXR-JPG share them).
CHEXPERT_LABEL_COLUMNS = {
    "cardiomegaly": "Cardiomegaly",
    "pleural_effusion": "Pleural Effusion",
    "pneumonia": "Pneumonia",
    "atelectasis": "Atelectasis",
    "healthy": "No Finding",
}


def chexpert_labels(
    frame: pd.DataFrame,
    columns: dict[str, str],
    *,
    uncertain: str,
    blank: str,
    source: Path | str,
) -> pd.DataFrame:
    """CheXpert-labeler values (1.0 / 0.0 / -1.0 / blank) to manifest labels under a policy.

    ``columns`` maps manifest label -> source column (``healthy`` -> ``No Finding``).
    ``uncertain``: -1.0 becomes 0 (zeros), 1 (ones) or NaN (mask). ``blank`` (not mentioned)
    becomes 0 (zeros) or NaN (mask) for the four findings. ``No Finding`` is written only as
    1.0 or left blank, so its blank always means 0. Under ``blank=mask``, a study with
    ``No Finding == 1`` has its blank findings set to 0, since the labeler asserts them absent
    (as torchxrayvision does). Any other value raises ``ManifestError``.
    """
    out = pd.DataFrame(index=frame.index)
    healthy_src = columns.get("healthy")
    healthy_raw = pd.to_numeric(frame[healthy_src], errors="coerce") if healthy_src else None
    for label in LABELS:
        src = columns[label]
        raw = pd.to_numeric(frame[src], errors="coerce").astype("float64")
        bad = raw.notna() & ~raw.isin((1.0, 0.0, -1.0))
        if bad.any():
            raise ManifestError(
                f"{source}: column {src!r} has unexpected value {raw[bad].iloc[0]!r}; "
                "CheXpert-style labels must be 1.0, 0.0, -1.0 or blank. Fix: use the labeler's "
                "own CSV"
            )
        value = raw.copy()
        value[raw == -1.0] = {"zeros": 0.0, "ones": 1.0, "mask": np.nan}[uncertain]
        is_blank = raw.isna()
        if label == "healthy" or blank == "zeros":
            value[is_blank] = 0.0
        elif healthy_raw is not None:
            value[is_blank & (healthy_raw == 1.0)] = 0.0
        out[label] = value.astype("float32")
    return out


def frame_of(
    *,
    path: pd.Series,
    patient_id: pd.Series,
    split: pd.Series,
    sex: pd.Series,
    age: pd.Series,
    labels: pd.DataFrame,
) -> pd.DataFrame:
    """A manifest-shaped DataFrame from row-aligned columns (positions, not index labels)."""
    df = pd.DataFrame(
        {
            "path": path.to_numpy(),
            "patient_id": patient_id.astype(str).to_numpy(),
            "split": split.to_numpy(),
            "sex": sex.to_numpy(),
            "age": age.to_numpy(dtype="float64"),
        }
    )
    for label in LABELS:
        df[label] = labels[label].to_numpy(dtype="float32")
    return df
