"""Item 4: server aggregation time and peak memory for K client replies of the real model size.

    FedAvg alone  server.strategy.FedAvg fed one reply at a time, each reply dropped after
                  it is folded in: what the accumulator itself needs (float64 hi + lo
                  TwoSum accumulator + one reply in flight + the float32 result)
    round loop    server/federation.py's pattern: `stream_replies` pulls one reply at a
                  time from the grid, each is checked (`weights.unpack` into fresh
                  networks), folded and dropped before the next is pulled
    all at once   the pattern before: Flower's `grid.send_and_receive` returns all K
                  replies together (their weights as serialized ArrayRecords), each is
                  checked and its arrays kept until all are folded: memory grows by about
                  two model copies per client

Peak memory is Python-heap memory by tracemalloc (numpy arrays and Flower's serialized
bytes are both traced), above what was allocated before the aggregation started, in MB
and in model copies (float32). Times are measured in a separate pass without tracemalloc.
"""

from __future__ import annotations

import tempfile
import time
import tracemalloc
from pathlib import Path
from statistics import median

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from benchmarks.timing import table
from benchmarks.workload import demo_config, describe
from server import federation
from server.strategy import FedAvg
from shared import models, weights
from shared.config import RunConfig

MB = 2 ** 20


def _reply_arrays(base: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Client k's update: the model plus a small per-client offset (distinct, finite)."""
    return {name: v + np.float32(1e-3 * (k + 1)) for name, v in base.items()}


def _reply_record(base: dict[str, np.ndarray], k: int) -> RecordDict:
    """What a hospital's reply carries that takes memory: its weights as an ArrayRecord."""
    arrays = _reply_arrays(base, k)
    return RecordDict({
        "weights": ArrayRecord(array_dict={n: Array(v) for n, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": 100 + k}),
    })


def streaming(base, K: int) -> dict[str, np.ndarray]:
    fedavg = FedAvg()
    for k in range(K):
        fedavg.add(_reply_arrays(base, k), 100 + k)
    return fedavg.result()


class _ReplyGrid:
    """A grid whose every pulled message id is answered with a fresh reply record, made
    at the moment of the pull (as a SuperLink hands a reply over)."""

    def __init__(self, base: dict[str, np.ndarray]):
        self.base = base

    def pull_messages(self, message_ids):
        return [_reply_record(self.base, int(i)) for i in message_ids]


def round_loop(base, K: int, cfg: RunConfig) -> dict[str, np.ndarray]:
    """server/federation.py's loop: stream, check (weights.unpack), fold, drop."""
    fedavg = FedAvg()
    for content in federation.stream_replies(_ReplyGrid(base), [str(k) for k in range(K)]):
        record = content["weights"]
        weights.unpack(record, models.build(cfg))      # keys, dtypes, shapes, finite
        fedavg.add({k: record[k].numpy() for k in record.keys()},
                   int(content["metrics"]["num-examples"]))
        del content, record
    return fedavg.result()


def all_at_once(base, K: int, cfg: RunConfig) -> dict[str, np.ndarray]:
    """The loop before: all K replies in hand (grid.send_and_receive), each checked
    (weights.unpack into fresh networks) and its arrays kept, then folded."""
    replies = [_reply_record(base, k) for k in range(K)]
    accepted = []
    for content in replies:
        record = content["weights"]
        weights.unpack(record, models.build(cfg))
        accepted.append(({k: record[k].numpy() for k in record.keys()},
                         int(content["metrics"]["num-examples"])))
    fedavg = FedAvg()
    for arrays, n in accepted:
        fedavg.add(arrays, n)
    return fedavg.result()


def _peak(fn) -> float:
    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    result = fn()
    peak = tracemalloc.get_traced_memory()[1] - before
    del result
    tracemalloc.stop()
    return peak


def _aggregation_seconds(base, K: int, repeats: int) -> float:
    """Median time of FedAvg.add for K replies + result(), replies made outside the clock."""
    times = []
    for _ in range(repeats):
        replies = [_reply_arrays(base, k) for k in range(min(K, 10))]
        fedavg = FedAvg()
        start = time.perf_counter()
        for k in range(K):
            fedavg.add(replies[k % len(replies)], 100 + k)
        fedavg.result()
        times.append(time.perf_counter() - start)
    return median(times)


def run(client_counts: tuple[int, ...], repeats: int, sizes: tuple[int, ...] = (28, 64)) -> str:
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            overrides = {"image-size": size}
            if size == 64:   # the config knobs' defaults at 64x64 (the demo is 28x28)
                overrides.update({"d-width": 32, "g-width": 32})
            cfg = demo_config(Path(tmp), **overrides)
            base = weights.to_numpy(models.build(cfg))
            model_mb = sum(v.nbytes for v in base.values()) / MB
            rows = []
            for K in client_counts:
                seconds = _aggregation_seconds(base, K, repeats)
                s_peak = _peak(lambda: streaming(base, K)) / MB
                r_peak = _peak(lambda: round_loop(base, K, cfg)) / MB
                a_peak = _peak(lambda: all_at_once(base, K, cfg)) / MB
                rows.append([str(K), f"{seconds * 1e3:.1f}", f"{seconds / K * 1e3:.2f}",
                             f"{s_peak:.1f} ({s_peak / model_mb:.1f}x)",
                             f"{r_peak:.1f} ({r_peak / model_mb:.1f}x)",
                             f"{a_peak:.1f} ({a_peak / model_mb:.1f}x)"])
            header = ["clients K", "FedAvg ms (all K + result)", "ms per reply",
                      "FedAvg alone: peak MB (model copies)",
                      "round loop (streaming): peak MB (model copies)",
                      "all replies at once (before): peak MB (model copies)"]
            parts.append(f"**{size}x{size}** ({describe(cfg)}): model {model_mb:.2f} MB float32, "
                         f"{sum(v.size for v in base.values()):,} values in {len(base)} tensors "
                         f"(generator + discriminator); time: median of {repeats}\n\n"
                         + table(header, rows))
    return "\n\n".join(parts)
