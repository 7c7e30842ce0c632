"""The auditor's guessing rules: the default grid of (k_plus, k_minus) rules and how many
guesses of a rule are correct.

Separate from the bounds: the rules choose what is counted, the bounds only turn (m, r, v) into
epsilon.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Fractions of m guessed on each side by the symmetric rules (k_plus = k_minus = fraction * m).
GUESS_FRACTIONS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
#: Fractions of m guessed "in" by the one-sided rules (k_minus = 0).
TOP_FRACTIONS: tuple[float, ...] = (0.01, 0.1, 0.3, 0.45)


@dataclass(frozen=True)
class GuessCount:
    """One guessing rule's outcome: top ``k_plus`` guessed in, bottom ``k_minus`` out."""

    k_plus: int
    k_minus: int
    correct: int

    @property
    def guesses(self) -> int:
        return self.k_plus + self.k_minus


def count_correct(
    scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int
) -> GuessCount:
    """Correct guesses when the top ``k_plus`` scores are guessed "in" and the bottom
    ``k_minus`` "out". Ties are broken by canary index (public, independent of the coins)."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if included.shape != scores.shape or scores.ndim != 1:
        raise ValueError("scores and included must be 1-D arrays of the same length")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"need 0 <= k_plus + k_minus <= m, got {k_plus} + {k_minus} > {m}")
    order = np.argsort(-scores, kind="stable")  # highest first
    return _count_sorted(included[order], k_plus, k_minus)


def _count_sorted(ranked: np.ndarray, k_plus: int, k_minus: int) -> GuessCount:
    """:func:`count_correct` on coins already ordered by score, highest first."""
    m = len(ranked)
    correct = int(ranked[:k_plus].sum()) + int((~ranked[m - k_minus :]).sum())
    return GuessCount(k_plus=k_plus, k_minus=k_minus, correct=correct)


def guess_grid(
    m: int,
    fractions: Sequence[float] = GUESS_FRACTIONS,
    top: Sequence[float] = TOP_FRACTIONS,
) -> tuple[tuple[int, int], ...]:
    """The (k_plus, k_minus) rules: k = max(1, round(f * m)) on each side for the symmetric
    ``fractions`` (at most m in all), then k_plus = round(f * m), k_minus = 0 for ``top``;
    duplicates removed (small m)."""
    if m < 1:
        raise ValueError("need at least one canary")
    grid: list[tuple[int, int]] = []
    for f in fractions:
        k = min(max(1, round(f * m)), m // 2) or 1
        k_minus = min(k, m - k)
        if (k, k_minus) not in grid:
            grid.append((k, k_minus))
    for f in top:
        rule = (min(max(1, round(f * m)), m), 0)
        if rule not in grid:
            grid.append(rule)
    return tuple(grid)
