"""The synthetic multi-site generator: determinism, manifest contract, sites, atomic generation."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from privdom_ray import imaging
from privdom_ray.domains import build_manifest, make_options
from privdom_ray.domains.synthetic import (
    INFO_FILE,
    LABELS_FILE,
    SITES,
    TMP_PREFIX,
    SyntheticOptions,
    generate,
    generate_images,
)
from privdom_ray.manifest import LABELS, ManifestError

SMALL = {"n_patients": 40, "file_size": 64}


def files(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (relative path -> bytes)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def site_a(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("site_a")
    options = SyntheticOptions(site="a", n_patients=80, file_size=64)
    return root, build_manifest("synthetic", root, options)


def test_same_options_give_byte_identical_domains_and_other_seeds_differ(tmp_path):
    options = SyntheticOptions(site="b", **SMALL)
    build_manifest("synthetic", tmp_path / "one", options)
    build_manifest("synthetic", tmp_path / "two", options)
    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert LABELS_FILE in one and len(one) > SMALL["n_patients"]
    assert one == two

    build_manifest("synthetic", tmp_path / "three", SyntheticOptions(site="b", seed=1, **SMALL))
    three = files(tmp_path / "three")
    assert three[LABELS_FILE] != one[LABELS_FILE]
    common = sorted(set(one) & set(three) - {LABELS_FILE, INFO_FILE})
    assert common and all(one[name] != three[name] for name in common)


def test_manifest_contract(site_a):
    root, m = site_a
    assert m["path"].map(lambda p: Path(p).is_absolute() and Path(p).is_file()).all()
    assert m.groupby("patient_id")["split"].nunique().max() == 1  # patient-wise
    assert set(m["split"]) == {"train", "val", "test"}
    assert set(m["sex"]) <= {"F", "M", "U"} and {"F", "M"} <= set(m["sex"])
    assert m["age"].dropna().between(18, 95).all()
    train = m[m["split"] == "train"]
    for label in LABELS:
        assert set(m[label].unique()) <= {0.0, 1.0}
        assert 0 < train[label].sum() < len(train), label
    findings = m[list(LABELS[:4])].sum(axis=1)
    assert (m.loc[findings > 0, "healthy"] == 0).all()
    # the distractor ("other finding"): some images are not healthy without any of the four
    assert ((findings == 0) & (m["healthy"] == 0)).any()
    assert m.groupby("patient_id").size().max() > 1  # follow-up images
    for path in m["path"].iloc[:5]:
        arr = imaging.decode(path)
        assert arr.dtype == np.uint8 and arr.shape == (64, 64)


def test_labels_csv_layout(site_a):
    root, m = site_a
    table = pd.read_csv(root / LABELS_FILE, dtype={"patient_id": str})
    assert list(table.columns) == ["file", "patient_id", "sex", "age", *LABELS]
    assert table["file"].str.startswith("images/").all()
    assert len(table) == len(m)


@pytest.mark.filterwarnings("error")  # e.g. NaN cast to uint8
def test_healthy_is_exactly_no_finding_in_generated_records():
    options = SyntheticOptions(site="d", n_patients=60, file_size=32)
    pairs = list(generate_images(options))
    records = [record for record, _ in pairs]
    assert all(image.shape == (32, 32) and image.dtype == np.uint8 for _, image in pairs)
    for r in records:
        any_finding = any(r[label] for label in LABELS[:4])
        assert not (any_finding and r["healthy"])
    assert any(np.isnan(r["age"]) for r in records)  # site d misses ages
    assert any(r["sex"] == "U" for r in records)


def test_sites_differ_in_images_and_population():
    def summary(site: str) -> tuple[float, pd.DataFrame]:
        pairs = list(generate_images(SyntheticOptions(site=site, n_patients=60, file_size=32)))
        mean = float(np.mean([image.mean() for _, image in pairs]))
        return mean, pd.DataFrame([record for record, _ in pairs])

    mean_b, b = summary("b")
    mean_c, c = summary("c")
    assert abs(mean_b - mean_c) > 5  # gray levels
    assert b["age"].mean() - c["age"].mean() > 10
    assert b["pleural_effusion"].mean() > c["pleural_effusion"].mean() + 0.1
    assert c["healthy"].mean() > b["healthy"].mean() + 0.2
    assert len(SITES) >= 4


def test_existing_domain_is_read_not_regenerated(tmp_path):
    root = tmp_path / "dom"
    root.mkdir()  # an existing empty root is fine
    options = SyntheticOptions(site="c", **SMALL)
    first = build_manifest("synthetic", root, options)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    second = build_manifest("synthetic", root, options)
    pd.testing.assert_frame_equal(first, second)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    assert not list(root.glob(f"{TMP_PREFIX}*")) and not list(tmp_path.glob(f".*{TMP_PREFIX}*"))

    # hand edits of labels.csv are honoured
    table = pd.read_csv(root / LABELS_FILE, dtype={"patient_id": str})
    table.loc[0, "pneumonia"] = 1 - table.loc[0, "pneumonia"]
    table.to_csv(root / LABELS_FILE, index=False)
    edited = build_manifest("synthetic", root, options)
    assert edited["pneumonia"].sum() != first["pneumonia"].sum()


def test_other_options_on_a_generated_root_are_refused(tmp_path):
    build_manifest("synthetic", tmp_path, SyntheticOptions(site="a", **SMALL))
    with pytest.raises(ManifestError, match="generated with options"):
        build_manifest("synthetic", tmp_path, SyntheticOptions(site="b", **SMALL))


def test_leftovers_of_an_interrupted_generation_are_not_a_domain(tmp_path):
    options = SyntheticOptions(site="a", **SMALL)
    clean = tmp_path / "clean"
    build_manifest("synthetic", clean, options)

    # interrupted while writing into a sibling temp folder: the root does not exist
    sibling = tmp_path / f".dom{TMP_PREFIX}dead"
    (sibling / "images").mkdir(parents=True)
    (sibling / "images" / "a00000_0.png").write_bytes(b"half a png")
    # interrupted between the renames: images/ and synthetic.json but no labels.csv
    half = tmp_path / "half"
    generate(half, options)
    (half / LABELS_FILE).unlink()
    (half / "images" / "a00000_0.png").write_bytes(b"truncated")
    (half / f"{TMP_PREFIX}dead").mkdir()
    old = time.time() - 7200
    os.utime(half / f"{TMP_PREFIX}dead", (old, old))

    dom = tmp_path / "dom"
    m = build_manifest("synthetic", dom, options)
    assert files(dom) == files(clean) and len(m) == len(build_manifest("synthetic", clean, options))
    m = build_manifest("synthetic", half, options)
    assert files(half) == files(clean)  # stale images replaced, old temp folder removed
    assert sibling.exists()  # young temp folders may belong to a running generation


def test_an_unrelated_images_folder_is_not_overwritten(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "mine.png").write_bytes(b"precious")
    with pytest.raises(ManifestError, match="refusing to overwrite"):
        build_manifest("synthetic", tmp_path, SyntheticOptions(site="a", **SMALL))
    assert (tmp_path / "images" / "mine.png").read_bytes() == b"precious"
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*"))


@pytest.mark.parametrize(
    ("values", "name"),
    [
        ({"site": "mars"}, "site"),
        ({"site": 3}, "site"),
        ({"n_patients": 0}, "n_patients"),
        ({"n_patients": -5}, "n_patients"),
        ({"n_patients": 2.5}, "n_patients"),
        ({"images_per_patient": 0}, "images_per_patient"),
        ({"file_size": 8}, "file_size"),
        ({"file_size": True}, "file_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_options_name_the_option(values, name):
    with pytest.raises(ValueError, match=rf"'{name}' = {values[name]!r}"):
        SyntheticOptions(**values)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError):
        make_options("synthetic", {"site": "a", "n_patient": 10})
