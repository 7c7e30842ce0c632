"""Real-format adapters on exact-format fixtures (tests/cxr_fixtures.py): mappings, policies,
filters, splits, demographics and user-facing errors. No mocks."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import cxr_fixtures as fx
import numpy as np
import pandas as pd
import pytest

from privdom_ray.domains import REGISTRY, build_manifest, make_options
from privdom_ray.domains._summary import summarize
from privdom_ray.manifest import COLUMNS, LABELS, ManifestError

REAL_KINDS = ("chexpert", "chestxray14", "padchest", "vindr", "mimic", "csv")
NAN = float("nan")


def build(kind: str, root: Path, **options) -> pd.DataFrame:
    return build_manifest(kind, root, make_options(kind, options))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def assert_patient_wise(m: pd.DataFrame) -> None:
    assert (m.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(m["split"]) == {"train", "val", "test"}, m["split"].value_counts()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cxr")
    return {
        "chexpert": fx.write_chexpert(base / "chexpert"),
        "chestxray14": fx.write_chestxray14(base / "nih"),
        "nih2017": fx.write_chestxray14(base / "nih2017", variant="2017", layout="flat"),
        "padchest": fx.write_padchest(base / "padchest"),
        "vindr": fx.write_vindr(base / "vindr"),
        "mimic": fx.write_mimic(base / "mimic"),
        "csv": fx.write_csv_site(base / "csv"),
    }


# ----------------------------------------------------------------------------- all kinds


@pytest.mark.parametrize("kind", REAL_KINDS)
def test_every_kind_builds_a_valid_patient_wise_manifest(kind, data):
    m = build(kind, data[kind])
    assert list(m.columns) == list(COLUMNS)
    assert_patient_wise(m)
    assert m["path"].map(lambda p: Path(p).is_absolute() and Path(p).is_file()).all()
    assert set(m["sex"]) <= {"F", "M", "U"}
    values = m[list(LABELS)].to_numpy()
    assert np.isin(values[~np.isnan(values)], [0.0, 1.0]).all()
    # deterministic: the split is a property of the data, not of a run
    pd.testing.assert_frame_equal(m, build(kind, data[kind]))


def test_registry_and_option_validation():
    assert set(REAL_KINDS) <= set(REGISTRY)
    for kind in REAL_KINDS:
        make_options(kind, {})  # defaults are valid
    with pytest.raises(ValueError, match=r"uncertain='maybe'.*zeros.*ones.*mask"):
        make_options("chexpert", {"uncertain": "maybe"})
    with pytest.raises(ValueError, match=r"aggregation='all'.*majority.*any"):
        make_options("vindr", {"aggregation": "all"})
    with pytest.raises(ValueError, match=r"projections.*'SIDE'.*AP_horizontal"):
        make_options("padchest", {"projections": ["PA", "side"]})
    with pytest.raises(ValueError, match=r"blank='ones'"):
        make_options("csv", {"blank": "ones"})
    with pytest.raises(TypeError):
        make_options("mimic", {"no_such_option": 1})
    opts = make_options("padchest", {"projections": ["pa", "ap_horizontal"]})
    assert opts.projections == ("PA", "AP_horizontal")  # YAML list -> canonical tuple
    assert make_options("chexpert", {"views": "pa"}).views == ("PA",)


def test_no_image_on_disk_is_an_error_but_missing_ones_are_not(data, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(data["chexpert"] / "train.csv", bare / "train.csv")
    with pytest.raises(ManifestError, match="none of the .* images listed in .*train.csv"):
        build("chexpert", bare)
    assert len(build("chexpert", bare, check_images=False)) > 0

    broken = fx.write_chexpert(tmp_path / "broken", broken=True)
    m = build("chexpert", broken)
    exists = m["path"].map(lambda p: Path(p).is_file())
    assert (~exists).sum() == fx.BROKEN_MISSING  # listed, kept, left to the decode stage
    assert len(m) == len(build("chexpert", data["chexpert"]))


# ----------------------------------------------------------------------------- CheXpert

CHEXPERT_COLUMNS = {
    "cardiomegaly": "Cardiomegaly",
    "pleural_effusion": "Pleural Effusion",
    "pneumonia": "Pneumonia",
    "atelectasis": "Atelectasis",
    "healthy": "No Finding",
}


def chexpert_expected(row: pd.Series, uncertain: str, blank: str) -> dict[str, float]:
    """Row-by-row reference of the policy (independent of the vectorised adapter)."""
    out = {}
    for label, column in CHEXPERT_COLUMNS.items():
        v = row[column]
        if v == 1.0:
            out[label] = 1.0
        elif v == 0.0:
            out[label] = 0.0
        elif v == -1.0:
            out[label] = {"zeros": 0.0, "ones": 1.0, "mask": NAN}[uncertain]
        elif label == "healthy" or blank == "zeros" or row["No Finding"] == 1.0:
            out[label] = 0.0
        else:
            out[label] = NAN
    return out


@pytest.mark.parametrize("uncertain", ["zeros", "ones", "mask"])
@pytest.mark.parametrize("blank", ["zeros", "mask"])
def test_chexpert_uncertainty_and_blank_policies(data, uncertain, blank):
    top = data["chexpert"]
    m = build("chexpert", top, uncertain=uncertain, blank=blank).set_index("path")
    raw = pd.read_csv(top / "train.csv")
    raw = raw[(raw["Frontal/Lateral"] == "Frontal") & raw["AP/PA"].isin(["AP", "PA"])]
    assert len(m) == len(raw)
    for _, row in raw.iterrows():
        got = m.loc[str(top / row["Path"].split("/", 1)[1])]
        for label, value in chexpert_expected(row, uncertain, blank).items():
            assert same(float(got[label]), value), (row["Path"], label, uncertain, blank)


def test_chexpert_spec_rows_views_and_demographics(data):
    top = data["chexpert"]
    m = build("chexpert", top)
    p1 = m[m["patient_id"] == "patient00001"].iloc[0]
    assert (p1["sex"], p1["age"], p1["healthy"], p1["pleural_effusion"]) == ("F", 68.0, 1.0, 0.0)
    p2 = build("chexpert", top, uncertain="ones").set_index("patient_id").loc["patient00002"]
    # -1.0 Cardiomegaly/Effusion/Atelectasis, blank Pneumonia and No Finding
    assert [p2[label] for label in LABELS] == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert m.loc[m["patient_id"] == "patient00004", "sex"].eq("U").all()  # Sex "Unknown"
    assert m.loc[m["patient_id"] == "patient00003", "age"].isna().all()  # Age 0 = missing
    assert not m["path"].str.contains("lateral").any()
    raw = pd.read_csv(top / "train.csv")
    frontal = raw["Frontal/Lateral"] == "Frontal"
    assert (raw["AP/PA"] == "LL").any() and len(m) == (
        frontal & raw["AP/PA"].isin(["AP", "PA"])
    ).sum()
    pa = build("chexpert", top, views=["PA"])
    assert len(pa) == (frontal & (raw["AP/PA"] == "PA")).sum()
    with_lat = build("chexpert", top, views=["PA", "AP", "LATERAL"])
    assert (
        with_lat["path"].str.contains("lateral").sum()
        == (raw["Frontal/Lateral"] == "Lateral").sum()
    )
    # the parent folder of CheXpert-v1.0-small works as root too
    assert build("chexpert", top.parent)["path"].tolist() == m["path"].tolist()


def test_chexpert_splits(data):
    top = data["chexpert"]
    hashed = build("chexpert", top)
    assert not hashed["patient_id"].str.startswith("patient645").any()  # valid.csv unused
    official = build("chexpert", top, split="official")
    assert_patient_wise(official)
    valid = official["path"].str.contains("/valid/")
    assert (official.loc[valid, "split"] == "test").all() and valid.sum() == 10
    assert set(official.loc[~valid, "split"]) == {"train", "val"}


def test_chexpert_file_errors_name_file_and_column(data, tmp_path):
    with pytest.raises(ManifestError, match=r"train\.csv not found.*Fix"):
        build("chexpert", tmp_path)
    broken = tmp_path / "cx"
    shutil.copytree(data["chexpert"], broken)
    raw = pd.read_csv(broken / "train.csv")
    raw.drop(columns=["Pleural Effusion"]).to_csv(broken / "train.csv", index=False)
    with pytest.raises(
        ManifestError, match=r"train\.csv: missing required column\(s\) \['Pleural Effusion'\]"
    ):
        build("chexpert", broken)
    (broken / "valid.csv").unlink()
    raw.to_csv(broken / "train.csv", index=False)
    with pytest.raises(ManifestError, match=r"valid\.csv not found.*split: hash"):
        build("chexpert", broken, split="official")


# ----------------------------------------------------------------------------- ChestX-ray14

NIH_TOKEN = {
    "cardiomegaly": "Cardiomegaly",
    "pleural_effusion": "Effusion",
    "pneumonia": "Pneumonia",
    "atelectasis": "Atelectasis",
    "healthy": "No Finding",
}


def test_nih_labels_official_split_and_layouts(data):
    root = data["chestxray14"]
    m = build("chestxray14", root)
    raw = pd.read_csv(root / "Data_Entry_2017_v2020.csv")
    assert len(m) == len(raw)
    m = m.assign(name=m["path"].map(lambda p: Path(p).name)).set_index("name")
    for _, row in raw.iterrows():
        tokens = row["Finding Labels"].split("|")
        for label, token in NIH_TOKEN.items():
            assert m.loc[row["Image Index"], label] == float(token in tokens)
    assert m.loc["00000001_000.png", "age"] == 57.0 and m.loc["00000001_000.png", "sex"] == "M"
    assert m.loc["00000002_000.png", "age"] == 0.0  # v2020 has age-0 images; kept
    test_names = set((root / "test_list.txt").read_text().split())
    assert (m.loc[m.index.isin(test_names), "split"] == "test").all()
    assert set(m.loc[~m.index.isin(test_names), "split"]) == {"train", "val"}  # val carved
    assert_patient_wise(m.reset_index())
    assert m["path"].str.contains(r"/images_00[12]/images/").all()  # Kaggle layout found
    assert len(build("chestxray14", root, views=["PA"])) == (raw["View Position"] == "PA").sum()


def test_nih_2017_variant_trailing_comma_and_odd_ages(data):
    new = build("chestxray14", data["chestxray14"]).assign(
        name=lambda d: d["path"].map(lambda p: Path(p).name)
    )
    old = build("chestxray14", data["nih2017"]).assign(
        name=lambda d: d["path"].map(lambda p: Path(p).name)
    )
    assert old["path"].str.contains(r"/nih2017/images/\d{8}_\d{3}\.png$").all()  # flat layout
    new, old = new.set_index("name"), old.set_index("name")
    assert (
        (
            old[list(LABELS) + ["split", "sex", "patient_id"]]
            == new[list(LABELS) + ["split", "sex", "patient_id"]]
        )
        .all()
        .all()
    )
    text = (data["nih2017"] / "Data_Entry_2017.csv").read_text()
    assert "414" in text and "Y," in text  # the outlier and "058Y"-style ages are in the file
    assert math.isnan(old.loc["00000002_000.png", "age"])  # 414 > 100 -> missing
    others = old.index != "00000002_000.png"
    assert (old.loc[others, "age"] == new.loc[old.index[others], "age"]).all()  # "058Y" == 58


def test_nih_split_lists_required_or_hash(data, tmp_path):
    root = tmp_path / "nih"
    shutil.copytree(data["chestxray14"], root)
    (root / "test_list.txt").unlink()
    with pytest.raises(ManifestError, match=r"test_list\.txt not found.*split: hash"):
        build("chestxray14", root)
    assert_patient_wise(build("chestxray14", root, split="hash"))


# ----------------------------------------------------------------------------- PadChest


def _padchest(m: pd.DataFrame) -> pd.DataFrame:
    return m.assign(image=m["path"].map(lambda p: Path(p).name)).set_index("image")


def test_padchest_exact_item_matching(data):
    root = data["padchest"]
    m = _padchest(build("padchest", root))
    for i, (cell, expected) in enumerate(fx.PADCHEST_CASES):
        image = fx.padchest_image_id(i)
        if expected is None:
            assert image not in m.index  # NaN Labels row dropped
            continue
        got = tuple(m.loc[image, list(LABELS)])
        assert got == expected, (cell, got)
    # 'loculated fissural effusion' counts only with the option
    fissural = _padchest(build("padchest", root, fissural_effusion=True))
    assert fissural.loc[fx.padchest_image_id(8), "pleural_effusion"] == 1.0
    # drop_excluded removes 'exclude' and 'suboptimal study' images
    kept = _padchest(build("padchest", root, drop_excluded=True))
    assert fx.padchest_image_id(10) not in kept.index and fx.padchest_image_id(11) not in kept.index
    assert len(kept) == len(m) - 2


def test_padchest_projections_demographics_and_paths(data):
    root = data["padchest"]
    raw = pd.read_csv(
        root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", low_memory=False
    )
    assert raw.columns[0].startswith("Unnamed")  # the real file's leading index column
    raw = raw[raw["Labels"].notna()].set_index("ImageID")
    m = _padchest(build("padchest", root))
    assert set(raw.loc[m.index, "Projection"]) == {"PA", "AP", "AP_horizontal"}
    assert len(m) == raw["Projection"].isin(["PA", "AP", "AP_horizontal"]).sum()
    assert len(build("padchest", root, projections=["PA"])) == (raw["Projection"] == "PA").sum()
    year = raw.loc[m.index, "StudyDate_DICOM"] // 10000
    expected_age = (year - raw.loc[m.index, "PatientBirth"]).astype(float)
    assert np.allclose(m["age"], expected_age, equal_nan=True) and m["age"].isna().sum() == 1
    sex = raw.loc[m.index, "PatientSex_DICOM"].fillna("U")
    assert (m["sex"] == sex).all() and (m["sex"] == "U").sum() == 1
    folders = m["path"].map(lambda p: Path(p).parent.name)
    assert (folders == raw.loc[m.index, "ImageDir"].astype(str)).all()  # root/<ImageDir>/<ImageID>
    assert build("padchest", root, layout="subfolders")["path"].sort_values().tolist() == sorted(
        m["path"]
    )
    with pytest.raises(ManifestError, match="none of the .* images listed"):
        build("padchest", root, layout="flat")


def test_padchest_flat_layout_and_gzip(tmp_path, data):
    root = fx.write_padchest(tmp_path / "flat", layout="flat", gz=True)
    m = build("padchest", root)
    assert (m["path"].map(lambda p: Path(p).parent) == root).all()
    assert build("padchest", root, layout="flat")["path"].tolist() == m["path"].tolist()
    ref = _padchest(build("padchest", data["padchest"]))
    columns = [*LABELS, "split", "patient_id", "sex"]
    pd.testing.assert_frame_equal(_padchest(m).loc[ref.index, columns], ref[columns])


# ----------------------------------------------------------------------------- VinDr


def test_vindr_majority_vs_any(data):
    root = data["vindr"]
    votes = pd.read_csv(root / "annotations" / "image_labels_train.csv")
    assert (votes.groupby("image_id")["rad_id"].nunique() == 3).all()
    columns = {
        "cardiomegaly": "Cardiomegaly",
        "pleural_effusion": "Pleural effusion",
        "pneumonia": "Pneumonia",
        "atelectasis": "Atelectasis",
        "healthy": "No finding",
    }
    sums = votes.groupby("image_id")[list(columns.values())].sum()
    for aggregation, threshold in (("majority", 2), ("any", 1)):
        m = build("vindr", root, aggregation=aggregation).set_index("patient_id")
        train = m[m["split"] != "test"]
        assert len(train) == len(sums)
        for label, column in columns.items():
            expected = (sums.loc[train.index, column] >= threshold).astype(float)
            assert (train[label] == expected).all(), (aggregation, label)
    first = fx.vindr_image_id(0, "train")
    majority = build("vindr", root).set_index("patient_id").loc[first]
    anyone = build("vindr", root, aggregation="any").set_index("patient_id").loc[first]
    assert majority["cardiomegaly"] == anyone["cardiomegaly"] == 1.0  # 2 of 3
    assert (majority["pleural_effusion"], anyone["pleural_effusion"]) == (0.0, 1.0)  # 1 of 3


def test_vindr_test_consensus_splits_and_dicom_demographics(data, tmp_path):
    root = data["vindr"]
    m = build("vindr", root)
    test_csv = pd.read_csv(root / "annotations" / "image_labels_test.csv").set_index("image_id")
    assert "Other disease" in test_csv.columns
    test = m[m["split"] == "test"].set_index("patient_id")
    assert sorted(test.index) == sorted(test_csv.index)
    assert (test["cardiomegaly"] == test_csv.loc[test.index, "Cardiomegaly"]).all()
    assert (test["healthy"] == test_csv.loc[test.index, "No finding"]).all()
    assert (m.loc[m["path"].str.contains("/train/"), "split"].isin(["train", "val"])).all()
    by_id = m.set_index("patient_id")
    order = [fx.vindr_image_id(i, "train") for i in range(36)] + [
        fx.vindr_image_id(i, "test") for i in range(12)
    ]
    for k, image in enumerate(order):
        sex, age = fx.vindr_expected_demographics(k)
        assert by_id.loc[image, "sex"] == sex and same(by_id.loc[image, "age"], age), k
    assert {"M", "F", "U"} == set(m["sex"]) and m["age"].isna().any() and (m["age"] == 45).any()
    plain = build("vindr", root, demographics=False)
    assert (plain["sex"] == "U").all() and plain["age"].isna().all()
    with_rad = fx.write_vindr(tmp_path / "rad", test_rad_id=True)
    pd.testing.assert_frame_equal(
        build("vindr", with_rad)[["patient_id", "split", *LABELS]],
        m[["patient_id", "split", *LABELS]],
    )


# ----------------------------------------------------------------------------- MIMIC


def test_mimic_joins_views_splits_and_policies(data):
    root = data["mimic"]
    meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv")
    labels = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv")
    m = build("mimic", root)
    dicom = m["path"].map(lambda p: Path(p).stem)
    labelled = meta.merge(labels[["subject_id", "study_id"]], on=["subject_id", "study_id"])
    frontal = labelled[labelled["ViewPosition"].isin(["PA", "AP"])]
    assert sorted(dicom) == sorted(frontal["dicom_id"])  # no LATERAL, no unlabelled study
    assert len(meta[meta["ViewPosition"].isin(["PA", "AP"])]) == len(frontal) + 1
    assert len(build("mimic", root, views=["PA", "AP", "LATERAL"])) == len(labelled)
    # official split, validate -> val, patient-wise
    subjects = sorted(m["patient_id"].astype(int).unique())
    all_subjects = sorted(meta["subject_id"].unique())
    for subject in subjects:
        expected = fx.mimic_split(all_subjects.index(subject)).replace("validate", "val")
        assert set(m.loc[m["patient_id"] == str(subject), "split"]) == {expected}
    assert_patient_wise(m)
    # files/p1X/p1XXXXXXX/sXXXXXXXX/<dicom_id>.jpg
    assert (
        m["path"]
        .str.contains(r"/files/p1\d/p1\d{7}/s5\d{7}/[0-9a-f]{8}(?:-[0-9a-f]{8}){4}\.jpg$")
        .all()
    )
    # the known study: Cardiomegaly -1, Effusion blank, Pneumonia 1, Atelectasis 0, No Finding blank
    known = m["path"].str.contains("/s50414267/")
    for options, expected in (
        ({}, [0.0, 0.0, 1.0, 0.0, 0.0]),
        ({"uncertain": "ones"}, [1.0, 0.0, 1.0, 0.0, 0.0]),
        ({"uncertain": "mask", "blank": "mask"}, [NAN, NAN, 1.0, 0.0, 0.0]),
    ):
        row = build("mimic", root, **options)[known].iloc[0]
        assert all(same(row[label], e) for label, e in zip(LABELS, expected, strict=True)), options
    negbio = build("mimic", root, labeler="negbio", uncertain="mask")
    assert negbio[list(LABELS)].notna().all().all()  # the negbio fixture has no -1 and blank -> 0


def test_mimic_demographics(data, tmp_path):
    root = data["mimic"]
    m = build("mimic", root)
    known = m[m["path"].str.contains("/s50414267/")].iloc[0]
    anchor_age, anchor_year = fx.MIMIC_KNOWN_AGE
    assert known["age"] == anchor_age + 2 and known["sex"] == "F"  # study in anchor_year + 2
    assert (
        build("mimic", root, age="anchor")[m["path"].str.contains("/s50414267/")].iloc[0]["age"]
        == anchor_age
    )
    assert set(m["sex"]) == {"F", "M"} and m["age"].notna().all()
    bare = tmp_path / "mimic"
    shutil.copytree(root, bare)
    shutil.rmtree(bare / "hosp")
    with pytest.raises(
        ManifestError, match=r"patients file not found.*patients\.csv.*demographics: false"
    ):
        build("mimic", bare)
    plain = build("mimic", bare, demographics=False)
    assert (plain["sex"] == "U").all() and plain["age"].isna().all()
    (bare / "mimic-cxr-2.0.0-chexpert.csv").unlink()
    with pytest.raises(ManifestError, match=r"chexpert file.*not found"):
        build("mimic", bare, demographics=False)


# ----------------------------------------------------------------------------- csv site


def test_csv_site_values_and_splits(data, tmp_path):
    root = data["csv"]
    raw = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    m = build("csv", root)
    by_path = m.set_index("path")
    for _, row in raw.iterrows():
        got = by_path.loc[str(root / row["path"])]
        assert got["split"] == row["split"] and got["patient_id"] == row["patient_id"]
        assert (
            got["sex"]
            == {"F": "F", "female": "F", "M": "M", "male": "M", "U": "U", "": "U"}[row["sex"]]
        )
        age = NAN if row["age"] == "" else 45.0 if row["age"] == "045Y" else float(row["age"])
        assert same(got["age"], age)
        for label in LABELS:
            assert same(got[label], NAN if row[label] == "" else float(row[label]))
    assert m["pneumonia"].isna().any() and m["age"].isna().any() and (m["age"] == 45).any()
    assert build("csv", root, blank="zeros")[list(LABELS)].notna().all().all()
    two = fx.write_csv_site(tmp_path / "two", splits="train_test")
    assert_patient_wise(build("csv", two))  # val carved from train
    none = fx.write_csv_site(tmp_path / "none", splits="none")
    assert_patient_wise(build("csv", none))  # hash split


def test_csv_site_errors_name_the_problem(data, tmp_path):
    with pytest.raises(
        ManifestError, match=r"labels\.csv: label file not found.*path,patient_id,sex,age"
    ):
        build("csv", tmp_path)
    root = tmp_path / "site"
    shutil.copytree(data["csv"], root)
    raw = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    raw.drop(columns=["age", "healthy"]).to_csv(root / "bad.csv", index=False)
    with pytest.raises(
        ManifestError,
        match=r"bad\.csv: missing required column\(s\) \['age', 'healthy'\].*"
        r"path,patient_id,sex,age,cardiomegaly",
    ):
        build("csv", root, file="bad.csv")
    raw.assign(pneumonia="-1").to_csv(root / "uncertain.csv", index=False)
    with pytest.raises(ManifestError, match=r"column 'pneumonia' has value '-1' \(line 2\)"):
        build("csv", root, file="uncertain.csv")
    raw.assign(sex="x").to_csv(root / "sex.csv", index=False)
    with pytest.raises(ManifestError, match=r"column 'sex' has value 'x'"):
        build("csv", root, file="sex.csv")
    raw.assign(split="holdout").to_csv(root / "split.csv", index=False)
    with pytest.raises(ManifestError, match=r"column 'split' has value 'holdout'"):
        build("csv", root, file="split.csv")
    leak = raw.copy()
    leak.loc[leak["patient_id"] == leak["patient_id"].iloc[0], "split"] = ["train", "test"]
    leak.to_csv(root / "leak.csv", index=False)
    with pytest.raises(ManifestError, match="more than one split"):
        build("csv", root, file="leak.csv")


# ----------------------------------------------------------------------------- summary


def test_summary_counts(data):
    m = build("chexpert", data["chexpert"])
    text = summarize(m)
    assert f"{len(m)} images, {m['patient_id'].nunique()} patients" in text
    train = m[m["split"] == "train"]
    pos, known = int((train["healthy"] == 1).sum()), int(train["healthy"].notna().sum())
    assert f"{pos}/{known}" in text
    for heading in ("train", "val", "test", "[0,40)", "[40,70)", "[70,inf)", "missing", "healthy"):
        assert heading in text
    missing_line = next(line for line in text.splitlines() if line.startswith("missing"))
    assert missing_line.split()[-1] == str(int(m["age"].isna().sum()))
