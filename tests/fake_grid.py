"""An in-process Flower Grid: the server's round loop against real ClientApp handlers.

`FakeGrid` answers `server.federation.run` the way a SuperLink with SuperNodes would,
but each node is a hospital's node config (deployment-style, or the simulation's
partition-id) and every reply comes from the ClientApp's handler called in this process
(`client.app.train_reply`; `client.app.evaluate_reply` for evaluate messages,
`client.app.utility_reply` for "train.utility"): real DP
training, real ledgers, real budget checks, no gRPC and no subprocesses. A handler that raises becomes an error
reply, as Flower's runtime would send it.

    with FakeGrid(run_config, {1: node_config_a, 2: node_config_b}) as grid:
        release_dir = federation.run(grid, RunConfig.from_flat(run_config))

`hospital_npz` writes a small MedMNIST-layout .npz from the bundled data, so each
hospital has its own data file as in a deployment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
from flwr.app import (Array, ArrayRecord, ConfigRecord, Error, Message, MessageType,
                      RecordDict)
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from client import app as client_app
from client.app import plan_round, train_reply
from client.ledger import rdp_epsilon
from client.node import Hospital
from shared import models, weights
from shared.config import RunConfig, validate

DATA = Path(__file__).resolve().parents[1] / "data" / "pneumoniamnist.npz"

# Tiny networks and two DP steps a round: a round takes about half a second on one core.
TINY = {"local-d-steps": 2, "d-steps-per-g-step": 2, "batch-size": 16, "g-width": 8,
        "d-width": 8, "latent-dim": 16, "samples-per-class": 2, "partition": "iid"}


def run_config(output_dir: Path, **overrides) -> dict:
    """A validated flat run config (TINY + overrides, underscores allowed in names)."""
    values = {**TINY, "data-path": str(DATA), "output-dir": str(output_dir)}
    values.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return validate(values, "test run config")


def hospital_npz(path: Path, start: int, count: int) -> Path:
    """Images [start, start + count) of the bundled PneumoniaMNIST train split, as a .npz:
    train_images uint8 (count, 28, 28), train_labels uint8 (count, 1)."""
    with np.load(DATA) as npz:
        images = npz["train_images"][start:start + count]
        labels = npz["train_labels"][start:start + count].reshape(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, train_images=images, train_labels=labels)
    return path


def node_config(tmp: Path, hospital: str, epsilon: float, images: tuple[int, int] = (0, 64),
                delta: float = 1e-5) -> dict:
    """A deployment-style node config with its own data file and state dir under tmp."""
    return {
        "hospital-id": hospital,
        "data-path": str(hospital_npz(tmp / f"{hospital}.npz", *images)),
        "state-dir": str(tmp / "nodes" / hospital),
        "epsilon": float(epsilon),
        "delta": float(delta),
    }


class FakeGrid:
    """The subset of `flwr.serverapp.Grid` that server/federation.py uses."""

    def __init__(self, run_config: dict, node_configs: dict[int, dict]):
        self.run_config = dict(run_config)
        self.node_configs = dict(node_configs)
        self.sent: list[tuple[int, int]] = []          # (round, node) per train message
        self._saved: tuple | None = None
        self._pushed: dict[str, Message] = {}            # message id -> instruction
        self.pulls = 0

    # Messages created outside Flower's runtime need the task identity it would set.
    def __enter__(self) -> "FakeGrid":
        self._saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
        TaskIdentity.task_id, TaskIdentity.run_id = 1, 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        return self

    def __exit__(self, *exc) -> None:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = self._saved

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_configs)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Accept the instructions; each is answered when its reply is pulled."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id   # as Flower's push does
            self._pushed[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        return self.send_and_receive([self._pushed.pop(i) for i in message_ids
                                      if i in self._pushed])

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id   # as Flower's push does
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == MessageType.TRAIN:
                self.sent.append((int(msg.content["config"]["round"]), node))
                handler = train_reply
            else:  # the ClientApp's other handlers, looked up by name like their decorators:
                # "evaluate" -> evaluate_reply, "train.utility" -> utility_reply
                category, _, action = msg.metadata.message_type.partition(".")
                handler = getattr(client_app, f"{action or category}_reply")
            try:
                content = handler(msg.content, self.run_config, self.node_configs[node], node)
            except Exception as e:  # noqa: BLE001 -- Flower turns it into an error reply
                replies.append(Message(Error(code=0, reason=f"{type(e).__name__}: {e}"),
                                       reply_to=msg))
                continue
            # A reply made with reply_to= has src_node_id = the request's dst_node_id.
            replies.append(Message(content=content, reply_to=msg))
        return replies


def train_content(run_config: dict, run_id: str, rnd: int) -> RecordDict:
    """What the server sends a hospital for one round: fresh global weights + (run id, round)."""
    cfg = RunConfig.from_flat(run_config)
    arrays = weights.to_numpy(models.build(cfg))
    return RecordDict({
        "weights": ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()}),
        "config": ConfigRecord({"run-id": run_id, "round": rnd}),
    })


def epsilon_after_rounds(run_config: dict, node_cfg: dict, rounds: int) -> float:
    """The RDP epsilon a hospital reaches after `rounds` rounds of this run's plan."""
    cfg = RunConfig.from_flat(run_config)
    hospital = Hospital.from_node_config(node_cfg, cfg)
    with np.load(hospital.data_path) as npz:
        n = len(npz["train_labels"])
    plan, delta = plan_round(hospital, cfg, n)
    step = (plan.noise_multiplier, plan.sample_rate, plan.steps)
    return rdp_epsilon([step] * rounds, delta)
