"""Split one labelled data set across K simulated hospitals, IID or with label skew.

Exports are often ordered by label (PneumoniaMNIST's training split is: all normal
images first), so indices are shuffled with the seed before anything else.
Label skew follows the usual Dirichlet recipe (Hsu et al. 2019): for each class, the
share each hospital receives is drawn from Dirichlet(alpha, ..., alpha); small alpha
means each hospital sees mostly one class.
"""

from __future__ import annotations

import numpy as np


class PartitionError(ValueError):
    pass


def split(
    labels: np.ndarray,
    num_hospitals: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Indices into `labels` for each hospital; disjoint, together covering every sample.

    labels: (N,) int. Returns `num_hospitals` sorted int64 index arrays.
    Dirichlet draws are repeated (seeded) until every hospital holds >= min_size samples.
    """
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if num_hospitals < 1:
        raise PartitionError(f"num-hospitals = {num_hospitals}: must be >= 1")
    if num_hospitals * min_size > n:
        raise PartitionError(
            f"num-hospitals = {num_hospitals} needs at least {num_hospitals * min_size} "
            f"samples ({min_size} each), the data set has {n}"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(order, num_hospitals)]
    if scheme != "dirichlet":
        raise PartitionError(f"partition = {scheme!r}: must be iid or dirichlet")
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_hospitals)]
        for c in np.unique(labels):
            members = order[labels[order] == c]
            shares = rng.dirichlet(np.full(num_hospitals, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for h, chunk in enumerate(np.split(members, cuts)):
                parts[h].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise PartitionError(
        f"dirichlet-alpha = {alpha}: could not give each of {num_hospitals} hospitals "
        f"{min_size} samples; raise alpha or use fewer hospitals"
    )
