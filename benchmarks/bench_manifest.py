"""Benchmark: manifest build time of the CheXpert and PadChest adapters at full real size.

Why: the original code filtered DataFrames per row (O(N^2)) and globbed per image; the
adapters must turn a 223,414-row CheXpert ``train.csv`` and a 160,000-row PadChest CSV into
manifests in seconds. This script writes both CSVs (realistic value distributions, taken from
the counts in shared/reference/cxr_formats.md) into a temp dir and times ``build_manifest``
(CSV read, filters, label policy, split, ``finalize`` checks), median of ``--repeats``.

Images: by default none are written and the adapters run with ``check_images: false`` (and
PadChest ``layout: subfolders``), i.e. no filesystem access beyond the CSV. With
``--with-files`` an empty file is created for every PadChest row (160k, in 50 ``ImageDir``
folders) and CheXpert row (223k, in patient/study folders) first, and the default options are
timed too: CheXpert's sampled existence check and PadChest's one-walk ``layout: auto`` index.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from privdom_ray.domains import build_manifest, make_options  # noqa: E402

COMMAND = "uv run python benchmarks/bench_manifest.py"

CHEXPERT_ROWS = 223_414
CHEXPERT_PATIENTS = 64_540
PADCHEST_ROWS = 160_000
PADCHEST_PATIENTS = 67_000

# (1.0, 0.0, -1.0, blank) counts per target column, from the real train.csv
CHEXPERT_COUNTS = {
    "Cardiomegaly": (27_000, 11_116, 8_087, 177_211),
    "Pleural Effusion": (86_187, 35_396, 11_628, 90_203),
    "Pneumonia": (6_039, 2_799, 18_770, 195_806),
    "Atelectasis": (33_376, 1_328, 33_739, 154_971),
}
CHEXPERT_COLUMNS = [
    "Path",
    "Sex",
    "Age",
    "Frontal/Lateral",
    "AP/PA",
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]


def _choice(rng: np.random.Generator, values: list, counts: tuple, n: int) -> np.ndarray:
    p = np.asarray(counts, dtype=float)
    return rng.choice(np.asarray(values, dtype=object), size=n, p=p / p.sum())


def write_chexpert(folder: Path, rng: np.random.Generator) -> Path:
    n = CHEXPERT_ROWS
    patient = np.sort(rng.integers(1, CHEXPERT_PATIENTS + 1, size=n))
    first = np.searchsorted(patient, patient)  # index of each patient's first row
    j = np.arange(n) - first  # row number within the patient
    lateral = rng.random(n) < 32_387 / n
    study = j // 2 + 1
    view = np.where(lateral, "view2_lateral.jpg", "view1_frontal.jpg")
    paths = [
        f"CheXpert-v1.0-small/train/patient{p:05d}/study{s}/{v}"
        for p, s, v in zip(patient, study, view, strict=True)
    ]
    df = pd.DataFrame({"Path": paths})
    df["Sex"] = _choice(rng, ["Male", "Female", "Unknown"], (132_636, 90_777, 1), n)
    age = rng.integers(18, 91, size=n)
    age[rng.choice(n, 3, replace=False)] = 0
    df["Age"] = age
    df["Frontal/Lateral"] = np.where(lateral, "Lateral", "Frontal")
    appa = _choice(rng, ["AP", "PA", "LL", "RL"], (161_590, 29_420, 16, 1), n)
    df["AP/PA"] = np.where(lateral, "", appa)
    for column in CHEXPERT_COLUMNS[5:]:
        counts = CHEXPERT_COUNTS.get(column, (20_000, 10_000, 5_000, 188_414))
        df[column] = _choice(rng, ["1.0", "0.0", "-1.0", ""], counts, n)
    no_finding = (df[list(CHEXPERT_COUNTS)] != "1.0").all(axis=1) & (rng.random(n) < 0.4)
    df["No Finding"] = np.where(no_finding, "1.0", "")
    path = folder / "CheXpert-v1.0-small" / "train.csv"
    path.parent.mkdir(parents=True)
    df.to_csv(path, index=False)
    return path


PADCHEST_HEADER = [
    "ImageID",
    "ImageDir",
    "StudyDate_DICOM",
    "StudyID",
    "PatientID",
    "PatientBirth",
    "PatientSex_DICOM",
    "ViewPosition_DICOM",
    "Projection",
    "MethodProjection",
    "Pediatric",
    "Modality_DICOM",
    "Manufacturer_DICOM",
    "PhotometricInterpretation_DICOM",
    "PixelRepresentation_DICOM",
    "PixelAspectRatio_DICOM",
    "SpatialResolution_DICOM",
    "BitsStored_DICOM",
    "WindowCenter_DICOM",
    "WindowWidth_DICOM",
    "Rows_DICOM",
    "Columns_DICOM",
    "XRayTubeCurrent_DICOM",
    "Exposure_DICOM",
    "ExposureInuAs_DICOM",
    "ExposureTime",
    "RelativeXRayExposure_DICOM",
    "ReportID",
    "Report",
    "MethodLabel",
    "Labels",
    "Localizations",
    "LabelsLocalizationsBySentence",
    "labelCUIS",
    "LocalizationsCUIS",
]
PADCHEST_VOCAB = [
    "pleural effusion",
    "cardiomegaly",
    "pneumonia",
    "atelectasis",
    "laminar atelectasis",
    "loculated pleural effusion",
    "atypical pneumonia",
    "pericardial effusion",
    "abnormal foreign body",
    "aortic elongation",
    "scoliosis",
    "chronic changes",
    "copd signs",
    "interstitial pattern",
    "alveolar pattern",
    "nodule",
    "kyphosis",
    "pseudonodule",
    "apical pleural thickening",
    "vascular hilar enlargement",
    "hiatal hernia",
    "costophrenic angle blunting",
    "callus rib fracture",
    "air trapping",
    "infiltrates",
    "volume loss",
    "bronchiectasis",
    "hilar enlargement",
    "granuloma",
    "calcified granuloma",
    "heart insufficiency",
    "central venous catheter",
    "pacemaker",
    "sternotomy",
    "suture material",
    "emphysema",
    "fibrotic band",
    "tracheal shift",
    "hemidiaphragm elevation",
    "mediastinal enlargement",
    "lobar atelectasis",
    "round atelectasis",
    "segmental atelectasis",
    "total atelectasis",
    "atelectasis basal",
    "loculated fissural effusion",
    "suboptimal study",
    "exclude",
]


def write_padchest(folder: Path, rng: np.random.Generator) -> Path:
    n = PADCHEST_ROWS
    labels = []
    for r in rng.random(n):
        if r < 0.003:
            labels.append(np.nan)
        elif r < 0.35:
            labels.append("['normal']")
        else:
            k = 1 + int(r * 10) % 4
            items = [PADCHEST_VOCAB[i] for i in rng.integers(0, len(PADCHEST_VOCAB), size=k)]
            labels.append(repr([(" " + s if len(s) % 5 == 0 else s) for s in items]))
    patient = rng.integers(0, PADCHEST_PATIENTS, size=n)
    birth = rng.integers(1920, 2015, size=n).astype(float)
    birth[rng.random(n) < 0.01] = np.nan
    sex = _choice(rng, ["M", "F", np.nan], (80_000, 79_900, 100), n)
    projection = _choice(
        rng,
        ["PA", "L", "AP", "AP_horizontal", "COSTAL", "UNK", "EXCLUDE"],
        (96_000, 50_000, 4_000, 9_000, 500, 400, 100),
        n,
    )
    df = pd.DataFrame(
        {
            "ImageID": [
                f"{216840111366964013829543166512013338135747880 + i}_{i % 997:03d}-{i % 89:03d}.png"
                for i in range(n)
            ],
            "ImageDir": rng.integers(0, 50, size=n),
            "StudyDate_DICOM": rng.integers(2009, 2018, size=n) * 10000 + 101,
            "StudyID": [f"2053668664013634823614867989145588{p:06d}" for p in patient],
            "PatientID": [f"8398021839173587654219876542341987{p:06d}" for p in patient],
            "PatientBirth": birth,
            "PatientSex_DICOM": sex,
            "ViewPosition_DICOM": "POSTEROANTERIOR",
            "Projection": projection,
            "MethodProjection": "Manual review of DICOM fields",
            "Pediatric": np.where(birth > 2005, "Yes", "No"),
        }
    )
    for column in PADCHEST_HEADER[len(df.columns) :]:
        df[column] = "None"
    df["BitsStored_DICOM"] = 12
    df["Rows_DICOM"], df["Columns_DICOM"] = 2000, 2000
    df["Report"] = " sin hallazg patolog edad pacient ."
    df["MethodLabel"] = np.where(rng.random(n) < 0.27, "Physician", "RNN_model")
    df["Labels"] = labels
    df["Localizations"] = "[]"
    df["LabelsLocalizationsBySentence"] = "[['normal'], ['normal']]"
    folder.mkdir(parents=True)
    path = folder / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    df[PADCHEST_HEADER].to_csv(path, index=True)  # leading unnamed index column, as the real file
    return path


def touch_images(root: Path, rels: pd.Series) -> None:
    for folder in sorted(set(rels.str.rsplit("/", n=1).str[0])):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for rel in rels:
        open(root / rel, "wb").close()  # noqa: SIM115 - fastest empty file


def time_build(kind: str, root: Path, options: dict, repeats: int) -> tuple[float, int]:
    opts = make_options(kind, options)
    times, rows = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        rows = len(build_manifest(kind, root, opts))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--with-files", action="store_true", help="create empty image files too")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    with tempfile.TemporaryDirectory(prefix="bench_manifest_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        chexpert_csv = write_chexpert(tmp / "chexpert", rng)
        padchest_csv = write_padchest(tmp / "padchest", rng)
        generated = time.perf_counter() - t0
        cases = [
            ("chexpert", chexpert_csv.parent, {"check_images": False}, CHEXPERT_ROWS),
            (
                "chexpert",
                chexpert_csv.parent,
                {"check_images": False, "uncertain": "mask", "blank": "mask"},
                CHEXPERT_ROWS,
            ),
            (
                "padchest",
                padchest_csv.parent,
                {"layout": "subfolders", "check_images": False},
                PADCHEST_ROWS,
            ),
        ]
        if args.with_files:
            t1 = time.perf_counter()
            chex = pd.read_csv(chexpert_csv, usecols=["Path"])["Path"].str.split("/", n=1).str[1]
            touch_images(chexpert_csv.parent, chex)
            pad = pd.read_csv(padchest_csv, usecols=["ImageID", "ImageDir"], dtype=str)
            touch_images(padchest_csv.parent, pad["ImageDir"] + "/" + pad["ImageID"])
            print(
                f"created {len(chex) + len(pad)} empty image files in {time.perf_counter() - t1:.1f} s"
            )
            cases += [
                ("chexpert", chexpert_csv.parent, {}, CHEXPERT_ROWS),
                ("padchest", padchest_csv.parent, {}, PADCHEST_ROWS),
            ]

        print(
            f"Reproduce: `{COMMAND}{' --with-files' if args.with_files else ''}` "
            f"(CSV generation: {generated:.1f} s, not timed; median of {args.repeats})\n"
        )
        print("| kind | options | CSV rows | manifest rows | seconds | CSV rows/s |")
        print("|---|---|---:|---:|---:|---:|")
        for kind, root, options, n in cases:
            seconds, rows = time_build(kind, root, options, args.repeats)
            shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
            print(f"| {kind} | {shown} | {n:,} | {rows:,} | {seconds:.2f} | {n / seconds:,.0f} |")


if __name__ == "__main__":
    main()
