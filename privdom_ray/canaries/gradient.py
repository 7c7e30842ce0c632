"""White-box gradient canaries: Dirac directions from the public seed, secret coins, injection
into the clipped sum before the noise, the scores (plain, likelihood ratio, replayed noise) and
the noise check's sums; and :class:`Fault`, the deliberately broken builds tests audit.

Separate from input canaries: this is the attack on DP-SGD itself, wired into the optimizer's
``add_noise``/``scale_grad``; input canaries only touch the training split and the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _generate_noise

from privdom_ray import audit_bound

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
