"""Gradient and input canaries with real Opacus: exact injection in every DP mode (and plain
NAdam), separation without noise and none with huge noise, a broken run caught by the audit."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privdom_ray import audit_bound, dpstep
from privdom_ray.cache import SplitData
from privdom_ray.canaries import (
    Fault,
    GradientCanaries,
    audit_canaries,
    dirac_coordinates,
    draw_coins,
    input_canary_losses,
    make_input_canaries,
    with_input_canaries,
)
from privdom_ray.canaries.gradient import _step_llr

CLIP = 0.5
pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha"),
    pytest.mark.filterwarnings("ignore:Using a non-full backward hook"),
]


def _conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Mish(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )


def _batch(n: int = 6, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, size, size, generator=gen), (
        torch.rand(n, 5, generator=gen) < 0.3
    ).float()


def _dp_steps(
    mode: str,
    canaries: bool,
    included: np.ndarray | None = None,
    nhwc: bool = False,
    *,
    sigma: float = 0.0,
    noise_seed: int = 11,
    replay_seed: int | None = None,
    fault: Fault | None = None,
):
    """Two DP steps (noiseless by default): one logical batch in two physical batches (a skipped
    step, as BatchMemoryManager does), then an empty Poisson batch. Returns each step's released
    gradient (flat, logical order), the canaries and the optimizer. ``nhwc``: channels_last
    weights and batches (the training core's option); ``replay_seed``: the replay attack's
    generator; ``fault``: a broken build."""
    x, y = _batch()
    module = _conv_model()
    if nhwc:
        module.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    params = list(module.parameters())
    model, opt, crit, _ = dpstep.privatize(
        PrivacyEngine(accountant="rdp"), mode=mode, module=module,
        optimizer=torch.optim.SGD(params, lr=0.0), data_loader=DataLoader(TensorDataset(x, y), batch_size=6),
        criterion=dpstep.MaskedBCELoss(), noise_multiplier=sigma, max_grad_norm=CLIP,
        noise_generator=torch.Generator().manual_seed(noise_seed),
    )  # fmt: skip
    if fault is not None:
        fault.apply(opt)
    can = None
    if canaries:
        known = None if replay_seed is None else torch.Generator().manual_seed(replay_seed)
        can = GradientCanaries.attach(
            opt, count=60, sample_rate=1.0, generator=torch.Generator().manual_seed(3),
            auditor_seed=7, included=included, known_noise=known,
        )  # fmt: skip
    released = []
    opt.zero_grad(set_to_none=True)
    for i, (xs, ys) in enumerate([(x[:4], y[:4]), (x[4:], y[4:])]):
        crit(model(xs), ys).backward()
        opt.signal_skip_step(do_skip=i == 0)
        opt.step()
        if i == 0:
            opt.zero_grad(set_to_none=True)  # keeps the skipped step's clipped sum
    released.append(torch.cat([p.grad.reshape(-1) for p in params]).clone())
    opt.zero_grad(set_to_none=True)
    if mode in ("functorch", "ew"):  # their forward rejects an empty batch: as the training core does
        for p in params:
            p.grad_sample = torch.zeros((0, *p.shape))
    else:
        crit(model(x[:0]), y[:0]).backward()
    opt.step()
    released.append(torch.cat([p.grad.reshape(-1) for p in params]).clone())
    return released, can, opt


@pytest.mark.parametrize(
    "mode, nhwc", [(m, False) for m in dpstep.DP_MODES] + [(m, True) for m in dpstep.NHWC_MODES]
)
def test_gradient_canary_is_added_to_the_clipped_sum_exactly_once_per_step(mode, nhwc):
    included = np.arange(60) % 3 != 0  # canaries 0, 3, 6, ... excluded
    plain, _, _ = _dp_steps(mode, canaries=False, nhwc=nhwc)
    got, can, opt = _dp_steps(mode, canaries=True, included=included, nhwc=nhwc)
    assert can.steps == 2 and can.insertions == 2 * included.sum()
    expected_batch = opt.expected_batch_size
    for step in range(2):
        extra = np.zeros(len(got[step]))
        extra[can.coordinates[included]] = CLIP / expected_batch  # C e_j / B, once
        np.testing.assert_allclose((got[step] - plain[step]).numpy(), extra, atol=1e-7)
    assert float(plain[1].abs().max()) == 0.0  # the empty step: canaries only
    released = (got[0] + got[1]).numpy()[can.coordinates]
    np.testing.assert_allclose(can.scores(), released, rtol=1e-6, atol=1e-9)


def test_likelihood_ratios_read_the_noised_sum_and_the_replay_removes_that_noise():
    """llr_scores: step_llr of each step's clipped sum + noise (before the division by the
    expected batch), in units of sigma C. The replay from the noise's own seed leaves the
    noiseless steps' ratios exactly; a replay from another seed does not."""
    included = np.arange(60) % 3 != 0
    sigma = 1.3
    clean, _, opt = _dp_steps("hooks", canaries=True, included=included)
    noisy, can, _ = _dp_steps(
        "hooks", canaries=True, included=included, sigma=sigma, noise_seed=5, replay_seed=5
    )
    batch, std = opt.expected_batch_size, sigma * CLIP

    def llr(steps):
        return sum(
            audit_bound.step_llr(g.double().numpy()[can.coordinates] * batch / std, 1.0, 1 / sigma)
            for g in steps
        )

    assert can.steps == 2
    np.testing.assert_allclose(can.llr_scores(), llr(noisy), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(can.replay_scores(), llr(clean), rtol=1e-5, atol=1e-5)
    assert np.abs(can.llr_scores() - llr(clean)).max() > 0.1  # the noise is there...
    _, other, _ = _dp_steps(
        "hooks", canaries=True, included=included, sigma=sigma, noise_seed=5, replay_seed=6
    )
    assert np.abs(other.replay_scores() - llr(clean)).max() > 0.1  # ...and only its seed undoes it


def test_torch_and_numpy_likelihood_ratios_agree():
    z = np.linspace(-8.0, 8.0, 161)
    for q, shift in ((0.125, 0.28), (1.0, 1.1), (0.01, 3.0)):
        got = _step_llr(torch.from_numpy(z), q, shift).numpy()
        np.testing.assert_allclose(got, audit_bound.step_llr(z, q, shift), rtol=1e-12)


def test_a_fault_scales_the_noise_added_while_the_optimizer_keeps_its_sigma():
    """The broken builds of tests and benchmarks: noise x0.5 or none, sigma unchanged."""
    plain, _, _ = _dp_steps("hooks", canaries=False)
    full, _, _ = _dp_steps("hooks", canaries=False, sigma=2.0, noise_seed=5)
    half, _, opt = _dp_steps(
        "hooks", canaries=False, sigma=2.0, noise_seed=5, fault=Fault(noise_scale=0.5)
    )
    none, _, _ = _dp_steps("hooks", canaries=False, sigma=2.0, fault=Fault(noise_scale=0.0))
    for p_, f_, h_, n_ in zip(plain, full, half, none, strict=True):
        np.testing.assert_allclose((h_ - p_).numpy(), 0.5 * (f_ - p_).numpy(), atol=1e-6)
        np.testing.assert_allclose(n_.numpy(), p_.numpy(), atol=1e-7)
        assert float((f_ - p_).abs().max()) > 0.1
    assert opt.noise_multiplier == 2.0  # what the accountant and the ledger see


def test_plain_optimizer_gets_the_canary_in_its_averaged_gradient():
    x, y = _batch()
    module, ref = _conv_model(), _conv_model()
    opt = torch.optim.NAdam(module.parameters(), lr=1e-3)
    can = GradientCanaries.attach(
        opt, count=60, sample_rate=0.5, generator=torch.Generator().manual_seed(4),
        auditor_seed=7, max_grad_norm=CLIP, expected_batch_size=8.0,
    )  # fmt: skip
    sampled = []
    for _ in range(3):
        before = can.insertions
        opt.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        dpstep.MaskedBCELoss()(module(x), y).backward()
        dpstep.MaskedBCELoss()(ref(x), y).backward()
        opt.step()
        got = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
        want = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
        diff = (got - want).numpy()
        hit = np.flatnonzero(np.abs(diff) > 1e-9)
        assert set(hit) <= set(can.coordinates[can.included])  # excluded canaries add nothing
        np.testing.assert_allclose(diff[hit], CLIP / 8.0, rtol=1e-5)
        assert len(hit) == can.insertions - before
        sampled.append(len(hit))
        ref.load_state_dict(module.state_dict())  # same weights for the next comparison
    assert 0 < sum(sampled) < 3 * can.included.sum()  # Poisson-sampled, not always
    can.detach()
    assert "step" not in opt.__dict__


def test_coins_and_sampling_are_secret_directions_public():
    sizes = [100, 37, 4000]
    a = dirac_coordinates(sizes, 500, auditor_seed=1)
    assert len(set(a)) == 500 and a.max() < sum(sizes)
    assert np.array_equal(a, dirac_coordinates(sizes, 500, auditor_seed=1))
    assert not np.array_equal(a, dirac_coordinates(sizes, 500, auditor_seed=2))
    c1 = draw_coins(1000, torch.Generator().manual_seed(5))
    assert np.array_equal(c1, draw_coins(1000, torch.Generator().manual_seed(5)))
    assert not np.array_equal(c1, draw_coins(1000, torch.Generator().manual_seed(6)))
    assert 400 < c1.sum() < 600
    with pytest.raises(ValueError):
        dirac_coordinates(sizes, sum(sizes) + 1, auditor_seed=1)


def test_attach_refuses_a_canary_above_the_clipping_bound_and_double_attachment():
    x, y = _batch()
    module = _conv_model()
    _, opt, _, _ = dpstep.privatize(
        PrivacyEngine(accountant="rdp"), mode="hooks", module=module,
        optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=6),
        criterion=dpstep.MaskedBCELoss(), noise_multiplier=1.0, max_grad_norm=CLIP,
    )  # fmt: skip
    kw = dict(count=10, sample_rate=0.5, generator=torch.Generator(), auditor_seed=0)
    with pytest.raises(ValueError, match="clipping bound"):
        GradientCanaries.attach(opt, max_grad_norm=2 * CLIP, **kw)
    can = GradientCanaries.attach(opt, **kw)
    with pytest.raises(RuntimeError, match="already attached"):
        GradientCanaries.attach(opt, **kw)
    can.detach()
    GradientCanaries.attach(opt, **kw)
    with pytest.raises(ValueError, match="plain optimizer"):
        GradientCanaries.attach(torch.optim.SGD(module.parameters(), lr=0.1), **kw)


