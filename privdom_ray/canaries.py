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
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _generate_noise
from torch import nn

from privdom_ray import audit_bound
from privdom_ray.audit_bound import AuditPower, PowerSetting, RunAudit
from privdom_ray.cache import SplitData, append
from privdom_ray.manifest import LABELS

KINDS: tuple[str, ...] = ("gradient", "input")
_ATTACHED = "_privdom_gradient_canaries"


def draw_coins(count: int, generator: torch.Generator) -> np.ndarray:
    """``count`` fair secret coins (True = canary included), from the caller's generator."""
    if count < 1:
        raise ValueError("need at least one canary")
    coins = torch.randint(0, 2, (count,), generator=generator, device=generator.device)
    return coins.bool().cpu().numpy()


def dirac_coordinates(sizes: Sequence[int], count: int, auditor_seed: int) -> np.ndarray:
    """``count`` distinct flat indices into the concatenation of parameters of ``sizes``
    elements, uniform, from the public auditor seed (so anyone can recompute the directions)."""
    total = int(sum(sizes))
    if not 1 <= count <= total:
        raise ValueError(f"need 1 <= canaries <= {total} trainable coordinates, got {count}")
    rng = np.random.default_rng(np.random.SeedSequence([auditor_seed, 0x6361_6E61]))
    return np.sort(rng.choice(total, size=count, replace=False))


@dataclass
class _Slot:
    """The canaries whose coordinates lie in one parameter tensor."""

    param: torch.Tensor
    canary: np.ndarray  # canary numbers (positions in the coin vector)
    canary_index: torch.Tensor  # the same as a long tensor (for the per-step gather)
    index: tuple[torch.Tensor, ...]  # logical multi-index per canary (any memory layout)
    scores: torch.Tensor  # float64 running sums of the released gradient, on its device
    llr: torch.Tensor  # float64 running log likelihood ratios (DP optimizers)
    replay: torch.Tensor  # the same after subtracting the replayed noise (known_noise)
    square: torch.Tensor  # running sums of the squared noised coordinate (noise check)
    cross: torch.Tensor  # ... of its product with the replayed noise (both in sigma C units)
    known: torch.Tensor | None = None  # this step's replayed noise at the coordinates


def _slots(
    params: Sequence[torch.Tensor], flat: np.ndarray, draw_device: torch.device
) -> list[_Slot]:
    sizes = np.array([p.numel() for p in params])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    owner = np.searchsorted(starts, flat, side="right") - 1
    slots = []
    for k in np.unique(owner):
        p = params[k]
        canary = np.flatnonzero(owner == k)
        coords = np.unravel_index(flat[canary] - starts[k], tuple(p.shape))
        index = tuple(torch.as_tensor(c, dtype=torch.long, device=p.device) for c in coords)
        zeros = [torch.zeros(len(canary), dtype=torch.float64, device=p.device) for _ in "slrqx"]
        canary_index = torch.as_tensor(canary, dtype=torch.long, device=draw_device)
        slots.append(_Slot(p, canary, canary_index, index, *zeros))
    return slots


