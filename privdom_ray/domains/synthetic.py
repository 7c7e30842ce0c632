"""A seeded, deterministic generator of synthetic multi-site chest radiographs (kind ``synthetic``).

Why: the demo grid and the tests need domains that exist without any download, are small enough
to train on in seconds, and still behave like the real problem: each label is tied to a visible
finding a CNN can learn, labels depend on age and sex, patients have follow-up images, and sites
differ in acquisition, population and labelling habits, so a model trained at one site is
measurably worse (but far better than chance) at another.

Layout of a generated domain root::

    root/images/<patient_id>_<k>.png   8-bit grayscale, ``file_size`` x ``file_size`` pixels
    root/synthetic.json                the options and generator version that made it
    root/labels.csv                    file, patient_id, sex, age, the five labels (written last)

``labels.csv`` is the completion marker: a root without it is never read as a domain. A missing
root is generated as a hidden sibling folder (``.<name>.synthetic-tmp-*``) and renamed into place
in one step; an existing (empty) root gets a hidden temp folder inside it whose contents are moved
in with renames, ``labels.csv`` last. An interrupted run therefore leaves at most a temp folder
(ignored; removed once it is an hour old) or an ``images/`` folder without ``labels.csv``
(replaced by the next run). When ``labels.csv`` exists it is read as is and never regenerated, so
it can be hand-edited; ``synthetic.json`` guards against reading a root made with other options.
The split is patient-wise by a salted hash (``synthetic:<site>``): 25% test, 15% val, 60% train
for sites a-d; the paper-shaped sites (``PAPER_SITES``) use their institution's test share.

Picture model: every image is a density map (air 0, soft tissue 0.3-0.6 with smooth thickness
gradients, aerated lung ~0.15-0.3, heart/mediastinum 0.72) drawn in patient ("body") coordinates,
seen through a per-image acquisition (zoom, shift, rotation, upright PA or supine AP) and a
per-site detector (gamma curve, contrast, offset, heel-effect ramp, large-radius unsharp
"processing", blur, noise, collimation). Findings, each tied to its label:

* cardiomegaly: cardiothoracic ratio (CTR) above the site's threshold; the heart is drawn with
  that CTR (magnified on supine AP films), so borderline hearts make the label genuinely hard.
* pleural_effusion: upright, fluid filling a lung base with a meniscus rising to the lateral
  wall (blunted costophrenic angle, hidden diaphragm); supine, a haze densest at the base.
* pneumonia: patchy consolidation: several textured blobs in one lung zone (lobar), or small foci
  in both lungs (multifocal, common at the ICU site).
* atelectasis: one or two dense plate-like bands in a lower lung, with volume loss (raised
  hemidiaphragm, mediastinum pulled toward it) when marked.
* healthy: 1 exactly when none of the four and no "other finding" (a lung nodule/mass), like a
  real "No Finding" label. Support devices (ECG electrodes, a central line) and, for women,
  breast shadows are nuisance and change no label.

Severities vary, and sites label mild findings differently (``min_labelled_severity``): a mild
effusion that site "a" calls positive is negative at site "c", as label definitions differ
between real institutions. Age raises cardiomegaly, effusion and atelectasis; cardiomegaly raises
effusion, effusion raises atelectasis, and a per-patient frailty links a patient's follow-ups.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from privdom_ray.domains import register
from privdom_ray.domains._common import check_field_counts
from privdom_ray.manifest import LABELS, ManifestError, patient_split

GENERATOR_VERSION = 1
LABELS_FILE = "labels.csv"
INFO_FILE = "synthetic.json"
IMAGES_DIR = "images"
TMP_PREFIX = ".synthetic-tmp-"
STALE_TMP_SECONDS = 3600.0
TEST_FRAC = 0.25
VAL_FRAC = 0.15
CSV_COLUMNS: tuple[str, ...] = ("file", "patient_id", "sex", "age", *LABELS)


@dataclass(frozen=True)
class SiteProfile:
    """One simulated institution: its population, labelling habits and acquisition.

    Population: age ~ N(age_mean, age_sd) clipped to [18, 95], ``age_missing`` of patients
    without a recorded age, ``female`` / ``unknown_sex`` fractions. Findings: ``*_logit`` are base
    log-odds (at age 60) of a diseased heart per patient and of each acute finding per image;
    ``ctr_mean`` is the mean normal cardiothoracic ratio and ``ctr_threshold`` the ratio this site
    calls cardiomegaly; ``severity`` scales how marked findings are; findings milder than
    ``min_labelled_severity`` are drawn but labelled negative. Acquisition: ``zoom`` (>1 = tighter
    field of view), ``shift`` (x, y in half-widths), ``rotation_sd`` (degrees), the detector curve
    ``offset + contrast * density ** gamma``, ``heel`` (left-right intensity ramp), ``processing``
    (strength of large-radius unsharp masking), ``blur`` (Gaussian sigma in pixels at 128 px,
    scaled with ``file_size``), ``noise`` (per-pixel SD), ``collimation`` (fraction of the border
    masked), ``rib_contrast``, ``devices`` (base chance of ECG leads / a central line, higher
    when sick), ``supine`` (fraction of supine AP films: magnified heart, higher diaphragm,
    scapulae over the lungs, effusion as a basal haze instead of a meniscus), ``multifocal``
    (fraction of pneumonias with small foci in both lungs instead of one lobar patch).
    """

    description: str
    age_mean: float
    age_sd: float
    age_missing: float
    female: float
    unknown_sex: float
    cardiomegaly_logit: float
    ctr_mean: float
    ctr_threshold: float
    effusion_logit: float
    pneumonia_logit: float
    atelectasis_logit: float
    nodule_logit: float
    severity: float
    min_labelled_severity: float
    zoom: float
    shift: tuple[float, float]
    rotation_sd: float
    gamma: float
    contrast: float
    offset: float
    heel: float
    blur: float
    noise: float
    collimation: float
    rib_contrast: float
    devices: float
    supine: float
    multifocal: float
    processing: float
    # patient-wise split fractions (of all patients); the paper-shaped sites set their own
    test_frac: float = TEST_FRAC
    val_frac: float = VAL_FRAC


SITES: dict[str, SiteProfile] = {
    "a": SiteProfile(
        description="general hospital: upright PA films, mixed adult population, standard "
        "detector, lobar pneumonias",
        age_mean=58.0,
        age_sd=17.0,
        age_missing=0.03,
        female=0.48,
        unknown_sex=0.02,
        cardiomegaly_logit=-1.4,
        ctr_mean=0.44,
        ctr_threshold=0.50,
        effusion_logit=-1.5,
        pneumonia_logit=-1.6,
        atelectasis_logit=-1.5,
        nodule_logit=-2.4,
        severity=1.0,
        min_labelled_severity=0.05,
        zoom=1.0,
        shift=(0.0, 0.0),
        rotation_sd=2.0,
        gamma=1.0,
        contrast=0.85,
        offset=0.06,
        heel=0.0,
        blur=0.7,
        noise=0.02,
        collimation=0.0,
        rib_contrast=1.0,
        devices=0.15,
        supine=0.03,
        multifocal=0.1,
        processing=0.0,
    ),
    "b": SiteProfile(
        description="intensive care: mostly supine AP films (magnified heart, hazy effusions), "
        "older and sicker patients, devices, multifocal pneumonias, wide field of view, "
        "low-contrast noisy images with strong unsharp-mask processing",
        age_mean=67.0,
        age_sd=14.0,
        age_missing=0.05,
        female=0.40,
        unknown_sex=0.03,
        cardiomegaly_logit=-1.2,
        ctr_mean=0.45,
        ctr_threshold=0.52,
        effusion_logit=-1.2,
        pneumonia_logit=-1.2,
        atelectasis_logit=-1.2,
        nodule_logit=-2.6,
        severity=1.1,
        min_labelled_severity=0.2,
        zoom=0.86,
        shift=(0.0, 0.08),
        rotation_sd=3.0,
        gamma=0.9,
        contrast=0.7,
        offset=0.15,
        heel=0.15,
        blur=0.8,
        noise=0.025,
        collimation=0.0,
        rib_contrast=0.6,
        devices=0.5,
        supine=0.6,
        multifocal=0.5,
        processing=0.8,
    ),
    "c": SiteProfile(
        description="outpatient screening: younger, mostly healthy, milder findings labelled "
        "conservatively, tight field of view, sharp high-contrast images",
        age_mean=46.0,
        age_sd=15.0,
        age_missing=0.02,
        female=0.55,
        unknown_sex=0.01,
        cardiomegaly_logit=-1.6,
        ctr_mean=0.435,
        ctr_threshold=0.49,
        effusion_logit=-1.5,
        pneumonia_logit=-1.6,
        atelectasis_logit=-1.4,
        nodule_logit=-2.2,
        severity=0.8,
        min_labelled_severity=0.3,
        zoom=1.15,
        shift=(0.0, -0.06),
        rotation_sd=1.5,
        gamma=1.3,
        contrast=0.95,
        offset=0.0,
        heel=-0.08,
        blur=0.4,
        noise=0.015,
        collimation=0.0,
        rib_contrast=1.4,
        devices=0.03,
        supine=0.0,
        multifocal=0.0,
        processing=0.2,
    ),
    "d": SiteProfile(
        description="other vendor and country: steep gamma, strong heel effect, collimated "
        "borders, shifted field of view, 35% missing age and 15% unknown sex",
        age_mean=52.0,
        age_sd=18.0,
        age_missing=0.35,
        female=0.45,
        unknown_sex=0.15,
        cardiomegaly_logit=-1.7,
        ctr_mean=0.44,
        ctr_threshold=0.51,
        effusion_logit=-1.4,
        pneumonia_logit=-1.3,
        atelectasis_logit=-1.7,
        nodule_logit=-2.0,
        severity=0.95,
        min_labelled_severity=0.1,
        zoom=0.95,
        shift=(0.07, 0.03),
        rotation_sd=3.0,
        gamma=1.7,
        contrast=0.8,
        offset=0.1,
        heel=0.28,
        blur=0.9,
        noise=0.03,
        collimation=0.07,
        rib_contrast=0.8,
        devices=0.25,
        supine=0.2,
        multifocal=0.3,
        processing=0.4,
    ),
}


def _like(base: str, description: str, **changes: object) -> SiteProfile:
    return dataclasses.replace(SITES[base], description=description, **changes)


#: Paper-shaped sites (``benchmarks/bench_paper_scale.py``): the five institutions of Tayebi
#: Arasteh et al. and a MIMIC-like public pretraining site, each with its published test share
#: (test / (train + test) images; val = 10% of the paper's training images), sex and age mix
#: of its test set (shared/reference/paper.md) and base log-odds fitted to approximate image
#: prevalences of its labels (ChestX-ray14 and CheXpert counts in cxr_formats.md; VinDr, UKA,
#: PadChest and MIMIC values are rough, unverified figures). Acquisition is borrowed from a-d.
#: Picked with ``images_per_patient`` 1 (vdr), 6 (c14, uka, mimic), 5 (cpt), 2 (pch).
PAPER_SITES: dict[str, SiteProfile] = {
    "vdr": _like(
        "c",
        "VinDr-CXR-shaped: one image per patient, 58% unknown sex, 84% missing age, mostly "
        "normal films",
        age_mean=50.0, age_sd=18.0, age_missing=0.84, female=0.184, unknown_sex=0.582,
        cardiomegaly_logit=-1.98, effusion_logit=-2.92, pneumonia_logit=-3.48,
        atelectasis_logit=-3.93, nodule_logit=-1.67,
        test_frac=0.1667, val_frac=0.0833,
    ),
    "c14": _like(
        "a",
        "ChestX-ray14-shaped: follow-up heavy, younger, 54% no finding",
        age_mean=47.0, age_sd=16.0, age_missing=0.0, female=0.42, unknown_sex=0.0,
        cardiomegaly_logit=-3.98, effusion_logit=-1.77, pneumonia_logit=-4.91,
        atelectasis_logit=-2.08, nodule_logit=-0.41,
        test_frac=0.2283, val_frac=0.0772,
    ),
    "cpt": _like(
        "d",
        "CheXpert-shaped: mostly AP inpatient films, older, 39% effusion, 10% no finding",
        age_mean=60.0, age_sd=18.0, age_missing=0.0, female=0.39, unknown_sex=0.0,
        supine=0.6, collimation=0.0,
        cardiomegaly_logit=-2.23, effusion_logit=-0.61, pneumonia_logit=-4.07,
        atelectasis_logit=-2.13, nodule_logit=1.62,
        test_frac=0.186, val_frac=0.0814,
    ),
    "uka": _like(
        "b",
        "UKA-CXR-shaped: intensive-care bedside films, oldest population",
        age_mean=67.0, age_sd=15.0, age_missing=0.0, female=0.363, unknown_sex=0.0,
        supine=0.95,
        cardiomegaly_logit=-1.15, effusion_logit=-1.54, pneumonia_logit=-2.14,
        atelectasis_logit=-1.5, nodule_logit=-2.47,
        test_frac=0.206, val_frac=0.0794,
    ),
    "pch": _like(
        "a",
        "PadChest-shaped: other vendor (steeper curve, heel effect, processing), broad ages",
        age_mean=60.0, age_sd=20.0, age_missing=0.005, female=0.482, unknown_sex=0.0,
        gamma=1.3, heel=0.12, processing=0.5, noise=0.025,
        cardiomegaly_logit=-2.99, effusion_logit=-3.8, pneumonia_logit=-4.01,
        atelectasis_logit=-3.58, nodule_logit=0.54,
        test_frac=0.2003, val_frac=0.0800,
    ),
    "mimic": _like(
        "b",
        "MIMIC-CXR-shaped public pretraining site: half supine, 33% no finding, a small test",
        age_mean=60.0, age_sd=18.0, age_missing=0.0, female=0.52, unknown_sex=0.0,
        supine=0.5,
        cardiomegaly_logit=-1.44, effusion_logit=-1.57, pneumonia_logit=-3.08,
        atelectasis_logit=-1.62, nodule_logit=-0.41,
        test_frac=0.02, val_frac=0.05,
    ),
}  # fmt: skip
SITES.update(PAPER_SITES)


@dataclass(frozen=True)
class SyntheticOptions:
    """Options of a synthetic domain (all YAML scalars).

    ``site``: a built-in site profile (see ``SITES``: a, b, c, d and the paper-shaped
    ``PAPER_SITES``). ``n_patients``: patients to generate. ``images_per_patient``: the most
    images one patient has (each gets 1..max, follow ups share the patient's anatomy). ``file_size``: pixel size of the square PNGs written.
    ``seed``: generation seed; the same options always give byte-identical files.
    """

    site: str = "a"
    n_patients: int = 400
    images_per_patient: int = 3
    file_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.site, str) or self.site not in SITES:
            raise ValueError(
                f"synthetic option 'site' = {self.site!r} is not a known site profile; "
                f"allowed: {', '.join(sorted(SITES))}"
            )
        _check_int("n_patients", self.n_patients, 1, 1_000_000)
        _check_int("images_per_patient", self.images_per_patient, 1, 100)
        _check_int("file_size", self.file_size, 32, 4096)
        _check_int("seed", self.seed, 0, 2**63 - 1)


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(
            f"synthetic option {name!r} = {value!r} is not allowed; "
            f"expected an integer from {lo} to {hi}"
        )


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


# --------------------------------------------------------------------------------------------
# Generation: files
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Generation: population and findings
# --------------------------------------------------------------------------------------------


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _draw_patient(
    rng: np.random.Generator, site: SiteProfile, options: SyntheticOptions, index: int
) -> dict:
    """A patient: demographics, heart, frailty and the anatomy its follow-ups share."""
    u = rng.random()
    sex = "U" if u < site.unknown_sex else "F" if u < site.unknown_sex + site.female else "M"
    female = sex == "F" or (sex == "U" and rng.random() < 0.5)  # unrecorded, not unknown
    male = 0.0 if female else 1.0
    age = float(np.clip(rng.normal(site.age_mean, site.age_sd), 18.0, 95.0))
    age_z = (age - 60.0) / 15.0
    # cardiothoracic ratio: a normal heart plus, for a diseased heart, an enlargement; the label
    # is the ratio against the site's threshold, so mild enlargements are borderline cases
    diseased = rng.random() < _sigmoid(site.cardiomegaly_logit + 0.8 * age_z + 0.3 * male)
    enlarged = rng.uniform(0.03, 0.17) if diseased else 0.0
    ctr = site.ctr_mean + 0.01 * age_z + 0.006 * male + rng.normal(0.0, 0.025) + enlarged
    return {
        "patient_id": f"{options.site}{index:05d}",
        "sex": sex,
        "female": female,
        "age": age,
        "age_z": age_z,
        "age_recorded": math.nan if rng.random() < site.age_missing else round(age, 1),
        "n_images": int(rng.integers(1, options.images_per_patient + 1)),
        "ctr": float(np.clip(ctr, 0.33, 0.7)),
        "risk": float(rng.normal(0.0, 0.7)),  # shared frailty: follow-ups are alike
        "size": float(np.clip(rng.normal(0.96 if female else 1.03, 0.04), 0.85, 1.15)),
        "lung_height": float(rng.normal(1.0, 0.05)),
        "dome": float(rng.normal(0.13, 0.025)),
        "asym": float(rng.normal(0.0, 0.02)),
        "breast": float(rng.uniform(0.04, 0.1)),
        "texture_seed": int(rng.integers(2**31)),
    }


def _draw_findings(rng: np.random.Generator, site: SiteProfile, p: dict) -> dict:
    """One image's findings (severity 0 = absent) and its labels."""
    az, risk = p["age_z"], p["risk"]
    ctr = p["ctr"] + rng.normal(0.0, 0.008)  # the heart of a follow-up is nearly the same
    cardiomegaly = ctr > site.ctr_threshold

    def severity() -> float:
        return float(np.clip(rng.beta(2.2, 1.6) * site.severity, 0.08, 1.0))

    eff = rng.random() < _sigmoid(site.effusion_logit + 0.7 * az + 0.9 * cardiomegaly + risk)
    pna = rng.random() < _sigmoid(site.pneumonia_logit + 0.35 * abs(az) + 0.7 * risk)
    atel = rng.random() < _sigmoid(site.atelectasis_logit + 0.4 * az + 0.6 * eff + 0.6 * risk)
    nod = rng.random() < _sigmoid(site.nodule_logit + 0.4 * az)
    f = {
        "ctr": ctr,
        "effusion": severity() if eff else 0.0,
        "effusion_side": int(rng.integers(0, 3)),  # 0 right, 1 left, 2 both
        "pneumonia": severity() if pna else 0.0,
        "atelectasis": severity() if atel else 0.0,
        "nodule": float(rng.uniform(0.5, 1.0)) if nod else 0.0,
    }
    labels = {
        "cardiomegaly": bool(cardiomegaly),
        "pleural_effusion": f["effusion"] > site.min_labelled_severity,
        "pneumonia": f["pneumonia"] > site.min_labelled_severity,
        "atelectasis": f["atelectasis"] > site.min_labelled_severity,
    }
    labels["healthy"] = not (any(labels.values()) or nod)
    # the nuisance: sicker patients have more devices
    sick = eff + pna + atel
    f["devices"] = rng.random() < min(0.95, site.devices * (1.0 + 0.3 * sick))
    f["supine"] = rng.random() < site.supine
    f["labels"] = {k: int(v) for k, v in labels.items()}
    return f


# --------------------------------------------------------------------------------------------
# Generation: rendering
# --------------------------------------------------------------------------------------------


class _Grid:
    """Pixel-centre coordinates in [-1, 1] and per-size helpers, shared by every image."""

    def __init__(self, size: int) -> None:
        self.size = size
        c = ((np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
        self.y, self.x = np.meshgrid(c, c, indexing="ij")
        self.px = 2.0 / size  # one pixel in coordinate units
        self.scale = size / 128.0  # blur sigmas are given at 128 px


def _soft(signed: np.ndarray, edge: float) -> np.ndarray:
    """Signed distance (negative inside) -> soft mask in [0, 1] with an edge of width ``edge``."""
    return np.clip(0.5 - signed / edge, 0.0, 1.0)


def _ellipse_sd(x, y, cx, cy, a, b):
    """Approximate signed distance to an ellipse (exact for circles)."""
    return (np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2) - 1.0) * min(a, b)


def _segment_distance(x, y, x0, y0, x1, y1):
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-12), 0.0, 1.0)
    return np.hypot(x - (x0 + t * dx), y - (y0 + t * dy))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Unit-variance-ish smooth random field: a coarse Gaussian grid upsampled bicubically."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding (plain numpy, deterministic)."""
    if sigma < 0.3:
        return img
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    n = img.shape[0]
    pad = np.pad(img, ((r, r), (0, 0)), mode="edge")
    out = sum(w * pad[i : i + n, :] for i, w in enumerate(k))
    pad = np.pad(out, ((0, 0), (r, r)), mode="edge")
    return sum(w * pad[:, i : i + n] for i, w in enumerate(k))


