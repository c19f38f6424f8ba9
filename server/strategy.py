"""FedAvg on every network at once, weighted by each hospital's declared dataset size.

    w_global = sum_k n_k w_k / sum_k n_k        (per tensor, generator and discriminator)

Replies are folded into a running sum as they arrive, so memory holds one model-sized
accumulator, not a copy per hospital. Only numbers the hospital may publish enter: its
weights (DP outputs) and its declared n. Folding is done in a fixed order (sorted by
hospital id) so that a resumed run reproduces an uninterrupted one bit for bit.
"""

from __future__ import annotations

import numpy as np


class FedAvg:
    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] | None = None
        self._weight = 0.0
        self.count = 0

    def add(self, arrays: dict[str, np.ndarray], num_examples: int) -> None:
        if num_examples <= 0:
            raise ValueError(f"num-examples must be positive, got {num_examples}")
        if self._sum is None:
            self._sum = {k: v.astype(np.float64) * num_examples for k, v in arrays.items()}
        else:
            if arrays.keys() != self._sum.keys():
                raise ValueError("update has different tensors from the others")
            for k, v in arrays.items():
                self._sum[k] += v.astype(np.float64) * num_examples
        self._weight += num_examples
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        if self._sum is None:
            raise ValueError("no updates to aggregate")
        return {k: (v / self._weight).astype(np.float32) for k, v in self._sum.items()}


def ema(previous: dict[str, np.ndarray] | None, current: dict[str, np.ndarray],
        decay: float) -> dict[str, np.ndarray]:
    """Exponential moving average over rounds (post-processing of DP outputs: free)."""
    if previous is None or decay == 0:
        return {k: v.copy() for k, v in current.items()}
    return {k: (decay * previous[k] + (1 - decay) * v).astype(np.float32)
            for k, v in current.items()}
