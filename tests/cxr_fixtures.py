"""Small datasets in the EXACT on-disk formats of the real chest-radiograph datasets.

Each ``write_<kind>(root, ...)`` writes one dataset under ``root`` and returns the folder to
give the ``<kind>`` adapter as its root. Formats follow ``shared/reference/cxr_formats.md``
("Fixture recommendation"): exact headers and value codes, NIH's headerless split lists and
the trailing-comma 2017 CSV, PadChest's leading index column, stringified label lists and
16-bit PNGs (max 4095 and max 65535), VinDr DICOMs (12 bits stored, MONOCHROME1/2, odd sex and
age tags) with three radiologists per training image, MIMIC's study-level labels joined to
image-level metadata with a ``validate`` split.

Images are tiny (40-64 px, some non-square) and carry a bright disk when the image's first
positive label is set, so a model can learn something in a few steps. Every fixture has
enough patients for non-empty train/val/test splits and positives and negatives of most
labels in train.

``broken=True`` makes exactly two images that the default options keep unusable:
``BROKEN_MISSING`` (listed, deleted from disk) and ``BROKEN_TRUNCATED`` (cut to a fraction of
its bytes, so decoding raises); both are counted in the returned folder's image list.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

BROKEN_MISSING = 1  # images deleted from disk when broken=True
BROKEN_TRUNCATED = 1  # images truncated when broken=True

# ----------------------------------------------------------------------------- pixels


def pixels(rng: np.random.Generator, h: int, w: int, signal: bool, maxval: int) -> np.ndarray:
    """A smooth gradient, noise, and (if ``signal``) a bright central disk, scaled to maxval."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = 0.3 + 0.3 * (yy / max(h - 1, 1)) + 0.1 * (xx / max(w - 1, 1))
    img += rng.normal(0.0, 0.05, size=(h, w))
    if signal:
        r = min(h, w) / 4.0
        img[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < r * r] += 0.4
    img = np.clip(img, 0.0, None)
    img = img / img.max() * maxval
    return np.rint(img).astype(np.int64)


def save_png8(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)  # mode L


def save_png16(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint16)).save(path)  # mode I;16


def save_jpeg(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, quality=95)  # 8-bit grayscale JPEG


