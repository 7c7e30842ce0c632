"""FedAvg with per-site DP-SGD, without Ray: real Opacus training on tiny learnable arrays."""

from __future__ import annotations

import dataclasses
import functools
import io
import math

import numpy as np
import pytest
import torch
from conftest import toy_split
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from privdom_ray import federated as fl
from privdom_ray.config import Federation, Site, TrainingConfig, TrialSpec
from privdom_ray.imaging import Preprocessing
from privdom_ray.manifest import LABELS
from privdom_ray.models import build_model
from privdom_ray.privacy import audit_ledger, epsilon_of
from privdom_ray.stats.metrics import auc
from privdom_ray.stats.thresholds import youden_threshold
from privdom_ray.train import load_model, predict

BATCH = 16
N_TRAIN = {"a": 48, "b": 80}  # 3 and 5 Poisson batches per epoch: different q per site


SEEDS = {"a": 10, "b": 20}
TRAIN = {name: toy_split(n, seed=SEEDS[name]) for name, n in N_TRAIN.items()}
VAL = {name: toy_split(32, seed=SEEDS[name] + 1) for name in N_TRAIN}


def fed_spec(
    epsilon: float,
    weights: dict[str, float],
    rounds: int = 3,
    local_epochs: int = 1,
    accountant: str = "rdp",  # PRV is ~2x slower to calibrate at these large q (see plan test)
) -> TrialSpec:
    private = math.isfinite(epsilon)
    sites = tuple(
        Site(name, f"fp-{name}", w, 1e-3 if private else 0.0) for name, w in weights.items()
    )
    return TrialSpec(
        source="fed",
        data_fingerprint="x",
        epsilon=epsilon,
        delta=1e-3 if private else 0.0,
        seed=0,
        model="resnet9",
        training=TrainingConfig(
            epochs=rounds * local_epochs,
            logical_batch=BATCH,
            physical_batch=BATCH,
            lr=1e-3,
            accountant=accountant,
        ),
        preprocessing=Preprocessing(image_size=16),
        federation=Federation(sites, rounds, local_epochs),
    ).with_key()


def serial_update(spec, fail_at_round=None):
    def update(round_, state, plans, keys):
        if round_ == fail_at_round:
            raise KeyboardInterrupt("simulated crash")
        return [
            fl.local_update(spec, p, state, TRAIN[p.name], round=round_, key=keys[p.name])
            for p in plans
        ]

    return update


def serial_validate(spec):
    return lambda state, plans: [fl.validate_site(spec, p.name, state, VAL[p.name]) for p in plans]


@functools.cache
def plans_of(spec: TrialSpec) -> tuple[fl.SitePlan, ...]:
    """Calibration runs the accountant a dozen times per site: once per spec is enough."""
    return tuple(fl.plan_sites(spec, {s.name: N_TRAIN[s.name] for s in spec.federation.sites}))


FIXED_KEYS = {"a": "test-key-a", "b": "test-key-b"}  # injected: a replayable run (tests only)


def run(spec, checkpoint=None, fail_at_round=None, on_round=None, plans=None, keys=FIXED_KEYS):
    return fl.run_federation(
        spec,
        plans or plans_of(spec),
        update=serial_update(spec, fail_at_round),
        validate=serial_validate(spec),
        checkpoint=checkpoint,
        on_round=on_round,
        keys=keys,
    )


class MemoryCheckpoints:
    """A checkpoint store in memory that gives back what a file would (weights_only load)."""

    def __init__(self) -> None:
        self.state = None

    def load(self):
        return self.state

    def save(self, state):
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        self.state = torch.load(buf, weights_only=True)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


@pytest.fixture(scope="module")
def dp_run():
    rounds_seen = []
    result = run(fed_spec(2.0, {"a": 1.0, "b": 3.0}), on_round=rounds_seen.append)
    return result, rounds_seen


# ------------------------------------------------------------------------------------ fedavg


