"""One DP-SGD step, fast and verified: per-sample-gradient modes, book-keeping clipping, memory.

Pure helpers for the training core: imports only torch, opacus and ``privdom_ray.models``, so a
GPU machine with nothing but torch + opacus (+ numpy) can use them.

Modes (``DP_MODES``): Opacus's ``grad_sample_mode`` values that give correct per-sample clipping on
our GroupNorm/Mish ResNets (``hooks``, ``functorch``, ``ew``, ``ghost``; checked against a
per-example loop in ``tests/test_dpstep.py`` and by ``benchmarks/bench_dp_step.py``) plus ``bk``,
this module's book-keeping clipping (:class:`BookKeepingClipper`): one forward and ONE backward
pass that never materialises the ``(batch, *param)`` per-sample gradients of the large layers.

How ``bk`` works, per layer with trainable parameters (Conv2d, Linear, GroupNorm):

1. Forward hooks keep each layer's input ``a`` and output ``z``.
2. ``torch.autograd.grad(sum_i loss_i, [z...])`` gives the per-sample output gradients ``g``
   (``d loss_i / d z_i``), skipping every weight gradient (autograd only computes what the
   requested outputs need).
3. Per-sample squared gradient norms, per layer, by whichever is cheaper ("mixed ghost
   clipping", Bu et al. 2022; :func:`conv_strategy`): for a conv with T output positions,
   D = C_in*k*k and O = C_out, the *ghost norm* ``<a_i^T a_i, g_i^T g_i>`` (T^2 (D + O) work,
   used for the deep, low-resolution layers) or *instantiation* of the per-sample gradient
   ``G_i = g_i a_i^T`` (T D O work, for the stem and the high-resolution layers, whose G is
   small, O x D, and is kept), by im2col + bmm, by one grouped weight-gradient conv, or for
   1x1 convs by bmm on the (strided) input itself, which is already its im2col.
4. Clip coefficients ``c_i = min(1, (1 - CLIP_MARGIN) C / (||grad_i|| + 1e-6))`` (Opacus's
   formula with a safety margin, see :data:`CLIP_MARGIN`; the norms summed in float64).
5. The clipped sum ``sum_i c_i grad_i`` per layer: one weight-gradient convolution with the
   output gradient scaled by ``c_i`` (ghost layers), or ``c @ G`` (instantiated layers; so
   their per-sample gradients replace, rather than add to, the non-DP weight gradient)
   ("book-keeping", Bu et al. 2023). It goes into ``p.grad``; Opacus's
   ``DPOptimizerFastGradientClipping`` then adds noise N(0, (sigma C)^2), divides by the
   expected batch size, steps, and feeds the accountant, exactly as in Opacus's ghost mode.

So the DP step costs the non-DP forward + backward plus per-sample norms, instead of Opacus's
per-sample gradients for every parameter (hooks/ew/functorch) or a second backward pass (ghost).
The privacy mechanism is unchanged: same clipping bound, same noise, same optimizer and
accountant objects, made by ``PrivacyEngine.make_private(grad_sample_mode="ghost")``.

How the training core uses it (``train.prepare_training``; the same loop for every mode,
BatchMemoryManager unchanged)::

    criterion = MaskedBCELoss(pos_weight)
    model, optimizer, criterion, loader = privatize(
        engine, mode=fastest_correct_mode(spec.model), module=model, optimizer=optimizer,
        data_loader=poisson_loader, criterion=criterion, noise_multiplier=sigma,
        max_grad_norm=..., poisson_sampling=False, noise_generator=secret_generator)
    ...
    loss = criterion(model(x), y); loss.backward(); optimizer.step(); loss.item()

Checks of each mode against a per-example loop live with the tests (``tests/dpcheck.py``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, TensorDataset

from privdom_ray.models import build_model

#: Every mode clips each example's gradient to norm ``(1 - CLIP_MARGIN) C`` while the noise
#: stays ``sigma C``. The privacy proof needs every example's clipped gradient to have norm
#: <= C exactly; clipping to exactly C with norms computed in float32 overshoots (measured:
#: 1.0000117 C in Opacus's hooks/functorch/ew/ghost modes on resnet9 at 32 px, 1.0000002 C in
#: bk; a float32 norm of 2.4 M entries, our largest layer, errs by up to ~1e-4). The margin is
#: ten times that error and costs nothing measurable (clipped gradients 0.1% shorter);
#: ``tests/test_privacy.py`` checks every mode's clipped norms against C in float64.
CLIP_MARGIN = 1e-3


def clip_factor(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Per-example clip coefficients: Opacus's ``min(1, C / (norm + 1e-6))`` with the bound
    lowered by :data:`CLIP_MARGIN` (the noise keeps using C)."""
    return (max_grad_norm * (1 - CLIP_MARGIN) / (norms + 1e-6)).clamp(max=1.0)


