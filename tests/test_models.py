"""The model family: torchvision's ResNet layouts with GroupNorm(32, C), Mish and no in-place
ops, so that Opacus can compute per-sample gradients (validator and per-sample-gradient checks
for every model are in tests/test_train.py; DP clipping parity in tests/test_dpstep.py)."""

from __future__ import annotations

import dpcheck
import pytest
import torch
import torchvision
from opacus.grad_sample import GradSampleModule
from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct
from opacus.validators import ModuleValidator
from torch import nn

from privdom_ray import dpstep
from privdom_ray.models import MODELS, build_model

#: Parameters for 1-channel inputs and 5 labels (the paper's ResNet9 is "about 4.9 M").
PARAMETERS = {
    "resnet9": 4_902_085,
    "resnet18": 11_172_805,
    "resnet34": 21_280_965,
    "resnet50": 23_512_005,
    "smallcnn": 93_541,
}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_registered_model_has_a_known_size():
    assert set(PARAMETERS) == set(MODELS)
    for name, expected in PARAMETERS.items():
        assert _count(build_model(name)) == expected


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_same_layout_and_size_as_torchvision(name):
    """Same convs (shapes, strides) and parameter count as torchvision's model with a
    1-channel stem and 5 outputs: only the norm (BN -> GN, same parameters) and activation
    differ, and the stride sits on the bottleneck's 3x3 conv as in torchvision."""
    ours = build_model(name)
    ref = getattr(torchvision.models, name)(num_classes=5)
    ref.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
    assert _count(ours) == _count(ref)

    def convs(model: nn.Module) -> list[tuple]:
        return sorted(
            (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
            for m in model.modules()
            if isinstance(m, nn.Conv2d)
        )

    assert convs(ours) == convs(ref)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_groupnorm_32_mish_and_no_in_place_ops(name):
    model = build_model(name)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 for m in norms)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU)) for m in model.modules())
    mish = [m for m in model.modules() if isinstance(m, nn.Mish)]
    assert mish and not any(m.inplace for m in mish)


def test_resnet50_is_bottlenecked():
    model = build_model("resnet50")
    assert model.head.in_features == 2048
    blocks = list(model.stages)
    assert len(blocks) == 16 and all(type(b).__name__ == "Bottleneck" for b in blocks)
    first = blocks[0]
    assert (first.conv1.kernel_size, first.conv2.kernel_size, first.conv3.kernel_size) == (
        (1, 1),
        (3, 3),
        (1, 1),
    )
    assert first.conv3.out_channels == 4 * first.conv1.out_channels


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_full_backward_hooks_accept_the_model(name):
    """Opacus's default hooks are full backward hooks, which raise on in-place ops
    (opacus #828; torchvision's resnet18 raises here): a DP backward at 32 px fills a
    per-sample gradient for every parameter."""
    module = GradSampleModule(build_model(name, in_channels=3))
    x = torch.rand(2, 3, 32, 32)
    out = module(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    for p in module.parameters():
        assert p.grad_sample is not None and p.grad_sample.shape == (2, *p.shape)


def test_smallcnn_is_opacus_valid_with_correct_per_sample_grads_at_dry_run_size():
    """The dry run's model at the dry run's 16 px (tests/test_train.py checks every model at
    32 px): odd-free strided maps down to 4x4, per-sample gradients equal Opacus's loop."""
    model = build_model("smallcnn")
    assert ModuleValidator.validate(model, strict=False) == []
    assert check_per_sample_gradients_are_correct(
        torch.randn(4, 1, 16, 16), model, atol=1e-4, rtol=1e-3
    )


@pytest.mark.parametrize("mode", dpstep.DP_MODES)
@pytest.mark.parametrize("size", [16, 33])
def test_smallcnn_clipping_matches_per_example_loop_in_every_mode(mode, size):
    """bk (its default) and every Opacus mode clip smallcnn's per-sample gradients exactly,
    at the dry run's 16 px and at an odd size (strided convs drop a row and a column)."""
    assert dpcheck.clipping_error("smallcnn", mode, image_size=size, batch=4) < 1e-4


@pytest.mark.parametrize("mode", dpstep.NHWC_MODES)
def test_smallcnn_clipping_is_exact_in_channels_last(mode):
    """GPU trials default to NHWC, with the modes verified in that layout only."""
    error = dpcheck.clipping_error("smallcnn", mode, image_size=16, batch=4, channels_last=True)
    assert error < 1e-4


def test_smallcnn_is_far_smaller_than_resnet9():
    """Why it exists: dry runs measure the pipeline, so training must not dominate."""
    assert _count(build_model("smallcnn")) * 40 < _count(build_model("resnet9"))
    assert build_model("smallcnn")(torch.rand(8, 1, 16, 16)).shape == (8, 5)