def test_fedavg_is_an_exact_float64_weighted_average_and_skips_zero_weights():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(1000, generator=g), "n": torch.tensor(3)}
    b = {"w": torch.randn(1000, generator=g), "n": torch.tensor(7)}
    expected = (0.25 * a["w"].double() + 0.75 * b["w"].double()).float()
    assert not torch.equal(0.25 * a["w"] + 0.75 * b["w"], expected)  # float32 would differ
    avg = fl.fedavg([a, b], [1, 3])
    assert torch.equal(avg["w"], expected) and avg["w"].dtype == torch.float32
    assert avg["n"].item() == 3  # non-floating: from the first positive-weight site
    thirds = (a["w"].double() * (1 / 3) + b["w"].double() * (2 / 3)).float()
    accumulated_in_float32 = (a["w"].double() * (1 / 3)).float() + b["w"].double() * (2 / 3)
    assert not torch.equal(accumulated_in_float32.float(), thirds)  # the data can tell them apart
    assert torch.equal(fl.fedavg([a, b], [1, 2])["w"], thirds)
    assert_same_state(fl.fedavg([a, b], [1, 3]), avg)  # nothing random
    assert_same_state(fl.fedavg([a, b], [2.5, 0]), a)  # weight 0: bit for bit unchanged
    assert_same_state(fl.fedavg([b, a], [0, 1]), a)
    with pytest.raises(ValueError):
        fl.fedavg([a, b], [0, 0])


# ----------------------------------------------------------------------------------- privacy


def test_plan_follows_opacus_sampler_and_calibrates_for_all_rounds():
    spec = fed_spec(2.0, {"a": 0.0, "b": 1.0}, rounds=2, local_epochs=2, accountant="prv")
    a, b = fl.plan_sites(spec, {"a": 50, "b": 93 * BATCH})
    # what Opacus's DPDataLoader really does with this data
    dp = DPDataLoader.from_data_loader(
        DataLoader(TensorDataset(torch.zeros(b.n_train, 1)), batch_size=BATCH)
    )
    assert b.sample_rate == dp.sample_rate == 1 / 93
    assert b.steps_per_round == 2 * len(dp) == 2 * 92  # int(1 / (1/93)) == 92 in floating point
    eps, _ = epsilon_of("prv", b.noise_plan().mechanisms, 1e-3)
    assert b.noise_plan().steps == 2 * 2 * 92
    assert 1.95 < eps <= 2.0
    assert a.steps_per_round == 0 and a.noise_multiplier == 0.0  # weight 0: never trained


def test_dp_federation_each_site_spends_at_most_its_epsilon(dp_run):
    result, rounds_seen = dp_run
    assert [r["round"] for r in rounds_seen] == [r["epoch"] for r in rounds_seen] == [1, 2, 3]
    assert rounds_seen == result.history
    for name, ledger in result.site_ledgers.items():
        assert ledger.scope == "site" and ledger.site == name and ledger.poisson_sampling
        assert ledger.sample_rate == 1 / math.ceil(N_TRAIN[name] / BATCH)
        assert ledger.steps == 3 * 1 * math.ceil(N_TRAIN[name] / BATCH)
        assert 1.9 < ledger.epsilon_spent <= 2.0 and ledger.delta == 1e-3
        audit = audit_ledger(ledger.as_dict())
        assert audit.ok, audit.problem
        assert audit.recomputed == pytest.approx(ledger.epsilon_spent, rel=1e-9)
    a, b = result.site_ledgers["a"], result.site_ledgers["b"]
    assert a.noise_multiplier != b.noise_multiplier  # each site calibrated for its own q, T
    assert result.ledger == max((a, b), key=lambda led: led.epsilon_spent)
    assert result.history[-1]["epsilon"] == result.ledger.epsilon_spent
    assert result.history[-1]["steps"] == max(a.steps, b.steps)
    assert result.best_round == 1 + int(np.argmax([h["val_macro_auc"] for h in result.history]))
    assert result.val_macro_auc == result.history[result.best_round - 1]["val_macro_auc"]
    assert result.thresholds.shape == (len(LABELS),)
    assert set(result.state_dict) == set(build_model("resnet9").state_dict())


