"""Canaries for one-run privacy audits: white-box gradient canaries and black-box input canaries.

Why: an audit twin trains like its trial but with m canaries, each included by a secret fair
coin; the released training output then lets an auditor guess the coins, and the number of
correct guesses lower-bounds epsilon (``audit_bound``). A lower bound above the claimed epsilon
means the DP implementation is broken.

Gradient canaries (:class:`GradientCanaries`, white box, the strongest audit of DP-SGD itself).
Canary i is a per-example gradient ``C e_{j_i}``: norm exactly the clipping bound C along the
Dirac direction of one coordinate j_i of the flattened trainable parameters (distinct
coordinates drawn from the *public* auditor seed, :func:`dirac_coordinates`). This is the
canary Nasr et al. (2023) and Steinke, Nasr & Jagielski (2023) use for white-box DP-SGD audits:
it is the worst-case example DP-SGD must hide (full clipping norm, no interaction with the
loss), and a Dirac direction makes injecting and scoring O(m) per step (one index per canary,
no m x d projection). At every optimizer step each included canary is Poisson-sampled with the
trial's rate q (from the *secret* generator) and, when sampled, ``C e_j`` is added to the
clipped gradient sum *before* the noise, exactly where a real example's clipped gradient is: it
is then noised and divided by the expected batch size like one. Canary i's scores are functions of the DP mechanism's output only, so the one-run theorem
applies to each: ``scores()``, the sum over steps of the released gradient's coordinate j_i;
for DP optimizers also ``llr_scores()``, the sum over steps of the log likelihood ratio "in" vs
"out" of the noised coordinate (``audit_bound.step_llr`` with the ledger's sigma: the optimal
score when the noise is what the ledger says, and far stronger than the sum when sigma is
small), which the twins' audit uses. Real gradients also touch coordinate j_i; they shift in
and out canaries alike and only add variance ("interference").

The replay attack (``known_noise``): a twin also scores every canary after subtracting the
noise that a build drawing its noise from the public seed would have added (the auditor
regenerates it: Opacus's draws, same order, from the generator that seed gives). A correct
build's noise is independent of that replay, so the replayed scores carry no more information
than the plain ones (less: the subtraction doubles the noise); a build whose noise follows the
seed is left with its canaries bare, and the audit catches it as it catches a build without
noise. ``replay_scores()`` holds them.

The noise check (:meth:`GradientCanaries.noise_check`): the coordinates of the excluded
canaries are never touched by a canary, so what the auditor sees there each step is a clipped
sum plus the noise; the sums of its squares and of its products with the replayed noise test
whether the run added the noise its ledger states and whether that noise is the public
seed's (``audit_bound.NoiseCheck``). A test of the noise, not a bound on epsilon.

Where the clipped sum lives (Opacus 1.6): ``DPOptimizer.pre_step`` (hooks, functorch, ew) and
``DPOptimizerFastGradientClipping.pre_step`` (ghost, and ``dpstep``'s bk) both leave the clipped
sum of the logical batch in ``p.summed_grad`` and call ``add_noise()`` (which sets
``p.grad = p.summed_grad + noise``) then ``scale_grad()`` (divides by the expected batch size),
once per *real* step: BatchMemoryManager's skipped physical steps return before ``add_noise``,
and an empty Poisson batch still reaches it with a zero sum. So the canaries wrap those two
methods of the optimizer instance: inject in ``add_noise``, score after ``scale_grad``. A plain
(non-DP) optimizer gets ``C e_j / expected_batch_size`` added to ``p.grad`` in a wrapped
``step()`` (the averaged gradient), and the score is read from the gradient it applies, so
non-DP audit twins are audited the same way.

Input canaries (:func:`make_input_canaries`, black box): images with a distinctive pattern and
a contradictory label vector, appended to the training split when their coin says so
(:func:`with_input_canaries`); the score is minus the trained model's loss on each
(:func:`input_canary_losses`).

Secrets: coins and per-step sampling come only from the caller's ``torch.Generator`` (seeded
from OS entropy by the training core; fixed in tests); directions and input patterns come from
the public ``auditor_seed``. :func:`audit_canaries` turns scores and coins into the bound.

Broken builds (:class:`Fault`) exist for tests and benchmarks only and are reachable only
through the Python API (a noise scale, a public noise generator), never from a grid.

The package, module by module (each names what it owns):

- ``gradient``: white-box gradient canaries (injection, scores, replay, the noise check's sums)
  and the deliberately broken builds (:class:`Fault`);
- ``inputs``: black-box input canaries (patterns, the training split with them, their losses);
- ``instrument``: the audit of one attack and :class:`CanaryInstrument`, what an audit twin's
  training run carries.
"""

from privdom_ray.canaries.gradient import Fault, GradientCanaries, dirac_coordinates, draw_coins
from privdom_ray.canaries.inputs import (
    InputCanaries,
    input_canary_losses,
    make_input_canaries,
    with_input_canaries,
)
from privdom_ray.canaries.instrument import KINDS, CanaryInstrument, audit_canaries

__all__ = [
    "draw_coins",
    "dirac_coordinates",
    "GradientCanaries",
    "Fault",
    "InputCanaries",
    "make_input_canaries",
    "with_input_canaries",
    "input_canary_losses",
    "KINDS",
    "audit_canaries",
    "CanaryInstrument",
]
