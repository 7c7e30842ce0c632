"""Numbers as our grids and records spell them: ``inf`` (or ``Infinity``, ``.inf``) is infinity.

One parser, two strictnesses. Input (the grid, a trial spec, a typed record) is parsed
strictly: a value that is no number raises ``ValueError`` naming it, so a typo is reported
instead of trained. Certifying code (``audit``, ``export``) reads files that may have been
damaged or tampered with and must report that rather than crash: it parses leniently, to NaN,
which compares unequal to everything and so shows up as a difference.
"""

from __future__ import annotations

import math
from typing import Any

#: How infinity is spelled in grids (YAML ``.inf``), JSON (``Infinity``) and our tables (``inf``).
INFINITY = ("inf", "+inf", "infinity", "+infinity", ".inf", "+.inf")


def is_infinity(text: str) -> bool:
    """Whether ``text`` spells (positive) infinity, in any case, surrounding spaces allowed."""
    return text.strip().lower() in INFINITY


def parse_number(value: Any) -> float:
    """A number, or a string spelling one (``inf`` for infinity), as a float.

    Strict: ``ValueError`` for anything else (a bool, None, a list, ``"abc"``)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{value!r} is not a number (write a number, or inf for infinity)")
    if isinstance(value, str) and is_infinity(value):
        return math.inf
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{value!r} is not a number (write a number, or inf for infinity)"
        ) from None


def number_or_nan(value: Any) -> float:
    """:func:`parse_number`, or NaN when the value is none: certifying code compares a
    damaged or tampered value (and reports it) instead of crashing on it."""
    try:
        return parse_number(value)
    except ValueError:
        return math.nan