def test_state_dict_resumes_an_interrupted_audit():
    full = _train_with_canaries(1.0, m=100, steps=6)
    first = _train_with_canaries(1.0, m=100, steps=3)
    state = first.state_dict()
    assert state["steps"] == 3 and len(state["included"]) == 100
    opt = first.optimizer
    first.detach()
    resumed = GradientCanaries.attach(
        opt, count=100, sample_rate=0.5, generator=first.generator, auditor_seed=0,
        included=np.zeros(100, bool), known_noise=torch.Generator().manual_seed(1),
    )  # fmt: skip
    # plain lists and numbers: a private checkpoint loads with weights_only=True
    assert all(isinstance(v, list | int | type(None)) for v in state.values())
    resumed.load_state_dict(state)
    assert np.array_equal(resumed.included, full.included)
    for scores in ("scores", "llr_scores", "replay_scores"):
        np.testing.assert_array_equal(getattr(resumed, scores)(), getattr(first, scores)())
        assert np.abs(getattr(first, scores)()).max() > 0
    # the replay generator continues where the interrupted run's was
    assert torch.equal(resumed.known_noise.get_state(), first.known_noise.get_state())
    with pytest.raises(ValueError, match="coordinates differ"):
        bad = dict(state, coordinates=list(np.asarray(state["coordinates"]) + 1))
        resumed.load_state_dict(bad)


