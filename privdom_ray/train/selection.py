"""DP model selection of an untuned DP trial (issue 26): the epoch and the thresholds chosen by
DP releases on the source's validation split, reusing ``selection.validation``'s statistics.

The epoch is the exponential mechanism over the epochs on the per-patient clipped validation
loss (``validation.epoch_utilities``), run online as Gumbel report-noisy-max: each epoch's
utility gets its own Gumbel draw when the epoch ends, and the running maximum (value and
model) lives in the private checkpoint. Taking argmax_e (eps u_e / 2B + G_e) one epoch at a
time is the same draw as ``validation.select_checkpoint`` on all epochs at once, without
keeping every epoch's weights. The thresholds are ``validation.release_thresholds`` on the
chosen model's validation scores. Noise from OS entropy (``secret_generator``), never the
public seed; its size comes from ``selection.untuned.validation_noise``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from privdom_ray.cache import SplitData
from privdom_ray.selection import validation as releases
from privdom_ray.selection.runs import secret_generator
from privdom_ray.selection.tuning import ValidationNoise
from privdom_ray.selection.untuned import validation_entry, validation_noise


def unit_codes(split: SplitData) -> np.ndarray:
    """One integer code per image: its patient (one term per patient whatever the privacy
    unit, so the sensitivity is the bound either way), or the image without patient ids."""
    if split.patient is None:
        return np.arange(len(split), dtype=np.int64)
    return np.unique(split.patient.astype(str), return_inverse=True)[1].astype(np.int64)


def plan_state(epsilon_train: float, delta: float) -> dict[str, Any]:
    """What a DP trial's checkpoint keeps of its selection plan (plain numbers)."""
    noise = validation_noise(epsilon_train, delta)
    return {"epsilon_train": float(epsilon_train), "noise": dataclasses.asdict(noise)}


@dataclass
class DPSelection:
    """The validation releases of one DP trial: its noise and V's patient codes."""

    epsilon_train: float
    noise: ValidationNoise
    codes: np.ndarray
    bound: float = releases.LOSS_BOUND
    bins: int = releases.HISTOGRAM_BINS

    @classmethod
    def of(cls, state: dict[str, Any], val: SplitData) -> DPSelection:
        noise = ValidationNoise(**state["noise"])
        return cls(float(state["epsilon_train"]), noise, unit_codes(val))

    def noisy_utility(
        self, probs: np.ndarray, labels: np.ndarray, rng: np.random.Generator | None = None
    ) -> float:
        """One epoch's term of the report-noisy-max: eps u / (2B) + Gumbel (OS entropy)."""
        eps = self.noise.checkpoint_epsilon
        assert eps is not None
        loss = releases.per_image_loss(np.nan_to_num(probs, nan=0.5), labels)
        broken = ~np.isfinite(probs).all(axis=1) & ~np.isnan(labels).all(axis=1)
        values = releases.unit_values(np.where(broken, self.bound, loss)[:, None], self.codes)
        utility = float(releases.epoch_utilities(values, self.bound)[0])
        return eps * utility / (2 * self.bound) + float(secret_generator(rng).gumbel())

    def thresholds(
        self, probs: np.ndarray, labels: np.ndarray, rng: np.random.Generator | None = None
    ) -> list[float]:
        """Per-label Youden thresholds from the noisy validation histograms (NaN: undefined)."""
        sigma = self.noise.histogram_noise_multiplier
        assert sigma is not None
        found = releases.release_thresholds(
            np.nan_to_num(probs, nan=0.5), labels, self.codes, sigma, self.bins, rng
        ).thresholds
        return [float(x) for x in found]

    def entry(self, delta: float, n_labels: int) -> dict[str, Any]:
        """The ledger's ``validation`` entry (``selection.untuned.validation_entry``)."""
        return validation_entry(self.noise, epsilon_train=self.epsilon_train, delta=delta,
                                bound=self.bound, bins=self.bins, n_labels=n_labels)  # fmt: skip


def better(noisy: float, best: float) -> bool:
    """The running maximum of the noisy utilities (a NaN never wins)."""
    return not math.isnan(noisy) and noisy > best
