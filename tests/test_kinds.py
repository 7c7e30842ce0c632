"""Trial kinds as plugins: every kind is an object with real methods, named by
``TrialSpec.kind`` (never part of the key), trained by a trainer the training side holds."""

from __future__ import annotations

import dataclasses
import math

from privdom_ray import kinds
from privdom_ray.config import Federation, Site, TrainingConfig, TrialSpec
from privdom_ray.imaging import Preprocessing
from privdom_ray.trial import TRAINERS, trainer_of


def _spec(**kw) -> TrialSpec:
    base = dict(
        source="a", data_fingerprint="fp", epsilon=1.0, delta=1e-5, seed=0, model="resnet9",
        training=TrainingConfig(), preprocessing=Preprocessing(),
    )  # fmt: skip
    return TrialSpec(**{**base, **kw})


def test_every_registered_kind_resolves_to_a_trainer():
    assert set(kinds.REGISTRY) == {"standard", "clip_only", "pretrain", "federated", "audit"}
    for kind in kinds.REGISTRY.values():
        assert isinstance(kind, kinds.TrialKind)
        assert callable(TRAINERS[kind.trainer]), kind.name
    assert trainer_of(_spec()) is TRAINERS["single_site"]
    assert trainer_of(_spec(variant="audit")).__name__ == "train_audit_twin"


def test_the_kind_names_the_trial_and_stays_out_of_its_key():
    fed = Federation((Site("a", "fa", 2.0, 1e-5), Site("b", "fb", 0.0, 1e-5)), 2, 1)
    spec = _spec()
    assert spec.kind == "standard" and kinds.kind_of(spec).name == "standard"
    assert _spec(variant="clip_only", epsilon=math.inf).kind == "clip_only"
    assert _spec(federation=fed).kind == "federated"
    # a property derived from the keyed fields: the hashed identity does not hold it
    assert "kind" not in spec.identity() and "kind" not in spec.to_json()
    assert spec.with_key().key == dataclasses.replace(spec, key="x").with_key().key


def test_one_rule_names_the_sites_that_trained_a_model():
    fed = Federation((Site("a", "fa", 2.0, 1e-5), Site("b", "fb", 0.0, 1e-5)), 2, 1)
    assert kinds.training_sites(_spec(source="x")) == ("x",)
    # a member with weight 0 contributes nothing to the model
    assert kinds.training_sites(_spec(source="fed", federation=fed)) == ("a",)
    assert kinds.kind_of(_spec(federation=fed)).members(_spec(federation=fed)) == fed.sites
    assert kinds.kind_of(_spec()).members(_spec()) == ()