# ------------------------------------------------------------------------------ training


def _train_with_canaries(
    sigma: float,
    *,
    m: int,
    steps: int,
    mode: str = "hooks",
    seed: int = 0,
    public_noise: bool = False,
    fault: Fault | None = None,
) -> GradientCanaries:
    """DP-SGD on a small MLP and 64 random examples, Poisson rate 1/2, m canaries. The auditor
    replays the noise of generator 999 (the "public seed"); a correct build draws its noise
    from another (secret) generator, a ``public_noise`` build from that one."""
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(64, 128, generator=gen)
    y = (torch.rand(64, 5, generator=gen) < 0.3).float()
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Linear(128, 64), nn.Mish(), nn.Linear(64, 5))
    model, opt, crit, loader = dpstep.privatize(
        PrivacyEngine(accountant="rdp"), mode=mode, module=head,
        optimizer=torch.optim.SGD(head.parameters(), lr=0.05),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=32, generator=gen),
        criterion=dpstep.MaskedBCELoss(), noise_multiplier=sigma, max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(999 if public_noise else 200 + seed),
    )  # fmt: skip
    if fault is not None:
        fault.apply(opt)
    can = GradientCanaries.attach(
        opt, count=m, sample_rate=loader.sample_rate, generator=gen, auditor_seed=seed,
        known_noise=torch.Generator().manual_seed(999),
    )  # fmt: skip
    while can.steps < steps:
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            crit(model(xb), yb).backward()
            opt.step()
            if can.steps == steps:
                break
    return can


