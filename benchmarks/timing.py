"""Side-by-side timing: variants interleaved in one process, ratios taken within each repeat.

    for each repeat r:                       (the order of the variants rotates per repeat)
        for each variant v:  t[v][r] = mean seconds of `calls` calls of v
    ratio[v][r] = t[v][r] / t[baseline][r]

On a shared, loaded machine the absolute times drift with the load; a ratio of two
measurements taken seconds apart drifts much less. Tables report the median and the
interquartile range (q1-q3) over repeats, of the times and of the per-repeat ratios.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3); with fewer than 4 values q1 and q3 are the min and max."""
    v = sorted(values)
    if len(v) < 4:
        return v[0], statistics.median(v), v[-1]
    q1, q2, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return q1, q2, q3


@dataclass
class Timed:
    name: str
    seconds: list[float]          # per call, one value per repeat
    ratios: list[float]           # per repeat, against the baseline of the same repeat

    def row(self, unit: float = 1e3) -> list[str]:
        q1, med, q3 = quartiles(self.seconds)
        r1, rmed, r3 = quartiles(self.ratios)
        return [self.name, f"{med * unit:.1f}", f"{q1 * unit:.1f}-{q3 * unit:.1f}",
                f"**{rmed:.2f}x**", f"{r1:.2f}-{r3:.2f}"]


def interleaved(variants: dict[str, Callable[[], object]], baseline: str, repeats: int,
                calls: int = 1, warmup: int = 1) -> list[Timed]:
    """Time every variant `repeats` times, interleaved; None-returning callables only."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = variants[name]
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            seconds[name].append((time.perf_counter() - start) / calls)
    base = seconds[baseline]
    return [Timed(n, seconds[n], [s / b for s, b in zip(seconds[n], base)]) for n in names]


TIME_HEADER = ["", "ms (median)", "ms (q1-q3)", "ratio (median)", "ratio (q1-q3)"]


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(threads: int) -> str:
    """One paragraph: CPU, cores, load, library versions, threads used."""
    import flwr
    import numpy
    import opacus
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu_model()}, {cores} cores available (load average {load} at start: "
            f"other jobs share the cores, absolute times drift, ratios less); "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"opacus {opacus.__version__}, flwr {flwr.__version__}, numpy {numpy.__version__}; "
            f"torch threads {threads}")
