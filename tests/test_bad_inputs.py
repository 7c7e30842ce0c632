"""A catalogue of bad inputs, each run through the real command line.

Each must give a message naming the problem, a non-zero exit code, and no partial results
(no output folder, or at least no trials and no tables in it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import launch
from cxr_fixtures import write_chexpert, write_csv_site

SYN = {
    "name": "a",
    "kind": "synthetic",
    "root": "data/a",
    "options": {"site": "a", "n_patients": 20},
}
BASE = {
    "name": "bad",
    "output": "out",
    "domains": [SYN],
    "epsilons": [1, "inf"],
    "training": {"epochs": 1, "logical_batch": 8, "physical_batch": 8},  # 15 training images
    "preprocessing": {"image_size": 16},
    "ray": {"num_cpus": 1},
}


def with_(**changes) -> Callable[[Path], dict]:
    return lambda tmp: {**BASE, **changes}


def training(**changes) -> Callable[[Path], dict]:
    return with_(training={**BASE["training"], **changes})


def domain(**changes) -> Callable[[Path], dict]:
    return with_(domains=[{**SYN, **changes}])


def csv_without_age(tmp: Path) -> dict:
    root = write_csv_site(tmp / "site")
    import pandas as pd

    df = pd.read_csv(root / "labels.csv")
    df.drop(columns=["age"]).to_csv(root / "labels.csv", index=False)
    return {**BASE, "domains": [{"name": "uka", "kind": "csv", "root": str(root)}]}


def chexpert_without_labels(tmp: Path) -> dict:
    root = write_chexpert(tmp / "cpt")
    for f in root.glob("*.csv"):
        f.unlink()
    return {**BASE, "domains": [{"name": "cpt", "kind": "chexpert", "root": str(root)}]}


def csv_with_unreadable_images(tmp: Path) -> dict:
    root = write_csv_site(tmp / "site")
    for f in root.rglob("*"):
        if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm", ".dicom"):
            f.write_bytes(b"not an image")
    return {**BASE, "domains": [{"name": "uka", "kind": "csv", "root": str(root)}]}


def output_under_a_file(tmp: Path) -> dict:
    (tmp / "afile").write_text("x")
    return {**BASE, "output": "afile/out"}


def csv_row_with_extra_fields(tmp: Path) -> dict:
    root = write_csv_site(tmp / "site")
    lines = (root / "labels.csv").read_text().splitlines()
    lines[3] += ",surplus"  # line 4 of the file
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return {**BASE, "domains": [{"name": "uka", "kind": "csv", "root": str(root)}]}


def synthetic_labels_with_extra_fields(tmp: Path) -> dict:
    from privdom_ray.domains import build_manifest, make_options

    build_manifest("synthetic", tmp / "data" / "a", make_options("synthetic", SYN["options"]))
    labels = tmp / "data" / "a" / "labels.csv"
    lines = labels.read_text().splitlines()
    lines[6] += ",1,2"  # line 7: a comma inside a value, unquoted
    labels.write_text("\n".join(lines) + "\n")
    return BASE


def synthetic_root_is_a_file(tmp: Path) -> dict:
    (tmp / "data").mkdir()
    (tmp / "data" / "a").write_text("not a folder")
    return BASE


def read_only_cache_dir(tmp: Path) -> dict:
    """A cache folder nobody may write: mode 0555, or (root ignores modes) a folder on a
    read-only file system."""
    import os

    if os.geteuid() == 0:
        return {**BASE, "cache_dir": "/sys/privdom-ray-cache"}
    (tmp / "ro").mkdir(mode=0o555)
    return {**BASE, "cache_dir": str(tmp / "ro")}


CATALOGUE: list[tuple[str, Callable[[Path], dict | str | None], str]] = [
    ("grid file missing", lambda tmp: None, "does not exist"),
    ("not YAML", lambda tmp: "domains: [unclosed", "not valid YAML"),
    ("YAML list, not a mapping", lambda tmp: "- 1\n- 2\n", "must be a YAML mapping"),
    ("typo in a top-level key", with_(epoch=3), "epoch: 3"),
    ("epsilon zero", with_(epsilons=[0]), "epsilons[0]: 0"),
    ("epsilon negative", with_(epsilons=[-2]), "epsilons[0]: -2"),
    ("epsilon not a number", with_(epsilons=["lots"]), "epsilons[0]: 'lots'"),
    ("delta >= 1", with_(delta=1.0), "delta: 1.0"),
    ("delta >= 1/N_train", with_(delta=0.2), "1/N_train"),
    ("empty domain list", with_(domains=[]), "domains: []"),
    ("unknown domain kind", domain(kind="dicomland"), "domains[a].kind: 'dicomland'"),
    (
        "missing dataset root",
        domain(kind="chexpert", root="nowhere", options={}),
        "domains[a].root: 'nowhere'",
    ),
    ("unknown kind option", domain(options={"colour": "red"}), "domains[a].options"),
    ("bad kind option value", domain(options={"site": "mars"}), "mars"),
    ("duplicate domain names", with_(domains=[SYN, SYN]), "duplicate"),
    ("zero logical batch", training(logical_batch=0), "training.logical_batch: 0"),
    ("physical batch > logical", training(physical_batch=64), "training.physical_batch: 64"),
    ("unknown accountant", training(accountant="gdp"), "training.accountant: 'gdp'"),
    ("unknown model", with_(model="vgg16"), "model: 'vgg16'"),
    ("seed not an integer", with_(seeds=[0.5]), "seeds[0]: 0.5"),
    ("negative seed", with_(seeds=[0, -1]), "seeds[1]: -1"),
    (
        "logical batch larger than the training set",
        training(logical_batch=1000),
        "training.logical_batch: 1000 is more than the",
    ),
    (
        "logical batch larger than the training set, non-DP only",
        with_(epsilons=["inf"], training={**BASE["training"], "logical_batch": 500}),
        "but q must be at most 1",
    ),
    ("a labels.csv row with extra fields", csv_row_with_extra_fields, "line 4 has 11 fields"),
    (
        "a synthetic labels.csv row with extra fields",
        synthetic_labels_with_extra_fields,
        "labels.csv: line 7 has",
    ),
    ("synthetic root that is a file", synthetic_root_is_a_file, "a folder, not a file"),
    ("read-only cache_dir", read_only_cache_dir, "is not writable"),
    ("source not a domain", with_(sources=["zz"]), "sources: ['zz']"),
    pytest.param(
        "more CPUs per trial than any node",
        with_(resources={"cpu": 64}),
        "more than any node has",
        marks=pytest.mark.ray,  # known only once the cluster is up
    ),
    ("output folder under a file", output_under_a_file, "is not a folder"),
    ("CSV site lacking a required column", csv_without_age, "age"),
    ("label file missing", chexpert_without_labels, "train.csv"),
    pytest.param(
        "no decodable image in a domain",
        csv_with_unreadable_images,
        "could be decoded",
        marks=pytest.mark.ray,  # known once Ray Data has tried every file
    ),
    (
        "exact label counts in a DP loss",
        training(pos_weight="exact"),
        "voids the DP guarantee",
    ),
    ("loss weights of the wrong length", training(pos_weight=[1, 2, 3]), "5 positive numbers"),
    ("count-release budget of 0", training(pos_weight_budget=0), "pos_weight_budget: 0.0"),
]
IDS = [c.values[0] if hasattr(c, "values") else c[0] for c in CATALOGUE]


@pytest.mark.parametrize(("case", "make", "needle"), CATALOGUE, ids=IDS)
def test_bad_input_is_refused_clearly(tmp_path, case, make, needle):
    grid = make(tmp_path)
    path = tmp_path / "grid.yaml"
    if isinstance(grid, dict):
        path.write_text(yaml.safe_dump(grid))
    elif isinstance(grid, str):
        path.write_text(grid)
    proc = launch("--grid", str(path), cwd=tmp_path, expect=2)  # 2: bad input
    assert needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr  # a message, not a crash
    out = tmp_path / "out"
    assert not (out / "trials").exists() and not (out / "transfer.parquet").exists()


def test_catalogue_is_large_and_distinct():
    cases = [c.values if hasattr(c, "values") else c for c in CATALOGUE]
    assert len(cases) >= 30
    assert len({c[0] for c in cases}) == len({c[2] for c in cases}) == len(cases)


def test_a_refused_run_leaves_a_finished_output_folder_as_it_was(tmp_path):
    """seeds: [-1] on a finished output once failed every cell after Ray started and
    replaced its table by an empty one: now it is refused before anything is written."""
    from helpers.trials import build_output

    from privdom_ray.stats import results

    keys = build_output(tmp_path / "out", domains=("a",), epsilons=(1.0,))
    results.aggregate(tmp_path / "out", keys, "bad")
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({**BASE, "seeds": [-1]}))
    proc = launch("--grid", "grid.yaml", cwd=tmp_path, expect=2)
    assert "seeds[0]: -1" in proc.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before


def test_every_logical_batch_is_checked_against_the_training_set_it_samples(tmp_path):
    """Sources (images, or patients with privacy_unit: patient), federation sites and the
    pretraining domain: each batch must fit, or q = batch / N is not a probability."""
    from privdom_ray.config import GridError
    from privdom_ray.grid import check_sample_rates, parse_grid

    doms = [{**SYN, "name": n, "root": str(tmp_path / n)} for n in ("a", "b", "p")]
    raw = {
        **BASE, "domains": doms, "sources": ["a"],
        "federations": [{"name": "ab", "sites": ["a", "b"], "rounds": 1}],
        "pretrain": {"domain": "p", "logical_batch": 64, "physical_batch": 32},
        "training": {**BASE["training"], "logical_batch": 16, "physical_batch": 16,
                     "init": "pretrain"},
    }  # fmt: skip
    spec = parse_grid(raw, base=tmp_path)
    check_sample_rates(spec, {"a": 16, "b": 16, "p": 64})  # every batch fits
    with pytest.raises(GridError) as err:
        check_sample_rates(spec, {"a": 16, "b": 15, "p": 63})
    text = str(err.value)
    assert "site 'b' of federation 'ab'" in text and "pretraining domain 'p'" in text
    assert "source 'a'" not in text
    patients = parse_grid(
        {**BASE, "training": {**BASE["training"], "logical_batch": 16, "physical_batch": 16,
                              "privacy_unit": "patient", "grad_sample_mode": "hooks"}},
        base=tmp_path,
    )  # fmt: skip
    with pytest.raises(GridError, match="15 training patients"):  # patients, not images
        check_sample_rates(patients, {"a": 40}, {"a": 15})
    check_sample_rates(patients, {"a": 40}, {"a": 16})