def _auc(scores: np.ndarray, included: np.ndarray) -> float:
    ranks = scores.argsort().argsort() + 1.0
    n_in = included.sum()
    return float((ranks[included].sum() - n_in * (n_in + 1) / 2) / (n_in * (~included).sum()))


def test_scores_separate_without_noise_and_not_with_huge_noise():
    quiet = _train_with_canaries(1e-3, m=300, steps=30)
    assert _auc(quiet.scores(), quiet.included) > 0.99
    result = audit_canaries(quiet.scores(), quiet.included, kind="gradient", delta=1e-5)
    assert result.epsilon_lower > 3
    # huge noise: chance level; at most beta of such runs may show a (small) positive bound
    lows, aucs = [], []
    for seed in range(5):
        loud = _train_with_canaries(1e4, m=300, steps=30, seed=seed)
        aucs.append(_auc(loud.scores(), loud.included))
        lows.append(
            audit_canaries(loud.scores(), loud.included, kind="gradient", delta=1e-5).epsilon_lower
        )
    assert all(abs(a - 0.5) < 0.12 for a in aucs)
    assert sum(low > 0 for low in lows) <= 1 and max(lows) < 0.3


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_audit_catches_broken_noise(mode):
    """sigma calibrated for epsilon = 2 over the run. A correct build is caught by neither
    attack; a build adding a tenth of the noise by the plain likelihood ratios; a build whose
    noise follows the public seed only by the replay (its noise has the right size)."""
    steps, epsilon, delta = 40, 2.0, 1e-5
    sigma = get_noise_multiplier(
        target_epsilon=epsilon, target_delta=delta, sample_rate=0.5, steps=steps, accountant="rdp"
    )
    for fault, public, caught_by in (
        (None, False, None),
        (Fault(noise_scale=0.1), False, "standard"),
        (None, True, "replay"),
    ):
        can = _train_with_canaries(
            sigma, m=2000, steps=steps, mode=mode, public_noise=public, fault=fault
        )
        scores = {"standard": can.llr_scores(), "replay": can.replay_scores()}
        result = audit_bound.run_audit(scores, can.included, delta=delta, diagnostics=False)
        caught = {n for n, a in result.attacks.items() if a.epsilon_lower > epsilon}
        assert caught == ({caught_by} if caught_by else set()), (fault, public, result)
        assert (result.epsilon_lower > epsilon) is (caught_by is not None)
        # the noise check measures the noise itself: its size and whether it is the seed's
        noise = can.noise_check()
        assert noise.units == (~can.included).sum() * steps
        assert noise.too_little is (fault is not None) and noise.follows_seed is public
        assert noise.ratio == pytest.approx(0.1 if fault else 1.0, rel=0.05)
        assert noise.detects_scale() > 0.9


