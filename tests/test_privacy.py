"""The guarantee around DP-SGD: neighbouring datasets, empty batches, exact calibration, the
label-count release, and the ledger's own checks. Real Opacus, small real arrays, no Ray."""

from __future__ import annotations

import dataclasses
import math

import dpcheck
import numpy as np
import pytest
import torch

from privdom_ray import dpstep, lossweights, privacy
from privdom_ray.cache import SplitData
from privdom_ray.config import TrainingConfig, TrialSpec
from privdom_ray.imaging import Preprocessing
from privdom_ray.manifest import LABELS
from privdom_ray.models import build_model
from privdom_ray.train import Randomness, noise_plan, prepare_training, train_epoch

IMAGE_MODES = ["hooks", "functorch", "ew", "ghost", "bk"]
PATIENT_MODES = ["hooks", "functorch", "ew"]  # bk and ghost never materialise per-image grads


def split(n_patients: int, per_patient: int, size: int = 16, seed: int = 0) -> SplitData:
    rng = np.random.default_rng(seed)
    n = n_patients * per_patient
    labels = (rng.random((n, len(LABELS))) < 0.4).astype(np.float32)
    labels[rng.random((n, len(LABELS))) < 0.1] = np.nan
    images = rng.integers(0, 255, size=(n, size, size), dtype=np.uint8)
    patient = np.repeat([f"p{i:03d}" for i in range(n_patients)], per_patient).astype(object)
    return SplitData(
        images, labels, np.array(["F", "M"] * (n // 2)), rng.uniform(20, 90, n), patient
    )


def drop_rows(data: SplitData, rows: np.ndarray) -> SplitData:
    keep = np.setdiff1d(np.arange(len(data)), rows)
    return SplitData(*(None if a is None else a[keep] for a in dataclasses.astuple(data)))


def dp_spec(mode: str, unit: str, epsilon: float = 2.0, **training) -> TrialSpec:
    cfg = dict(epochs=1, logical_batch=8, physical_batch=4, lr=1e-3, max_grad_norm=0.5)
    cfg.update(training)
    return TrialSpec(
        source="toy",
        data_fingerprint="x",
        epsilon=epsilon,
        delta=1e-5,
        seed=0,
        model="resnet9",
        training=TrainingConfig(**cfg, grad_sample_mode=mode, privacy_unit=unit),
        preprocessing=Preprocessing(image_size=16),
    ).with_key()


def capture_clipped_sum(optimizer) -> list:
    """Wrap the DP optimizer's add_noise (both Opacus optimizer classes keep the clipped sum in
    ``p.summed_grad`` there) to record the sum before the noise is added."""
    seen: list = []
    original = optimizer.add_noise

    def add_noise() -> None:
        seen.append([p.summed_grad.detach().clone() for p in optimizer.params])
        original()

    optimizer.add_noise = add_noise
    return seen


def clipped_sum(spec: TrialSpec, data: SplitData, weights: torch.Tensor, batch: list[str]):
    """One logical DP-SGD step on the images (or patients) ``batch``, noise 0: the clipped sum."""
    torch.manual_seed(0)
    model = build_model(spec.model)
    t = prepare_training(
        spec, model, torch.optim.SGD(model.parameters(), lr=0.1), data,
        randomness=Randomness.for_trial(0, "cpu", secret=False), weights=weights,
        noise_multiplier=0.0, device="cpu", memory_budget_mb=512,
    )  # fmt: skip
    seen = capture_clipped_sum(t.optimizer)
    if t.by_patient:
        ids = np.unique(data.patient.astype(str))
        t.loader = [torch.as_tensor([int(np.flatnonzero(ids == p)[0]) for p in batch])]
        train_epoch(t)  # the patient path: per-image gradients summed per patient, then clipped
    else:
        rows = np.array([int(r) for r in batch])
        x = torch.from_numpy(data.images[rows])
        y = torch.from_numpy(data.labels[rows])
        t.optimizer.zero_grad(set_to_none=True)
        t.criterion(t.model(t.inputs(x)), y).backward()
        t.optimizer.step()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize(
    "mode,unit",
    [(m, "image") for m in IMAGE_MODES] + [(m, "patient") for m in PATIENT_MODES],
)
def test_removing_a_unit_outside_the_batch_leaves_the_clipped_sum_unchanged(mode, unit):
    """DP-SGD's sensitivity bound: each example's clipped gradient depends on that example
    only. With loss weights released beforehand (and fixed, as the analysis conditions on a
    released value), removing one training image (patient) that is not in the batch must not
    move the pre-noise clipped sum at all."""
    spec = dp_spec(mode, unit)
    data = split(12, 3)
    released = torch.tensor([2.0, 1.5, 3.0, 0.8, 1.2])
    if unit == "image":
        batch, removed = [str(r) for r in range(6)], np.array([30])
    else:
        batch, removed = ["p000", "p001", "p002"], np.flatnonzero(data.patient == "p010")
    neighbour = drop_rows(data, removed)
    full = clipped_sum(spec, data, released, batch)
    without = clipped_sum(spec, neighbour, released, batch)
    for a, b in zip(full, without, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the test can fail: weights computed from each dataset's exact counts (the original code's
    # pos_weight) make the sum depend on the removed unit
    exact = [
        torch.tensor(lossweights.exact_pos_weight(d.labels), dtype=torch.float32)
        for d in (data, neighbour)
    ]
    moved = clipped_sum(spec, data, exact[0], batch)
    moved_without = clipped_sum(spec, neighbour, exact[1], batch)
    assert max(float((a - b).abs().max()) for a, b in zip(moved, moved_without, strict=True)) > 1e-5


@pytest.mark.parametrize(
    "mode,unit",
    [(m, "image") for m in IMAGE_MODES] + [(m, "patient") for m in PATIENT_MODES],
)
def test_every_mode_takes_an_empty_poisson_batch_as_a_noise_only_step(mode, unit):
    per_patient = 1 if unit == "image" else 2
    data = split(8, per_patient)
    spec = dp_spec(mode, unit, logical_batch=1, physical_batch=1)  # q = 1/8, 8 steps
    torch.manual_seed(0)
    model = build_model(spec.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = Randomness.for_trial(3, "cpu", secret=False)  # seed 3: 4 of the 8 batches are empty
    t = prepare_training(
        spec, model, torch.optim.SGD(model.parameters(), lr=0.1), data, randomness=rng,
        weights=torch.ones(len(LABELS)), noise_multiplier=1.0, device="cpu",
        memory_budget_mb=512,
    )  # fmt: skip
    seen = capture_clipped_sum(t.optimizer)
    train_epoch(t)
    assert t.accounted_steps() == 8 == len(seen)  # every step noised and counted
    empty = [s for s in seen if all(float(g.abs().max()) == 0.0 for g in s)]
    assert 1 <= len(empty) < 8  # the seed gives empty and non-empty Poisson batches
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())


ROUNDING = [k for k in range(2, 3000) if int(1 / (1 / k)) != k][:12]  # 93, 99, 105, ...


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_covers_the_steps_the_sampler_really_takes(accountant):
    """Opacus's Poisson sampler takes epochs x int(1/q) steps; for q = 1/k that is k - 1 per
    epoch where 1/(1/k) rounds below k. The old path calibrated for int(epochs/q), one step
    short for many (k, epochs): e.g. 75 batches x 6 epochs at epsilon 8 spent 8.005."""
    combos = [(75, 6, 8.0), (93, 3, 1.0)] + [(k, e, 2.0) for k in ROUNDING for e in (1, 7)]
    if accountant == "prv":
        combos = combos[:4]
    for batches, epochs, eps in combos:
        spec = dp_spec(
            "bk", "image", epsilon=eps, epochs=epochs, logical_batch=32, accountant=accountant
        )
        plan = noise_plan(spec, units=batches * 32)
        assert plan.sample_rate == 1 / batches
        assert plan.steps == epochs * int(1 / plan.sample_rate)
        spent, used = privacy.epsilon_of(accountant, plan.mechanisms, spec.delta)
        assert spent <= eps, (batches, epochs, spent)
        assert spent >= 0.98 * eps and used == accountant
        assert [m.name for m in plan.mechanisms] == ["label_counts", "dp_sgd"]


def test_the_label_count_release_is_a_gaussian_mechanism_with_the_right_sensitivity():
    labels = np.array([[1, 0, np.nan, 1, 0], [0, 0, 1, np.nan, 1], [1, 1, 0, 0, 0]], float)
    pos, neg = lossweights.label_contributions(labels)
    np.testing.assert_array_equal(pos, [2, 1, 1, 1, 1])
    np.testing.assert_array_equal(neg, [1, 2, 1, 1, 2])
    # per patient: a patient contributes at most 1 per label (fractions of its images)
    ppos, pneg = lossweights.label_contributions(labels, np.array(["a", "a", "b"]))
    np.testing.assert_allclose(ppos, [1.5, 1, 0.5, 0.5, 0.5])  # fractions of all its images
    assert np.all(ppos + pneg <= 2 + 1e-12)  # 2 patients
    # removing any one unit moves the 10 counts by at most sqrt(5) in L2
    for r in range(3):
        p2, n2 = lossweights.label_contributions(np.delete(labels, r, axis=0))
        assert np.sqrt(((pos - p2) ** 2).sum() + ((neg - n2) ** 2).sum()) <= math.sqrt(5) + 1e-12
    # the released weights scatter around the exact ones with the mechanism's noise
    many = np.array(
        [
            lossweights.release_counts(
                np.tile(labels, (300, 1)), None, 2.0, torch.Generator().manual_seed(s)
            )
            for s in range(200)
        ]
    )
    exact = lossweights.exact_pos_weight(np.tile(labels, (300, 1)))
    np.testing.assert_allclose(np.median(many, axis=0), exact, rtol=0.1)
    assert np.all(many.std(axis=0) > 0)


def test_the_count_release_costs_its_budget_fraction_and_the_total_stays_on_target():
    eps, delta = 1.0, 1e-5
    z = privacy.count_noise_multiplier(eps, delta, 0.05)
    mu = privacy.gdp_mu(eps, delta)
    assert (1 / z) ** 2 == pytest.approx(0.05 * mu**2)
    plan = privacy.calibrate(
        epsilon=eps, delta=delta, sample_rate=1 / 8, steps=48, accountant="prv", count_fraction=0.05
    )
    alone = privacy.calibrate(
        epsilon=eps, delta=delta, sample_rate=1 / 8, steps=48, accountant="prv"
    )
    assert plan.noise_multiplier > alone.noise_multiplier  # DP-SGD pays for the release
    assert plan.noise_multiplier < 1.05 * alone.noise_multiplier  # ... about 2% more noise
    spent, _ = privacy.epsilon_of("prv", plan.mechanisms, delta)
    assert 0.99 * eps <= spent <= eps


def test_exact_label_counts_are_refused_for_dp_trials():
    from privdom_ray.train import loss_weights

    spec = dp_spec("bk", "image")
    exact = dataclasses.replace(
        spec, training=dataclasses.replace(spec.training, pos_weight="exact")
    )
    with pytest.raises(ValueError, match="exact private label counts"):
        loss_weights(exact, split(4, 1), torch.Generator())
    assert spec.loss_weight_source == "dp_counts"
    nondp = dataclasses.replace(spec, epsilon=math.inf)
    assert nondp.loss_weight_source == "exact"
    fixed = dataclasses.replace(
        spec, training=dataclasses.replace(spec.training, pos_weight=(1.0,) * 5)
    )
    assert loss_weights(fixed, split(4, 1), torch.Generator()).values == (1.0,) * 5


def test_a_void_ledger_and_columns_that_disagree_with_the_mechanisms_are_caught():
    plan = privacy.calibrate(
        epsilon=2.0, delta=1e-5, sample_rate=1 / 4, steps=8, accountant="rdp", count_fraction=0.05
    )
    ledger = privacy.make_ledger(
        epsilon_target=2.0, delta=1e-5, plan=plan, max_grad_norm=1.0, accountant="rdp",
        loss_weights="dp_counts",
    ).as_dict()  # fmt: skip
    assert privacy.audit_ledger(ledger).ok and privacy.check_epsilon(ledger) == []
    # a ledger written before noise was secret is void
    old = {k: v for k, v in ledger.items() if k not in ("mechanisms", "mechanism_version")}
    assert "void" in privacy.audit_ledger(old).problem
    # a ledger whose columns disagree with its mechanisms is caught
    assert "disagree" in privacy.audit_ledger({**ledger, "steps": 9}).problem
    # the independent PLD accountant agrees with RDP's upper bound from below
    pld = privacy.pld_epsilon(plan.mechanisms, 1e-5)
    assert 0.5 * ledger["epsilon_spent"] < pld <= ledger["epsilon_spent"]


@pytest.mark.parametrize("mode", dpstep.DP_MODES)
def test_no_clipped_gradient_exceeds_the_clipping_bound(mode, one_torch_thread):
    """The accountant assumes every example's clipped gradient has norm <= C (the noise is
    sigma C). Clipping to exactly C with float32 norms overshot: 1.0000117 C in Opacus's modes
    at 32 px, 1.0000002 C in bk. Every mode now clips to (1 - CLIP_MARGIN) C."""
    norms, clip = dpcheck.clipped_norms("resnet9", mode, image_size=32)
    assert max(norms) <= clip, (mode, max(norms) / clip)
    # every example was clipped, to the margin's bound and no further
    assert min(norms) >= (1 - 2 * dpstep.CLIP_MARGIN) * clip


def test_every_column_of_every_table_has_a_privacy_class():
    """A column added to a table without a class stops `export` (it would not know whether
    the column may leave): every column the tables have today is classified."""
    import pyarrow as pa

    from privdom_ray.folder import TRANSFER
    from privdom_ray.stats import quantities, results

    tables = {
        TRANSFER: results.SCHEMA,
        "comparisons.parquet": quantities.SCHEMA,
        "reliability.parquet": quantities.RELIABILITY_SCHEMA,
    }
    for name, schema in tables.items():
        missing = [c for c in schema.names if results.privacy_class(c, name) is None]
        assert missing == [], (name, missing)
        classes = {results.privacy_class(c, name) for c in schema.names}
        assert classes <= set(results.PRIVACY_CLASSES), name
    assert results.privacy_class("train_seconds") == "timing"  # depends on the training set
    with pytest.raises(KeyError, match="'new_column'"):
        results.with_privacy_metadata(pa.table({"new_column": [1]}), "comparisons.parquet")
