"""The training core without Ray: real Opacus DP-SGD on small real arrays."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import toy_split
from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct
from opacus.validators import ModuleValidator

from privdom_ray.cache import SplitData
from privdom_ray.config import TrainingConfig, TrialSpec
from privdom_ray.dpstep import MaskedBCELoss
from privdom_ray.imaging import Preprocessing
from privdom_ray.lossweights import exact_pos_weight
from privdom_ray.models import MODELS, build_model
from privdom_ray.privacy import epsilon_of
from privdom_ray.train import Randomness, run_trial

# 15 DP runs here, of 5 distinct configurations: each calibrated once (conftest)
pytestmark = pytest.mark.usefixtures("calibrated_once")


def masked_bce(logits, target, weight):
    return MaskedBCELoss(weight)(logits, target)


def pos_weight(labels):
    return torch.tensor(exact_pos_weight(labels), dtype=torch.float32)


def fixed_randomness(seed: int = 0) -> Randomness:
    """Injected generators: the Python API's way to make a DP run replayable in a test."""
    return Randomness.for_trial(seed, "cpu", secret=False)


def spec(epsilon: float, epochs: int = 2, model: str = "resnet9") -> TrialSpec:
    return TrialSpec(
        source="toy",
        data_fingerprint="x",
        epsilon=epsilon,
        delta=1e-5 if math.isfinite(epsilon) else 0.0,
        seed=0,
        model=model,
        training=TrainingConfig(epochs=epochs, logical_batch=32, physical_batch=8, lr=1e-3),
        preprocessing=Preprocessing(image_size=16),
    ).with_key()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_is_opacus_valid_with_correct_per_sample_grads(name):
    model = build_model(name)
    assert ModuleValidator.validate(model, strict=False) == []
    x = torch.randn(4, 1, 32, 32)
    assert check_per_sample_gradients_are_correct(x, model, atol=1e-4, rtol=1e-3)


def test_masked_bce_ignores_masked_labels():
    logits = torch.zeros(2, 5)
    weight = torch.ones(5)
    full = masked_bce(logits, torch.ones(2, 5), weight)
    masked = masked_bce(logits, torch.tensor([[1.0] * 4 + [math.nan]] * 2), weight)
    assert masked.item() == pytest.approx(full.item() * 4 / 5)


def test_pos_weight_is_negatives_over_positives():
    labels = np.array([[1, 0], [0, 0], [0, np.nan], [1, 0]], dtype=np.float32)
    assert pos_weight(labels).tolist() == [1.0, 1.0]  # label 2 has no positives -> 1
    labels[0, 1] = 1
    assert pos_weight(labels)[1].item() == pytest.approx(2.0)


def test_dp_trial_spends_at_most_its_epsilon_and_the_ledger_reproduces_it():
    train, val = toy_split(96, 16, 0), toy_split(32, 16, 1)
    epochs_seen = []
    result = run_trial(spec(2.0), train, val, on_epoch=epochs_seen.append)
    ledger = result.ledger
    assert [e["epoch"] for e in epochs_seen] == [1, 2]
    assert ledger.poisson_sampling and ledger.accountant in ("prv", "rdp")
    assert ledger.sample_rate == pytest.approx(1 / math.ceil(96 / 32))
    assert ledger.steps == 2 * math.ceil(96 / 32)
    assert 0 < ledger.epsilon_spent <= 2.0 + 1e-6
    recomputed, _ = epsilon_of(ledger.accountant, ledger.mechanisms, ledger.delta)
    assert recomputed == pytest.approx(ledger.epsilon_spent, rel=1e-6)
    assert ledger.epsilon_rdp >= ledger.epsilon_spent * 0.99  # RDP is the looser bound
    # the loss weights are the label counts released with noise, composed into epsilon
    assert ledger.loss_weights == "dp_counts"
    assert [m.name for m in ledger.mechanisms] == ["label_counts", "dp_sgd"]
    assert set(result.state_dict) == set(build_model("resnet9").state_dict())


def test_non_private_trial_learns_and_is_deterministic():
    train, val = toy_split(128, 16, 0), toy_split(64, 16, 1)
    a = run_trial(spec(math.inf, epochs=3), train, val)
    b = run_trial(spec(math.inf, epochs=3), train, val)
    assert math.isinf(a.ledger.epsilon_spent) and a.ledger.noise_multiplier == 0
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]
    np.testing.assert_array_equal(a.val_scores, b.val_scores)
    # the bright-square label is learnable
    from privdom_ray.stats.metrics import auc

    assert auc(a.val_scores[:, 0], val.labels[:, 0]) > 0.8


def test_channels_last_trains_the_same_model():
    """NHWC (the GPU default) is a layout, not a different model: same ledger, same weights
    up to float rounding, stored in NCHW."""
    train, val = toy_split(96, 16, 0), toy_split(48, 16, 1)
    nchw = run_trial(spec(2.0, epochs=1), train, val, randomness=fixed_randomness())
    nhwc = run_trial(
        spec(2.0, epochs=1), train, val, channels_last=True, randomness=fixed_randomness()
    )
    assert nhwc.ledger == nchw.ledger
    for name, w in nhwc.state_dict.items():
        assert w.is_contiguous(), name
        torch.testing.assert_close(w, nchw.state_dict[name], atol=1e-4, rtol=1e-3)