def test_a_site_whose_accounting_drifts_from_its_plan_raises():
    spec = fed_spec(2.0, {"a": 1.0}, rounds=1)
    (plan,) = plans_of(spec)
    state = build_model("resnet9").state_dict()
    bad = dataclasses.replace(plan, steps_per_round=plan.steps_per_round + 1)
    with pytest.raises(RuntimeError, match="accounting drifted"):
        fl.local_update(spec, bad, state, TRAIN["a"], round=1, key="k")


def test_non_private_federation_learns_and_its_ledgers_have_infinite_epsilon():
    spec = fed_spec(math.inf, {"a": 1.0, "b": 1.0}, rounds=2)
    result = run(spec)
    for name, ledger in result.site_ledgers.items():
        assert math.isinf(ledger.epsilon_spent) and ledger.noise_multiplier == 0
        assert ledger.scope == "site" and ledger.site == name
        assert ledger.steps == 2 * math.ceil(N_TRAIN[name] / BATCH)
    assert math.isinf(result.ledger.epsilon_spent)
    assert all(math.isinf(h["epsilon"]) for h in result.history)
    model = load_model("resnet9", result.state_dict, len(LABELS))
    scores = np.concatenate([predict(model, VAL[n].images) for n in "ab"])
    labels = np.concatenate([VAL[n].labels for n in "ab"])
    assert auc(scores[:, 0], labels[:, 0]) > 0.9  # the bright square is learnt (init: ~0.2)


def test_a_zero_weight_site_changes_nothing_and_spends_nothing():
    with_b = run(fed_spec(2.0, {"a": 1.0, "b": 0.0}, rounds=2))
    alone = run(fed_spec(2.0, {"a": 1.0}, rounds=2))
    assert_same_state(with_b.state_dict, alone.state_dict)
    assert with_b.site_ledgers["a"] == alone.site_ledgers["a"]
    b = with_b.site_ledgers["b"]
    assert b.steps == 0 and b.epsilon_spent == 0.0 and b.site == "b"
    assert audit_ledger(b.as_dict()).ok
    assert with_b.ledger == with_b.site_ledgers["a"]


# ------------------------------------------------------------------------ resume, determinism


def test_resume_after_a_crash_equals_the_uninterrupted_run(dp_run):
    reference, _ = dp_run
    spec = fed_spec(2.0, {"a": 1.0, "b": 3.0})
    store = MemoryCheckpoints()
    with pytest.raises(KeyboardInterrupt):
        run(spec, checkpoint=store, fail_at_round=3)
    assert store.state["round"] == 2
    resumed = run(spec, checkpoint=store)
    assert resumed.resumed_from_round == 2
    assert_same_state(resumed.state_dict, reference.state_dict)
    assert resumed.site_ledgers == reference.site_ledgers

    def timeless(history: list[dict]) -> list[dict]:  # wall-clock entries differ by nature
        assert all(math.isnan(h["train_loss"]) for h in history)  # DP sites send no loss
        return [
            {
                k: v
                for k, v in h.items()
                if not k.endswith("seconds") and k not in ("site_tasks", "train_loss")
            }
            for h in history
        ]

    assert timeless(resumed.history) == timeless(reference.history)
    assert resumed.best_round == reference.best_round
    np.testing.assert_array_equal(resumed.thresholds, reference.thresholds)

    tampered = MemoryCheckpoints()
    tampered.state = {**store.state, "site_noise": {**store.state["site_noise"]}}
    sigma, q = tampered.state["site_noise"]["b"]
    tampered.state["site_noise"]["b"] = [sigma * 0.9, q]
    with pytest.raises(ValueError, match="never re-calibrated"):
        run(spec, checkpoint=tampered)
    other_seed = dataclasses.replace(spec, seed=1).with_key()
    with pytest.raises(ValueError, match="belongs to trial"):
        run(other_seed, checkpoint=store, plans=plans_of(spec))