#: Opacus ``grad_sample_mode`` values verified correct (clipped gradient equal to a per-example
#: loop, to float32 precision) on ``resnet9``, ``resnet18``, ``resnet34`` and ``resnet50``.
OPACUS_MODES: tuple[str, ...] = ("hooks", "functorch", "ew", "ghost")
#: Every mode :func:`privatize` accepts, all verified: Opacus's plus book-keeping ``bk``.
DP_MODES: tuple[str, ...] = (*OPACUS_MODES, "bk")
#: Modes that give correct per-sample clipping on our models (the parity test runs them all).
GRAD_SAMPLE_MODES: tuple[str, ...] = DP_MODES
#: Modes whose clipping stays correct with NHWC (``channels_last``) activations. Opacus's
#: ``hooks`` and ``ghost`` compute conv per-sample gradients with ``unfold2d``, an
#: ``as_strided`` view whose strides assume NCHW: on channels_last tensors the per-sample
#: gradients, hence the clipping, are silently wrong (relative error 0.2-0.6 against the
#: per-example loop; ``tests/test_dpstep.py`` checks every mode in both layouts).
NHWC_MODES: tuple[str, ...] = ("functorch", "ew", "bk")

#: Fastest correct mode per model, ``(any mode, Opacus modes only)``, measured with
#: ``benchmarks/bench_dp_step.py`` on CPU (1 thread, batch 32; resnet9 at 64 and 128 px,
#: resnet18 at 64 px; DP / non-DP per image, CPU time): bk 1.25-1.44x (resnet9), 1.33x
#: (resnet18); best Opacus mode ew 2.3-4.4x (resnet9), 5.2x (resnet18; hooks 6.3x); ghost
#: 3.1-7.3x; functorch slowest. resnet34 / resnet50 at 64 px, batch 16 (CPU time, two runs
#: each, median of 3 and 5): bk 1.54-1.56x / 1.34-1.37x; best Opacus mode hooks 4.5-5.2x /
#: 3.4-3.7x; ghost 5.5-6.0x / 4.0-4.2x (but a third of hooks' memory); functorch 7.1-7.2x /
#: 5.4-6.4x; ew 11.4-11.6x / 11.7-12.2x. Not measured on GPU.
_FASTEST: dict[str, tuple[str, str]] = {
    "resnet9": ("bk", "ew"),
    "resnet18": ("bk", "ew"),
    "resnet34": ("bk", "hooks"),
    "resnet50": ("bk", "hooks"),
    # smallcnn (dry runs), batch 64 at 16 px / 32 at 32 px: bk 1.37x / 1.40x, ew 1.93x / 1.49x
    "smallcnn": ("bk", "ew"),
}


def fastest_correct_mode(model_name: str, *, opacus_only: bool = False) -> str:
    """The fastest verified DP mode for ``model_name`` (``"hooks"`` for models not measured).

    ``opacus_only=True`` restricts the answer to Opacus's own ``grad_sample_mode`` values, for
    callers that pass it to ``PrivacyEngine.make_private`` directly instead of :func:`privatize`.
    """
    best = _FASTEST.get(model_name)
    if best is None:
        return "hooks"
    return best[1] if opacus_only else best[0]


# --------------------------------------------------------------------------------------------
# Loss with a per-sample form (ghost and bk modes need one loss per sample)
# --------------------------------------------------------------------------------------------


