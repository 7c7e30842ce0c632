"""The DP step's vocabulary: the clipping margin, the verified per-sample modes, the fastest
mode per model and the loss with a per-sample form.

Separate from the clippers because every mode, the grid's checks and the planner's cost model
need these names, and none of them needs the clipping code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