def _lowpass(img: np.ndarray, factor: int) -> np.ndarray:
    """A cheap large-radius low-pass: box-downsample by ``factor``, bilinear upsample back."""
    n = img.shape[0]
    small = Image.fromarray(img.astype(np.float32), mode="F").resize(
        (max(1, n // factor),) * 2, Image.BOX
    )
    return np.asarray(small.resize((n, n), Image.BILINEAR), dtype=np.float32)


def _render(rng: np.random.Generator, g: _Grid, site: SiteProfile, p: dict, f: dict) -> np.ndarray:
    """Draw one radiograph: density map in body coordinates, then the site's detector.

    The steps run in this fixed order because they share ``rng``: drawing in another order would
    change every image, and with it the manifest hash that finished trials are keyed by.
    """
    X, Y, edge = _body_coordinates(rng, g, site, p)
    atel = f["atelectasis"]
    atel_side, loss, shift_med = _volume_loss(rng, atel)
    density = _soft_tissue(X, Y)
    top = -0.68 * p["lung_height"]
    diaphragms = _diaphragm_levels(p, f, atel_side, loss)
    lungs, air, bases = _lung_fields(X, Y, edge, top, p["dome"], diaphragms)
    lung = _aerated_lung(g, site, p, X, Y, air)
    if f["pneumonia"]:
        lung = _add_pneumonia(rng, g, site, f["pneumonia"], X, Y, lungs, bases, lung)
    if f["nodule"]:
        lung = _add_nodule(rng, f["nodule"], X, Y, bases, lung)
    density = density * (1 - lungs) + lung * lungs
    if f["effusion"]:
        density = _add_effusion(f, X, Y, top, bases, density)
    if atel:
        density = _add_atelectasis(rng, atel, p["dome"], X, Y, bases[atel_side], density)
    density = _add_heart_and_mediastinum(f, X, Y, edge, top, shift_med, density)
    density = _add_bones_and_soft_tissue(p, f, X, Y, shift_med, density)
    if f["devices"]:
        density = _add_devices(rng, X, Y, density)
    return _detect(rng, g, site, density)


def _body_coordinates(
    rng: np.random.Generator, g: _Grid, site: SiteProfile, p: dict
) -> tuple[np.ndarray, np.ndarray, float]:
    """Image coords -> body coords (units of the patient's thorax) and the soft-edge width.

    Why: each film is taken with its own zoom, shift and rotation around the site's habits, so
    the same anatomy lands differently on the detector.
    """
    zoom = site.zoom * math.exp(rng.normal(0.0, 0.04)) * p["size"]
    sx = site.shift[0] + rng.normal(0.0, 0.03)
    sy = site.shift[1] + rng.normal(0.0, 0.03)
    th = math.radians(rng.normal(0.0, site.rotation_sd))
    ct, st = math.cos(th), math.sin(th)
    x0, y0 = g.x - np.float32(sx), g.y - np.float32(sy)
    X = x0 * np.float32(ct / zoom) + y0 * np.float32(st / zoom)
    Y = y0 * np.float32(ct / zoom) - x0 * np.float32(st / zoom)
    return X, Y, 1.5 * g.px / zoom


def _volume_loss(rng: np.random.Generator, atel: float) -> tuple[int, float, float]:
    """Side of the atelectasis, its volume loss and the mediastinal shift toward it.

    Why: marked atelectasis shrinks its lung, raising that hemidiaphragm and pulling the
    mediastinum over; the side is drawn for every image (sick or not) to keep the stream fixed.
    """
    atel_side = int(rng.integers(0, 2))
    loss = 0.1 * max(0.0, atel - 0.3) / 0.7
    shift_med = (-1 if atel_side == 0 else 1) * 0.5 * loss
    return atel_side, loss, shift_med


def _soft_tissue(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Soft-tissue density: thickest mid-body, denser below the diaphragm.

    Why: real films have smooth thickness gradients (a path length through a rounded body), so
    a model cannot key on flat backgrounds.
    """
    tx, ty = np.square(X / 0.95), np.square((Y - 0.2) / 1.3)
    torso = np.sqrt(np.sqrt(tx * tx + ty * ty)) - 1.0
    thick = np.sqrt(np.clip(1.0 - np.square(X / 0.97), 0.0, 1.0))
    density = (0.3 + 0.3 * thick + 0.04 * Y) * _soft(torso * 0.95, 0.06)
    density += 0.06 * _soft(0.35 - Y, 0.15)  # upper abdomen / liver
    return density


def _diaphragm_levels(p: dict, f: dict, atel_side: int, loss: float) -> tuple[float, float]:
    """Height of each hemidiaphragm (0 right = image left, 1 left).

    Why: the right one sits a little higher over the liver; supine films and atelectatic volume
    loss raise them, which shows on the film and the findings are drawn relative to it.
    """
    levels = []
    for side in (0, 1):
        dia = (0.27 if side == 0 else 0.30) + (p["asym"] if side else -p["asym"])
        if f["supine"]:
            dia -= 0.04
        if f["atelectasis"] and side == atel_side:
            dia -= loss
        levels.append(dia)
    return levels[0], levels[1]


def _lung_fields(
    X: np.ndarray,
    Y: np.ndarray,
    edge: float,
    top: float,
    dome: float,
    diaphragms: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float, np.ndarray]]]:
    """Both lungs: union mask, aeration map and per side ``(centre x, diaphragm, mask)``.

    Why: the findings are placed in and masked by a particular lung, and aerated lung is
    darkest where it is thickest (mid-lung, away from the chest wall).
    """
    lungs = np.zeros_like(X)
    air = np.zeros_like(X)
    bases: list[tuple[float, float, np.ndarray]] = []
    for cx, dia in zip((-0.34, 0.34), diaphragms, strict=True):
        grow = np.clip((Y - top) / 0.55, 0.0, 1.0)
        half = 0.25 * np.sqrt(1.0 - np.square(1.0 - grow))
        d_dia = Y - (dia + dome * np.square((X - cx) / 0.25) - dome)
        sd = np.maximum(np.maximum(np.abs(X - cx) - half, d_dia), top - Y)
        mask = _soft(sd, edge + 0.015)
        lungs = np.maximum(lungs, mask)
        air = np.maximum(air, mask * np.sqrt(np.clip(1.0 - np.square((X - cx) / 0.27), 0.0, 1.0)))
        bases.append((cx, dia, mask))
    return lungs, air, bases


def _aerated_lung(
    g: _Grid, site: SiteProfile, p: dict, X: np.ndarray, Y: np.ndarray, air: np.ndarray
) -> np.ndarray:
    """Density of the healthy lung: air, ribs and the patient's own parenchymal texture.

    Why: the texture comes from the patient's ``texture_seed`` (not ``rng``) so that follow-up
    films share it; ribs vary in contrast between sites.
    """
    phase = (Y + 0.45 * np.square(np.abs(X) - 0.25)) / 0.14
    ribs = np.clip(1.0 - np.square((phase - np.floor(phase) - 0.5) * 4.0), 0.0, 1.0)
    texture = _smooth_noise(np.random.default_rng(p["texture_seed"]), g.size, 10)
    lung = 0.3 - 0.16 * air + 0.04 * np.clip(Y / 0.3, 0.0, 1.0)
    return lung + 0.035 * site.rib_contrast * ribs + 0.02 * texture


def _opacify(lung: np.ndarray, target: float, amount: np.ndarray) -> np.ndarray:
    """Pull the aerated lung toward a soft-tissue density by ``amount`` (clipped to [0, 1]).

    Why: lung findings replace air with fluid or tissue, so they brighten toward ``target``
    rather than adding on top of what is there.
    """
    return lung + (target - lung) * np.clip(amount, 0.0, 1.0)


def _add_pneumonia(
    rng: np.random.Generator,
    g: _Grid,
    site: SiteProfile,
    sev: float,
    X: np.ndarray,
    Y: np.ndarray,
    lungs: np.ndarray,
    bases: list[tuple[float, float, np.ndarray]],
    lung: np.ndarray,
) -> np.ndarray:
    """Patchy consolidation: one zone (lobar) or several small foci in both lungs (multifocal).

    Why: the two patterns differ by site (multifocal is common in intensive care), so a model
    must recognise consolidation, not one blob shape.
    """
    multifocal = rng.random() < site.multifocal
    blobs = np.zeros_like(X)
    for _ in range(int(rng.integers(3, 5)) if multifocal else 1):
        side = int(rng.integers(0, 2))
        cx = bases[side][0] + rng.normal(0.0, 0.05)
        cy = (-0.35, -0.1, 0.1)[int(rng.integers(0, 3))] + rng.normal(0.0, 0.05)
        for _ in range(int(rng.integers(2, 4) if multifocal else rng.integers(3, 7))):
            bx, by = cx + rng.normal(0.0, 0.08), cy + rng.normal(0.0, 0.1)
            r = rng.uniform(0.07, 0.12) if multifocal else rng.uniform(0.09, 0.16)
            blobs = blobs + np.exp(-(np.square(X - bx) + np.square(Y - by)) / (2 * r * r))
    patch = np.clip(0.9 + 0.25 * _smooth_noise(rng, g.size, 24), 0.0, 1.0)
    amount = (0.65 + 0.35 * sev) * np.minimum(2.0 * blobs, 1.0) * patch * lungs
    return _opacify(lung, 0.6, amount)


def _add_nodule(
    rng: np.random.Generator,
    size: float,
    X: np.ndarray,
    Y: np.ndarray,
    bases: list[tuple[float, float, np.ndarray]],
    lung: np.ndarray,
) -> np.ndarray:
    """The "other finding": a round nodule or mass in one lung.

    Why: it makes ``healthy`` 0 without any of the four labels, like real "No Finding".
    """
    cx, dia, mask = bases[int(rng.integers(0, 2))]
    nx, ny = cx + rng.normal(0.0, 0.08), rng.uniform(-0.45, dia - 0.2)
    r = 0.035 + 0.045 * size
    return _opacify(lung, 0.6, 0.9 * _soft(_ellipse_sd(X, Y, nx, ny, r, r), 0.02) * mask)


def _add_effusion(
    f: dict,
    X: np.ndarray,
    Y: np.ndarray,
    top: float,
    bases: list[tuple[float, float, np.ndarray]],
    density: np.ndarray,
) -> np.ndarray:
    """Pleural fluid on one or both sides: a meniscus upright, a basal haze supine.

    Why: fluid layers by gravity, so the finding looks different on supine (ICU) films.
    """
    sev = f["effusion"]
    sides = (0, 1) if f["effusion_side"] == 2 else (f["effusion_side"],)
    for side in sides:
        cx, dia, mask = bases[side]
        if f["supine"]:
            density = _supine_effusion(sev, Y, top, dia, mask, density)
        else:
            density = _upright_effusion(sev, side, X, Y, cx, dia, density)
    return density


def _supine_effusion(
    sev: float, Y: np.ndarray, top: float, dia: float, mask: np.ndarray, density: np.ndarray
) -> np.ndarray:
    """Fluid layered behind a supine lung: a haze growing toward the base.

    Why: lying down, the fluid spreads over the back of the lung instead of filling the base.
    """
    grade = np.clip((Y - top) / (dia - top), 0.0, 1.0)
    level = 0.85 - 0.45 * sev  # where the haze is half dense, as a fraction of height
    haze = np.clip(0.5 + (grade - level) / 0.3, 0.0, 0.95) + 0.15 * sev * grade
    haze = np.minimum(haze, 1.0) * mask
    return density + (0.55 - density) * haze


def _upright_effusion(
    sev: float, side: int, X: np.ndarray, Y: np.ndarray, cx: float, dia: float, density: np.ndarray
) -> np.ndarray:
    """Fluid filling an upright lung base, its meniscus rising to the lateral wall.

    Why: this blunts the costophrenic angle and hides the diaphragm, the classic sign.
    """
    out = -1.0 if side == 0 else 1.0  # toward the lateral wall
    t = np.clip((X - cx) * out / 0.25 * 0.5 + 0.5, 0.0, 1.0)  # 0 medial .. 1 lateral
    level = dia - 0.06 - 0.5 * sev  # fluid top at the lateral wall
    line = level + 0.14 * (1 - t) ** 1.5
    pleura = _soft(np.abs(X - cx) - 0.27, 0.03) * _soft(Y - dia - 0.12, 0.04)
    fluid = pleura * _soft(line - Y, 0.04)
    return density * (1 - fluid) + 0.6 * fluid


def _add_atelectasis(
    rng: np.random.Generator,
    atel: float,
    dome: float,
    X: np.ndarray,
    Y: np.ndarray,
    base: tuple[float, float, np.ndarray],
    density: np.ndarray,
) -> np.ndarray:
    """One or two plate-like bands in a lower lung.

    Why: drawn after the effusion and dense enough to show through fluid, as the two often
    occur together.
    """
    cx, dia, mask = base
    for _ in range(1 + int(rng.random() < 0.4)):
        ang = math.radians(rng.normal(0.0, 12.0))
        length = rng.uniform(0.18, 0.28)
        bx, by = cx + rng.normal(0.0, 0.04), dia - dome - rng.uniform(0.05, 0.3)
        dx, dy = length * math.cos(ang), length * math.sin(ang)
        d = _segment_distance(X, Y, bx - dx, by - dy, bx + dx, by + dy)
        band = _soft(d - (0.03 + 0.03 * atel), 0.03) * mask
        density = density + (0.22 + 0.18 * atel) * band
    return density


def _add_heart_and_mediastinum(
    f: dict,
    X: np.ndarray,
    Y: np.ndarray,
    edge: float,
    top: float,
    shift_med: float,
    density: np.ndarray,
) -> np.ndarray:
    """Mediastinum and heart (image right = patient's left), drawn over the lungs.

    Why: the heart's width is the image's cardiothoracic ratio (magnified on supine AP films),
    which is what the cardiomegaly label is defined by.
    """
    med = _soft(np.abs(X - shift_med) - 0.085, 0.03) * _soft(top - 0.1 - Y, 0.05)
    heart_half = 0.59 * f["ctr"] * (1.12 if f["supine"] else 1.0)  # AP magnification
    heart_height = 0.21 * (f["ctr"] / 0.45) ** 0.6
    heart_sd = _ellipse_sd(X, Y, 0.07 + shift_med, 0.38 - heart_height, heart_half, heart_height)
    solid = np.maximum(med, _soft(heart_sd, edge + 0.02))
    return density * (1 - solid) + 0.72 * solid


def _add_bones_and_soft_tissue(
    p: dict, f: dict, X: np.ndarray, Y: np.ndarray, shift_med: float, density: np.ndarray
) -> np.ndarray:
    """Spine, clavicles, scapulae and, for women, breast shadows, on top of everything.

    Why: these overlap the lungs and heart on real films and are nuisance that changes no label.
    ``density`` is updated in place and returned.
    """
    density += 0.05 * _soft(np.abs(X - shift_med) - 0.05, 0.02)  # spine
    for s in (-1, 1):  # clavicles
        d = _segment_distance(X, Y, s * 0.08, -0.6 * p["lung_height"], s * 0.6, -0.74)
        density += 0.08 * _soft(d - 0.025, 0.02)
    # scapulae: rotated out of the lung fields on upright PA films, over them on supine AP films
    for s in (-1, 1):
        scapula_x = s * (0.5 if f["supine"] else 0.7)
        density += 0.07 * _soft(_ellipse_sd(X, Y, scapula_x, -0.4, 0.11, 0.3), 0.04)
    if p["female"]:
        for cx in (-0.42, 0.42):
            density += p["breast"] * _soft(_ellipse_sd(X, Y, cx, 0.3, 0.3, 0.22), 0.2)
    return density


def _add_devices(
    rng: np.random.Generator, X: np.ndarray, Y: np.ndarray, density: np.ndarray
) -> np.ndarray:
    """ECG electrodes and, half the time, a central line.

    Why: devices come with sicker patients, a shortcut a model could learn; they set no label.
    ``density`` is updated in place and returned.
    """
    for _ in range(int(rng.integers(2, 5))):
        ex, ey = rng.uniform(-0.7, 0.7), rng.uniform(-0.7, 0.5)
        ring = np.abs(np.hypot(X - ex, Y - ey) - 0.03)
        density += 0.5 * _soft(ring - 0.008, 0.01)
    if rng.random() < 0.5:
        ax, ay = (-0.35, 0.35)[int(rng.integers(0, 2))], -0.95
        bx, by = rng.normal(0.0, 0.03), rng.uniform(-0.1, 0.05)
        d = _segment_distance(X, Y, ax, ay, bx, by)
        density += 0.45 * _soft(d - 0.008, 0.01)
    return density


def _detect(
    rng: np.random.Generator, g: _Grid, site: SiteProfile, density: np.ndarray
) -> np.ndarray:
    """The site's detector: curve, heel effect, processing, blur, noise, collimation, 8-bit.

    Why: these acquisition differences are what make a model trained at one site worse at
    another, even for the same patients.
    """
    signal = site.offset + site.contrast * np.clip(density, 0.0, 1.5) ** np.float32(site.gamma)
    signal = signal * (1.0 + site.heel * g.x)
    if site.processing:  # vendor "multi-frequency" processing: large-radius unsharp masking
        signal = signal + site.processing * (signal - _lowpass(signal, 8))
    signal = _blur(signal, site.blur * g.scale)
    signal = signal + site.noise * rng.standard_normal(signal.shape, dtype=np.float32)
    if site.collimation:
        m = site.collimation
        inside = (np.abs(g.x) < 1 - m * rng.uniform(0.5, 1.5)) & (np.abs(g.y) < 1 - m)
        signal = np.where(inside, signal, 0.92)
    return np.clip(np.rint(signal * 255.0), 0, 255).astype(np.uint8)
