"""Audit twins end to end without Ray: a real cache entry, the real trainer, the trial store,
the aggregator and ``launch.py audit``; and a deliberately broken build that must be caught."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
from conftest import launch, synthetic_domain, toy_split

from privdom_ray import kinds, results
from privdom_ray.canaries import CanaryInstrument
from privdom_ray.cell import Cell
from privdom_ray.config import AuditSpec, EvaluationConfig, TrainingConfig, TrialSpec
from privdom_ray.imaging import Preprocessing
from privdom_ray.kinds.audit import audited
from privdom_ray.manifest import LABELS
from privdom_ray.store import TrialStore
from privdom_ray.trial import Executor, train_audit_twin

CANARIES = 400


def write_cache(folder, n_train: int = 96, size: int = 16):
    """A cache entry like cache.build writes (learnable toy images): train and val splits."""
    train, val = toy_split(n_train, size, seed=0), toy_split(32, size, seed=1)
    folder.mkdir(parents=True)
    images = np.concatenate([train.images, val.images])
    np.save(folder / "images.npy", images)
    labels = np.concatenate([train.labels, val.labels])
    rows = pd.DataFrame(
        {
            "path": [f"{i}.png" for i in range(len(images))],
            "patient_id": [f"p{i}" for i in range(len(images))],
            "split": ["train"] * n_train + ["val"] * 32,
            "sex": "F",
            "age": 50.0,
            **{label: labels[:, j] for j, label in enumerate(LABELS)},
            "ok": True,
        }
    )
    rows.to_parquet(folder / "rows.parquet", index=False)
    return folder


def twin_spec(epsilon: float) -> TrialSpec:
    return TrialSpec(
        source="a",
        data_fingerprint="fp-a",
        epsilon=epsilon,
        delta=1e-5 if math.isfinite(epsilon) else 0.0,
        seed=0,
        model="resnet9",
        training=TrainingConfig(epochs=4, logical_batch=32, physical_batch=32, lr=1e-3),
        preprocessing=Preprocessing(image_size=16),
        variant="audit",
        audit=AuditSpec(canaries=CANARIES, kind="gradient", auditor_seed=0),
    ).with_key()


def train_twin(tmp_path, epsilon: float, **kw):
    cache = tmp_path / "cache" / "a"
    if not cache.exists():
        write_cache(cache)
    spec = twin_spec(epsilon)
    cell = Cell(spec=spec, output=str(tmp_path / "out"), source_cache=str(cache), targets=(),
                evaluation=EvaluationConfig())  # fmt: skip
    store = TrialStore(cell.output)
    store.folder(spec.key).mkdir(parents=True, exist_ok=True)
    train_audit_twin(cell, store, None, "test", Executor(), **kw)
    return store.read(spec.key)


class BrokenNoise(CanaryInstrument):
    """A deliberately broken build: the noise generation adds a tenth of the noise while the
    optimizer (and so the accountant and the ledger) still believe in the full sigma."""

    def attach(self, optimizer, sample_rate):
        super().attach(optimizer, sample_rate)
        add_noise, sigma = optimizer.add_noise, optimizer.noise_multiplier

        def broken() -> None:
            optimizer.noise_multiplier = 0.1 * sigma
            try:
                add_noise()
            finally:
                optimizer.noise_multiplier = sigma

        optimizer.add_noise = broken


@pytest.mark.slow
def test_audit_twins_bound_epsilon_from_below_and_catch_a_broken_build(tmp_path):
    dp = train_twin(tmp_path, 1.0)
    nondp = train_twin(tmp_path, math.inf)
    a_dp, a_nondp = dp.info["audit"], nondp.info["audit"]
    assert a_dp["m"] == a_nondp["m"] == CANARIES and a_dp["kind"] == "gradient"
    spent = dp.ledger["epsilon_spent"]
    assert 0 < spent <= 1.0
    assert a_dp["epsilon_lower"] <= spent  # a correct implementation stays below its epsilon
    assert a_nondp["epsilon_lower"] > 2.0  # without noise the canaries are plain to see
    assert launch("audit", "out", cwd=tmp_path).returncode == 0
    # nothing of the coins, draws or scores is left in the finished twin
    assert not store_has(tmp_path, dp.key, "checkpoint.pt")
    assert not [v for v in dp.info["audit"].values() if isinstance(v, list)]  # no coins, scores

    broken = train_twin(tmp_path / "broken", 1.0, make_instrument=BrokenNoise)
    assert broken.ledger["epsilon_spent"] == spent  # the ledger claims the full noise...
    assert broken.info["audit"]["epsilon_lower"] > spent  # ... the canaries prove otherwise
    proc = launch("audit", "out", cwd=tmp_path / "broken", expect=1)
    assert "canary audit" in proc.stdout and "broken" in proc.stdout


def store_has(tmp_path, key: str, name: str) -> bool:
    return (TrialStore(tmp_path / "out").folder(key) / name).exists()


def test_twins_are_planned_keyed_and_attached_to_the_audited_rows(tmp_path):
    """The grid's audit section plans one twin per named cell (its own key, never evaluated,
    never released) and the aggregator puts the twin's result on the audited cell's rows."""
    import yaml

    from privdom_ray.grid import load_grid

    (tmp_path / "g.yaml").write_text(
        yaml.safe_dump(
            {
                "output": "out",
                "domains": [synthetic_domain("a", "a", n_patients=20)],
                "epsilons": [1, 8, "inf"],
                "audit": {"canaries": 100, "epsilons": [1, "inf"]},
            }
        )
    )
    spec = load_grid(tmp_path / "g.yaml")
    trials = kinds.plan_trials(spec, {"a": "fp-a"}, {"a": 50})
    twins = [t for t in trials if t.variant == "audit"]
    assert [t.name for t in twins] == ["a_eps1_seed0_audit", "a_epsinf_seed0_audit"]
    standard = {t.key for t in trials if t.variant == "standard"}
    assert {audited(t).key for t in twins} <= standard
    assert all(t.key not in standard for t in twins)
    kind = kinds.kind_of(twins[0])
    assert not (kind.evaluated or kind.in_matrices or kind.released)
    # keys: the audit settings are part of the twin's, never of the audited cell's
    other = dataclasses.replace(twins[0], audit=dataclasses.replace(twins[0].audit, canaries=7))
    assert other.with_key().key != twins[0].key and audited(other).key == audited(twins[0]).key

    # the twin's result lands on the audited cell's rows (through the real aggregator)
    from conftest import make_testset, scores_for, write_trial

    test = make_testset(60, seed=1)
    key = write_trial(tmp_path / "agg", source="a", epsilon=1.0, seed=0,
                      evals={"a": ("fpa", test, scores_for(test, 1.0, 0))})  # fmt: skip
    record = TrialStore(tmp_path / "agg").read(key)
    twin = dataclasses.replace(
        record.spec, variant="audit", audit=AuditSpec(100, "gradient", 0)
    ).with_key()
    assert audited(twin).key == key
    result = {"epsilon_lower": 0.3, "epsilon_lower_fdp": 0.4, "m": 100, "guesses": 40,
              "correct": 26, "kind": "gradient"}  # fmt: skip
    import torch

    TrialStore(tmp_path / "agg").write_trained(
        twin.key, state_dict={"w": torch.zeros(1)}, ledger=record.ledger, history=[],
        thresholds=list(record.thresholds), labels=LABELS,
        record={"spec": twin.to_json(), "best_epoch": 1, "train_seconds": 1.0,
                "val_macro_auc": 0.5, "audit": result},
    )  # fmt: skip
    _, df = results.aggregate(tmp_path / "agg", [key, twin.key], "t", [_T("a", "fpa")])
    assert set(df["trial_key"]) == {key}  # the twin has no rows of its own
    assert (df["audit_epsilon_lower"] == 0.3).all() and (df["audit_canaries"] == 100).all()

    # the report shows the audited cell once, with its numbers and verdict, and draws the figure
    from privdom_ray import report

    md = report.write_report(tmp_path / "agg")
    rows = [line for line in md.splitlines() if line.startswith("| a, ε = 1, seed 0")]
    spent = f"{record.ledger['epsilon_spent']:.2f}"
    assert rows == [f"| a, ε = 1, seed 0 | {spent} | gradient, m = 100 | 26/40 | 0.30 | 0.40 "
                    "| consistent |"]  # fmt: skip
    assert (tmp_path / "agg" / "figures" / "audit_epsilon.png").is_file()


@dataclasses.dataclass(frozen=True)
class _T:
    name: str
    fingerprint: str


def test_the_audit_section_of_a_grid_is_validated(tmp_path):
    import yaml

    from privdom_ray.grid import GridError, load_grid

    base = {
        "output": "out",
        "domains": [synthetic_domain("a", "a", n_patients=20)],
        "epsilons": [1, "inf"],
    }
    bad = {"canaries": 5, "kind": "loss", "sources": ["z"], "epsilons": [3]}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({**base, "audit": bad}))
    with pytest.raises(GridError) as err:
        load_grid(tmp_path / "g.yaml")
    text = str(err.value)
    for needle in ("audit.canaries: 5", "audit.kind: 'loss'", "audit.sources", "audit.epsilons"):
        assert needle in text