def save_dicom(
    path: Path,
    arr: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    sex: str | None = None,
    age: str | None = None,
    bits_stored: int = 12,
) -> None:
    """An uncompressed 16-bit-container DICOM (SecondaryCapture, ExplicitVRLittleEndian).

    ``arr`` holds the values as displayed with MONOCHROME2; for MONOCHROME1 they are stored
    inverted (``2**bits_stored - 1 - arr``), so a correct decoder recovers ``arr``.
    ``sex``/``age`` None leave the tag out; "" writes it empty.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    stored = arr.astype(np.int64)
    if photometric == "MONOCHROME1":
        stored = (2**bits_stored - 1) - stored
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if sex is not None:
        ds.PatientSex = sex
    if age is not None:
        ds.PatientAge = age
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = stored.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def break_images(missing: Path, truncated: Path) -> None:
    """Delete one listed image and truncate another (decoding it must raise)."""
    missing.unlink()
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])


def _fmt(value: float | str | None) -> str:
    """CheXpert-labeler cell: 1.0 / 0.0 / -1.0 / blank."""
    if value is None or value == "":
        return ""
    return f"{float(value):.1f}"


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        path.write_text(text)


# ----------------------------------------------------------------------------- CheXpert

CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
    "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
    "Pleural Effusion,Pleural Other,Fracture,Support Devices"
)
CHEXPERT_FINDINGS = CHEXPERT_HEADER.split(",")[6:]  # the 13 findings after No Finding
# the two rows quoted in the spec, verbatim
CHEXPERT_SPEC_ROWS = (
    "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0",
    "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,",
)


def write_chexpert(
    root: Path, *, n_patients: int = 44, broken: bool = False, seed: int = 0
) -> Path:
    """``root/CheXpert-v1.0-small/{train,valid}.csv`` + JPEGs; returns that folder.

    Covers 1.0/0.0/-1.0/blank, Frontal AP/PA, Frontal LL, Lateral (blank AP/PA), Sex
    Male/Female/Unknown and Age 0 (patient00003). valid.csv has only 0/1 values.
    """
    rng = np.random.default_rng(seed)
    top = root / "CheXpert-v1.0-small"
    rows = list(CHEXPERT_SPEC_ROWS)
    for p in range(3, n_patients + 1):
        sex = "Unknown" if p == 4 else ("Male" if rng.random() < 0.55 else "Female")
        age = 0 if p == 3 else int(rng.integers(18, 91))
        for study in range(1, 3 if p % 3 == 0 else 2):
            values = {}
            for name in CHEXPERT_FINDINGS:
                values[name] = rng.choice(["1.0", "0.0", "-1.0", ""], p=[0.3, 0.25, 0.15, 0.3])
            target = ("Cardiomegaly", "Pleural Effusion", "Pneumonia", "Atelectasis")
            healthy = (
                "1.0" if all(values[t] != "1.0" for t in target) and rng.random() < 0.6 else ""
            )
            view = "PA" if rng.random() < 0.4 else "AP"
            if p == 7 and study == 1:
                view = "LL"  # a frontal image whose AP/PA says LL (16 such rows in the real file)
            cells = [_fmt(v) for v in values.values()]
            base = f"CheXpert-v1.0-small/train/patient{p:05d}/study{study}"
            rows.append(
                f"{base}/view1_frontal.jpg,{sex},{age},Frontal,{view},{healthy}," + ",".join(cells)
            )
            if p % 4 == 3:  # a lateral view of the same study
                rows.append(
                    f"{base}/view2_lateral.jpg,{sex},{age},Lateral,,{healthy}," + ",".join(cells)
                )
    _write_text(top / "train.csv", CHEXPERT_HEADER + "\n" + "\n".join(rows) + "\n")

    valid = []
    for p in range(64541, 64551):
        cells = [_fmt(rng.choice(["1.0", "0.0"], p=[0.3, 0.7])) for _ in CHEXPERT_FINDINGS]
        healthy = "1.0" if all(c == "0.0" for c in cells) else "0.0"
        sex = "Male" if p % 2 else "Female"
        valid.append(
            f"CheXpert-v1.0-small/valid/patient{p}/study1/view1_frontal.jpg,{sex},{40 + p % 40},"
            f"Frontal,PA,{healthy}," + ",".join(cells)
        )
    _write_text(top / "valid.csv", CHEXPERT_HEADER + "\n" + "\n".join(valid) + "\n")

    header = CHEXPERT_HEADER.split(",")
    frontal = []
    for line in rows + valid:
        cells = line.split(",")
        rel = cells[0].split("/", 1)[1]
        h, w = (64, 52) if "lateral" in rel else (56, 48)
        signal = cells[header.index("Cardiomegaly")] == "1.0"
        save_jpeg(top / rel, pixels(rng, h, w, signal, 255))
        if cells[3] == "Frontal" and cells[4] in ("AP", "PA") and rel.startswith("train/"):
            frontal.append(top / rel)
    if broken:
        break_images(frontal[-1], frontal[-2])
    return top


# ----------------------------------------------------------------------------- ChestX-ray14

NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
NIH_TOKENS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)
NIH_TARGETS = ("Cardiomegaly", "Effusion", "Pneumonia", "Atelectasis")


def nih_test_patient(pid: int) -> bool:
    """Patients whose images go to test_list.txt (the rest to train_val_list.txt)."""
    return pid % 4 == 0


def write_chestxray14(
    root: Path,
    *,
    variant: str = "v2020",
    layout: str = "kaggle",
    n_patients: int = 36,
    broken: bool = False,
    seed: int = 1,
) -> Path:
    """Data_Entry CSV (``v2020``, or ``2017`` with a trailing comma on every line, ages like
    ``058Y`` and one age of 414), headerless split lists, 8-bit PNGs in ``images_00X/images/``
    (``kaggle``) or a flat ``images/`` (``flat``). Returns ``root``.

    Patient 1 has the spec's two rows (57 y, Cardiomegaly | Cardiomegaly|Emphysema); patient 2
    has one image aged 0 (v2020) or 414 (2017).
    """
    if variant not in ("v2020", "2017") or layout not in ("kaggle", "flat"):
        raise ValueError(f"variant {variant!r} / layout {layout!r}")
    rng = np.random.default_rng(seed)
    rows, train, test = [], [], []
    for pid in range(1, n_patients + 1):
        sex = "M" if rng.random() < 0.55 else "F"
        base_age = int(rng.integers(20, 85))
        for follow in range(1 + int(rng.integers(0, 3))):
            name = f"{pid:08d}_{follow:03d}.png"
            if pid == 1:
                labels, age, sex = (
                    ("Cardiomegaly", "Cardiomegaly|Emphysema", "Cardiomegaly")[follow % 3],
                    57 + follow,
                    "M",
                )
            elif rng.random() < 0.35:
                labels, age = "No Finding", base_age + follow
            else:
                k = int(rng.integers(1, 4))
                pool = list(NIH_TARGETS) * 2 + list(NIH_TOKENS)
                picks = sorted(set(rng.choice(pool, size=k)))
                labels, age = "|".join(picks), base_age + follow
            if pid == 2 and follow == 0:
                age = 0 if variant == "v2020" else 414
            view = "PA" if rng.random() < 0.6 else "AP"
            kaggle_style = variant == "2017" and pid % 3 == 0  # ages like "058Y"
            age_text = f"{age:03d}Y" if kaggle_style else str(age)
            rows.append(
                f"{name},{labels},{follow},{pid},{age_text},{sex},{view},2682,2749,"
                "0.14300000000000002,0.14300000000000002"
            )
            (test if nih_test_patient(pid) else train).append(name)
            folder = (
                f"images_{1 + (pid > n_patients // 2):03d}/images"
                if layout == "kaggle"
                else "images"
            )
            signal = any(t in labels.split("|") for t in NIH_TARGETS[:1])
            save_png8(root / folder / name, pixels(rng, 64, 64, signal, 255))
    if variant == "2017":
        text = NIH_HEADER + ",\n" + "".join(r + ",\n" for r in rows)
        _write_text(root / "Data_Entry_2017.csv", text)
    else:
        _write_text(root / "Data_Entry_2017_v2020.csv", NIH_HEADER + "\n" + "\n".join(rows) + "\n")
    _write_text(root / "train_val_list.txt", "\n".join(train) + "\n")
    _write_text(root / "test_list.txt", "\n".join(test) + "\n")
    if broken:
        files = sorted(root.glob("**/*.png"))
        break_images(files[-1], files[-2])
    return root


# ----------------------------------------------------------------------------- PadChest

PADCHEST_COLUMNS = [
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
# (Labels cell, expected [cardiomegaly, pleural_effusion, pneumonia, atelectasis, healthy]);
# None = the row is dropped (NaN Labels)
PADCHEST_CASES: tuple[tuple[str | None, tuple[float, ...] | None], ...] = (
    ("['normal']", (0, 0, 0, 0, 1)),
    ("['pleural effusion', ' cardiomegaly']", (1, 1, 0, 0, 0)),
    ("['abnormal foreign body']", (0, 0, 0, 0, 0)),
    ("['']", (0, 0, 0, 0, 0)),
    ("['atypical pneumonia', 'laminar atelectasis']", (0, 0, 1, 1, 0)),
    (None, None),
    ("['pericardial effusion']", (0, 0, 0, 0, 0)),
    ("['loculated pleural effusion', 'atelectasis basal']", (0, 1, 0, 1, 0)),
    ("['loculated fissural effusion']", (0, 0, 0, 0, 0)),
    ("[' pneumonia', 'Cardiomegaly ', '']", (1, 0, 1, 0, 0)),
    ("['suboptimal study', 'normal']", (0, 0, 0, 0, 1)),
    ("['exclude']", (0, 0, 0, 0, 0)),
    ("['normal', 'abnormal foreign body']", (0, 0, 0, 0, 1)),
    ("[]", (0, 0, 0, 0, 0)),
)
PADCHEST_POOL = (
    "cardiomegaly",
    "pleural effusion",
    "pneumonia",
    "atelectasis",
    "laminar atelectasis",
    "aortic elongation",
    "scoliosis",
    "chronic changes",
    "pericardial effusion",
    "nodule",
    "abnormal foreign body",
    "copd signs",
    "interstitial pattern",
    "alveolar pattern",
)


def padchest_image_id(i: int) -> str:
    """Both real ImageID styles: ``<digits>_<dd-ddd-ddd>.png`` and ``<digits>_<6 chars>.png``."""
    digits = str(216840111366964013829543166512013338135747880 + 7919 * i)
    if i % 2:
        return f"{digits}_02-{94 + i % 5:03d}-{100 + i:03d}.png"
    return f"{digits[:39]}_{np.base_repr(1000003 * (i + 11), 36).lower()[-6:]:0>6}.png"


def write_padchest(
    root: Path,
    *,
    n_random: int = 56,
    layout: str = "subfolders",
    gz: bool = False,
    broken: bool = False,
    seed: int = 2,
) -> Path:
    """The 160K label CSV (leading unnamed index column, the verified real header) + 16-bit
    PNGs (mode I;16, alternately max 4095 and max 65535) in ``<ImageDir>/`` folders
    (``subfolders``) or flat (``flat``). The first rows are ``PADCHEST_CASES`` (all PA, one
    patient each); then ``n_random`` random rows over ~30 patients with projections PA, AP,
    AP_horizontal and L. Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    records = []
    n_cases = len(PADCHEST_CASES)
    for i in range(n_cases + n_random):
        if i < n_cases:
            labels = PADCHEST_CASES[i][0]
            patient, projection = 1000 + i, "PA"
        else:
            patient = 2000 + int(rng.integers(0, 40))
            projection = rng.choice(["PA", "PA", "AP", "AP_horizontal", "L"])
            if rng.random() < 0.3:
                labels = "['normal']"
            else:
                pool = PADCHEST_POOL[:4] * 2 + PADCHEST_POOL  # the four targets more often
                items = sorted(set(rng.choice(pool, size=int(rng.integers(1, 4)))))
                labels = repr([(" " + str(s) if rng.random() < 0.2 else str(s)) for s in items])
        birth = np.nan if i == 3 else float(rng.integers(1925, 2000))
        sex = np.nan if i == 4 else ("M" if rng.random() < 0.5 else "F")
        view = {
            "PA": "POSTEROANTERIOR",
            "AP": "ANTEROPOSTERIOR",
            "AP_horizontal": "ANTEROPOSTERIOR",
            "L": "LATERAL",
        }[projection]
        records.append(
            {
                "ImageID": padchest_image_id(i),
                "ImageDir": i % 3,
                "StudyDate_DICOM": int(f"{2009 + i % 9}{1 + i % 12:02d}{1 + i % 28:02d}"),
                "StudyID": f"{20536686640136348236148679891455886468 + 31 * patient}",
                "PatientID": f"{83980218391735876542198765423419876547 + 101 * patient}",
                "PatientBirth": birth,
                "PatientSex_DICOM": sex,
                "ViewPosition_DICOM": view,
                "Projection": projection,
                "MethodProjection": "Manual review of DICOM fields",
                "Pediatric": "Yes" if birth == birth and birth > 2005 else "No",
                "Modality_DICOM": "CR",
                "Manufacturer_DICOM": "ImagingDynamicsCompanyLtd",
                "PhotometricInterpretation_DICOM": "MONOCHROME2",
                "PixelRepresentation_DICOM": 0,
                "PixelAspectRatio_DICOM": "None",
                "SpatialResolution_DICOM": "None",
                "BitsStored_DICOM": 12 if i % 2 else 16,
                "WindowCenter_DICOM": 2092,
                "WindowWidth_DICOM": 2251,
                "Rows_DICOM": 1728,
                "Columns_DICOM": 1872,
                "XRayTubeCurrent_DICOM": 250,
                "Exposure_DICOM": 2,
                "ExposureInuAs_DICOM": 2500,
                "ExposureTime": 10,
                "RelativeXRayExposure_DICOM": -1.42,
                "ReportID": 4765777 + i,
                "Report": " sin hallazg patolog edad pacient .",
                "MethodLabel": "Physician" if i % 4 == 0 else "RNN_model",
                "Labels": labels if labels is not None else np.nan,
                "Localizations": "[]",
                "LabelsLocalizationsBySentence": "[['normal'], ['normal']]",
                "labelCUIS": "[]",
                "LocalizationsCUIS": "[]",
            }
        )
    df = pd.DataFrame.from_records(records, columns=PADCHEST_COLUMNS)
    buf = io.StringIO()
    df.to_csv(buf, index=True)  # the real file's leading unnamed index column
    name = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv" + (".gz" if gz else "")
    _write_text(root / name, buf.getvalue())
    kept = []
    for i, rec in enumerate(records):
        folder = root / str(rec["ImageDir"]) if layout == "subfolders" else root
        maxval = 4095 if i % 2 else 65535
        signal = isinstance(rec["Labels"], str) and "cardiomegaly" in rec["Labels"].lower()
        shape = (48, 40) if i % 3 else (40, 40)
        path = folder / rec["ImageID"]
        save_png16(path, pixels(rng, *shape, signal, maxval))
        if rec["Projection"] != "L" and isinstance(rec["Labels"], str):
            kept.append(path)
    if broken:
        break_images(kept[-1], kept[-2])
    return root


