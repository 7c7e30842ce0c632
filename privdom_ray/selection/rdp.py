"""Renyi-DP curves of the mechanisms a tuned cell runs, their composition, and (epsilon, delta).

A curve is a numpy array of RDP values, one per order in ``orders`` (add/remove-one neighbours,
the relation Opacus's Poisson-sampled analysis uses). Curves are what the Papernot-Steinke
selection bound consumes (``runs.py``), so every mechanism here reports one: composition adds
curves, parallel composition takes their maximum, and a curve becomes (epsilon, delta) only at
the very end. Opacus is imported lazily: reading a plan must not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

#: The orders every curve is evaluated at: Opacus's RDPAccountant default (1.1 ... 10.9 in
#: steps of 0.1, then 12 ... 63) extended to 1024, because the selection bound's
#: log(E[K]) / (lambda - 1) term moves the optimal order up, and tuned runs are noisier
#: (optimal orders of 100+ at the paper's shapes). Fractional orders come from Opacus's series
#: (Mironov, Talwar and Zhang 2019, section 3.3); tests check them against direct integration.
ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(12, 65),
    80, 96, 128, 160, 192, 256, 384, 512, 768, 1024,
)  # fmt: skip

#: The accountant named next to every epsilon this package reports: RDP, converted to
#: (epsilon, delta) by Balle et al. 2020 (Theorem 21), as Opacus's ``get_privacy_spent`` does.
ACCOUNTANT = "rdp"


def as_orders(orders: Iterable[float] | None = None) -> np.ndarray:
    """The orders as a float array (default :data:`ORDERS`); every order must exceed 1."""
    out = np.asarray(ORDERS if orders is None else tuple(orders), dtype=np.float64)
    if out.ndim != 1 or out.size == 0 or not (out > 1).all():
        raise ValueError("RDP orders must be a non-empty list of numbers > 1")
    return out


def dpsgd_rdp(
    noise_multiplier: float, sample_rate: float, steps: int, orders: Iterable[float] | None = None
) -> np.ndarray:
    """RDP of ``steps`` Poisson-subsampled Gaussian steps (DP-SGD), by Opacus's analysis
    (``opacus.accountants.analysis.rdp.compute_rdp``: Mironov, Talwar and Zhang 2019).
    ``sample_rate`` 1 is the plain Gaussian mechanism; ``noise_multiplier`` 0 is no privacy."""
    a = as_orders(orders)
    if steps <= 0 or sample_rate <= 0:
        return np.zeros_like(a)
    if noise_multiplier <= 0:
        return np.full_like(a, np.inf)
    from opacus.accountants.analysis.rdp import compute_rdp

    curve = compute_rdp(
        q=float(sample_rate), noise_multiplier=float(noise_multiplier), steps=int(steps), orders=a
    )
    return np.asarray(curve, dtype=np.float64)


def mechanisms_rdp(
    mechanisms: Iterable[Sequence[float] | object], orders: Iterable[float] | None = None
) -> np.ndarray:
    """Sequential composition of Gaussian mechanisms given as (sigma, q, steps) tuples or
    objects with ``as_tuple()`` (``privacy.Mechanism``): their curves add up."""
    a = as_orders(orders)
    total = np.zeros_like(a)
    for m in mechanisms:
        sigma, q, steps = m.as_tuple() if hasattr(m, "as_tuple") else m  # type: ignore[union-attr]
        total = total + dpsgd_rdp(float(sigma), float(q), int(steps), a)
    return total


def gaussian_rdp(noise_multiplier: float, orders: Iterable[float] | None = None) -> np.ndarray:
    """RDP of one Gaussian mechanism with noise std = ``noise_multiplier`` x L2 sensitivity:
    alpha / (2 sigma^2) (Mironov 2017, Proposition 7)."""
    a = as_orders(orders)
    if noise_multiplier <= 0:
        return np.full_like(a, np.inf)
    return a / (2.0 * noise_multiplier**2)


def exponential_rdp(epsilon: float, orders: Iterable[float] | None = None) -> np.ndarray:
    """RDP of an exponential mechanism that is ``epsilon``-bounded-range (``validation.py``
    scales it so): min(alpha epsilon^2 / 8, epsilon).

    Why alpha eps^2/8: the privacy loss L of an eps-bounded-range mechanism lies in an
    interval of width eps, so Hoeffding's lemma gives E_P[exp(t (L - KL))] <= exp(t^2 eps^2/8);
    t = -1 (E_P[exp(-L)] = 1) gives KL <= eps^2/8, and t = alpha - 1 then gives
    D_alpha <= KL + (alpha - 1) eps^2/8 <= alpha eps^2/8 (Cesar and Rogers 2021, "Bounding,
    concentrating, and truncating", ALT; Durfee and Rogers 2019 show the exponential mechanism
    is bounded-range). Pure eps-DP caps every order at eps.
    """
    a = as_orders(orders)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    return np.minimum(a * epsilon**2 / 8.0, epsilon)


def parallel(train: np.ndarray, validation: np.ndarray) -> np.ndarray:
    """Privacy of (train on T, then release computed on V) when T and V are disjoint splits
    fixed independently of the data: the maximum of the two guarantees, not their sum.

    The argument (add/remove-one-unit neighbours D ~ D'): every unit's split is a function of
    that unit alone (``manifest.patient_split``: a salted hash of its patient id; official
    splits are a per-record attribute), so adding or removing a unit changes exactly one of T
    and V and leaves the other identical. The output is (M_T(T), M_V(M_T(T), V)).
    - If D and D' differ in T, V is the same and M_V is post-processing of M_T's output, so
      D_alpha(out(D) || out(D')) <= D_alpha(M_T(T) || M_T(T')) <= train(alpha).
    - If they differ in V, M_T(T) has the same distribution on both, and for every fixed model
      w, D_alpha(M_V(w, V) || M_V(w, V')) <= validation(alpha); so the joint divergence is at
      most validation(alpha) (adaptive composition with a first part that costs nothing).
    A neighbour falls in one case or the other, hence max at each order. The same argument
    holds for (epsilon, delta) pairs at one delta, so scalar epsilons may be passed too.

    Where it fails: a unit whose records can land in both splits. With ``privacy_unit:
    patient`` that needs patient-wise splits (``manifest.finalize`` refuses a patient in two
    splits); a domain without patient ids (VinDr: each image is its own "patient") gives an
    image-level guarantee only, whatever the unit says. It also fails if the split depends on
    other units' data (a seeded shuffle of the patient list, a label-stratified split, a salt
    picked after looking at the splits), and it treats the split sizes (like N_train, hence q)
    as public.
    """
    train, validation = np.asarray(train, dtype=np.float64), np.asarray(validation, np.float64)
    if train.shape != validation.shape:
        raise ValueError(f"curves differ in shape: {train.shape} vs {validation.shape}")
    return np.maximum(train, validation)


def monotone(curve: np.ndarray, orders: Iterable[float] | None = None) -> np.ndarray:
    """Tighten a curve with the monotonicity of Renyi divergence in the order: a guarantee at
    order b >= a also holds at a, so each value becomes the minimum over orders >= its own."""
    a = as_orders(orders)
    curve = np.asarray(curve, dtype=np.float64)
    order = np.argsort(a)
    out = np.empty_like(curve)
    out[order] = np.minimum.accumulate(curve[order][::-1])[::-1]
    return out


def rdp_to_epsilon(
    curve: np.ndarray, delta: float, orders: Iterable[float] | None = None
) -> tuple[float, float]:
    """(epsilon, optimal order) of a curve at ``delta``, by Opacus's ``get_privacy_spent``
    (Balle et al. 2020, "Hypothesis testing interpretations and Renyi DP", Theorem 21:
    eps = rdp + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha - 1); the same
    conversion as dp-accounting's ``compute_epsilon``, Canonne, Kamath and Steinke 2020)."""
    a = as_orders(orders)
    curve = np.asarray(curve, dtype=np.float64)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not np.isfinite(curve).any():
        return math.inf, math.nan
    import warnings

    from opacus.accountants.analysis.rdp import get_privacy_spent

    with warnings.catch_warnings():  # "optimal order is the smallest/largest alpha": harmless
        warnings.simplefilter("ignore")
        eps, order = get_privacy_spent(orders=a, rdp=curve, delta=delta)
    return max(0.0, float(eps)), float(order)


def rdp_to_delta(curve: np.ndarray, epsilon: float, orders: Iterable[float] | None = None) -> float:
    """The smallest delta such that the curve implies (epsilon, delta)-DP: the inverse of
    :func:`rdp_to_epsilon`'s conversion, log delta = (alpha - 1)(rdp - epsilon +
    log(1 - 1/alpha)) - log alpha, minimised over the orders (capped at 1)."""
    a = as_orders(orders)
    curve = np.asarray(curve, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        log_delta = (a - 1) * (curve - epsilon + np.log1p(-1 / a)) - np.log(a)
    log_delta = np.where(np.isnan(log_delta), np.inf, log_delta)
    return float(min(1.0, math.exp(min(0.0, float(log_delta.min())))))
