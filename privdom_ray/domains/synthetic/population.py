"""Patients and their findings: age, sex, frailty and follow-ups, then each image's findings
and labels (with each site's labelling habits), all drawn from one seeded generator.

Separate from rendering: the labels are decided here, before any pixel is drawn, and tests
check their prevalences without rendering.
"""

from __future__ import annotations

import math

import numpy as np

from privdom_ray.domains.synthetic.profiles import SiteProfile, SyntheticOptions


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
