"""FedAvg on every network at once, weighted by each hospital's declared dataset size.

    w_global = sum_k n_k w_k / sum_k n_k        (per tensor, generator and discriminator)

Replies are folded in as they arrive (server/federation.py streams them), so memory holds
one model-sized accumulator and the reply being folded, not a copy per hospital. Only
numbers the hospital may publish enter: its weights (DP outputs) and its declared n.

Arrival order varies from run to run, yet a resumed run must reproduce an uninterrupted
one bit for bit. Each term n_k w_k is exact in float64 (a float32 times an integer below
2^29), and the sum is kept as hi + lo with Knuth's TwoSum, which is error-free for each
addition: hi + lo equals the exact sum up to the rounding of lo (about 2^-100 relative),
so the float32 result does not depend on the order in which replies arrived.
"""

from __future__ import annotations

import numpy as np


def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """s, e with s = fl(a + b) and s + e = a + b exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


class FedAvg:
    def __init__(self) -> None:
        self._hi: dict[str, np.ndarray] | None = None
        self._lo: dict[str, np.ndarray] = {}
        self._weight = 0
        self.count = 0

    def add(self, arrays: dict[str, np.ndarray], num_examples: int) -> None:
        if num_examples <= 0 or num_examples >= 2**29:
            raise ValueError(f"num-examples must be in [1, 2^29), got {num_examples}")
        if self._hi is None:
            self._hi = {k: v.astype(np.float64) * num_examples for k, v in arrays.items()}
            self._lo = {k: np.zeros_like(v) for k, v in self._hi.items()}
        else:
            if arrays.keys() != self._hi.keys():
                raise ValueError("update has different tensors from the others")
            for k, v in arrays.items():
                self._hi[k], err = _two_sum(self._hi[k], v.astype(np.float64) * num_examples)
                self._lo[k] += err
        self._weight += int(num_examples)
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        if self._hi is None:
            raise ValueError("no updates to aggregate")
        return {k: ((hi + self._lo[k]) / self._weight).astype(np.float32)
                for k, hi in self._hi.items()}


def ema(previous: dict[str, np.ndarray] | None, current: dict[str, np.ndarray],
        decay: float) -> dict[str, np.ndarray]:
    """Exponential moving average over rounds (post-processing of DP outputs: free)."""
    if previous is None or decay == 0:
        return {k: v.copy() for k, v in current.items()}
    return {k: (decay * previous[k] + (1 - decay) * v).astype(np.float32)
            for k, v in current.items()}