# ----------------------------------------------------------------------------- VinDr-CXR

VINDR_FINDINGS = [
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Clavicle fracture",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Enlarged PA",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Lung cavity",
    "Lung cyst",
    "Mediastinal shift",
    "Nodule/Mass",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
    "Rib fracture",
    "Other lesion",
    "COPD",
    "Lung tumor",
    "Pneumonia",
    "Tuberculosis",
    "Other diseases",
    "No finding",
]
VINDR_TRAIN_HEADER = "image_id,rad_id," + ",".join(VINDR_FINDINGS)
VINDR_TEST_HEADER = "image_id," + ",".join(VINDR_FINDINGS).replace(
    "Other diseases", "Other disease"
)
VINDR_SEXES = ("M", "F", "O", "", None)  # None = tag missing
VINDR_AGES = ("045Y", "000Y", None, "", "062Y", "071Y")
# image 0 (train): Cardiomegaly voted by 2 of 3, Pleural effusion by 1 of 3
VINDR_SPLIT_VOTES = {"Cardiomegaly": (1, 1, 0), "Pleural effusion": (1, 0, 0)}


def vindr_image_id(i: int, part: str) -> str:
    return f"{(0x50A418190BC3FB1EF1633BF9678929B3 + 7 * i + (10**6 if part == 'test' else 0)) % 16**32:032x}"