class MaskedBCELoss(nn.Module):
    """The training loss: masked BCE with a ``reduction`` attribute, for every mode.

    Per sample: the mean over labels of the BCE-with-logits, NaN targets (unknown labels)
    contributing 0 and still counted in the denominator. ``reduction="mean"`` averages over
    the batch (plain training); ``"none"`` gives the per-sample vector that Opacus's ghost
    clipping and :class:`BookKeepingLoss` need.
    """

    def __init__(self, pos_weight: torch.Tensor | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(target)
        loss = F.binary_cross_entropy_with_logits(
            logits, torch.nan_to_num(target), pos_weight=self.pos_weight, reduction="none"
        )
        per_sample = (loss * known).sum(dim=1).div(target.shape[1])
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample.mean()


# --------------------------------------------------------------------------------------------
# Book-keeping clipping
# --------------------------------------------------------------------------------------------

_Finish = Callable[[torch.Tensor], list[tuple[nn.Parameter, torch.Tensor]]]


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


#: Ghost norm for a conv layer when T^2 (D + O) < GHOST_RATIO * D * O (T output positions,
#: D = C_in k k, O = C_out): the ghost norm's T^2 (D + O) work against writing the O x D
#: per-sample gradient (memory-bound when T is small). Calibrated on CPU, 1 thread, ResNet9
#: layers at 64 and 128 px (benchmarks/bench_dp_step.py --layers): ghost won below ~20-40.
GHOST_RATIO = 30.0


def _pointwise(m: nn.Conv2d) -> bool:
    return tuple(m.kernel_size) == (1, 1) and tuple(m.padding) == (0, 0)


def _columns(m: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """The conv's im2col, ``(n, D, T)``; for a pointwise conv the strided input itself (a view
    when the stride is 1 and ``a`` is NCHW), so no copy of the activations is made."""
    if _pointwise(m):
        sh, sw = m.stride
        return a[:, :, ::sh, ::sw].reshape(a.shape[0], m.in_channels, -1)
    return F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)


def conv_strategy(
    m: nn.Conv2d, positions: int, ghost: str = "auto", device: torch.device | None = None
) -> str:
    """How :class:`BookKeepingClipper` gets a conv layer's per-sample norms: ``"ghost"``
    (ghost norm, then one weight-gradient conv with rescaled output gradients), ``"unfold"``
    (per-sample gradients by im2col + bmm, as Opacus does, kept for the clipped sum),
    ``"grouped"`` (the same per-sample gradients by one weight-gradient conv with the batch
    folded into groups: 2-4x faster than unfold on CPU for layers with >= 16 input channels
    and >= 256 output positions; not measured on GPU, so CUDA uses unfold) or ``"pointwise"``
    (1x1 convs without padding: ResNet50's bottleneck convs and every shortcut; unfold's bmm
    on the strided input itself, which already is the im2col, so without unfold's copy; on
    CPU, ResNet50 at 64-128 px: as fast as or up to 2-3x faster than unfold and grouped per
    layer (grouped is slowest on strided 1x1 convs), bk's overhead over non-DP 17-21% lower;
    ``bench_dp_step.py --layers``. Less work than unfold on any device, so used on CUDA too)."""
    depth = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
    out = m.out_channels
    if ghost == "always" or (
        ghost == "auto" and positions * positions * (depth + out) < GHOST_RATIO * depth * out
    ):
        return "ghost"
    if ghost in ("unfold", "grouped"):
        return ghost
    if _pointwise(m):
        return "pointwise"
    on_cpu = device is None or device.type == "cpu"
    return "grouped" if on_cpu and positions >= 256 and m.in_channels >= 16 else "unfold"


def _conv2d(
    m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, ghost: str
) -> tuple[torch.Tensor, _Finish, str]:
    n, out_ch = g.shape[0], g.shape[1]
    positions = g.shape[2] * g.shape[3]
    g3 = g.reshape(n, out_ch, positions)
    sq = g.new_zeros(n)
    parts: list[Callable[[torch.Tensor], tuple[nn.Parameter, torch.Tensor]]] = []
    how = ""
    if m.weight.requires_grad:
        how = conv_strategy(m, positions, ghost, g.device)
        if how == "ghost":
            cols = _columns(m, a)  # (n, D, T)
            aa = torch.bmm(cols.transpose(1, 2), cols)  # (n, T, T)
            gg = torch.bmm(g3.transpose(1, 2), g3)
            sq += (aa * gg).sum(dim=(1, 2))
            del aa, gg, cols

            def weight(c: torch.Tensor) -> tuple[nn.Parameter, torch.Tensor]:
                scaled = g * c.view(-1, 1, 1, 1)
                grad = torch.ops.aten.convolution_backward(
                    scaled, a, m.weight.detach(), None, m.stride, m.padding, m.dilation,
                    False, [0, 0], m.groups, [False, True, False],
                )[1]  # fmt: skip
                return m.weight, grad
        else:
            if how in ("unfold", "pointwise"):
                cols = (
                    _columns(m, a)
                    if how == "pointwise"
                    else F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)
                )
                per_sample = torch.bmm(g3, cols.transpose(1, 2)).reshape(n, -1)  # (n, O*D)
                del cols
            else:  # grouped: sample i's channels form group i
                per_sample = torch.ops.aten.convolution_backward(
                    g.reshape(1, n * out_ch, *g.shape[2:]),
                    a.reshape(1, n * m.in_channels, *a.shape[2:]),
                    m.weight.detach().repeat(n, 1, 1, 1),
                    None, m.stride, m.padding, m.dilation,
                    False, [0, 0], n, [False, True, False],
                )[1].reshape(n, -1)  # fmt: skip
            sq += per_sample.pow(2).sum(dim=1)

            def weight(c: torch.Tensor) -> tuple[nn.Parameter, torch.Tensor]:
                return m.weight, (c @ per_sample).view_as(m.weight)

        parts.append(weight)
    if m.bias is not None and m.bias.requires_grad:
        gb = g3.sum(dim=2)
        sq += gb.pow(2).sum(dim=1)
        bias = m.bias
        parts.append(lambda c: (bias, c @ gb))
    return sq, (lambda c: [part(c) for part in parts]), how