def test_a_sites_update_depends_on_its_key_site_and_round_only():
    spec = fed_spec(2.0, {"a": 1.0, "b": 3.0})
    other = fed_spec(2.0, {"b": 1.0, "a": 0.0})  # b in another federation, at another position
    plan = plans_of(spec)[1]
    assert dataclasses.replace(plans_of(other)[0], weight=plan.weight) == plan
    state = build_model("resnet9").state_dict()
    first = fl.local_update(spec, plan, state, TRAIN["b"], round=2, key="k")
    again = fl.local_update(spec, plan, state, TRAIN["b"], round=2, key="k")
    elsewhere = fl.local_update(other, plans_of(other)[0], state, TRAIN["b"], round=2, key="k")
    later = fl.local_update(spec, plan, state, TRAIN["b"], round=3, key="k")
    other_key = fl.local_update(spec, plan, state, TRAIN["b"], round=2, key="k2")
    assert_same_state(first.state, again.state)
    assert_same_state(first.state, elsewhere.state)
    assert first.pos_weight == again.pos_weight == later.pos_weight  # one release, every round
    assert not torch.equal(first.state["head.weight"], later.state["head.weight"])
    assert not torch.equal(first.state["head.weight"], other_key.state["head.weight"])
    # a DP site sends no training statistic: its loss stays at the site
    assert math.isnan(first.train_loss)


def test_dp_sites_draw_secret_keys_so_two_runs_differ_and_the_checkpoint_keeps_them():
    spec = fed_spec(2.0, {"a": 1.0}, rounds=1)
    store = MemoryCheckpoints()
    first = run(spec, checkpoint=store, keys=None)
    second = run(spec, keys=None)
    assert not torch.equal(first.state_dict["head.weight"], second.state_dict["head.weight"])
    key = store.state["site_keys"]["a"]
    assert len(key) == 64 and key not in (str(spec.seed), FIXED_KEYS["a"])
    # the key reproduces the run: the checkpoint (private) is what makes resumes exact
    replay = run(spec, keys={"a": key})
    assert_same_state(replay.state_dict, first.state_dict)
    assert fl.site_keys(fed_spec(math.inf, {"a": 1.0}), plans_of(spec)) == {"a": "0"}


# ------------------------------------------------------------------------------- thresholds


def pooled_youden(validations) -> np.ndarray:
    """Youden thresholds of the sites' pooled histograms (what the coordinator does with the
    selected round's histograms, ``fl.youden_from_histograms``)."""
    return fl.youden_from_histograms(
        np.sum([v.hist_pos for v in validations], axis=0),
        np.sum([v.hist_neg for v in validations], axis=0),
    )


def test_pooled_youden_matches_the_per_image_threshold_within_one_bin():
    rng = np.random.default_rng(0)
    bins = fl.HIST_BINS
    sites = []
    for n in (300, 500):
        labels = (rng.random((n, 2)) < 0.3).astype(np.float64)
        labels[rng.random((n, 2)) < 0.1] = np.nan
        raw = np.clip(rng.normal(0.35 + 0.3 * np.nan_to_num(labels), 0.15), 0, 1 - 1e-9)
        scores = (np.floor(raw * bins) + 0.5) / bins  # mid-bin: every cut is a bin edge
        labels[:, 1] = np.where(np.isnan(labels[:, 1]), np.nan, 0.0)  # label 1: no positives
        sites.append((scores, labels))
    validations = [
        fl.SiteValidation(f"s{i}", 0.5, len(s), *fl.score_histograms(s, y))
        for i, (s, y) in enumerate(sites)
    ]
    pooled = pooled_youden(validations)
    scores = np.concatenate([s for s, _ in sites])
    labels = np.concatenate([y for _, y in sites])
    exact = youden_threshold(scores[:, 0], labels[:, 0])
    assert 0.3 < exact < 0.7
    assert exact - 1 / bins < pooled[0] <= exact
    assert math.isnan(pooled[1]) and math.isnan(youden_threshold(scores[:, 1], labels[:, 1]))