# ------------------------------------------------------------------------------ input canaries


def test_input_canaries_are_public_patterns_with_contradictory_labels():
    a = make_input_canaries(20, 16, auditor_seed=3)
    b = make_input_canaries(20, 16, auditor_seed=3)
    assert a.images.dtype == np.uint8 and a.images.shape == (20, 16, 16) and len(a) == 20
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, make_input_canaries(20, 16, auditor_seed=4).images)
    assert (a.images.max(axis=(1, 2)) >= 229).all()  # the bright shapes
    findings, healthy = a.labels[:, :4], a.labels[:, 4]
    assert np.array_equal(healthy, findings.max(axis=1))  # "healthy" with findings: unusual


def test_with_input_canaries_appends_only_the_included_ones():
    train = SplitData(
        images=np.zeros((3, 16, 16), np.uint8),
        labels=np.zeros((3, 5), np.float32),
        sex=np.array(["F", "M", "F"], dtype=object),
        age=np.array([40.0, 50.0, np.nan]),
        patient=np.array(["p1", "p1", "p2"], dtype=object),
    )
    canaries = make_input_canaries(4, 16, auditor_seed=0)
    out = with_input_canaries(train, canaries, np.array([True, False, False, True]))
    assert len(out) == 5
    assert np.array_equal(out.images[3:], canaries.images[[0, 3]])
    assert np.array_equal(out.labels[3:], canaries.labels[[0, 3]])
    assert list(out.patient[3:]) == ["canary-0", "canary-3"] and list(out.sex[3:]) == ["U", "U"]
    with pytest.raises(ValueError):
        with_input_canaries(train, make_input_canaries(4, 8, auditor_seed=0), np.ones(4, bool))


def test_input_canary_losses_are_the_per_canary_bce():
    canaries = make_input_canaries(5, 8, auditor_seed=1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    losses = input_canary_losses(model, canaries, batch=2)
    x = torch.from_numpy(canaries.images).float().div(255).reshape(5, 64)
    want = nn.functional.binary_cross_entropy_with_logits(
        model(x), torch.from_numpy(canaries.labels), reduction="none"
    ).mean(1)
    np.testing.assert_allclose(losses, want.detach().numpy(), rtol=1e-5)


def test_input_canaries_trained_on_have_lower_loss():
    """Black box: non-private training memorises the included canaries (score = -loss)."""
    torch.manual_seed(0)
    canaries = make_input_canaries(64, 12, auditor_seed=2)
    coins = draw_coins(64, torch.Generator().manual_seed(9))
    rng = np.random.default_rng(0)
    base = SplitData(
        images=rng.integers(0, 256, (64, 12, 12), dtype=np.uint8),
        labels=(rng.random((64, 5)) < 0.2).astype(np.float32),
        sex=np.full(64, "U", dtype=object),
        age=np.full(64, np.nan),
    )
    train = with_input_canaries(base, canaries, coins)
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 256), nn.Mish(), nn.Linear(256, 5))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.from_numpy(train.images).float().div(255).unsqueeze(1)
    y = torch.from_numpy(train.labels)
    for _ in range(300):
        opt.zero_grad()
        dpstep.MaskedBCELoss()(model(x), y).backward()
        opt.step()
    scores = -input_canary_losses(copy.deepcopy(model), canaries)
    assert _auc(scores, coins) > 0.9
    result = audit_canaries(scores, coins, kind="input", delta=1e-5)
    assert result.kind == "input" and result.m == 64 and result.epsilon_lower > 0
    with pytest.raises(ValueError, match="unknown canary kind"):
        audit_canaries(scores, coins, kind="output", delta=1e-5)
    assert math.isfinite(result.epsilon_lower_gdp)
