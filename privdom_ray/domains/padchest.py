"""PadChest: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz)`` + 16-bit PNGs.

The real CSV starts with an unnamed index column and has mixed-type columns: it is read by
column name (``low_memory=False``), ignoring every column not needed. Rows whose ``Labels`` is
NaN are dropped. ``Labels`` is a Python-list literal; items are stripped and lower-cased and
matched EXACTLY (never substring tests on the raw string, which make ``abnormal foreign body``
"normal" and ``pericardial effusion`` a pleural effusion):

- cardiomegaly: ``cardiomegaly``
- pleural_effusion: ``pleural effusion``, ``loculated pleural effusion`` (+ ``loculated
  fissural effusion`` with ``fissural_effusion: true``); never ``pericardial effusion``
- pneumonia: ``pneumonia``, ``atypical pneumonia``
- atelectasis: any item containing ``atelectasis`` (``laminar atelectasis``, ``atelectasis basal``...)
- healthy: ``normal``

A list with no items (``[]``, ``['']``) gives all five labels 0. There is no official split:
patients (``PatientID``) are split 70/10/20 by salted hash. Age is the ``StudyDate_DICOM``
year minus ``PatientBirth``.

Layouts (``layout``): ``subfolders`` = ``root/<ImageDir>/<ImageID>`` (the zip archives
extracted as numbered folders), ``flat`` = ``root/<ImageID>``, ``auto`` = one walk of ``root``
indexing every PNG by name (finds either layout, or any other nesting); images not found keep
the ``subfolders`` path and are skipped at decode time.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from privdom_ray.domains import register
from privdom_ray.domains._common import (
    check_bool,
    check_choice,
    find_file,
    frame_of,
    hash_split,
    join_paths,
    labels_from_tokens,
    log,
    map_sex,
    normalize_tuple,
    parse_age,
    read_csv,
    require_some_images,
    walk_files,
)
from privdom_ray.manifest import ManifestError

PROJECTIONS = ("PA", "AP", "AP_horizontal", "L", "COSTAL", "UNK", "EXCLUDE")
LAYOUTS = ("auto", "subfolders", "flat")
REQUIRED = (
    "ImageID",
    "ImageDir",
    "StudyDate_DICOM",
    "PatientID",
    "PatientBirth",
    "PatientSex_DICOM",
    "Projection",
    "Labels",
)
EXCLUDED = frozenset({"exclude", "suboptimal study"})
SALT = "padchest"


@dataclass(frozen=True)
class PadChestOptions:
    """``projections``: kept ``Projection`` values (default PA, AP, AP_horizontal; also L,
    COSTAL, UNK, EXCLUDE). ``layout``: ``auto`` | ``subfolders`` | ``flat`` (module doc).
    ``fissural_effusion``: count ``loculated fissural effusion`` as pleural effusion.
    ``drop_excluded``: drop images labelled ``exclude`` or ``suboptimal study``.
    ``check_images``: fail when none of the listed PNGs exists (``auto`` always walks).
    """

    projections: tuple[str, ...] = ("PA", "AP", "AP_horizontal")
    layout: str = "auto"
    fissural_effusion: bool = False
    drop_excluded: bool = False
    check_images: bool = True

    def __post_init__(self) -> None:
        normalize_tuple(self, "projections", allowed=PROJECTIONS, upper=True)
        check_choice("layout", self.layout, LAYOUTS)
        check_bool("fissural_effusion", self.fissural_effusion)
        check_bool("drop_excluded", self.drop_excluded)
        check_bool("check_images", self.check_images)


_ITEM = re.compile(r"'([^'\\]*)'|\"([^\"\\]*)\"")
_LIST_REST = re.compile(r"[\s,\[\]]*")


def parse_labels(cell: str) -> frozenset[str]:
    """``"['pleural effusion', ' cardiomegaly', '']"`` -> {'pleural effusion', 'cardiomegaly'}.

    A plain list of quoted strings (every real cell) is read with a regex, 10x faster than
    ``ast.literal_eval``, which handles anything else.
    """
    text = str(cell)
    if _LIST_REST.fullmatch(_ITEM.sub("", text)):
        items = [a or b for a, b in _ITEM.findall(text)]
        return frozenset(s for s in (x.strip().lower() for x in items) if s)
    try:
        items = ast.literal_eval(cell)
        if isinstance(items, str):
            items = [items]
        items = [str(x) for x in items if x == x]  # drops float NaN inside a list
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        items = str(cell).strip().strip("[]").split(",")
    return frozenset(s for s in (str(x).strip().strip("'\"").strip().lower() for x in items) if s)


def _rules(fissural: bool) -> dict:
    effusions = {"pleural effusion", "loculated pleural effusion"}
    if fissural:
        effusions.add("loculated fissural effusion")
    return {
        "cardiomegaly": lambda t: "cardiomegaly" in t,
        "pleural_effusion": lambda t: not effusions.isdisjoint(t),
        "pneumonia": lambda t: "pneumonia" in t or "atypical pneumonia" in t,
        "atelectasis": lambda t: any("atelectasis" in item for item in t),
        "healthy": lambda t: "normal" in t,
    }


@register("padchest", PadChestOptions, description="PadChest: labels CSV (160K) + 16-bit PNGs")
def build(root: Path, options: PadChestOptions) -> pd.DataFrame:
    source = find_file(
        root,
        [
            "PADCHEST_chest_x_ray_images_labels_160K*.csv",
            "PADCHEST_chest_x_ray_images_labels_160K*.csv.gz",
            "PADCHEST*.csv",
            "PADCHEST*.csv.gz",
            "padchest*.csv",
            "padchest*.csv.gz",
        ],
        what="PadChest label CSV",
        fix="put PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz) in root",
    )
    text = {
        c: "string"
        for c in ("ImageID", "ImageDir", "PatientID", "PatientSex_DICOM", "Projection", "Labels")
    }
    raw = read_csv(
        source, required=REQUIRED, dtype=text, low_memory=False, fix="use PadChest's own label CSV"
    )
    n = len(raw)
    raw = raw[raw["Labels"].notna().to_numpy()]
    if len(raw) < n:
        log.info("padchest: %d rows without Labels dropped", n - len(raw))
    projection = raw["Projection"].str.strip().str.upper()
    wanted = [p.upper() for p in options.projections]
    raw = raw[projection.isin(wanted).fillna(False).to_numpy()]
    rules = _rules(options.fissural_effusion)
    rules["excluded"] = lambda t: not EXCLUDED.isdisjoint(t)
    labels = labels_from_tokens(raw["Labels"], parse_labels, rules)
    if options.drop_excluded:
        keep = (labels["excluded"] == 0).to_numpy()
        raw, labels = raw[keep], labels[keep]

    image = raw["ImageID"].str.strip()
    folder = pd.to_numeric(raw["ImageDir"], errors="coerce").astype("Int64").astype("string")
    nested = folder.fillna("") + "/" + image
    if options.layout == "flat":
        path = join_paths(root, image)
    else:
        path = join_paths(root, nested.str.lstrip("/"))
    if options.layout == "auto":
        found = image.map(walk_files(root, (".png",)))
        if found.notna().sum() == 0 and options.check_images:
            raise ManifestError(
                f"domain 'padchest': none of the {len(image)} images listed in {source} was found "
                f"under {root} (e.g. {image.iloc[0] if len(image) else '?'}). Fix: point root at "
                "the folder holding the numbered ImageDir folders (0/, 1/, ...) or the flat PNGs"
            )
        path = found.fillna(path)
    elif options.check_images:
        require_some_images(path, root=root, source=source, domain="padchest")

    year = pd.to_numeric(raw["StudyDate_DICOM"], errors="coerce") // 10000
    age = year - pd.to_numeric(raw["PatientBirth"], errors="coerce")
    patient = raw["PatientID"].str.strip()
    if patient.isna().any():
        raise ManifestError(
            f"{source}: column 'PatientID' is blank in {int(patient.isna().sum())} rows"
        )
    return frame_of(
        path=path,
        patient_id=patient,
        split=hash_split(patient, salt=SALT),
        sex=map_sex(raw["PatientSex_DICOM"], {"M": "M", "F": "F"}),
        age=parse_age(age.astype("float64")),
        labels=labels,
    )
