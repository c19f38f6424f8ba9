"""Shared fixtures: the bundled PneumoniaMNIST file and the smoke config pointed at tmp dirs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch

from shared.config import RunConfig, validate

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "pneumoniamnist.npz"
SMOKE = REPO / "configs" / "smoke.toml"


def smoke_values(output_dir: Path, **overrides) -> dict:
    """configs/smoke.toml, validated, with absolute data-path and output-dir (flat dict)."""
    raw = tomllib.loads(SMOKE.read_text())
    raw.update({"data-path": str(DATA), "output-dir": str(output_dir)})
    raw.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return validate(raw, str(SMOKE))


def smoke_config(output_dir: Path, **overrides) -> RunConfig:
    return RunConfig.from_flat(smoke_values(output_dir, **overrides))


@pytest.fixture
def one_thread():
    """Training tests use one core: other jobs share this small machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
