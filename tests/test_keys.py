"""Finished sweeps survive upgrades: the key of every trial written by earlier code stays the
same, so a new version skips those trials instead of training them again.

``fixtures/pinned_keys.json`` holds trial specs and keys written by the code of commit
520ebab (the demo's 12 cells, read from its trial folders, plus a clip-only control, a
patient-level, a pretraining, a pretrained-init and an augmented trial from its planner).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privdom_ray.config import TrialSpec

PINNED = json.loads((Path(__file__).parent / "fixtures" / "pinned_keys.json").read_text())


@pytest.mark.parametrize("entry", PINNED, ids=[e["what"] for e in PINNED])
def test_keys_of_existing_trials_never_change(entry):
    spec = TrialSpec.from_json(entry["spec"])
    assert spec.with_key().key == entry["spec"]["key"]


def test_the_pins_cover_every_kind_of_trial():
    kinds = {e["spec"].get("variant", "standard") for e in PINNED}
    assert kinds == {"standard", "clip_only", "pretrain"}
    assert any(e["spec"].get("federation") for e in PINNED)
    assert any(e["spec"]["training"].get("privacy_unit") == "patient" for e in PINNED)
    assert len({e["spec"]["key"] for e in PINNED}) == len(PINNED)
