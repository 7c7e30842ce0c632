"""A human-readable summary of one manifest (printed by ``launch.py manifest``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from privdom_ray.manifest import LABELS, SEXES, SPLITS

AGE_BINS = ((0.0, 40.0, "[0,40)"), (40.0, 70.0, "[40,70)"), (70.0, np.inf, "[70,inf)"))


def summarize(manifest: pd.DataFrame) -> str:
    """Per split: images, patients, label prevalence (positives / known), sex and age-bin counts."""
    splits = [s for s in SPLITS if (manifest["split"] == s).any()] + sorted(
        set(manifest["split"]) - set(SPLITS)
    )
    groups = {s: manifest[manifest["split"] == s] for s in splits}
    columns = [*splits, "all"]
    groups["all"] = manifest

    def table(rows: dict[str, list[str]], first: str) -> str:
        frame = pd.DataFrame(rows, index=columns).T
        frame.index.name = first
        return frame.to_string()

    counts = {
        "images": [str(len(g)) for g in groups.values()],
        "patients": [str(g["patient_id"].nunique()) for g in groups.values()],
    }
    prevalence = {}
    for label in LABELS:
        cells = []
        for g in groups.values():
            values = g[label].to_numpy(dtype="float64")
            known = int(np.isfinite(values).sum())
            pos = int((values == 1.0).sum())
            cells.append(f"{pos}/{known} ({100.0 * pos / known:.1f}%)" if known else "0/0")
        prevalence[label] = cells
    sexes = {sex: [str(int((g["sex"] == sex).sum())) for g in groups.values()] for sex in SEXES}
    ages = {}
    for lo, hi, name in AGE_BINS:
        ages[name] = [str(int(((g["age"] >= lo) & (g["age"] < hi)).sum())) for g in groups.values()]
    ages["missing"] = [str(int(g["age"].isna().sum())) for g in groups.values()]

    parts = [
        f"{len(manifest)} images, {manifest['patient_id'].nunique()} patients",
        table(counts, "count"),
        "",
        "label prevalence (positives/known):",
        table(prevalence, "label"),
        "",
        "sex:",
        table(sexes, "sex"),
        "",
        "age (years):",
        table(ages, "age"),
    ]
    return "\n".join(parts)
