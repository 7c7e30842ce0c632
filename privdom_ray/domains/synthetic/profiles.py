"""The simulated institutions (``SITES``: a-d, and the paper-shaped ``PAPER_SITES``) and a
synthetic domain's options.

Separate from the generator: mostly data tables (population, labelling habits, acquisition),
read by the population and rendering code and by the paper-scale benchmark.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

TEST_FRAC = 0.25
VAL_FRAC = 0.15


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
