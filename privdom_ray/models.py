"""Opacus-compatible CNNs: the paper's ResNet9 (GroupNorm + Mish) and a deeper GroupNorm ResNet18.

Blocks are written here instead of taken from torchvision because torchvision's ``BasicBlock``
adds the residual in place (``out += identity``) and uses ``ReLU(inplace=True)``, which break
Opacus's full backward hooks (opacus #828). BatchNorm is replaced by GroupNorm(32, C) because
BatchNorm mixes samples and has no per-sample gradient.
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


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm, Mish and an out-of-place residual add."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = _norm(out_ch)
        self.act = nn.Mish()
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), _norm(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.downsample(x))


class ResNet(nn.Module):
    """torchvision's ResNet layout (7x7 stem, max-pool, four stages) with the blocks above."""

    def __init__(self, layers: list[int], num_outputs: int, in_channels: int) -> None:
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
                stages.append(BasicBlock(in_ch, width, stride=2 if (i > 0 and b == 0) else 1))
                in_ch = width
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