def vindr_expected_demographics(k: int) -> tuple[str, float]:
    """(sex, age) the adapter must read from the k-th DICOM written (train then test)."""
    sex = VINDR_SEXES[k % len(VINDR_SEXES)]
    age = VINDR_AGES[k % len(VINDR_AGES)]
    return (
        sex if sex in ("M", "F") else "U",
        float(age[:3]) if age and age != "000Y" else float("nan"),
    )


def write_vindr(
    root: Path,
    *,
    n_train: int = 36,
    n_test: int = 12,
    test_rad_id: bool = False,
    broken: bool = False,
    seed: int = 3,
) -> Path:
    """``annotations/image_labels_{train,test}.csv`` + ``{train,test}/<32hex>.dicom``.

    Train: 3 rows per image (distinct rad_ids), image 0 with split votes (see
    ``VINDR_SPLIT_VOTES``). Test: one consensus row per image, ``Other disease`` spelling,
    optionally a ``rad_id`` column. DICOMs alternate MONOCHROME2/MONOCHROME1 (12 bits stored)
    and cycle PatientSex/PatientAge through ``VINDR_SEXES``/``VINDR_AGES``. Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    targets = ("Cardiomegaly", "Pleural effusion", "Pneumonia", "Atelectasis")
    train_rows, test_rows = [], []
    k = 0
    for part, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            image = vindr_image_id(i, part)
            sick = i == 0 or rng.random() < 0.7
            truth = {f: int(sick and rng.random() < 0.4) for f in targets}
            truth.update(
                {
                    f: int(sick and rng.random() < 0.03)
                    for f in VINDR_FINDINGS[:-1]
                    if f not in targets
                }
            )
            if part == "train":
                rads = rng.choice([f"R{r}" for r in range(1, 18)], size=3, replace=False)
                for j, rad in enumerate(rads):
                    vote = dict(truth)
                    for f in targets:  # one reader in five disagrees
                        if rng.random() < 0.2:
                            vote[f] = 1 - vote[f]
                    if i == 0:
                        vote.update({f: v[j] for f, v in VINDR_SPLIT_VOTES.items()})
                    vote["No finding"] = int(not any(vote[f] for f in VINDR_FINDINGS[:-1]))
                    train_rows.append(
                        f"{image},{rad}," + ",".join(str(vote[f]) for f in VINDR_FINDINGS)
                    )
            else:
                truth["No finding"] = int(not any(truth.values()))
                cells = ",".join(str(truth[f]) for f in VINDR_FINDINGS)
                test_rows.append(
                    f"{image},R{8 + i % 3},{cells}" if test_rad_id else f"{image},{cells}"
                )
            sex, age = VINDR_SEXES[k % len(VINDR_SEXES)], VINDR_AGES[k % len(VINDR_AGES)]
            photometric = "MONOCHROME1" if k % 2 else "MONOCHROME2"
            shape = (48, 40) if k % 3 else (40, 40)
            save_dicom(
                root / part / f"{image}.dicom",
                pixels(rng, *shape, bool(truth["Cardiomegaly"]), 4095),
                photometric=photometric,
                sex=sex,
                age=age,
            )
            k += 1
    test_header = (
        VINDR_TEST_HEADER.replace("image_id,", "image_id,rad_id,")
        if test_rad_id
        else VINDR_TEST_HEADER
    )
    _write_text(
        root / "annotations" / "image_labels_train.csv",
        VINDR_TRAIN_HEADER + "\n" + "\n".join(train_rows) + "\n",
    )
    _write_text(
        root / "annotations" / "image_labels_test.csv",
        test_header + "\n" + "\n".join(test_rows) + "\n",
    )
    if broken:
        files = sorted((root / "train").glob("*.dicom"))
        break_images(files[-1], files[-2])
    return root


# ----------------------------------------------------------------------------- MIMIC-CXR-JPG

MIMIC_LABEL_HEADER = (
    "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,"
    "Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,"
    "Pneumothorax,Support Devices"
)
MIMIC_METADATA_HEADER = (
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
    "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
    "PatientOrientationCodeSequence_CodeMeaning"
)
MIMIC_SPLIT_HEADER = "dicom_id,study_id,subject_id,split"
MIMIC_PATIENTS_HEADER = "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod"
# a fixed study: subject 10000032, study 50414267 (first study)
MIMIC_KNOWN_STUDY = {
    "Cardiomegaly": "-1.0",
    "Pleural Effusion": "",
    "Pneumonia": "1.0",
    "Atelectasis": "0.0",
    "No Finding": "",
}
MIMIC_KNOWN_AGE = (52, 2180)  # anchor_age, anchor_year of subject 10000032; its studies are in 2182


def mimic_split(k: int) -> str:
    """Official split of the k-th subject (patient-wise)."""
    return "test" if k % 5 == 0 else "validate" if k % 5 == 1 else "train"


def write_mimic(root: Path, *, n_subjects: int = 26, broken: bool = False, seed: int = 4) -> Path:
    """``mimic-cxr-2.0.0-{chexpert,negbio,metadata}.csv``, ``mimic-cxr-2.0.0-split.csv.gz``,
    ``hosp/patients.csv.gz`` and JPEGs at ``files/p1X/p1XXXXXXX/sXXXXXXXX/<dicom_id>.jpg``.

    Each subject has 1-2 studies; each study a PA or AP image, some a LATERAL too. One extra
    study has images but no label row. Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    head = MIMIC_LABEL_HEADER.split(",")[2:]
    labels, negbio, meta, split, patients = [], [], [], [], []
    frontal = []
    study_id = 50414267
    for k in range(n_subjects):
        subject = 10000032 if k == 0 else 10000032 + 313_717 * k  # p10..p17
        anchor_age, anchor_year = (
            MIMIC_KNOWN_AGE if k == 0 else (int(rng.integers(20, 92)), 2110 + k * 3)
        )
        gender = "F" if k % 2 == 0 else "M"
        patients.append(f"{subject},{gender},{anchor_age},{anchor_year},2014 - 2016,")
        for s in range(1 + (k % 3 == 0)):
            study_id += 1_234 + k
            values = {
                h: rng.choice(["1.0", "0.0", "-1.0", ""], p=[0.3, 0.25, 0.15, 0.3]) for h in head
            }
            if k == 0 and s == 0:
                study_id = 50414267
                values.update(MIMIC_KNOWN_STUDY)
            elif all(
                values[t] != "1.0"
                for t in ("Cardiomegaly", "Pleural Effusion", "Pneumonia", "Atelectasis")
            ):
                values["No Finding"] = "1.0" if rng.random() < 0.6 else ""
            else:
                values["No Finding"] = ""
            row = f"{subject},{study_id}," + ",".join(values[h] for h in head)
            if k != n_subjects - 1 or s != 0:  # the last subject's first study has no label row
                labels.append(row)
                negbio.append(row.replace("-1.0", "0.0"))
            date = anchor_year + 2 + s if k == 0 else anchor_year + s
            views = ["PA" if (k + s) % 3 else "AP"] + (["LATERAL"] if (k + s) % 2 == 0 else [])
            for v in views:
                dicom = "-".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, size=5))
                meaning = {
                    "PA": "postero-anterior",
                    "AP": "antero-posterior",
                    "LATERAL": "lateral",
                }[v]
                meta.append(
                    f"{dicom},{subject},{study_id},CHEST (PA AND LAT),{v},56,48,{date}0506,"
                    f"213014.531,CHEST (PA AND LAT),{meaning},Erect"
                )
                split.append(f"{dicom},{study_id},{subject},{mimic_split(k)}")
                path = (
                    root
                    / "files"
                    / f"p{str(subject)[:2]}"
                    / f"p{subject}"
                    / f"s{study_id}"
                    / f"{dicom}.jpg"
                )
                save_jpeg(path, pixels(rng, 56, 48, values["Cardiomegaly"] == "1.0", 255))
                if v != "LATERAL" and (k != n_subjects - 1 or s != 0):
                    frontal.append(path)
    _write_text(
        root / "mimic-cxr-2.0.0-chexpert.csv", MIMIC_LABEL_HEADER + "\n" + "\n".join(labels) + "\n"
    )
    _write_text(
        root / "mimic-cxr-2.0.0-negbio.csv", MIMIC_LABEL_HEADER + "\n" + "\n".join(negbio) + "\n"
    )
    _write_text(
        root / "mimic-cxr-2.0.0-metadata.csv", MIMIC_METADATA_HEADER + "\n" + "\n".join(meta) + "\n"
    )
    _write_text(
        root / "mimic-cxr-2.0.0-split.csv.gz", MIMIC_SPLIT_HEADER + "\n" + "\n".join(split) + "\n"
    )
    _write_text(
        root / "hosp" / "patients.csv.gz", MIMIC_PATIENTS_HEADER + "\n" + "\n".join(patients) + "\n"
    )
    if broken:
        break_images(frontal[-1], frontal[-2])
    return root


