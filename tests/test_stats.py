"""95% intervals against hand-computed and published values."""

from __future__ import annotations

import pytest

from gymnb.core.stats import normal_interval, standard_error, wilson_interval


def test_normal_interval_by_hand():
    # values 1, 2, 3, 4, 5: mean 3, sample sd sqrt(2.5), se sqrt(2.5 / 5) = 0.7071, half-width 1.3859
    assert standard_error([1, 2, 3, 4, 5]) == pytest.approx(0.70711, abs=1e-5)
    mean, (low, high) = normal_interval([1, 2, 3, 4, 5])
    assert mean == 3 and (low, high) == pytest.approx((1.6141, 4.3859), abs=1e-4)
    assert normal_interval([1, 2, 3, 4, 5], 2.0, 4.0)[1] == [2.0, 4.0]  # clipped to the range the value can take
    assert normal_interval([0.7]) == (0.7, None)  # one value: no spread to estimate


def test_wilson_interval_published_values():
    # Newcombe (1998), table I: 15 of 148 -> 0.0624, 0.1605; 0 of 20 -> 0, 0.1611
    assert wilson_interval(15 / 148, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    assert wilson_interval(0.0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
