"""Checking code for the DP clipping modes (tests and benchmarks only, not the package).

A mode's clipped gradient for one noiseless step against a per-example loop of plain
autograd: ``clipping_error`` is ~1e-6 for a correct mode in float32 and ~1 for a wrong one.
``benchmarks/bench_dp_step.py`` imports it too (it adds this folder to ``sys.path``).
"""

from __future__ import annotations

import copy

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privdom_ray.dpstep import (
    CLIP_MARGIN,
    MaskedBCELoss,
    memory_format,
    privatize,
    synthetic_batch,
)
from privdom_ray.dpstep.memory import _quiet
from privdom_ray.models import build_model


def dp_gradient(
    module: nn.Module,
    mode: str,
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: nn.Module,
    *,
    max_grad_norm: float,
    noise_multiplier: float = 0.0,
    noise_generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """The gradient the DP optimizer hands to the wrapped optimizer for one step on (x, y):
    clipped per-sample gradients summed, plus noise, divided by the expected batch size
    (= ``len(x)``); read from ``p.grad`` after ``optimizer.pre_step()``. ``module`` is wrapped
    in place: pass a copy."""
    loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=len(x))
    params = [p for p in module.parameters() if p.requires_grad]
    with _quiet():
        dp_module, opt, dp_criterion, _ = privatize(
            PrivacyEngine(accountant="rdp"),
            mode=mode,
            module=module,
            optimizer=torch.optim.SGD(params, lr=1.0),
            data_loader=loader,
            criterion=criterion,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            noise_generator=noise_generator,
        )
        opt.zero_grad(set_to_none=True)
        dp_criterion(dp_module(x), y).backward()
        opt.pre_step()
    return [p.grad.detach().clone() for p in params]


def reference_clipped_gradient(
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion: nn.Module, max_grad_norm: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-example loop (batch of one at a time, plain autograd): ``(mean_i c_i grad_i,
    per-sample norms)`` with Opacus's ``c_i = min(1, C / (norm_i + 1e-6))``, the bound lowered
    by ``dpstep.CLIP_MARGIN`` as every mode clips."""
    params = [p for p in module.parameters() if p.requires_grad]
    old = getattr(criterion, "reduction", "mean")
    criterion.reduction = "mean"
    try:
        grads = [
            torch.autograd.grad(criterion(module(x[i : i + 1]), y[i : i + 1]), params)
            for i in range(len(x))
        ]
    finally:
        criterion.reduction = old
    norms = torch.stack([torch.sqrt(sum((g.double() ** 2).sum() for g in gs)) for gs in grads])
    coef = (max_grad_norm * (1 - CLIP_MARGIN) / (norms + 1e-6)).clamp(max=1.0)
    summed = [
        sum(float(coef[i]) * grads[i][k].double() for i in range(len(x))) / len(x)
        for k in range(len(params))
    ]
    return [s.float() for s in summed], norms.float()


def clipping_error(
    model_name: str,
    mode: str,
    *,
    image_size: int = 32,
    batch: int = 4,
    device: str | torch.device = "cpu",
    seed: int = 0,
    channels_last: bool = False,
) -> float:
    """``max |mode's clipped gradient - per-example loop| / max |loop|`` for one noiseless step,
    with the clipping bound at the median per-sample norm (so some samples are clipped and
    some are not) and a non-trivial ``pos_weight``. float32 gives ~1e-6; a wrong mode ~1.
    ``channels_last`` runs the mode's model and batch in NHWC (the loop stays in NCHW)."""
    dev = torch.device(device)
    x, y = synthetic_batch(batch, image_size, dev, seed=seed)
    torch.manual_seed(seed)
    base = build_model(model_name, num_outputs=y.shape[1]).to(dev).train()
    criterion = MaskedBCELoss(torch.linspace(0.5, 3.0, y.shape[1], device=dev))
    ref, norms = reference_clipped_gradient(copy.deepcopy(base), x, y, criterion, 1.0)
    clip = float(norms.median())
    ref, _ = reference_clipped_gradient(copy.deepcopy(base), x, y, criterion, clip)
    fmt = memory_format(channels_last)
    module = copy.deepcopy(base).to(memory_format=fmt)
    got = dp_gradient(
        module, mode, x.contiguous(memory_format=fmt), y, criterion, max_grad_norm=clip
    )
    scale = max(float(r.abs().max()) for r in ref)
    return max(float((g - r).abs().max()) for g, r in zip(got, ref, strict=True)) / scale


def clipped_norms(
    model_name: str, mode: str, *, image_size: int = 32, examples: int = 6, seed: int = 1
) -> tuple[list[float], float]:
    """``(clipped gradient norms, C)`` of ``examples`` single-example DP steps (noise 0, batch
    of one: the step's gradient IS that example's clipped gradient), norms in float64, with C
    a thousandth of the smallest unclipped norm so that every example is clipped."""
    x, y = synthetic_batch(examples, image_size, "cpu", seed=seed)
    torch.manual_seed(seed)
    base = build_model(model_name, num_outputs=y.shape[1]).train()
    criterion = MaskedBCELoss(torch.linspace(0.5, 3.0, y.shape[1]))
    _, raw = reference_clipped_gradient(copy.deepcopy(base), x, y, criterion, 1.0)
    clip = 1e-3 * float(raw.min())
    norms = []
    for i in range(examples):
        grads = dp_gradient(
            copy.deepcopy(base), mode, x[i : i + 1], y[i : i + 1], criterion, max_grad_norm=clip
        )
        norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))))
    return norms, clip