def _linear(m: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, _Finish]:
    n = g.shape[0]
    a3 = a.reshape(n, -1, a.shape[-1])
    g3 = g.reshape(n, -1, g.shape[-1])
    sq = g.new_zeros(n)
    per_sample = []
    if m.weight.requires_grad:
        gw = torch.bmm(g3.transpose(1, 2), a3).reshape(n, -1)  # (n, O*I)
        sq += gw.pow(2).sum(dim=1)
        per_sample.append((m.weight, gw))
    if m.bias is not None and m.bias.requires_grad:
        gb = g3.sum(dim=1)
        sq += gb.pow(2).sum(dim=1)
        per_sample.append((m.bias, gb))
    return sq, lambda c: [(p, (c @ gs).view_as(p)) for p, gs in per_sample]


def _group_norm(m: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, _Finish]:
    n = g.shape[0]
    sq = g.new_zeros(n)
    per_sample = []
    if m.weight is not None and m.weight.requires_grad:
        xhat = F.group_norm(a, m.num_groups, None, None, m.eps)
        gw = (xhat * g).reshape(n, m.num_channels, -1).sum(dim=2)
        sq += gw.pow(2).sum(dim=1)
        per_sample.append((m.weight, gw))
    if m.bias is not None and m.bias.requires_grad:
        gb = g.reshape(n, m.num_channels, -1).sum(dim=2)
        sq += gb.pow(2).sum(dim=1)
        per_sample.append((m.bias, gb))
    return sq, lambda c: [(p, c @ gs) for p, gs in per_sample]


