"""Book-keeping clipping (``bk``: one forward, one backward, mixed ghost norms) and
:func:`privatize`, which attaches any verified mode to a model, optimizer and loader.

Separate from the memory probes: this is the privacy mechanism's code path (what a trial runs),
while ``memory`` only measures a synthetic step built with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader

from privdom_ray.dpstep.modes import CLIP_MARGIN, DP_MODES, clip_factor

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