def test_channels_last_falls_back_to_nchw_where_a_mode_would_clip_wrong():
    train, val = toy_split(64, 16, 0), toy_split(32, 16, 1)
    hooks = spec(2.0, epochs=1)
    hooks = dataclasses.replace(
        hooks, training=dataclasses.replace(hooks.training, grad_sample_mode="hooks")
    ).with_key()
    with pytest.warns(UserWarning, match="training in NCHW"):
        nhwc = run_trial(hooks, train, val, channels_last=True, randomness=fixed_randomness())
    nchw = run_trial(hooks, train, val, randomness=fixed_randomness())
    for name, w in nhwc.state_dict.items():
        torch.testing.assert_close(w, nchw.state_dict[name], rtol=0, atol=0)


class MemoryCheckpoints:
    """A checkpoint store in memory that keeps every save and can simulate a crash."""

    def __init__(self, crash_after_epoch: int | None = None) -> None:
        self.state = None
        self.saved: dict[int, dict] = {}
        self.crash_after_epoch = crash_after_epoch

    def load(self):
        return self.state

    def save(self, state):
        self.state = torch.load(_roundtrip(state), weights_only=True)  # what a file would give back
        self.saved[state["epoch"]] = self.state
        if state["epoch"] == self.crash_after_epoch:
            raise KeyboardInterrupt("simulated crash")


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def assert_same_weights(a, b):
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=0, atol=0)


# DP: two 3-epoch runs and a calibration of its own, ~10 s on 2 cores (the quick suite keeps inf)
@pytest.mark.parametrize("epsilon", [pytest.param(2.0, marks=pytest.mark.slow), math.inf])
def test_resume_from_checkpoint_equals_uninterrupted_run(epsilon):
    """With secret randomness nothing outside the checkpoint can replay a DP run: resuming
    from the epoch-1 checkpoint of a run must still reproduce that run bit for bit."""
    train, val = toy_split(96, 16, 0), toy_split(32, 16, 1)
    store = MemoryCheckpoints()
    reference = run_trial(spec(epsilon, epochs=3), train, val, checkpoint=store)
    after_first = MemoryCheckpoints()
    after_first.state = store.saved[1]
    resumed = run_trial(spec(epsilon, epochs=3), train, val, checkpoint=after_first)
    assert resumed.resumed_from_epoch == 1
    assert resumed.ledger == reference.ledger  # same sigma, q, steps, released loss weights
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert_same_weights(reference.state_dict, resumed.state_dict)


def test_a_crash_then_resume_gives_a_complete_run():
    train, val = toy_split(96, 16, 0), toy_split(32, 16, 1)
    store = MemoryCheckpoints(crash_after_epoch=1)
    with pytest.raises(KeyboardInterrupt):
        run_trial(spec(2.0, epochs=3), train, val, checkpoint=store)
    store.crash_after_epoch = None
    resumed = run_trial(spec(2.0, epochs=3), train, val, checkpoint=store)
    assert resumed.resumed_from_epoch == 1 and resumed.ledger.steps == 3 * 3


def test_two_fresh_dp_runs_differ_but_non_private_runs_repeat():
    """DP noise and sampling come from OS entropy (the published seed cannot replay them);
    non-private training follows the public seed."""
    train, val = toy_split(64, 16, 0), toy_split(32, 16, 1)
    a = run_trial(spec(2.0, epochs=1), train, val)
    b = run_trial(spec(2.0, epochs=1), train, val)
    assert not torch.equal(a.state_dict["head.weight"], b.state_dict["head.weight"])
    assert a.ledger.randomness == "os-entropy" and a.ledger.mechanism_version == 2
    assert a.ledger.pos_weight != b.ledger.pos_weight  # the released counts are noised afresh
    c = run_trial(spec(math.inf, epochs=1), train, val)
    d = run_trial(spec(math.inf, epochs=1), train, val)
    assert_same_weights(c.state_dict, d.state_dict)
    # generators injected through the Python API replay a DP run, and the ledger says so
    e = run_trial(spec(2.0, epochs=1), train, val, randomness=fixed_randomness())
    f = run_trial(spec(2.0, epochs=1), train, val, randomness=fixed_randomness())
    assert_same_weights(e.state_dict, f.state_dict)
    assert e.ledger.randomness == "injected" and e.ledger.void


def test_training_starts_from_given_weights():
    train, val = toy_split(32, 16, 0), toy_split(16, 16, 1)
    start = build_model("resnet9").state_dict()
    for v in start.values():
        if v.is_floating_point():
            v.add_(0.01)  # distinct from the seed's own initialisation
    frozen = TrialSpec(
        **{**spec(math.inf, epochs=1).__dict__, "training": TrainingConfig(epochs=1, lr=1e-12)}
    )
    result = run_trial(frozen, train, val, init_state=start)
    for name, tensor in start.items():
        torch.testing.assert_close(result.state_dict[name], tensor, rtol=0, atol=1e-6)


