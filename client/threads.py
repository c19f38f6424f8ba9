"""How many torch intra-op threads a hospital's node trains with.

    node config `torch-threads`           the hospital's own choice (its IT knows the box)
    else OMP_NUM_THREADS                  in simulation Ray exports the CPUs it allocated to
                                          this ClientApp (`client-resources-num-cpus`, set
                                          by server/launch.py), so K hospitals on one machine
                                          do not oversubscribe its cores
    else the cores this process may use   os.sched_getaffinity: honours taskset and cgroup
                                          cpusets, unlike os.cpu_count

Oversubscription is the expensive mistake here: the DP step is many small kernels, and
processes that each run one thread per core spend their time contending for the cores.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def choose(node_config: dict[str, Any], environ: dict[str, str] | None = None) -> tuple[int, str]:
    """(threads, where the number came from)."""
    environ = os.environ if environ is None else environ
    if "torch-threads" in node_config:
        value = node_config["torch-threads"]
        try:
            threads = int(value)
        except (TypeError, ValueError):
            threads = 0
        if threads < 1 or isinstance(value, bool):
            from shared.config import ConfigError
            raise ConfigError(f"node config: torch-threads = {value!r}: expected an integer >= 1")
        return threads, "node config torch-threads"
    omp = environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) >= 1:
        return min(int(omp), available_cores()), "OMP_NUM_THREADS (Ray's CPU allocation)"
    return available_cores(), "cores available to the process"


def apply(node_config: dict[str, Any]) -> tuple[int, str]:
    """Set torch's intra-op threads for this node; returns (threads, source)."""
    threads, source = choose(node_config)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads, source
