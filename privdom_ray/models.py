"""Opacus-compatible CNNs: the paper's ResNet9 (GroupNorm + Mish), GroupNorm ResNet18/34/50,
and ``smallcnn``, a three-conv GroupNorm net for dry runs of the pipeline at paper scale.

Blocks are written here instead of taken from torchvision because torchvision's ``BasicBlock``
and ``Bottleneck`` add the residual in place (``out += identity``) and use
``ReLU(inplace=True)``, which break Opacus's full backward hooks (opacus #828). BatchNorm is
replaced by GroupNorm(32, C) because BatchNorm mixes samples and has no per-sample gradient.
The layouts (7x7 stem, max-pool, four stages; stride on the bottleneck's 3x3 conv, i.e.
torchvision's "ResNet v1.5") and parameter counts follow torchvision's resnet9/18/34/50 with
BN -> GN, ReLU -> Mish, a ``in_channels`` stem and a ``num_outputs`` head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ModelFactory = Callable[[int, int], nn.Module]
MODELS: dict[str, ModelFactory] = {}


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    def wrap(fn: ModelFactory) -> ModelFactory:
        MODELS[name] = fn
        return fn

    return wrap


def build_model(name: str, num_outputs: int = 5, in_channels: int = 1) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_outputs, in_channels)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


def _downsample(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """The shortcut: identity, or a strided 1x1 conv + GroupNorm when the shape changes."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), _norm(out_ch))


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm, Mish and an out-of-place residual add."""

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = _norm(out_ch)
        self.act = nn.Mish()
        self.downsample = _downsample(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.downsample(x))


class Bottleneck(nn.Module):
    """ResNet50's block: 1x1 reduce, 3x3 (carries the stride), 1x1 expand to 4x ``width``;
    GroupNorm, Mish and an out-of-place residual add, like :class:`BasicBlock`."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.norm1 = _norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.norm2 = _norm(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.norm3 = _norm(out_ch)
        self.act = nn.Mish()
        self.downsample = _downsample(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.act(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.act(out + self.downsample(x))


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """torchvision's ResNet layout (7x7 stem, max-pool, four stages) with the blocks above."""

    def __init__(
        self, layers: list[int], num_outputs: int, in_channels: int, block: Block = BasicBlock
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            _norm(64),
            nn.Mish(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        in_ch = 64
        for i, (blocks, width) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            for b in range(blocks):
                stages.append(block(in_ch, width, stride=2 if (i > 0 and b == 0) else 1))
                in_ch = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_ch, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


@register("resnet9")
def resnet9(num_outputs: int = 5, in_channels: int = 1) -> nn.Module:
    """The paper's ResNet9: BasicBlock layout [1, 1, 1, 1], GroupNorm(32), Mish."""
    return ResNet([1, 1, 1, 1], num_outputs, in_channels)


@register("resnet18")
def resnet18(num_outputs: int = 5, in_channels: int = 1) -> nn.Module:
    return ResNet([2, 2, 2, 2], num_outputs, in_channels)


@register("resnet34")
def resnet34(num_outputs: int = 5, in_channels: int = 1) -> nn.Module:
    return ResNet([3, 4, 6, 3], num_outputs, in_channels)


@register("resnet50")
def resnet50(num_outputs: int = 5, in_channels: int = 1) -> nn.Module:
    """Bottleneck layout [3, 4, 6, 3]: 1x1 convs, 2048 features into the head."""
    return ResNet([3, 4, 6, 3], num_outputs, in_channels, Bottleneck)


class SmallCNN(nn.Module):
    """Three strided 3x3 convs (32, 64, 128 channels) with GroupNorm(32) and Mish, then a
    global average pool and a linear head: about 94k parameters.

    Why: a paper-shaped dry run (``benchmarks/bench_paper_scale.py``) trains ~180 models on
    hundreds of thousands of tiny images to measure the pipeline around training, not the
    training; ResNet9's 4.9 M parameters would make training dominate even at 16 px. Same
    building blocks as the ResNets (GroupNorm(32, C), Mish, no in-place ops), so it takes
    the same Opacus and book-keeping paths.
    """

    def __init__(self, num_outputs: int = 5, in_channels: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = in_channels
        for i, width in enumerate((32, 64, 128)):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(in_ch, width, 3, stride=stride, padding=1, bias=False)]
            layers += [_norm(width), nn.Mish()]
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_ch, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


@register("smallcnn")
def smallcnn(num_outputs: int = 5, in_channels: int = 1) -> nn.Module:
    """The cheap model of dry runs (not a model to report results with)."""
    return SmallCNN(num_outputs, in_channels)
