"""The paper-shaped synthetic sites (``synthetic.PAPER_SITES``) that the paper-scale dry run
(``benchmarks/bench_paper_scale.py``) generates, and the guarantee that adding them changed
nothing for the original sites a-d (finished sweeps are keyed by their manifests)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from privdom_ray.domains import synthetic
from privdom_ray.domains.synthetic import PAPER_SITES, SITES, SyntheticOptions, population
from privdom_ray.manifest import LABELS, fingerprint

#: (hash of the generated records and pixels, manifest fingerprint) of a 40-patient domain per
#: original site, computed at main 10482de, before the paper-shaped sites existed.
PINNED = {
    "a": ("698b2fcb62f49f01", "2ab9bda09b3d9ab1"),
    "b": ("4d526740831d4282", "627855ac447bc833"),
    "c": ("bd5c36ce00434d0d", "891c2653f8415bd4"),
    "d": ("30fbda6cc096ebc3", "f021b361bf9aab0d"),
}

#: What each paper-shaped site stands for: the test share of its images (paper.md: test /
#: (train + test)) and the share of female / unknown-sex test images.
PAPER_SHAPE = {
    "vdr": {"test": 3_000 / 18_000, "female": 552 / 3_000, "unknown_sex": 1 - 1_254 / 3_000},
    "c14": {"test": 25_596 / 112_120, "female": 10_714 / 25_596, "unknown_sex": 0.0},
    "cpt": {"test": 29_320 / 157_676, "female": 11_436 / 29_320, "unknown_sex": 0.0},
    "uka": {"test": 39_824 / 193_324, "female": 14_457 / 39_824, "unknown_sex": 0.0},
    "pch": {"test": 22_045 / 110_045, "female": 10_636 / 22_045, "unknown_sex": 0.0},
}


@pytest.mark.parametrize("site", sorted(PINNED))
def test_original_sites_generate_byte_identical_domains(site, tmp_path):
    options = SyntheticOptions(site=site, n_patients=40, images_per_patient=3, file_size=32)
    h = hashlib.sha256()
    for record, image in synthetic.generate_images(options):
        h.update(json.dumps(record, sort_keys=True, default=str).encode())
        h.update(image.tobytes())
    root = tmp_path / "root"
    manifest = synthetic.build(root, options)
    assert (h.hexdigest()[:16], fingerprint(manifest, root)) == PINNED[site]


def test_paper_sites_are_registered_and_original_sites_keep_the_demo_split():
    assert set(PAPER_SITES) <= set(SITES)
    assert all(SITES[s].test_frac == 0.25 and SITES[s].val_frac == 0.15 for s in "abcd")


@pytest.mark.parametrize("site", sorted(PAPER_SHAPE))
def test_paper_site_split_and_sex_mix_follow_the_paper(site, tmp_path):
    """The manifest's test share of images and the test set's sex mix, on a real generated
    domain (1 image per patient, so image shares are patient shares)."""
    options = SyntheticOptions(site=site, n_patients=1_500, images_per_patient=1, file_size=32)
    df = synthetic.build(tmp_path / site, options)
    shape = PAPER_SHAPE[site]
    assert (df["split"] == "test").mean() == pytest.approx(shape["test"], abs=0.03)
    assert (df["split"] == "val").mean() == pytest.approx(0.1 * (1 - shape["test"]), abs=0.02)
    assert (df["sex"] == "F").mean() == pytest.approx(shape["female"], abs=0.04)
    assert (df["sex"] == "U").mean() == pytest.approx(shape["unknown_sex"], abs=0.04)


def _label_prevalence(site: str, n_patients: int = 4_000) -> np.ndarray:
    """Image prevalence of the five labels from the generator's own population and findings
    draws (no rendering: the rendering draws in between change which numbers a stream yields,
    not their distribution)."""
    profile = SITES[site]
    options = SyntheticOptions(site=site, n_patients=n_patients, images_per_patient=3)
    rows = []
    for i in range(n_patients):
        rng = np.random.default_rng(np.random.SeedSequence([11, i]))
        patient = population._draw_patient(rng, profile, options, i)
        for _ in range(patient["n_images"]):
            labels = population._draw_findings(rng, profile, patient)["labels"]
            rows.append([labels[name] for name in LABELS])
    return np.asarray(rows, dtype=float).mean(axis=0)


def test_paper_sites_have_their_institutions_label_mix():
    """ChestX-ray14 and CheXpert counts (cxr_formats.md): healthy 54% vs 10%, effusion 12% vs
    39%, cardiomegaly 2.5% vs 12%; the ICU site is the sickest, VinDr the most normal."""
    c14, cpt = _label_prevalence("c14"), _label_prevalence("cpt")
    assert c14 == pytest.approx([0.025, 0.119, 0.013, 0.103, 0.538], abs=0.025)
    assert cpt == pytest.approx([0.121, 0.386, 0.027, 0.149, 0.10], abs=0.025)
    prev = {s: _label_prevalence(s, 1_500) for s in ("vdr", "uka", "pch")}
    assert prev["vdr"][-1] == pytest.approx(0.70, abs=0.05)
    assert prev["uka"][:4].sum() > max(prev[s][:4].sum() for s in ("vdr", "pch")) + 0.3


def test_paper_scale_grid_is_the_benchmarks_grid_and_validates():
    """experiments/paper_scale.yaml is what bench_paper_scale.py writes at scale 1: the
    paper's grid shape (5 sources and targets, 5 epsilons, 3 seeds, a control, a federation,
    audit twins, a pretraining domain) at the paper's image counts."""
    import subprocess
    import sys
    from pathlib import Path

    from privdom_ray.grid import load_grid

    root = Path(__file__).resolve().parents[1]
    path = root / "experiments" / "paper_scale.yaml"
    printed = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_paper_scale.py"), "--print-grid", "1"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    committed = "".join(line for line in path.read_text().splitlines(True) if line[0] != "#")
    assert committed == printed
    spec = load_grid(path)
    assert (len(spec.sources), len(spec.targets), len(spec.epsilons), len(spec.seeds)) == (
        5, 5, 5, 3,
    )  # fmt: skip
    images = {d.name: d.options.n_patients * (d.options.images_per_patient + 1) / 2
                for d in spec.domains}  # fmt: skip
    assert images["UKA"] == pytest.approx(193_324, rel=0.01)
    assert images["VDR"] == 18_000
    assert spec.pretrain.domain == "MIMIC" and spec.audit is not None and spec.federations
