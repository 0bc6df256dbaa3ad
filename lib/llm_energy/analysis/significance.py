"""Whether two configs differ in quality beyond noise, on the same items: the paired tests, the paired
interval of the difference, and Holm's correction over a family of such tests.

The tests keep their size (the false-positive rate under no difference is at most the nominal level):

- 0/1 metrics (accuracies): McNemar's exact test, a two-sided binomial test on the discordant items,
  computed in integer arithmetic so that any number of discordant pairs works.
- other metrics in [0, 1] (ROUGE-L, embedding similarity): a paired sign-flip permutation test of the
  mean difference, exact (every sign pattern) up to :data:`EXACT_SIGN_FLIP_MAX_ITEMS` non-zero
  differences, else Monte-Carlo with ``n_perm`` random sign patterns and p = (1 + hits) / (n_perm + 1),
  never 0.

Below :data:`MIN_VERDICT_ITEMS` paired items a metric gets no verdict at all ("too few items to
judge"): on 8 items even a valid test has almost no power, and the report must not print a verdict.
``benchmarks/test_size.py`` measures the size of each test by simulation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "EXACT_SIGN_FLIP_MAX_ITEMS",
    "MIN_VERDICT_ITEMS",
    "holm",
    "is_binary",
    "mcnemar_exact",
    "paired_interval",
    "paired_test",
    "sign_flip_test",
]

# Fewer paired items than this: no verdict on a metric ("too few items to judge").
MIN_VERDICT_ITEMS = 20
# Up to this many non-zero differences the sign-flip test enumerates every sign pattern (2^n).
EXACT_SIGN_FLIP_MAX_ITEMS = 16


def is_binary(values: np.ndarray) -> bool:
    """True when every value is 0 or 1 (a per-item accuracy)."""
    return bool(np.isin(np.asarray(values, dtype=float), (0.0, 1.0)).all())


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 outcomes: a binomial test (p = 1/2) on the
    discordant items (a right and b wrong, against a wrong and b right); 1.0 when none are discordant.
    Integer arithmetic throughout (the tail is a sum of binomial coefficients divided by 2^n as a
    correctly rounded integer ratio), so thousands of discordant pairs neither overflow nor underflow
    to a wrong value."""
    a = np.asarray(a)
    b = np.asarray(b)
    only_a = int(np.sum((a == 1) & (b == 0)))
    only_b = int(np.sum((a == 0) & (b == 1)))
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    if 2 * k == n:
        return 1.0
    tail = 0
    term = 1  # comb(n, 0)
    for i in range(k + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return min(1.0, (2 * tail) / (1 << n))


def sign_flip_test(d: np.ndarray, n_perm: int = 9999, seed: int = 0) -> float:
    """Two-sided paired permutation test of mean(d) = 0 by flipping the sign of each difference.

    Under no difference the two configs' values of an item are exchangeable, so each difference is as
    likely to have either sign. The statistic is |sum(d)|; p is the share of sign patterns whose
    statistic is at least the observed one. Zero differences carry no sign and are left out. Exact over
    all 2^m patterns for m <= EXACT_SIGN_FLIP_MAX_ITEMS non-zero differences; otherwise ``n_perm``
    random patterns and p = (1 + hits) / (n_perm + 1), so p is never 0."""
    d = np.asarray(d, dtype=float)
    d = d[d != 0]
    m = len(d)
    if m == 0:
        return 1.0
    observed = abs(d.sum())
    # Sums are compared with a tolerance so that a pattern equal to the observed one on paper counts.
    tolerance = 1e-9 * max(1.0, float(np.abs(d).sum()))
    if m <= EXACT_SIGN_FLIP_MAX_ITEMS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=m)))
        stats = np.abs(signs @ d)
        return float(np.mean(stats >= observed - tolerance))
    rng = np.random.default_rng(seed)
    hits = 0
    done = 0
    block = 2000
    while done < n_perm:
        size = min(block, n_perm - done)
        signs = rng.integers(0, 2, size=(size, m)) * 2.0 - 1.0
        hits += int(np.sum(np.abs(signs @ d) >= observed - tolerance))
        done += size
    return (1 + hits) / (n_perm + 1)


def paired_test(a: np.ndarray, b: np.ndarray, n_perm: int = 9999, seed: int = 0) -> tuple[float, str]:
    """The p-value of a paired difference and the test's name: McNemar's exact test for 0/1 values,
    the sign-flip permutation test otherwise."""
    if is_binary(a) and is_binary(b):
        return mcnemar_exact(a, b), "mcnemar_exact"
    return sign_flip_test(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), n_perm, seed), "sign_flip"


def paired_interval(d: np.ndarray, n_boot: int = 2000, level: float = 0.95,
                    rng: np.random.Generator | None = None) -> tuple[float, float]:
    """Percentile paired-bootstrap interval of mean(d): the same resampled items for both configs."""
    d = np.asarray(d, dtype=float)
    if len(d) == 0:
        return float("nan"), float("nan")
    rng = rng or np.random.default_rng(0)
    draws = rng.integers(0, len(d), size=(n_boot, len(d)))
    boot = d[draws].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error rate), in the input order. NaN entries
    are not part of the family and stay NaN."""
    values = [float(p) for p in p_values]
    present = [i for i, p in enumerate(values) if not math.isnan(p)]
    m = len(present)
    adjusted = [float("nan")] * len(values)
    running = 0.0
    for rank, i in enumerate(sorted(present, key=lambda j: values[j])):
        running = max(running, min(1.0, (m - rank) * values[i]))
        adjusted[i] = running
    return adjusted