# ----------------------------------------------------------------------------- generic CSV site

CSV_SITE_HEADER = (
    "path,patient_id,sex,age,cardiomegaly,pleural_effusion,pneumonia,atelectasis,healthy"
)


def write_csv_site(
    root: Path,
    *,
    splits: str = "full",
    n_patients: int = 36,
    broken: bool = False,
    seed: int = 5,
) -> Path:
    """``root/labels.csv`` in the documented generic layout + images in ``images/`` (8-bit
    PNGs, 16-bit PNGs and 12-bit .dcm files). ``splits``: ``full`` (train/val/test column),
    ``train_test`` (no val) or ``none`` (no split column). Sex is written as F/M/U/female/male/
    blank, ages as numbers, ``045Y`` or blank, labels as 0/1/blank. Returns ``root``.
    """
    if splits not in ("full", "train_test", "none"):
        raise ValueError(f"splits={splits!r}")
    rng = np.random.default_rng(seed)
    sexes = ("F", "M", "female", "male", "U", "")
    rows, files = [], []
    for p in range(n_patients):
        pid = f"UKA{p:04d}"
        sex = sexes[p % len(sexes)]
        part = "test" if p % 5 == 0 else "val" if p % 5 == 1 else "train"
        if splits == "train_test" and part == "val":
            part = "train"
        for j in range(1 + (p % 4 == 0)):
            kind = ("png", "png16", "dcm")[(p + j) % 3]
            ext = "dcm" if kind == "dcm" else "png"
            rel = f"images/{pid}_{j}.{ext}"
            values = [int(rng.random() < 0.35) for _ in range(4)]
            healthy = int(not any(values))
            cells = [str(v) for v in values] + [str(healthy)]
            if p % 7 == 3:
                cells[2] = ""  # unknown pneumonia
            age = "" if p % 11 == 5 else ("045Y" if p % 11 == 6 else str(int(rng.integers(20, 90))))
            row = f"{rel},{pid},{sex},{age}," + ",".join(cells)
            rows.append(row + (f",{part}" if splits != "none" else ""))
            arr = pixels(
                rng, 48, 40, bool(values[0]), {"png": 255, "png16": 65535, "dcm": 4095}[kind]
            )
            path = root / rel
            if kind == "png":
                save_png8(path, arr)
            elif kind == "png16":
                save_png16(path, arr)
            else:
                save_dicom(path, arr, photometric="MONOCHROME2")
            files.append(path)
    header = CSV_SITE_HEADER + (",split" if splits != "none" else "")
    _write_text(root / "labels.csv", header + "\n" + "\n".join(rows) + "\n")
    if broken:
        pngs = [f for f in files if f.suffix == ".png"]
        break_images(pngs[-1], pngs[-2])
    return root


WRITERS = {
    "chexpert": write_chexpert,
    "chestxray14": write_chestxray14,
    "padchest": write_padchest,
    "vindr": write_vindr,
    "mimic": write_mimic,
    "csv": write_csv_site,
}
