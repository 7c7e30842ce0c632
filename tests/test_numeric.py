"""One number parser (numeric.py): strict for grids, specs and typed records; NaN for certifying
code that must report a damaged value rather than crash on it."""

from __future__ import annotations

import math

import pytest

from privdom_ray import numeric


@pytest.mark.parametrize(
    "text", ["inf", "Inf", " INFINITY ", "Infinity", ".inf", "+inf", "+.inf"]
)
def test_every_spelling_of_infinity_is_infinity(text):
    assert numeric.parse_number(text) == math.inf
    assert numeric.number_or_nan(text) == math.inf


@pytest.mark.parametrize("value, want", [(1, 1.0), (0.5, 0.5), ("2", 2.0), ("1e-5", 1e-5),
                                         (math.inf, math.inf), ("-inf", -math.inf)])  # fmt: skip
def test_numbers_and_numeric_strings_parse(value, want):
    assert numeric.parse_number(value) == want
    assert numeric.number_or_nan(value) == want


@pytest.mark.parametrize("value", ["abc", "", None, True, [1.0], {"a": 1}])
def test_strict_refuses_what_is_no_number_and_names_it(value):
    with pytest.raises(ValueError, match="is not a number"):
        numeric.parse_number(value)
    assert math.isnan(numeric.number_or_nan(value))  # lenient: a difference, not a crash
