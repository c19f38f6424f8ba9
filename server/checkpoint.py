"""Per-round checkpoints: everything needed to resume a run and to audit it.

    <output-dir>/checkpoints/round-0003/
        global.npz    aggregated generator + discriminator weights after round 3
        ema.npz       the server's EMA of the generator
        state.json    round, run id, config, per-round client metrics, the signed ledger
                      entries each hospital returned, the digest of every update received,
                      hospitals dropped for exhausted budgets, their ledger public keys

A checkpoint is written to a temporary directory and renamed into place, so a crash
leaves either the whole checkpoint or none of it. Resuming loads the newest one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class CheckpointError(ValueError):
    pass


@dataclass
class ServerState:
    run_id: str
    round: int
    config: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)     # one record per round
    ledger: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # hospital -> entries
    public_keys: dict[str, str] = field(default_factory=dict)      # hospital -> PEM (as sent)
    dropped: list[str] = field(default_factory=list)               # budget exhausted


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save(output_dir: Path, state: ServerState, global_weights: dict[str, np.ndarray],
         ema_weights: dict[str, np.ndarray]) -> Path:
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{state.round:04d}"
    tmp = root / f".tmp-round-{state.round:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    np.savez(tmp / "global.npz", **global_weights)
    np.savez(tmp / "ema.npz", **ema_weights)
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1, sort_keys=True))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def latest(output_dir: Path) -> Path | None:
    root = checkpoint_dir(output_dir)
    rounds = sorted(p for p in root.glob("round-[0-9]*") if (p / "state.json").exists())
    return rounds[-1] if rounds else None


def load(path: Path) -> tuple[ServerState, dict[str, np.ndarray], dict[str, np.ndarray]]:
    try:
        state = ServerState(**json.loads((path / "state.json").read_text()))
        with np.load(path / "global.npz") as g, np.load(path / "ema.npz") as e:
            return state, {k: g[k] for k in g.files}, {k: e[k] for k in e.files}
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({err})") from None