def test_augmentation_flips_and_rotates_per_image():
    from privdom_ray.train import augment

    batch = torch.rand(64, 1, 16, 16)
    out = augment(batch, generator=torch.Generator().manual_seed(0))
    assert out.shape == batch.shape
    changed = (out - batch).abs().flatten(1).amax(1) > 1e-3
    assert 0 < changed.sum() <= 64  # images are transformed individually
    again = augment(batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)


def test_auto_physical_batch_changes_memory_use_not_privacy():
    train, val = toy_split(64, 16, 0), toy_split(16, 16, 1)
    fixed = spec(2.0, epochs=1)
    auto = TrialSpec(
        **{
            **fixed.__dict__,
            "training": TrainingConfig(epochs=1, logical_batch=32, physical_batch=0),
        }
    ).with_key()
    a = run_trial(fixed, train, val)
    b = run_trial(auto, train, val, memory_budget_mb=512)
    assert a.ledger.pos_weight != b.ledger.pos_weight  # fresh secret draws, same mechanism
    for field in ("noise_multiplier", "sample_rate", "steps", "epsilon_spent"):
        assert getattr(a.ledger, field) == getattr(b.ledger, field), field


def patient_split(n_patients: int, per_patient: int, size: int, seed: int) -> SplitData:
    base = toy_split(n_patients * per_patient, size, seed)
    patient = np.repeat([f"p{i}" for i in range(n_patients)], per_patient).astype(object)
    return SplitData(base.images, base.labels, base.sex, base.age, patient)


def test_patient_level_step_clips_each_patients_summed_gradient():
    import copy

    from opacus import PrivacyEngine

    from privdom_ray import dpstep
    from privdom_ray.train.data import _as_input
    from privdom_ray.train.patients import _patient_epoch, _patient_loader

    torch.manual_seed(0)
    train = patient_split(4, 3, 8, 0)
    weight = pos_weight(train.labels)
    model = build_model("resnet9")
    reference_model = copy.deepcopy(model)
    clip = 0.05  # small enough that every patient's gradient is clipped
    loader, rows = _patient_loader(
        train, logical_batch=4, generator=torch.Generator().manual_seed(0)
    )
    assert loader.batch_sampler.sample_rate == 1.0  # every patient in the one step: deterministic
    dp_model, optimizer, criterion, loader = dpstep.privatize(
        PrivacyEngine(accountant="rdp"),
        mode="hooks",
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=loader,
        criterion=dpstep.MaskedBCELoss(weight),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        poisson_sampling=False,
    )
    before = {k: v.clone() for k, v in reference_model.state_dict().items()}
    _patient_epoch(
        dp_model,
        optimizer,
        criterion,
        loader,
        rows,
        train,
        lambda x: _as_input(x, torch.device("cpu")),
        2,
        torch.device("cpu"),
    )

    # reference: per patient, the gradient of the sum of its images' losses, clipped to C
    # (less the safety margin every mode clips with)
    params = dict(reference_model.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for r in rows:
        reference_model.zero_grad()
        x = _as_input(torch.from_numpy(train.images[r]), torch.device("cpu"))
        y = torch.from_numpy(train.labels[r])
        (masked_bce(reference_model(x), y, weight) * len(r)).backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params.values()))
        factor = min(1.0, clip * (1 - dpstep.CLIP_MARGIN) / (float(norm) + 1e-6))
        assert factor < 1.0
        for k, p in params.items():
            total[k] += factor * p.grad
    for k in params:
        expected = before[k] - total[k] / 4  # lr 1, divided by the expected number of patients
        torch.testing.assert_close(model.state_dict()[k], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # ~14 s on 2 cores: its (per-patient) q and steps need a calibration of their own
def test_patient_level_trial_accounts_per_patient():
    train, val = patient_split(30, 3, 16, 0), toy_split(32, 16, 1)
    patient_spec = TrialSpec(
        **{
            **spec(2.0, epochs=2).__dict__,
            "training": TrainingConfig(
                epochs=2, logical_batch=8, physical_batch=8, privacy_unit="patient"
            ),
        }
    ).with_key()
    result = run_trial(patient_spec, train, val)
    ledger = result.ledger
    assert ledger.privacy_unit == "patient" and ledger.poisson_sampling
    assert ledger.sample_rate == pytest.approx(1 / math.ceil(30 / 8))  # over patients, not images
    assert ledger.steps == 2 * math.ceil(30 / 8)
    assert 0 < ledger.epsilon_spent <= 2.0 + 1e-6
    recomputed, _ = epsilon_of(ledger.accountant, ledger.mechanisms, ledger.delta)
    assert recomputed == pytest.approx(ledger.epsilon_spent, rel=1e-6)
