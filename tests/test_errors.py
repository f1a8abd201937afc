"""anita/errors.py: `check_number`, the one check of a number read from the user. NaN passes every
range test written as `x < 0`, which is how `--lr nan` and `lora_alpha: NaN` got through (issue 18)."""

import math

import pytest

from anita.errors import AnitaError, check_number


@pytest.mark.parametrize("value, bounds, message", [
    (math.nan, {}, "x must be a finite number, got nan"),
    (math.inf, dict(low=0), "x must be a finite number >= 0, got inf"),
    (-math.inf, {}, "x must be a finite number, got -inf"),
    (10 ** 400, {}, "x must be a finite number, got 1000"),  # an int beyond a double (JSON allows it)
    (True, {}, "x must be a finite number, got True"),
    ("0.1", {}, "x must be a finite number, got '0.1'"),
    (None, {}, "x must be a finite number, got None"),
    (0.0, dict(low=0, low_open=True), "x must be a finite number > 0, got 0.0"),
    (1.5, dict(low=0, high=1, low_open=True), r"x must be a finite number in (0, 1], got 1.5"),
    (1.0, dict(low=0, high=1, high_open=True), r"x must be a finite number in [0, 1), got 1.0"),
    (2.0, dict(high=1), "x must be a finite number <= 1, got 2.0"),
    (2.5, dict(integer=True), "x must be an integer, got 2.5"),
    (0, dict(low=1, integer=True), "x must be an integer >= 1, got 0"),
    (False, dict(integer=True), "x must be an integer, got False"),
])
def test_refused_numbers_are_named_with_the_range(value, bounds, message):
    with pytest.raises(AnitaError) as error:
        check_number("x", value, **bounds)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("value, bounds", [
    (0.0, dict(low=0)), (1, {}), (1e308, {}), (-5.0, {}), (1.0, dict(low=0, high=1, low_open=True)),
    (3, dict(low=1, integer=True)),
])
def test_accepted_numbers_are_returned_unchanged(value, bounds):
    assert check_number("x", value, **bounds) == value
