"""FedAvg: the weighted mean, independent of the order replies arrive in, folded as they
stream in (the round loop never holds a reply it has already folded)."""

from __future__ import annotations

import gc
import itertools
import weakref

import numpy as np
import pytest

from fake_grid import FakeGrid, node_config, run_config
from server import federation
from server.strategy import FedAvg
from shared.config import RunConfig


def updates(k: int, size: int = 20_000, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [({"g.w": rng.normal(0, 0.05, size).astype(np.float32),
              "d.b": rng.normal(0, 1, 7).astype(np.float32)}, int(rng.integers(50, 3000)))
            for _ in range(k)]


def test_the_result_is_the_weighted_mean():
    ups = updates(4)
    fedavg = FedAvg()
    for arrays, n in ups:
        fedavg.add(arrays, n)
    total = sum(n for _, n in ups)
    for key in ("g.w", "d.b"):
        exact = sum(a[key].astype(np.float64) * n for a, n in ups) / total
        assert np.allclose(fedavg.result()[key], exact, rtol=1e-6, atol=1e-9)
        assert fedavg.result()[key].dtype == np.float32


def test_any_arrival_order_gives_the_same_bits():
    ups = updates(5, size=200_000, seed=1)
    results = []
    for order in itertools.islice(itertools.permutations(range(5)), 0, 120, 7):
        fedavg = FedAvg()
        for i in order:
            fedavg.add(*ups[i])
        results.append(fedavg.result())
    for r in results[1:]:
        assert all(np.array_equal(r[k], results[0][k]) for k in r)


def test_cancellation_does_not_make_the_order_matter():
    """Where a plain float64 running sum loses bits to cancellation, and so depends on
    the order, the compensated sum does not."""
    x = np.float32(1.2345678e-3)
    ups = [({"w": np.array([2.0**30], np.float32)}, 1),
           ({"w": np.array([x], np.float32)}, 1),
           ({"w": np.array([-(2.0**30)], np.float32)}, 1)]

    def naive(order):
        return np.float32(sum(float(ups[i][0]["w"][0]) for i in order) / 3)

    def fedavg(order):
        agg = FedAvg()
        for i in order:
            agg.add(*ups[i])
        return agg.result()["w"][0]

    assert naive((0, 1, 2)) != naive((0, 2, 1))              # the hazard is real
    assert fedavg((0, 1, 2)) == fedavg((0, 2, 1)) == fedavg((1, 2, 0)) == np.float32(x / 3)


def test_mismatched_or_empty_updates_are_refused():
    fedavg = FedAvg()
    with pytest.raises(ValueError, match="no updates"):
        fedavg.result()
    fedavg.add({"a": np.zeros(3, np.float32)}, 10)
    with pytest.raises(ValueError, match="different tensors"):
        fedavg.add({"b": np.zeros(3, np.float32)}, 10)
    with pytest.raises(ValueError, match="num-examples"):
        fedavg.add({"a": np.zeros(3, np.float32)}, 0)


class WatchingGrid(FakeGrid):
    """Records, at each pull, how many earlier training replies are still alive."""

    def __init__(self, *args):
        super().__init__(*args)
        self.alive_at_pull: list[int] = []
        self._replies: list[weakref.ref] = []

    def pull_messages(self, message_ids):
        gc.collect()
        self.alive_at_pull.append(sum(r() is not None for r in self._replies))
        replies = super().pull_messages(message_ids)
        self._replies += [weakref.ref(r) for r in replies]
        return replies


def test_the_round_loop_folds_each_reply_before_pulling_the_next(tmp_path):
    rc = run_config(tmp_path / "out", num_rounds=1, num_hospitals=3, min_hospitals=1)
    nodes = {i: node_config(tmp_path, f"hospital-{i}", 100.0, (64 * i, 64)) for i in range(3)}
    with WatchingGrid(rc, nodes) as grid:
        federation.run(grid, RunConfig.from_flat(rc))
    assert grid.sent == [(1, 0), (1, 1), (1, 2)]
    assert grid.alive_at_pull == [0, 0, 0]
