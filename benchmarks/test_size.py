"""The size of the report's paired tests: how often each says "beyond noise" when there is no difference.

Simulates paired items under the null hypothesis (the two configs' values of an item exchangeable) and
runs each test the ranking phase uses (llm_energy.analysis.significance) at alpha = 0.05:

- 0/1 items (accuracies) at accuracy 0.3 for both configs, with discordance rates 0.1, 0.3 and 0.5
  (the share of items one config gets right and the other wrong): McNemar's exact test;
- continuous items in [0, 1] (ROUGE-like: an item difficulty shared by both configs plus independent
  noise, clipped): the paired sign-flip permutation test;

at n = 8, 30, 120 and 1,200 items, each with its Monte-Carlo standard error. For comparison it also
prints the two-sided paired-bootstrap p-value the report used before (2 x the smaller share of
bootstrap means on either side of 0), which is anti-conservative on few items. Below
significance.MIN_VERDICT_ITEMS items the report gives no verdict at all; the size is printed anyway.

    python benchmarks/test_size.py [--sims 2000]

Target: size <= 0.07 for n >= 30. Last line: size_max=<largest size of the report's tests over n >= 30>
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))

from llm_energy.analysis.significance import MIN_VERDICT_ITEMS, mcnemar_exact, sign_flip_test  # noqa: E402

ALPHA = 0.05
SIZES = (8, 30, 120, 1200)
TARGET = 0.07


def binary_pairs(rng: np.random.Generator, n: int, accuracy: float,
                 discordance: float) -> tuple[np.ndarray, np.ndarray]:
    """n paired 0/1 items, both configs at ``accuracy``, a share ``discordance`` of items split evenly
    between a-right-b-wrong and a-wrong-b-right."""
    both = accuracy - discordance / 2
    # (1,1) (1,0) (0,1) (0,0)
    probabilities = [both, discordance / 2, discordance / 2, 1 - both - discordance]
    cell = rng.choice(4, size=n, p=probabilities)
    a = np.isin(cell, (0, 1)).astype(float)
    b = np.isin(cell, (0, 2)).astype(float)
    return a, b


def continuous_pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    difficulty = rng.beta(2.0, 5.0, n)
    a = np.clip(difficulty + rng.normal(0, 0.1, n), 0, 1)
    b = np.clip(difficulty + rng.normal(0, 0.1, n), 0, 1)
    return a, b


def bootstrap_p(d: np.ndarray, rng: np.random.Generator, n_boot: int = 2000) -> float:
    """The p-value the report used before: 2 x the smaller share of bootstrap means on either side of 0."""
    draws = rng.integers(0, len(d), size=(n_boot, len(d)))
    boot = d[draws].mean(axis=1)
    return float(min(1.0, 2.0 * min((boot <= 0).mean(), (boot >= 0).mean())))


def size(rejections: int, sims: int) -> tuple[float, float]:
    rate = rejections / sims
    return rate, math.sqrt(max(rate * (1 - rate), 1e-12) / sims)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=int, default=2000, help="simulated comparisons per cell")
    parser.add_argument("--perms", type=int, default=999,
                        help="random sign patterns of the Monte-Carlo permutation test")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    print(f"alpha = {ALPHA}, {args.sims} simulated comparisons per cell, no difference between the configs; "
          f"the report gives no verdict below {MIN_VERDICT_ITEMS} items")
    print(f"{'items':>20} {'n':>5} {'test':>15} {'size':>7} {'± MC se':>8} {'old bootstrap p':>16}")
    worst = 0.0
    cases = [(f"0/1, discordance {r}", lambda n, r=r: binary_pairs(rng, n, 0.3, r), "mcnemar_exact")
             for r in (0.1, 0.3, 0.5)]
    cases.append(("continuous [0, 1]", lambda n: continuous_pairs(rng, n), "sign_flip"))
    for label, draw, test in cases:
        for n in SIZES:
            hits = old_hits = 0
            for _ in range(args.sims):
                a, b = draw(n)
                if test == "mcnemar_exact":
                    p = mcnemar_exact(a, b)
                else:
                    p = sign_flip_test(a - b, n_perm=args.perms, seed=int(rng.integers(1 << 31)))
                hits += p < ALPHA
                old_hits += bootstrap_p(a - b, rng, n_boot=500) < ALPHA
            rate, se = size(hits, args.sims)
            old_rate, old_se = size(old_hits, args.sims)
            if n >= 30:
                worst = max(worst, rate)
            conservative = f"  (conservative by {ALPHA - rate:.3f})" if rate < ALPHA - 2 * se else ""
            print(f"{label:>20} {n:>5} {test:>15} {rate:7.3f} {se:8.3f} {old_rate:10.3f} ± "
                  f"{old_se:.3f}{conservative}")
    print(f"target: size <= {TARGET} for n >= 30: {'met' if worst <= TARGET else 'NOT met'}; "
          f"{time.perf_counter() - start:.0f} s")
    print(f"size_max={worst:.4f}")


if __name__ == "__main__":
    main()