class GradientCanaries:
    """m Dirac gradient canaries attached to one optimizer (see the module docstring).

    Build with :meth:`attach`; after training read :meth:`scores` and :attr:`included` (the
    secret coins: private, like the generator state) and pass them to :func:`audit_canaries`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[torch.Tensor],
        coordinates: np.ndarray,
        included: np.ndarray,
        *,
        sample_rate: float,
        norm: float,
        expected_batch_size: float,
        generator: torch.Generator,
        known_noise: torch.Generator | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.coordinates = coordinates
        self.included = np.asarray(included, dtype=bool)
        self.sample_rate = float(sample_rate)
        self.norm = float(norm)
        self.expected_batch_size = float(expected_batch_size)
        self.generator = generator
        self.known_noise = known_noise
        self.private = isinstance(optimizer, DPOptimizer)
        self.steps = 0  # real (noised) optimizer steps seen
        self.insertions = 0  # canary gradients added over all steps
        self._slots = _slots(params, coordinates, generator.device)
        self._pending = False
        self._include = torch.as_tensor(self.included, device=generator.device)

    # ---------------------------------------------------------------- construction

    @classmethod
    def attach(
        cls,
        optimizer: torch.optim.Optimizer,
        *,
        count: int,
        sample_rate: float,
        generator: torch.Generator,
        auditor_seed: int,
        max_grad_norm: float | None = None,
        expected_batch_size: float | None = None,
        params: Sequence[torch.Tensor] | None = None,
        included: np.ndarray | None = None,
        known_noise: torch.Generator | None = None,
    ) -> GradientCanaries:
        """Attach ``count`` canaries to ``optimizer`` (an Opacus ``DPOptimizer`` of any mode, or
        a plain optimizer) before the first step.

        ``sample_rate``: the trial's Poisson rate q (per image, or per patient for patient-level
        privacy). ``generator``: secret, draws the coins (unless ``included`` is given) and the
        per-step sampling. ``auditor_seed``: public, picks the coordinates. ``max_grad_norm``: C
        (default: the DP optimizer's; required for a plain optimizer). ``expected_batch_size``:
        the divisor of a plain optimizer's averaged gradient (DP optimizers divide themselves).
        ``params``: the trainable parameters in a fixed order (default: the optimizer's).
        ``known_noise``: the replay attack: the generator a build that drew its noise from a
        seed the auditor knows would use, from which that noise is replayed (Opacus's draws,
        same order) and subtracted before :meth:`replay_scores` (a correct build's noise is
        independent of it: the replay then only adds noise).
        """
        if hasattr(optimizer, _ATTACHED):
            raise RuntimeError("canaries are already attached to this optimizer")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        private = isinstance(optimizer, DPOptimizer)
        if known_noise is not None and not private:
            raise ValueError("known_noise needs a DP optimizer")
        if private:
            clip = float(optimizer.max_grad_norm)
            norm = clip if max_grad_norm is None else float(max_grad_norm)
            if norm > clip * (1 + 1e-9):
                raise ValueError(f"canary norm {norm} exceeds the clipping bound {clip}")
            batch = float(optimizer.expected_batch_size or 1)
        else:
            if max_grad_norm is None or expected_batch_size is None:
                raise ValueError("a plain optimizer needs max_grad_norm and expected_batch_size")
            norm, batch = float(max_grad_norm), float(expected_batch_size)
        if params is None:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        coordinates = dirac_coordinates([p.numel() for p in params], count, auditor_seed)
        coins = draw_coins(count, generator) if included is None else np.asarray(included, bool)
        if coins.shape != (count,):
            raise ValueError(f"included must have shape ({count},), got {coins.shape}")
        canaries = cls(
            optimizer, params, coordinates, coins, sample_rate=sample_rate, norm=norm,
            expected_batch_size=batch, generator=generator, known_noise=known_noise,
        )  # fmt: skip
        canaries._wrap()
        return canaries

    def _wrap(self) -> None:
        opt = self.optimizer
        setattr(opt, _ATTACHED, self)
        if self.private:
            add_noise, scale_grad = opt.add_noise, opt.scale_grad

            def noised() -> None:
                self._inject(self.norm, "summed_grad")
                if self.known_noise is not None:
                    self._replay_noise()
                add_noise()
                self._score_noised()
                self._pending = True

            def scaled() -> None:
                scale_grad()
                if self._pending:
                    self._score()
                    self._pending = False

            opt.add_noise, opt.scale_grad = noised, scaled
            return
        step = opt.step

        def stepped(*args, **kwargs):
            self._inject(self.norm / self.expected_batch_size, "grad")
            self._score()
            return step(*args, **kwargs)

        opt.step = stepped

    def detach(self) -> None:
        """Restore the optimizer's own methods (scores and coins are kept)."""
        for name in ("add_noise", "scale_grad", "step", _ATTACHED):
            self.optimizer.__dict__.pop(name, None)

    # ---------------------------------------------------------------- one step

    def _inject(self, value: float, attr: str) -> None:
        """Poisson-sample the included canaries and add ``value`` at their coordinates of
        ``p.<attr>`` (the clipped sum before noise, or a plain optimizer's gradient)."""
        draw = torch.rand(
            len(self.included), generator=self.generator, device=self.generator.device
        )
        sampled = (draw < self.sample_rate) & self._include
        self.insertions += int(sampled.sum())
        for slot in self._slots:
            target = getattr(slot.param, attr, None)
            if target is None:
                if attr != "grad":
                    raise RuntimeError(f"parameter has no {attr}: not a DP-SGD step")
                target = slot.param.grad = torch.zeros_like(slot.param)
            mask = sampled[slot.canary_index].to(target.device, target.dtype)
            target.index_put_(slot.index, mask * value, accumulate=True)

    def _replay_noise(self) -> None:
        """Draw the noise ``add_noise`` is about to draw, from the auditor's copy of a known
        generator (every parameter, in the optimizer's order, so the streams stay aligned)."""
        opt = self.optimizer
        std = getattr(opt, "_adjusted_noise_multiplier", opt.noise_multiplier) * opt.max_grad_norm
        slots = {id(slot.param): slot for slot in self._slots}
        for p in opt.params:
            noise = _generate_noise(std, p.summed_grad, self.known_noise, opt.secure_mode)
            if id(p) in slots:
                slots[id(p)].known = noise.view_as(p)[slots[id(p)].index].to(torch.float64)

    def _score_noised(self) -> None:
        """Add each canary's step log likelihood ratio: its coordinate of ``p.grad`` right after
        ``add_noise`` (the clipped sum plus noise, not yet divided), in units of the noise's
        standard deviation as the optimizer states it (sigma C). The replay attack scores the
        same coordinate minus the replayed noise."""
        opt = self.optimizer
        std = float(opt.noise_multiplier) * float(opt.max_grad_norm)
        if std <= 0:
            return  # no noise claimed: a likelihood ratio is undefined, the sums remain
        shift = self.norm / std
        with torch.no_grad():
            for slot in self._slots:
                z = slot.param.grad[slot.index].to(torch.float64) / std
                slot.llr += _step_llr(z, self.sample_rate, shift)
                slot.square += z * z
                if slot.known is not None:
                    known = slot.known / std
                    slot.replay += _step_llr(z - known, self.sample_rate, shift)
                    slot.cross += z * known

    def _score(self) -> None:
        """Add the released gradient's coordinate j_i to canary i's score, for every canary."""
        self.steps += 1
        with torch.no_grad():
            for slot in self._slots:
                slot.scores += slot.param.grad[slot.index].to(torch.float64)

    # ---------------------------------------------------------------- results

    def state_dict(self) -> dict[str, object]:
        """What a private checkpoint must keep to resume the audit (the coins are secret):
        plain lists and numbers, loadable with ``torch.load(weights_only=True)``."""
        known = self.known_noise
        return {
            "coordinates": self.coordinates.tolist(),
            "included": self.included.tolist(),
            "scores": self.scores().tolist(),
            "llr": self._gather("llr").tolist(),
            "replay": self._gather("replay").tolist(),
            "square": self._gather("square").tolist(),
            "cross": self._gather("cross").tolist(),
            "known_noise": None if known is None else known.get_state().tolist(),
            "steps": self.steps,
            "insertions": self.insertions,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Continue from :meth:`state_dict` (same optimizer parameters and auditor seed); the
        sampling generator's state is the caller's to restore."""
        if not np.array_equal(np.asarray(state["coordinates"]), self.coordinates):
            raise ValueError("canary coordinates differ: another auditor seed or model")
        self.included = np.asarray(state["included"], dtype=bool)
        self._include = torch.as_tensor(self.included, device=self.generator.device)
        zeros = [0.0] * len(self.included)  # a checkpoint from before the likelihood ratios:
        # they cover the steps after the resume only (still a valid audit, a weaker one)
        for name in ("scores", "llr", "replay", "square", "cross"):
            values = np.asarray(state.get(name, zeros), dtype=np.float64)
            for slot in self._slots:
                getattr(slot, name).copy_(torch.as_tensor(values[slot.canary]))
        if self.known_noise is not None and state.get("known_noise") is not None:
            self.known_noise.set_state(torch.tensor(state["known_noise"], dtype=torch.uint8))
        self.steps, self.insertions = int(state["steps"]), int(state["insertions"])

    def _gather(self, name: str) -> np.ndarray:
        out = np.zeros(len(self.included), dtype=np.float64)
        for slot in self._slots:
            out[slot.canary] = getattr(slot, name).cpu().numpy()
        return out

    def scores(self) -> np.ndarray:
        """Per canary: the sum over steps of the released gradient at its coordinate."""
        return self._gather("scores")

    def llr_scores(self) -> np.ndarray:
        """Per canary: the sum over steps of the log likelihood ratio of its noised coordinate
        (DP optimizers; zeros for a plain one)."""
        return self._gather("llr")

    def noise_check(self, alpha: float = audit_bound.NOISE_ALPHA) -> audit_bound.NoiseCheck:
        """The noise the run really added, measured at the excluded canaries' coordinates
        (no canary ever touches them): its size against the optimizer's sigma C, and its
        correlation with the replayed noise (``audit_bound.NoiseCheck``)."""
        out = ~self.included
        known = self.known_noise is not None
        return audit_bound.noise_check(
            self._gather("square")[out],
            self._gather("cross")[out] if known else None,
            steps=self.steps,
            alpha=alpha,
        )

    def replay_scores(self) -> np.ndarray:
        """:meth:`llr_scores` after subtracting the replayed noise (zeros without
        ``known_noise``)."""
        return self._gather("replay")


def _step_llr(z: torch.Tensor, sample_rate: float, shift: float) -> torch.Tensor:
    """``audit_bound.step_llr`` on a torch tensor (same formula; tests check they agree)."""
    stay = math.log1p(-sample_rate) if sample_rate < 1 else -math.inf
    return torch.logaddexp(
        torch.full_like(z, stay), math.log(sample_rate) + shift * z - 0.5 * shift**2
    )


@dataclass(frozen=True)
class Fault:
    """A deliberately broken DP build, for tests and benchmarks only: reachable through the
    Python API (``trial.train_audit_twin(fault=...)``), never from a grid.

    ``noise_scale``: the noise actually added is this times the calibrated noise, while the
    optimizer, its accountant and the ledger keep the calibrated sigma (0 = no noise at all).
    ``public_noise``: the noise is drawn from the generator the public seed gives (the bug
    class this project once shipped), while the ledger still claims secret randomness.
    """

    noise_scale: float = 1.0
    public_noise: bool = False

    def apply(self, optimizer: DPOptimizer) -> None:
        """Make ``optimizer`` add ``noise_scale`` times its noise (before canaries attach, so
        they inject before and score after the faulty noise, as in a real broken build)."""
        if self.noise_scale == 1.0:
            return
        add_noise, sigma = optimizer.add_noise, optimizer.noise_multiplier

        def scaled() -> None:
            optimizer.noise_multiplier = self.noise_scale * sigma
            try:
                add_noise()
            finally:
                optimizer.noise_multiplier = sigma

        optimizer.add_noise = scaled


# --------------------------------------------------------------------------------------------
# Input canaries
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputCanaries:
    """Black-box canaries: uint8 images (m, S, S) like the cache's and label rows (m, L)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def _pattern(rng: np.random.Generator, size: int, background: np.ndarray | None) -> np.ndarray:
    """A radiograph-like smooth background with 2-4 bright discs or bars on it."""
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    if background is None:
        base = 0.35 + 0.25 * rng.random() * yy + 0.15 * rng.random() * np.sin(math.pi * xx)
        base = base + rng.normal(0.0, 0.03, (size, size))
    else:
        base = background.astype(np.float64) / 255.0
    for _ in range(rng.integers(2, 5)):
        cy, cx = rng.uniform(0.15, 0.85, 2)
        r = rng.uniform(0.05, 0.14)
        if rng.random() < 0.5:
            shape = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        else:
            shape = (np.abs(yy - cy) < r / 3) & (np.abs(xx - cx) < 2 * r)
        base = np.where(shape, rng.uniform(0.9, 1.0), base)
    return np.clip(np.rint(base * 255), 0, 255).astype(np.uint8)


def make_input_canaries(
    count: int,
    image_size: int,
    auditor_seed: int,
    *,
    label_names: Sequence[str] = LABELS,
    background: np.ndarray | None = None,
) -> InputCanaries:
    """``count`` distinctive images with unusual labels, from the public auditor seed.

    Labels: each finding is 1 with probability 1/2 (far above any real prevalence), and
    ``healthy`` (when among ``label_names``) contradicts them: 1 exactly when some finding is
    1. Each canary is thus an individual, hard-to-fit example whose loss drops only when it is
    trained on. ``background``: an optional public uint8 (S, S) image to draw the shapes on.
    """
    if count < 1:
        raise ValueError("need at least one canary")
    if background is not None and background.shape != (image_size, image_size):
        raise ValueError(f"background must be ({image_size}, {image_size})")
    rng = np.random.default_rng(np.random.SeedSequence([auditor_seed, 0x696E_7075]))
    images = np.stack([_pattern(rng, image_size, background) for _ in range(count)])
    labels = (rng.random((count, len(label_names))) < 0.5).astype(np.float32)
    if "healthy" in label_names:
        h = list(label_names).index("healthy")
        findings = np.delete(labels, h, axis=1)
        labels[:, h] = (findings.max(axis=1) if findings.size else 0.0) > 0
    return InputCanaries(images=images, labels=labels)


def with_input_canaries(
    train: SplitData, canaries: InputCanaries, included: np.ndarray
) -> SplitData:
    """``train`` with the included canaries appended (sex "U", age unknown, each its own
    patient ``canary-<i>`` so patient-level sampling treats it as one unit)."""
    included = np.asarray(included, dtype=bool)
    if included.shape != (len(canaries),):
        raise ValueError("one coin per canary")
    if canaries.images.shape[1:] != train.images.shape[1:]:
        raise ValueError(f"canary images {canaries.images.shape[1:]} != {train.images.shape[1:]}")
    idx = np.flatnonzero(included)
    patient = None
    if train.patient is not None:
        ids = np.array([f"canary-{i}" for i in idx], dtype=object)
        patient = np.concatenate([train.patient.astype(object), ids])
    return SplitData(
        images=append(train.images, canaries.images[idx]),  # the split stays in its cache
        labels=np.concatenate([train.labels, canaries.labels[idx].astype(train.labels.dtype)]),
        sex=np.concatenate([train.sex.astype(object), np.full(len(idx), "U", dtype=object)]),
        age=np.concatenate([train.age.astype(np.float64), np.full(len(idx), np.nan)]),
        patient=patient,
    )


@torch.no_grad()
def input_canary_losses(
    model: nn.Module,
    canaries: InputCanaries,
    *,
    device: str = "cpu",
    batch: int = 256,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Per-canary mean BCE-with-logits of the trained model (eval mode, no augmentation, no
    loss weights: the score must not depend on private statistics). ``forward`` maps a uint8
    batch (n, S, S) to logits; by default the training core's input scaling and ``model``."""
    model.eval()
    dev = torch.device(device)

    def default(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(dev).unsqueeze(1).float().div_(255.0))

    run = forward or default
    out = []
    for start in range(0, len(canaries), batch):
        x = torch.from_numpy(np.ascontiguousarray(canaries.images[start : start + batch]))
        y = torch.from_numpy(canaries.labels[start : start + batch]).to(dev)
        logits = run(x).float()
        out.append(F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1).cpu())
    return torch.cat(out).numpy().astype(np.float64)


# --------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------


def audit_canaries(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    kind: str,
    delta: float,
    beta: float = audit_bound.DEFAULT_BETA,
    diagnostics: bool = True,
) -> audit_bound.AuditResult:
    """The one-run audit of one attack: higher score = guess "in" (gradient scores as they are;
    for input canaries pass ``-losses``). See ``audit_bound.audit`` for the bound and grid."""
    if kind not in KINDS:
        raise ValueError(f"unknown canary kind {kind!r}; known: {', '.join(KINDS)}")
    return audit_bound.audit(
        scores, included, delta=delta, beta=beta, kind=kind, diagnostics=diagnostics
    )


# --------------------------------------------------------------------------------------------
# An audit twin's canaries, carried by a training run (train.run_trial's ``instrument``)
# --------------------------------------------------------------------------------------------


class CanaryInstrument:
    """An audit twin's canaries in a training run: input canaries join the training split
    (``prepare``), gradient canaries attach to the optimizer (``attach``). The coins, the
    per-step draws and the scores are secret: they live in the private checkpoint only, and
    the twin keeps just the audit's result.

    ``units`` and ``sample_rate`` are the audited cell's (the trial's training set WITHOUT
    canaries): the Poisson rate and, for input canaries, the expected batch size that the DP
    optimizer divides by stay what they would be without them, so nothing the released run
    computes depends on how many coins came up.

    ``replay_noise``: the generator the public seed gives a build's noise (the replay attack,
    DP gradient twins). ``fault``: a deliberately broken build (tests and benchmarks only).
    """

    def __init__(
        self,
        *,
        count: int,
        kind: str,
        auditor_seed: int,
        units: int,
        logical_batch: int,
        max_grad_norm: float,
        replay_noise: torch.Generator | None = None,
        fault: Fault | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown canary kind {kind!r}; known: {', '.join(KINDS)}")
        self.count, self.kind, self.auditor_seed = count, kind, auditor_seed
        self.units, self.logical_batch, self.max_grad_norm = units, logical_batch, max_grad_norm
        self.replay_noise, self.fault = replay_noise, fault
        self.coins: np.ndarray | None = None
        self.generator: torch.Generator | None = None
        self.gradient: GradientCanaries | None = None
        self.inputs: InputCanaries | None = None
        self._saved: dict | None = None

    def prepare(self, train: SplitData, generator: torch.Generator) -> SplitData:
        """Draw the coins (unless restored) and, for input canaries, append the included ones."""
        self.generator = generator
        if self.coins is None:
            self.coins = draw_coins(self.count, generator)
        if self.kind != "input":
            return train
        size = int(train.images.shape[1])
        self.inputs = make_input_canaries(self.count, size, self.auditor_seed)
        return with_input_canaries(train, self.inputs, self.coins)

    def attach(self, optimizer: torch.optim.Optimizer, sample_rate: float) -> None:
        assert self.coins is not None and self.generator is not None, "prepare() first"
        private = isinstance(optimizer, DPOptimizer)
        if self.fault is not None and private:
            self.fault.apply(optimizer)
        if self.kind == "input":
            if private:  # divide by the cell's expected batch, not one that counts the coins
                optimizer.expected_batch_size = int(self.units * sample_rate)
            return
        extra = {} if private else dict(
            max_grad_norm=self.max_grad_norm, expected_batch_size=self.logical_batch
        )  # fmt: skip
        self.gradient = GradientCanaries.attach(
            optimizer, count=self.count, sample_rate=sample_rate, generator=self.generator,
            auditor_seed=self.auditor_seed, included=self.coins,
            known_noise=self.replay_noise if private else None, **extra,
        )  # fmt: skip
        if self._saved is not None:
            self.gradient.load_state_dict(self._saved)

    def result(
        self,
        model: nn.Module,
        *,
        delta: float,
        epsilon_spent: float = math.inf,
        device: str = "cpu",
        power_runs: int = 24,
    ) -> RunAudit:
        """Every attack's scores against the secret coins (gradient canaries of a DP run: the
        plain and the replayed likelihood ratios; of a plain run: the released sums; input
        canaries: minus the final model's loss on each), Bonferroni over the attacks; for DP
        gradient twins also the noise check and the power (``audit_bound.audit_power``,
        ``power_runs`` simulated runs; 0 = none) against ``epsilon_spent``."""
        assert self.coins is not None
        scores, score = self._scores(model, device)
        audit = audit_bound.run_audit(scores, self.coins, delta=delta, kind=self.kind, score=score)
        g = self.gradient
        if score != "llr" or g is None:
            return audit
        audit = dataclasses.replace(audit, noise=g.noise_check())
        if power_runs < 1 or not math.isfinite(epsilon_spent):
            return audit
        opt = g.optimizer
        setting = PowerSetting(
            m=self.count, sample_rate=g.sample_rate, steps=g.steps,
            noise_multiplier=float(opt.noise_multiplier), epsilon=float(epsilon_spent),
            delta=delta, beta=audit.beta, tests=len(scores),
        )  # fmt: skip
        return dataclasses.replace(audit, power=_power(setting, power_runs))

    def _scores(self, model: nn.Module, device: str) -> tuple[dict[str, np.ndarray], str]:
        if self.kind == "input":
            assert self.inputs is not None
            return {"standard": -input_canary_losses(model, self.inputs, device=device)}, "loss"
        g = self.gradient
        assert g is not None
        if not g.private or float(g.optimizer.noise_multiplier) <= 0:
            return {"standard": g.scores()}, "sum"
        scores = {"standard": g.llr_scores()}
        if g.known_noise is not None:
            scores["replay"] = g.replay_scores()
        return scores, "llr"

    def state_dict(self) -> dict[str, object]:
        return {
            "coins": [] if self.coins is None else self.coins.tolist(),
            "gradient": None if self.gradient is None else self.gradient.state_dict(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.coins = np.asarray(state["coins"], dtype=bool)
        self._saved = state["gradient"]  # type: ignore[assignment]


@functools.lru_cache(maxsize=8)
def _power(setting: PowerSetting, runs: int) -> AuditPower:
    """Twins of one sweep often share their shapes (sites of similar size): simulate once per
    worker process."""
    return audit_bound.audit_power(setting, runs=runs)
