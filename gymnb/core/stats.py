"""95% intervals, the one set every stage reports with (rollout metrics, benchmark verdicts).

- `normal_interval`: mean +- 1.96 standard errors of independent values (per task, per prompt, per paired
  difference), clipped to the range the value can take; with fewer than two values there is no interval.
- `wilson_interval`: for a proportion of n independent 0/1 outcomes; unlike the normal interval it stays
  inside [0, 1] and does not collapse to a point at 0 or 1.
"""

from __future__ import annotations

import math

Z95 = 1.959964  # two-sided 95% quantile of the standard normal


def standard_error(values: list[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)); needs two values or more."""
    n = len(values)
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def normal_interval(values: list[float], low: float = -math.inf,
                    high: float = math.inf) -> tuple[float, list[float] | None]:
    """(mean, [low, high]) with the normal-approximation 95% interval clipped to [low, high]; the interval
    is None for fewer than two values."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    half = Z95 * standard_error(values)
    return mean, [max(low, mean - half), min(high, mean + half)]


def wilson_interval(p: float, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion `p` observed on `n` outcomes."""
    denom = 1 + Z95 ** 2 / n
    centre = (p + Z95 ** 2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / denom
    return centre - half, centre + half
