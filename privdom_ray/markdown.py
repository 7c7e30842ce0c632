"""Markdown primitives shared by the report and the kinds' report sections.

A leaf (imports nothing of ours) so that a kind's section (kinds/ sits below report/) writes
numbers and tables exactly as the report's own sections do: a missing value is "—", never
dropped, and a table is the same pipe table everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pandas as pd

MISSING = "—"


def missing(x: Any) -> bool:
    """None, pandas' NA or NaN: a cell without a value."""
    return x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x))


def num(x: Any, digits: int = 3, sign: bool = False) -> str:
    """A number with ``digits`` decimals (a sign when asked), or "—" when missing."""
    if missing(x):
        return MISSING
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def table(header: list[str], rows: Iterable[list[str]]) -> str:
    """A markdown pipe table, ending in a newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
