"""DP step helpers: every mode clips like a per-example loop and noises like hooks mode;
book-keeping clipping's strategies, edge cases and physical batching; the memory model."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import dpcheck
import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privdom_ray import dpstep
from privdom_ray.dpstep import memory, modes
from privdom_ray.models import MODELS, build_model

SIZE, BATCH, SIGMA = 32, 6, 1.3
ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha"),
]


@pytest.fixture(scope="module")
def case():
    """ResNet9 at 32 px, 6 samples, pos_weight != 1, NaN labels; clip at the median norm."""
    x, y = dpstep.synthetic_batch(BATCH, SIZE, "cpu", seed=3)
    assert torch.isnan(y).any()
    torch.manual_seed(0)
    model = build_model("resnet9").train()
    criterion = dpstep.MaskedBCELoss(torch.linspace(0.5, 3.0, 5))
    _, norms = dpcheck.reference_clipped_gradient(copy.deepcopy(model), x, y, criterion, 1.0)
    clip = float(norms.median())
    ref, _ = dpcheck.reference_clipped_gradient(copy.deepcopy(model), x, y, criterion, clip)
    assert (norms > clip).any() and (norms < clip).any()  # some clipped, some not
    return {"x": x, "y": y, "model": model, "criterion": criterion, "clip": clip, "ref": ref}


def _grad(case, mode, sigma=0.0, seed=0, model=None):
    return dpcheck.dp_gradient(
        copy.deepcopy(model if model is not None else case["model"]),
        mode,
        case["x"],
        case["y"],
        case["criterion"],
        max_grad_norm=case["clip"],
        noise_multiplier=sigma,
        noise_generator=torch.Generator().manual_seed(seed) if sigma else None,
    )


def _rel_err(got, ref):
    scale = max(float(r.abs().max()) for r in ref)
    return max(float((g - r).abs().max()) for g, r in zip(got, ref, strict=True)) / scale


def test_masked_bce_loss_weights_positives_and_masks_unknown_labels(case):
    """The training core's loss (train.epochs uses MaskedBCELoss), against BCE written out:
    -(w y log s(z) + (1 - y) log s(-z)), NaN labels contributing 0 to a mean over all labels."""
    logits = torch.randn(BATCH, 5)
    weight = torch.linspace(0.5, 3.0, 5)
    y = case["y"]
    known, t = ~torch.isnan(y), torch.nan_to_num(y)
    bce = -(weight * t * F.logsigmoid(logits) + (1 - t) * F.logsigmoid(-logits))
    expected = torch.where(known, bce, 0.0).sum(dim=1) / y.shape[1]
    crit = dpstep.MaskedBCELoss(weight)
    torch.testing.assert_close(crit(logits, y), expected.mean())
    crit.reduction = "none"
    torch.testing.assert_close(crit(logits, y), expected)


@pytest.mark.parametrize("mode", dpstep.GRAD_SAMPLE_MODES)
def test_clipped_gradient_matches_per_example_loop(case, mode):
    assert _rel_err(_grad(case, mode), case["ref"]) < 1e-4


@pytest.mark.parametrize("mode", [m for m in dpstep.GRAD_SAMPLE_MODES if m != "hooks"])
def test_noised_gradient_equals_hooks_with_the_same_noise_seed(case, mode):
    hooks = _grad(case, "hooks", sigma=SIGMA)
    got = _grad(case, mode, sigma=SIGMA)
    noise_scale = SIGMA * case["clip"] / BATCH
    for g, h in zip(got, hooks, strict=True):
        torch.testing.assert_close(g, h, atol=1e-5 * noise_scale, rtol=1e-5)


@pytest.mark.parametrize("mode", dpstep.GRAD_SAMPLE_MODES)
def test_channels_last_is_correct_exactly_in_the_nhwc_modes(case, mode):
    """NHWC activations (the GPU default, resources.memory_format) leave the clipped
    gradient of the NHWC-safe modes equal to the per-example loop; Opacus's hooks and ghost
    clip wrong gradients in NHWC (if Opacus fixes it, this fails: widen NHWC_MODES)."""
    nhwc = copy.deepcopy(case["model"]).to(memory_format=torch.channels_last)
    x = case["x"].contiguous(memory_format=torch.channels_last)
    got = dpcheck.dp_gradient(
        nhwc, mode, x, case["y"], case["criterion"], max_grad_norm=case["clip"]
    )
    assert (_rel_err(got, case["ref"]) < 1e-4) == (mode in dpstep.NHWC_MODES)


@pytest.mark.parametrize("mode", dpstep.NHWC_MODES)
def test_channels_last_clips_and_noises_like_nchw(case, mode):
    """In an NHWC-safe mode the layout changes no clipped or noised gradient: checked against
    the NCHW per-example loop and NCHW hooks with the same noise."""
    nhwc = copy.deepcopy(case["model"]).to(memory_format=torch.channels_last)
    x = case["x"].contiguous(memory_format=torch.channels_last)
    assert nhwc.stem[0].weight.is_contiguous(memory_format=torch.channels_last)

    def grad(sigma: float) -> list[torch.Tensor]:
        return dpcheck.dp_gradient(
            copy.deepcopy(nhwc),
            mode,
            x,
            case["y"],
            case["criterion"],
            max_grad_norm=case["clip"],
            noise_multiplier=sigma,
            noise_generator=torch.Generator().manual_seed(0) if sigma else None,
        )

    assert _rel_err(grad(0.0), case["ref"]) < 1e-4
    noise_scale = SIGMA * case["clip"] / BATCH
    for g, h in zip(grad(SIGMA), _grad(case, "hooks", sigma=SIGMA), strict=True):
        torch.testing.assert_close(g, h, atol=1e-5 * noise_scale, rtol=1e-5)


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_noise_std_is_sigma_times_clip_over_expected_batch(case, mode):
    clean = torch.cat([g.flatten() for g in _grad(case, mode)])
    noised = torch.cat([g.flatten() for g in _grad(case, mode, sigma=SIGMA, seed=1)])
    noise = (noised - clean) * BATCH  # expected batch size = BATCH here
    assert noise.numel() > 4_000_000
    assert abs(float(noise.std()) / (SIGMA * case["clip"]) - 1) < 0.01
    assert abs(float(noise.mean())) < 0.01 * SIGMA * case["clip"]


@pytest.mark.parametrize("strategy", ["always", "unfold", "grouped"])
def test_bookkeeping_conv_strategies_agree(case, strategy):
    model = copy.deepcopy(case["model"])
    clipper = dpstep.BookKeepingClipper(model, case["clip"], ghost=strategy)
    crit = copy.deepcopy(case["criterion"])
    crit.reduction = "none"
    clipper.backward(crit(model(case["x"]), case["y"]))
    expected = {"always": "ghost", "unfold": "unfold", "grouped": "grouped"}[strategy]
    assert set(clipper.layer_modes.values()) == {expected}
    got = [p.grad / BATCH for p in model.parameters()]
    assert not any(g.requires_grad for g in got)
    assert _rel_err(got, case["ref"]) < 1e-4


def _deeper_model_cases():
    """Every mode on the deeper models; the modes ``_FASTEST`` recommends run in the quick
    suite, the others (~2-3 s each) are marked slow."""
    for name in ("resnet18", "resnet34", "resnet50"):
        for mode in dpstep.DP_MODES:
            slow = [] if mode in modes._FASTEST[name] else [pytest.mark.slow]
            yield pytest.param(name, mode, marks=slow, id=f"{name}-{mode}")


@pytest.mark.parametrize(("name", "mode"), list(_deeper_model_cases()))
def test_clipped_gradient_matches_per_example_loop_on_deeper_models(name, mode):
    assert dpcheck.clipping_error(name, mode, image_size=32, batch=3) < 1e-4


def test_fastest_table_covers_every_model_with_verified_modes():
    """A new model needs a measured ``_FASTEST`` entry (else it silently gets ``hooks``)."""
    assert set(modes._FASTEST) == set(MODELS)
    for best, opacus_best in modes._FASTEST.values():
        assert best in dpstep.DP_MODES and opacus_best in dpstep.OPACUS_MODES


def test_conv_strategy_takes_1x1_convs_pointwise():
    """Unpadded 1x1 convs (bottlenecks, shortcuts) need no im2col: bmm on the strided input."""
    shortcut = nn.Conv2d(64, 256, 1, stride=2, bias=False)
    assert dpstep.conv_strategy(shortcut, 1024) == "pointwise"
    assert dpstep.conv_strategy(shortcut, 1024, device=torch.device("cuda")) == "pointwise"
    assert dpstep.conv_strategy(shortcut, 4) == "ghost"  # few positions: ghost norm still wins
    assert dpstep.conv_strategy(shortcut, 1024, "unfold") == "unfold"  # forced stays forced
    assert dpstep.conv_strategy(nn.Conv2d(64, 256, 1, padding=1), 1024) == "grouped"
    assert dpstep.conv_strategy(nn.Conv2d(64, 64, 3, padding=1), 1024) == "grouped"


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
def test_bookkeeping_pointwise_on_bottlenecks_matches_per_example_loop(channels_last):
    """ResNet50 at 33 px (odd maps, so strided 1x1 shortcuts drop a row and a column) with
    every conv instantiated: all 1x1 convs go pointwise and the clipped gradient is exact."""
    x, y = dpstep.synthetic_batch(3, 33, "cpu", seed=1)
    torch.manual_seed(0)
    model = build_model("resnet50").train()
    criterion = dpstep.MaskedBCELoss(torch.linspace(0.5, 3.0, 5))
    _, norms = dpcheck.reference_clipped_gradient(copy.deepcopy(model), x, y, criterion, 1.0)
    clip = float(norms.median())
    ref, _ = dpcheck.reference_clipped_gradient(copy.deepcopy(model), x, y, criterion, clip)
    fmt = dpstep.memory_format(channels_last)
    model = model.to(memory_format=fmt)
    clipper = dpstep.BookKeepingClipper(model, clip, ghost="never")
    criterion.reduction = "none"
    clipper.backward(criterion(model(x.contiguous(memory_format=fmt)), y))
    one_by_one = {
        n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    }
    assert len(one_by_one) == 36  # 2 per bottleneck x 16 bottlenecks + 4 shortcuts
    assert {n for n, how in clipper.layer_modes.items() if how == "pointwise"} == one_by_one
    assert _rel_err([p.grad / 3 for p in model.parameters()], ref) < 1e-4


def test_bookkeeping_refuses_what_it_cannot_clip():
    with pytest.raises(NotImplementedError, match="BatchNorm2d"):
        dpstep.BookKeepingClipper(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), 1.0)

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(self.lin(x))

    clipper = dpstep.BookKeepingClipper(Shared(), 1.0)
    with pytest.raises(RuntimeError, match="shared weights"):
        clipper.module(torch.randn(2, 4))


def _bk_private(model, batch, dataset, clip, sigma=0.0):
    loader = DataLoader(dataset, batch_size=batch)
    return dpstep.privatize(
        PrivacyEngine(accountant="rdp"),
        mode="bk",
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=loader,
        criterion=dpstep.MaskedBCELoss(torch.linspace(0.5, 3.0, 5)),
        noise_multiplier=sigma,
        max_grad_norm=clip,
    )


def test_bookkeeping_physical_batches_and_empty_batch_change_nothing(case):
    """A logical batch split by BatchMemoryManager (with an empty physical batch in between,
    as Poisson sampling can give) yields the same clipped gradient as one batch."""
    dataset = TensorDataset(case["x"], case["y"])
    module, opt, crit, _ = _bk_private(copy.deepcopy(case["model"]), BATCH, dataset, case["clip"])
    for xs, ys in [(case["x"][:4], case["y"][:4]), (case["x"][:0], case["y"][:0])]:
        opt.zero_grad(set_to_none=True)
        crit(module(xs), ys).backward()
        opt.signal_skip_step(do_skip=True)
        opt.step()
    opt.zero_grad(set_to_none=True)
    crit(module(case["x"][4:]), case["y"][4:]).backward()
    opt.pre_step()
    assert _rel_err([p.grad for p in module.parameters()], case["ref"]) < 1e-4


def test_bookkeeping_trains_with_batch_memory_manager_and_accountant(case):
    n = 24
    x, y = dpstep.synthetic_batch(n, 16, "cpu", seed=5)
    engine = PrivacyEngine(accountant="rdp")
    torch.manual_seed(0)
    model = build_model("resnet9")
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    module, opt, crit, loader = dpstep.privatize(
        engine,
        mode="bk",
        module=model,
        optimizer=torch.optim.NAdam(model.parameters(), lr=1e-3),
        data_loader=loader,
        criterion=dpstep.MaskedBCELoss(),
        target_epsilon=8.0,
        target_delta=1e-3,
        epochs=1,
        max_grad_norm=1.0,
    )
    before = [p.detach().clone() for p in model.parameters()]
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=3, optimizer=opt) as b:
        for xs, ys in b:
            opt.zero_grad(set_to_none=True)
            crit(module(xs), ys).backward()
            opt.step()
    steps = sum(k for _, _, k in engine.accountant.history)
    assert steps == len(loader)  # one accountant step per logical batch, not per physical
    assert 0 < engine.get_epsilon(1e-3) <= 8.0 + 1e-6
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_max_physical_batch_shrinks_with_the_budget():
    model = dpstep.memory_model("resnet9", 32, "bk", probe=(2, 4))
    big = model.max_batch(1024 * 2**20)
    small = model.max_batch(256 * 2**20)
    assert isinstance(big, int) and big > small >= 1
    got = dpstep.max_physical_batch("resnet9", 32, "hooks", 512 * 2**20, probe=(2, 4))
    assert isinstance(got, int) and got >= 1
    assert (
        dpstep.max_physical_batch("resnet9", 32, "hooks", 512 * 2**20, probe=(2, 4), limit=3) == 3
    )
    with pytest.raises(ValueError, match="one sample"):
        dpstep.max_physical_batch("resnet9", 32, "hooks", 2**20, probe=(2, 4))


def test_tensor_tracker_counts_live_tensors():
    with memory._TensorBytes(torch.device("cpu")) as t:
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 4 MB, peak 8 MB
        del a
        c = b[10:]  # view: no new storage
        del b, c
        d = torch.ones(500, 1000)  # 2 MB
    assert t.peak == 8_000_000 and t.live == 2_000_000
    del d


def test_fastest_correct_mode_table():
    assert dpstep.fastest_correct_mode("resnet9") in dpstep.DP_MODES
    assert dpstep.fastest_correct_mode("resnet9", opacus_only=True) in dpstep.OPACUS_MODES
    assert dpstep.fastest_correct_mode("unknown-net") == "hooks"


def test_dpstep_and_benchmark_need_only_torch_and_opacus():
    code = (
        "import sys, runpy; sys.argv = ['x', '--help']\n"
        "import privdom_ray.dpstep\n"
        "try:\n    runpy.run_path('benchmarks/bench_dp_step.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'ray', 'pandas', 'pyarrow', 'sklearn', 'yaml', 'PIL', 'pydicom'})\n"
        "print('BAD', bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "BAD []" in out.stdout, out.stdout
