"""95% half-widths: of a task's accuracy at a number of items, and of an energy total at a number of
measured windows. The report states the achieved ones (``phases/ranking.py``); ``llm-energy plan``
states what a smaller study would reach (``runner/estimate.py``)."""

from __future__ import annotations

import math

# Targets of the scoring's precision: the 95% half-width each task's headline accuracy should reach.
HALF_WIDTH_TARGETS: dict[str, float] = {"qa": 0.07, "rca": 0.09}
Z_95 = 1.959963984540054
# Student's t, 97.5% quantile, by degrees of freedom (1-30); beyond 30 the normal quantile is within 4%.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def wilson_half_width(p: float, n: int, z: float = Z_95) -> float:
    """Half the width of the Wilson score interval of a proportion p observed on n items."""
    if n <= 0:
        return float("nan")
    denominator = 1 + z * z / n
    return z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator


def accuracy_half_width(n: int, p: float = 0.5, z: float = Z_95) -> float:
    """The normal-approximation half-width of an accuracy on n items, z * sqrt(p(1-p)/n) (at p = 0.5:
    the widest any accuracy gets)."""
    return z * math.sqrt(p * (1 - p) / n) if n > 0 else float("nan")


def items_for_half_width(half_width: float, z: float = Z_95) -> int:
    """Items needed for a half-width at worst (p = 0.5), normal approximation."""
    return math.ceil(z * z * 0.25 / (half_width * half_width))


def t_975(df: int) -> float:
    """Student's t 97.5% quantile (the normal one beyond 30 degrees of freedom)."""
    if df < 1:
        return float("nan")
    return T_975[df - 1] if df <= len(T_975) else Z_95


def energy_half_width(relative_spread: float, windows: int) -> float:
    """The relative 95% half-width of an energy total measured in ``windows`` windows whose implied
    totals spread by ``relative_spread`` (their sd over their mean): t(windows - 1) x spread / sqrt(windows),
    the standard error the tables report (se_of_chunk_sum, or the sd of repeats over sqrt(repeats))."""
    if windows < 2 or math.isnan(relative_spread):
        return float("nan")
    return t_975(windows - 1) * relative_spread / math.sqrt(windows)
