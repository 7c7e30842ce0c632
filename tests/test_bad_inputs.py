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
    "training": {"epochs": 1, "logical_batch": 16, "physical_batch": 16},
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
    assert len(cases) >= 20
    assert len({c[0] for c in cases}) == len({c[2] for c in cases}) == len(cases)
