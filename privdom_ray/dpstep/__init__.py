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

The package, module by module (each names what it owns):

- ``modes``: the clipping margin, the verified modes, the fastest mode per model, the loss with a
  per-sample form (what every mode shares);
- ``bookkeeping``: book-keeping clipping (``bk``) and :func:`privatize`, which attaches any mode;
- ``memory``: one synthetic DP step and what it costs in memory (the memory-fit batch).
"""

from privdom_ray.dpstep.bookkeeping import (
    GHOST_RATIO,
    BookKeepingClipper,
    BookKeepingLoss,
    BookKeepingTensor,
    conv_strategy,
    privatize,
)
from privdom_ray.dpstep.memory import (
    MemoryModel,
    Step,
    build_step,
    max_physical_batch,
    memory_format,
    memory_model,
    step_peak_bytes,
    step_phase_peaks,
    synthetic_batch,
)
from privdom_ray.dpstep.modes import (
    CLIP_MARGIN,
    DP_MODES,
    GRAD_SAMPLE_MODES,
    NHWC_MODES,
    OPACUS_MODES,
    MaskedBCELoss,
    clip_factor,
    fastest_correct_mode,
)

__all__ = [
    "CLIP_MARGIN",
    "clip_factor",
    "OPACUS_MODES",
    "DP_MODES",
    "GRAD_SAMPLE_MODES",
    "NHWC_MODES",
    "fastest_correct_mode",
    "MaskedBCELoss",
    "GHOST_RATIO",
    "conv_strategy",
    "BookKeepingClipper",
    "BookKeepingTensor",
    "BookKeepingLoss",
    "privatize",
    "Step",
    "synthetic_batch",
    "memory_format",
    "build_step",
    "step_phase_peaks",
    "step_peak_bytes",
    "MemoryModel",
    "memory_model",
    "max_physical_batch",
]
