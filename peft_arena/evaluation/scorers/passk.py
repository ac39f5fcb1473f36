"""The unbiased pass@k estimator (Chen et al., 2021), as in the paper's math eval and human-eval."""

from __future__ import annotations

from math import comb

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of ``k`` samples drawn without replacement from ``n`` (``c`` correct) passes:
    1 − C(n−c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def mean_pass_at_k(counts: list[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given ``(n, c)`` per problem, on the 0–100 scale."""
    return 100.0 * float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


def ks_for(n: int, ks: tuple[int, ...] = (1, 2, 4, 8, 16)) -> list[int]:
    """The paper's k ∈ {1, 2, 4, 8, 16}, restricted to k ≤ n."""
    return [k for k in ks if k <= n]