def _released_bins(exact_row: np.ndarray) -> list[tuple[int, int]]:
    """The merged bins of one k-anonymous row, in fine-bin units: runs of public cells, each
    closed once it holds k images (what is left above the last joins it)."""
    width = fl.HIST_BINS // fl.SUMMARY_CELLS
    cells = exact_row.reshape(fl.SUMMARY_CELLS, width).sum(axis=1)
    cuts, start, count = [], 0, 0
    for i, c in enumerate(cells):
        count += c
        if count >= fl.MIN_BIN_IMAGES:
            cuts.append((start * width, (i + 1) * width))
            start, count = i + 1, 0
    if cuts:  # a remainder (or empty cells) above the last full bin joins it
        cuts[-1] = (cuts[-1][0], fl.HIST_BINS)
    return cuts


def test_k_anonymous_histograms_release_no_bin_below_k():
    """Every bin a site releases holds >= k images, spread evenly over public cells; totals
    are kept; a threshold at a released edge counts exactly the images above it; a label-class
    with fewer than k images is not sent."""
    rng = np.random.default_rng(0)
    exact = np.zeros((4, fl.HIST_BINS), dtype=np.int64)
    np.add.at(exact[0], rng.integers(0, fl.HIST_BINS, 63), 1)  # 63 scores, mostly alone in a bin
    exact[1, 500] = fl.MIN_BIN_IMAGES - 1  # too few: not sent
    exact[2, [3, 998]] = [fl.MIN_BIN_IMAGES, 1]  # the top image joins the bin below
    np.add.at(exact[3], np.clip(rng.normal(700, 80, 400).astype(int), 0, 999), 1)
    released = fl.k_anonymous(exact)
    assert released.shape == exact.shape and released.dtype == np.float64
    assert not released[1].any()
    for j in (0, 2, 3):
        assert released[j].sum() == pytest.approx(exact[j].sum())
        bins = _released_bins(exact[j])
        assert bins[0][0] == 0 and bins[-1][1] == fl.HIST_BINS
        for lo, hi in bins:
            assert exact[j, lo:hi].sum() >= fl.MIN_BIN_IMAGES
            assert np.allclose(released[j, lo:hi], released[j, lo])  # one count, spread
            above = exact[j, lo:].sum()
            assert released[j, lo:].sum() == pytest.approx(above)  # exact at released edges
    assert len(_released_bins(exact[2])) == 1  # 11 images: one bin


def test_a_sites_validation_summary_hides_single_images():
    """The issue's case: per-image scores of a small validation split (13 images) used to be
    alone in their histogram bins; what a site sends now describes at least k images per bin."""
    state = build_model("resnet9").state_dict()
    spec = fed_spec(math.inf, {"a": 1.0})
    small = toy_split(13, seed=5)
    summary = fl.validate_site(spec, "a", state, small)
    model = load_model("resnet9", state, len(LABELS))
    exact_pos, exact_neg = fl.score_histograms(predict(model, small.images), small.labels)
    assert ((exact_pos + exact_neg) == 1).sum() >= 13  # in full detail, images stand alone
    for released, exact in ((summary.hist_pos, exact_pos), (summary.hist_neg, exact_neg)):
        for j in range(len(LABELS)):
            if exact[j].sum() < fl.MIN_BIN_IMAGES:
                assert not released[j].any()
            else:
                for lo, hi in _released_bins(exact[j]):
                    assert released[j, lo:hi].sum() >= fl.MIN_BIN_IMAGES - 1e-9
    assert summary.n == 13


def test_pooled_thresholds_from_k_anonymous_summaries_lie_on_the_public_grid(dp_run):
    """The coordinator pools what the sites sent: its Youden thresholds are edges of the
    public 50-cell grid (or +inf / NaN), never a single image's score."""
    result, _ = dp_run
    finite = result.thresholds[np.isfinite(result.thresholds)]
    assert len(finite)
    cells = finite * fl.SUMMARY_CELLS
    np.testing.assert_allclose(cells, np.round(cells), atol=1e-9)