class BookKeepingClipper:
    """Per-sample clipped gradient sum in one backward pass (see the module docstring).

    ``backward(loss_per_sample)`` sets ``p.grad`` (adds to it, like autograd, if already set)
    to ``sum_i min(1, (1 - CLIP_MARGIN) C / (||grad_i loss_i|| + 1e-6)) * grad_i loss_i`` over
    the batch: what Opacus's clipping puts in ``summed_grad`` before adding noise. Layers: Conv2d (groups=1,
    zero padding), Linear, GroupNorm; any other module with trainable parameters, or a layer
    called twice in one forward (shared weights), raises rather than clips wrongly.

    ``ghost``: ``"auto"`` picks per conv layer by :func:`conv_strategy` (default);
    ``"always"`` forces ghost norms, ``"never"``/``"unfold"``/``"grouped"`` force per-sample
    gradients (``"never"`` lets the rule pick unfold, grouped or pointwise), for tests and
    benchmarks.
    """

    def __init__(self, module: nn.Module, max_grad_norm: float, *, ghost: str = "auto") -> None:
        if ghost not in ("auto", "always", "never", "unfold", "grouped"):
            raise ValueError(f"unknown ghost setting {ghost!r}")
        if not isinstance(max_grad_norm, int | float):
            raise TypeError("book-keeping clipping supports flat clipping (one float) only")
        self.module = module
        self.max_grad_norm = float(max_grad_norm)
        self.ghost = ghost
        self.layers: list[nn.Module] = []
        for name, m in module.named_modules():
            if not _trainable(m):
                continue
            if type(m) not in (nn.Conv2d, nn.Linear, nn.GroupNorm):
                raise NotImplementedError(
                    f"{name or 'module'}: {type(m).__name__} has trainable parameters; "
                    "book-keeping clipping supports Conv2d, Linear and GroupNorm only"
                )
            if isinstance(m, nn.Conv2d) and (
                m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)
            ):
                raise NotImplementedError(f"{name}: only groups=1, numeric zero padding")
            self.layers.append(m)
        self.layer_modes: dict[str, str] = {}
        self._names = {m: n for n, m in module.named_modules()}
        self._records: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [m.register_forward_hook(self._capture) for m in self.layers]
        self.per_sample_norms: torch.Tensor | None = None

    def _capture(self, m: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        if not (m.training and torch.is_grad_enabled()):
            return
        if m in self._records:
            raise RuntimeError(
                f"{self._names[m]} ran twice before backward(): shared weights are not "
                "supported, and every training forward must be followed by backward()"
            )
        self._records[m] = (inputs[0].detach(), output)

    def clear(self) -> None:
        """Forget captured activations (e.g. after a forward that will not be back-propagated)."""
        self._records.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def backward(self, loss_per_sample: torch.Tensor) -> None:
        if loss_per_sample.dim() != 1:
            raise ValueError(
                f"need one loss per sample (shape (n,)), got {tuple(loss_per_sample.shape)}"
            )
        layers = [m for m in self.layers if m in self._records]
        records = [self._records[m] for m in layers]
        self._records.clear()
        if not layers:
            raise RuntimeError(
                "backward() needs a forward in training mode with grad enabled first"
            )
        n = loss_per_sample.shape[0]
        if n == 0:  # an empty Poisson batch: contributes nothing
            for m in layers:
                for p in _trainable(m):
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
            self.per_sample_norms = loss_per_sample.detach()
            return
        grads = torch.autograd.grad(
            loss_per_sample.sum(), [z for _, z in records], allow_unused=True
        )
        with torch.no_grad():
            self._clip(layers, records, grads, n)

    def _clip(
        self,
        layers: list[nn.Module],
        records: list[tuple[torch.Tensor, torch.Tensor]],
        grads: tuple[torch.Tensor | None, ...],
        n: int,
    ) -> None:
        # float64: the per-layer sums of squares add up without rounding the total below C
        sq = torch.zeros(n, dtype=torch.float64, device=records[0][1].device)
        finishers: list[_Finish] = []
        for m, (a, z), g in zip(layers, records, grads, strict=True):
            g = torch.zeros_like(z) if g is None else g.detach()
            if isinstance(m, nn.Conv2d):
                s, fin, how = _conv2d(m, a, g, self.ghost)
                self.layer_modes[self._names[m]] = how
            elif isinstance(m, nn.Linear):
                s, fin = _linear(m, a, g)
            else:
                s, fin = _group_norm(m, a, g)  # type: ignore[arg-type]
            sq += s.double()
            finishers.append(fin)
        del records, grads
        norms = sq.sqrt()
        self.per_sample_norms = norms.float()
        coef = clip_factor(norms, self.max_grad_norm).float()
        for fin in finishers:
            for p, grad in fin(coef):
                grad = grad.to(p.dtype)
                p.grad = grad if p.grad is None else p.grad + grad


class BookKeepingTensor:
    """What :class:`BookKeepingLoss` returns: ``.backward()`` clips; ``.item()`` is the mean loss."""

    def __init__(self, clipper: BookKeepingClipper, loss_per_sample: torch.Tensor) -> None:
        self.clipper = clipper
        self.loss_per_sample = loss_per_sample

    def detach(self) -> torch.Tensor:
        return self.loss_per_sample.detach().mean()

    def item(self) -> float:
        return float(self.detach().item())

    def backward(self) -> None:
        self.clipper.backward(self.loss_per_sample)


class BookKeepingLoss:
    """Wraps a criterion that has a ``reduction`` attribute (like Opacus's ghost criterion)."""

    def __init__(self, clipper: BookKeepingClipper, criterion: nn.Module) -> None:
        if not hasattr(criterion, "reduction"):
            raise TypeError("criterion needs a 'reduction' attribute ('none' gives per-sample)")
        self.clipper = clipper
        self.criterion = criterion

    def __call__(self, *args: Any, **kwargs: Any) -> BookKeepingTensor:
        old = self.criterion.reduction
        self.criterion.reduction = "none"
        try:
            per_sample = self.criterion(*args, **kwargs)
        finally:
            self.criterion.reduction = old
        return BookKeepingTensor(self.clipper, per_sample)


def privatize(
    engine: PrivacyEngine,
    *,
    mode: str,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    criterion: nn.Module,
    **kwargs: Any,
) -> tuple[nn.Module, torch.optim.Optimizer, Callable[..., Any], DataLoader]:
    """``engine.make_private`` for any mode in ``DP_MODES``, always as a 4-tuple.

    Returns ``(module, optimizer, criterion, data_loader)``; the training loop is the same for
    every mode: ``loss = criterion(module(x), y); loss.backward(); optimizer.step()``.
    ``kwargs`` go to ``make_private`` (``noise_multiplier=...``) or, when they contain
    ``target_epsilon``, to ``make_private_with_epsilon``. ``bk`` is built from Opacus's ghost
    mode (its optimizer, accountant hook and Poisson loader) with Opacus's hooks replaced by
    :class:`BookKeepingClipper`; ``criterion`` must then have a ``reduction`` attribute.
    Every mode clips with the safety margin :data:`CLIP_MARGIN` (noise: sigma C, unchanged).
    """
    if mode not in DP_MODES:
        raise ValueError(f"unknown DP mode {mode!r}; known: {', '.join(DP_MODES)}")
    make = engine.make_private_with_epsilon if "target_epsilon" in kwargs else engine.make_private
    common = dict(module=module, optimizer=optimizer, data_loader=data_loader, **kwargs)
    if mode in ("ghost", "bk"):
        gsm, opt, ghost_criterion, loader = make(
            **common, criterion=criterion, grad_sample_mode="ghost"
        )
        if mode == "ghost":
            # Opacus's ghost clipping reads the bound from the module (coefficients) and the
            # optimizer (noise): only the coefficients get the margin
            gsm.max_grad_norm = opt.max_grad_norm * (1 - CLIP_MARGIN)
            return gsm, opt, ghost_criterion, loader
        gsm.remove_hooks()
        clipper = BookKeepingClipper(gsm._module, opt.max_grad_norm)
        gsm.bookkeeping_clipper = clipper  # type: ignore[attr-defined]
        return gsm, opt, BookKeepingLoss(clipper, criterion), loader
    gsm, opt, loader = make(**common, grad_sample_mode=mode)
    _clip_with_margin(opt)
    return gsm, opt, criterion, loader


def _clip_with_margin(optimizer: Any) -> None:
    """Make an Opacus ``DPOptimizer`` clip to ``(1 - CLIP_MARGIN) C``: its
    ``clip_and_accumulate`` reads ``max_grad_norm`` for the coefficients and ``add_noise``
    reads it for the noise std, so the bound is lowered for the clipping call only."""
    clip = optimizer.clip_and_accumulate

    def clip_and_accumulate() -> None:
        bound = optimizer.max_grad_norm
        optimizer.max_grad_norm = bound * (1 - CLIP_MARGIN)
        try:
            clip()
        finally:
            optimizer.max_grad_norm = bound

    optimizer.clip_and_accumulate = clip_and_accumulate


# --------------------------------------------------------------------------------------------
# One synthetic DP step (benchmarks, memory probing)
# --------------------------------------------------------------------------------------------


@dataclass
class Step:
    """A training step on a fixed synthetic batch, in two phases: ``backward()`` (zero_grad,
    forward, loss, backward; per-sample clipping for ghost/bk) and ``update()``
    (``optimizer.step()``: clipping for hooks/functorch/ew, noise, NAdam). ``run()`` does both."""

    backward: Callable[[], None]
    update: Callable[[], None]
    module: nn.Module
    optimizer: torch.optim.Optimizer
    inputs: tuple[torch.Tensor, ...] = ()

    def run(self) -> None:
        self.backward()
        self.update()


def synthetic_batch(
    batch: int, image_size: int, device: str | torch.device, *, labels: int = 5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A reproducible batch in the training core's format: float images in [0, 1], 0/1/NaN labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, image_size, image_size, generator=gen)
    y = (torch.rand(batch, labels, generator=gen) < 0.3).float()
    y[torch.rand(batch, labels, generator=gen) < 0.05] = math.nan
    return x.to(device), y.to(device)


def memory_format(channels_last: bool) -> torch.memory_format:
    """NHWC (``channels_last``: cuDNN's tensor-core convolutions prefer it) or PyTorch's NCHW."""
    return torch.channels_last if channels_last else torch.contiguous_format


def build_step(
    model_name: str,
    image_size: int,
    mode: str,
    batch: int,
    device: str | torch.device = "cpu",
    *,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    lr: float = 1e-3,
    seed: int = 0,
    channels_last: bool = False,
) -> Step:
    """One optimizer step of ``model_name`` on a fixed batch: ``mode`` is ``"nondp"`` (plain
    NAdam, mean loss, like the training core's epsilon = inf path) or one of ``DP_MODES``
    (forward, backward, per-sample clipping, noise, NAdam step)."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    fmt = memory_format(channels_last)
    model = build_model(model_name).to(dev, memory_format=fmt)
    optimizer: torch.optim.Optimizer = torch.optim.NAdam(model.parameters(), lr=lr)
    x, y = synthetic_batch(batch, image_size, dev, seed=seed)
    x = x.contiguous(memory_format=fmt)
    criterion = MaskedBCELoss(torch.ones(y.shape[1], device=dev)).to(dev)
    if mode == "nondp":

        def backward() -> None:
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()

        return Step(backward, optimizer.step, model, optimizer, (x, y))
    loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=batch)
    module, dp_opt, dp_criterion, _ = privatize(
        PrivacyEngine(accountant="rdp"),
        mode=mode,
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        criterion=criterion,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        noise_generator=torch.Generator(device=dev).manual_seed(seed + 1),
    )

    def dp_backward() -> None:
        dp_opt.zero_grad(set_to_none=True)
        dp_criterion(module(x), y).backward()

    return Step(dp_backward, dp_opt.step, module, dp_opt, (x, y))


# --------------------------------------------------------------------------------------------
# Memory of one step
# --------------------------------------------------------------------------------------------


class _TensorBytes(TorchDispatchMode):
    """Live and peak bytes of tensor storages created on ``device`` while active.

    The CPU counterpart of CUDA's allocator statistics: every op's outputs are registered by
    storage (views and in-place results are not counted twice) and subtracted when the storage
    is freed (a weak reference on the storage object, which torch keeps alive exactly as long
    as the storage). Not counted: kernels' internal scratch buffers and malloc overhead.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device_type = device.type
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}
        self._refs: list[weakref.ref[Any]] = []

    def _free(self, key: int, nbytes: int, _ref: Any = None) -> None:
        if self._seen.pop(key, None) is not None:
            self.live -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in self._seen:
                continue
            nbytes = st.nbytes()
            self._seen[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self._refs.append(weakref.ref(st, functools.partial(self._free, key, nbytes)))
        return out


def _state_bytes(step: Step) -> int:
    """Bytes of the tensors that live across steps: parameters, optimizer state, the batch."""
    optimizer = getattr(step.optimizer, "original_optimizer", step.optimizer)
    state = [v for s in optimizer.state.values() for v in s.values()]
    seen: set[int] = set()
    total = 0
    for t in [*step.module.parameters(), *state, *step.inputs]:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def step_phase_peaks(
    step: Step, device: str | torch.device = "cpu", *, warmup: int = 1
) -> tuple[int, int]:
    """Peak memory (bytes) of one step's two phases: ``(backward phase, update phase)``.

    Each is persistent state (parameters, optimizer state and the batch, walked after
    ``warmup`` steps so NAdam's moments exist) plus the phase's peak of new tensors: on CUDA
    ``max_memory_allocated() - memory_allocated()`` (reset between the phases); on CPU the
    peak of live tensor bytes created since the step began, tracked by a dispatch mode
    (:class:`_TensorBytes`). What the backward phase leaves (per-sample gradients, ``p.grad``)
    counts in the update phase too. The phases are kept apart because they grow differently:
    activations and per-sample gradients with the batch, the optimizer's temporaries not.
    """
    dev = torch.device(device)
    for _ in range(warmup):
        step.run()
    step.optimizer.zero_grad(set_to_none=True)
    state = _state_bytes(step)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step.backward()
        torch.cuda.synchronize(dev)
        first = torch.cuda.max_memory_allocated(dev) - before
        torch.cuda.reset_peak_memory_stats(dev)
        step.update()
        torch.cuda.synchronize(dev)
        second = torch.cuda.max_memory_allocated(dev) - before
        return state + first, state + second
    with _TensorBytes(dev) as tracker:
        step.backward()
        first = tracker.peak
        tracker.reset_peak()
        step.update()
        second = tracker.peak
    return state + first, state + second


def step_peak_bytes(step: Step, device: str | torch.device = "cpu", *, warmup: int = 1) -> int:
    """Peak memory of one whole step (bytes): the larger of :func:`step_phase_peaks`."""
    return max(step_phase_peaks(step, device, warmup=warmup))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@dataclass(frozen=True)
class MemoryModel:
    """Peak bytes of one step as ``max(a1 + s1 * batch, a2 + s2 * batch)`` (the two phases of
    :func:`step_phase_peaks`, each a line through two probe batches)."""

    lines: tuple[tuple[float, float], tuple[float, float]]

    def peak(self, batch: int) -> float:
        return max(a + s * batch for a, s in self.lines)

    def max_batch(self, budget_bytes: float) -> int:
        """Largest batch with ``peak(batch) <= budget_bytes`` (0 if none; huge if flat)."""
        best = math.inf
        for a, s in self.lines:
            if a > budget_bytes:
                return 0
            if s > 0:
                best = min(best, (budget_bytes - a) / s)
        return math.floor(best) if math.isfinite(best) else 2**31 - 1


def memory_model(
    model_name: str,
    image_size: int,
    mode: str,
    device: str | torch.device = "cpu",
    *,
    probe: tuple[int, int] = (8, 16),
) -> MemoryModel:
    """Fit :class:`MemoryModel` from one-step peaks measured at the two ``probe`` batches.
    Activations and per-sample gradients (and their temporaries) scale linearly with the
    batch; parameters and optimizer state are the intercept."""
    b1, b2 = probe
    peaks = []
    for b in (b1, b2):
        with _quiet():
            step = build_step(model_name, image_size, mode, b, device)
            peaks.append(step_phase_peaks(step, device))
        del step
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    lines = []
    for phase in range(2):
        slope = (peaks[1][phase] - peaks[0][phase]) / (b2 - b1)
        lines.append((peaks[0][phase] - slope * b1, slope))
    return MemoryModel((lines[0], lines[1]))


def max_physical_batch(
    model_name: str,
    image_size: int,
    mode: str,
    budget_bytes: int,
    device: str | torch.device = "cpu",
    *,
    probe: tuple[int, int] = (8, 16),
    limit: int | None = None,
) -> int:
    """Largest physical batch whose one-step peak memory fits ``budget_bytes``.

    Method: the peak of one full step (forward, backward, per-sample clipping, noise, NAdam
    step; :func:`step_phase_peaks`, per phase) is measured at two small batches ``probe`` and
    extrapolated linearly (:class:`MemoryModel`); takes about two small steps. ``mode`` is
    ``"nondp"`` or one of ``DP_MODES``; ``limit`` caps the answer (e.g. the logical batch).
    Raises ``ValueError`` when not even one sample fits.

    The physical batch only bounds memory. Privacy accounting must depend on the *logical*
    batch alone (the Poisson sample rate and the noise scale use the expected logical batch
    size): split logical batches with Opacus's ``BatchMemoryManager``, which clips every
    sample and adds noise once per logical step, so any physical batch gives the same
    epsilon and the same noise. Never derive the sample rate or sigma from this number.
    """
    model = memory_model(model_name, image_size, mode, device, probe=probe)
    fit = model.max_batch(budget_bytes)
    if fit < 1:
        raise ValueError(
            f"{model_name} at {image_size}px ({mode}) needs {model.peak(1) / 2**20:.0f} MiB "
            f"for one sample; the budget is {budget_bytes / 2**20:.0f} MiB"
        )
    return min(fit, limit) if limit is not None else fit
