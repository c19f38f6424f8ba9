"""What the benchmarks train: the demo's config, one simulated hospital's share of its data."""

from __future__ import annotations

from pathlib import Path

from client.data import HospitalData, load_hospital
from client.node import Hospital
from shared.config import RunConfig, load_toml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.toml"


def demo_values(output_dir: Path, **overrides) -> dict:
    """configs/demo.toml, validated, with absolute paths, a budget that never runs out
    (benchmarks repeat rounds far past the demo's epsilon) and `overrides` (key=value with
    dashes or underscores)."""
    values = load_toml(DEMO)
    values.update({"data-path": str(REPO / str(values["data-path"])),
                   "output-dir": str(output_dir), "sim-hospital-epsilon": 1e9})
    values.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return RunConfig.from_flat(values, str(DEMO)).to_flat()


def demo_config(output_dir: Path, **overrides) -> RunConfig:
    return RunConfig.from_flat(demo_values(output_dir, **overrides))


SIM_NODE = {"partition-id": 0, "num-partitions": 3}


def hospital_data(cfg: RunConfig) -> HospitalData:
    """Simulated hospital 0 of 3: the data `client.app.train_reply` trains on."""
    return load_hospital(Hospital.from_node_config(SIM_NODE, cfg), cfg)


def describe(cfg: RunConfig) -> str:
    return (f"d-width {cfg.d_width}, g-width {cfg.g_width}, latent-dim {cfg.latent_dim}, "
            f"classes {cfg.num_classes}")
