"""A hospital's own settings: its data, its state directory and its privacy budget.

In a real deployment they come from the SuperNode's `--node-config` and belong to the
hospital: the server's run config cannot change them. Keys:

    hospital-id   name used in the ledger and in reports          (default: node id)
    data-path     .npz file (MedMNIST layout) or a folder of scans (required)
    state-dir     where the ledger, keys and caches live           (required)
    epsilon       the hospital's total epsilon budget              (required)
    delta         the hospital's delta                             (default 1e-5)

In simulation there is no node config beyond Flower's `partition-id` and
`num-partitions`, so the simulated hospitals take their data from the run config's
`data-path` partition, their state from `<output-dir>/hospitals/hospital-<id>`, and
their budget from `sim-hospital-epsilon` (or `target-epsilon`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.config import ConfigError, RunConfig

NODE_KEYS = ("hospital-id", "data-path", "state-dir", "epsilon", "delta")


@dataclass(frozen=True)
class Hospital:
    hospital_id: str
    data_path: Path
    state_dir: Path
    epsilon_budget: float
    delta_budget: float
    partition_id: int | None = None      # simulation only: which share of data-path
    num_partitions: int | None = None

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any], cfg: RunConfig,
                         node_id: int = 0) -> "Hospital":
        if "partition-id" in node_config and "data-path" not in node_config:
            pid = int(node_config["partition-id"])
            return cls(
                hospital_id=f"hospital-{pid}",
                data_path=Path(cfg.data_path),
                state_dir=Path(cfg.output_dir) / "hospitals" / f"hospital-{pid}",
                epsilon_budget=cfg.sim_hospital_epsilon or cfg.target_epsilon,
                delta_budget=cfg.target_delta,
                partition_id=pid,
                num_partitions=int(node_config["num-partitions"]),
            )
        unknown = sorted(set(node_config) - set(NODE_KEYS) - {"partition-id", "num-partitions"})
        if unknown:
            raise ConfigError(f"node config: unknown key '{unknown[0]}' (known: {', '.join(NODE_KEYS)})")
        for key in ("data-path", "state-dir", "epsilon"):
            if key not in node_config:
                raise ConfigError(f"node config: '{key}' is required (e.g. --node-config \"{key}=...\")")
        epsilon = float(node_config["epsilon"])
        delta = float(node_config.get("delta", 1e-5))
        if not epsilon > 0:
            raise ConfigError(f"node config: epsilon = {epsilon}: must be > 0")
        if not 0 < delta < 1:
            raise ConfigError(f"node config: delta = {delta}: must be in (0, 1)")
        return cls(
            hospital_id=str(node_config.get("hospital-id", f"node-{node_id}")),
            data_path=Path(str(node_config["data-path"])),
            state_dir=Path(str(node_config["state-dir"])),
            epsilon_budget=epsilon,
            delta_budget=delta,
        )
