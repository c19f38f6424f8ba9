"""The coordinator's round loop: FedAvg over hospitals, checkpoints, budgets, release.

    start from a fresh model (seeded) or the newest checkpoint (resume)
    for each round:
        send global weights + (run id, round) to every hospital still in the run
        for each reply, as it arrives (one reply in memory at a time):
            error              -> logged; the round goes on without it
            budget-exhausted   -> logged; the hospital is dropped from later rounds
            trained            -> weights checked (keys, shapes, dtypes, finite values;
                                  digest equal to the one in its signed ledger entry),
                                  folded into FedAvg weighted by declared dataset size
        fewer than min-hospitals trained -> stop cleanly (release what exists)
        aggregate; EMA of the generator
        round in eval-every's rounds: DP scores from the hospitals (server/evaluation.py)
        checkpoint; metrics.csv (server/round_metrics.py); sample grid
    evaluate = true: DP scores of the release from the hospitals' held-out images, and the
        memorization check against their training images (server/evaluation.py)
    utility-epsilon > 0: the utility table's real-data classifiers, DP-SGD at the hospitals
        and DP scores (server/utility.py)
    release (server/release.py), with metrics.csv

The server never sees a hospital's data or its budget settings beyond what the
hospital reports; it cannot make a hospital train past its own budget (the hospital's
node enforces that), it can only stop asking.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from server import checkpoint, evaluation, release, replies, round_metrics, utility
from server.checkpoint import ServerState
from server.strategy import FedAvg, ema
from shared import models, weights
from shared.config import ConfigError, RunConfig, defaults

# Config knobs that may differ between a run and its resumption.
RESUMABLE = {"resume", "stop-after-round"}
NODE_WAIT_S = 120.0
ROUND_TIMEOUT_S = 3600.0
POLL_S = 1.0


class StopRun(Exception):
    """The run cannot go on (too few hospitals); what exists has been released."""


def _say(msg: str) -> None:
    """Progress for the coordinator (`fedsynth run` echoes lines with this prefix)."""
    print(f"[fedsynth] {msg}", flush=True)


def generator_part(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in arrays.items() if k.startswith("generator.")}


def start_state(cfg: RunConfig) -> tuple[ServerState, dict[str, np.ndarray],
                                         dict[str, np.ndarray]]:
    out = Path(cfg.output_dir)
    newest = checkpoint.latest(out)
    if cfg.resume:
        if newest is None:
            raise ConfigError(f"resume = true but {out} has no checkpoint to resume from")
        state, global_w, ema_w = checkpoint.load(newest)
        ours = {k: v for k, v in cfg.to_flat().items() if k not in RESUMABLE}
        # a knob added since the checkpoint was written ran at its default
        theirs = {k: v for k, v in {**defaults(), **state.config}.items() if k not in RESUMABLE}
        changed = sorted(k for k in ours if ours[k] != theirs.get(k))
        if changed:
            raise ConfigError(f"{newest}: cannot resume with a different config "
                              f"({', '.join(changed)} changed)")
        _say(f"resuming run {state.run_id} after round {state.round} from {newest}")
        return state, global_w, ema_w
    if newest is not None:
        raise ConfigError(f"{out} already holds checkpoints of another run: set resume = true "
                          "to continue it, or choose a new output-dir")
    global_w = weights.to_numpy(models.build(cfg))
    state = ServerState(run_id=uuid.uuid4().hex, round=0, config=cfg.to_flat())
    return state, global_w, generator_part(global_w)


def wait_for_nodes(grid: Grid, cfg: RunConfig) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_S
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= cfg.num_hospitals or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def train_messages(nodes: Iterable[int], global_w: dict[str, np.ndarray], run_id: str,
                   rnd: int) -> list[Message]:
    record = ArrayRecord(array_dict={k: Array(v) for k, v in global_w.items()})
    return [
        Message(content=RecordDict({"weights": record,
                                    "config": ConfigRecord({"run-id": run_id, "round": rnd})}),
                dst_node_id=node, message_type=MessageType.TRAIN)
        for node in nodes
    ]


def stream_replies(grid: Grid, message_ids: Iterable[str],
                   timeout: float = ROUND_TIMEOUT_S) -> Iterator[Message]:
    """Yield each reply to the pushed instructions `message_ids` as soon as it is there.

    Flower's `grid.send_and_receive` returns only when every reply is in, all of them at
    once: a full model copy per hospital in memory. Pulling one message id at a time
    keeps one reply in hand; the caller folds it into FedAvg and drops it.
    """
    pending = list(message_ids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        arrived = False
        for message_id in list(pending):
            replies = list(grid.pull_messages([message_id]))
            while replies:
                reply = replies.pop()
                pending.remove(message_id)
                arrived = True
                yield reply
                del reply                    # the caller has folded it: let it go
        if pending and not arrived:
            time.sleep(POLL_S)


def check_reply(reply: Message, cfg: RunConfig,
                node: int | None = None) -> tuple[str, dict[str, Any]]:
    """Classify one reply: ("error"|"budget"|"ok", details). Never raises on bad replies.

    `node` is the node the instruction went to: an error the SuperLink reports for an
    unreachable node comes from the SuperLink, not from that node.
    """
    kind, info = replies.status(reply, reply.metadata.src_node_id if node is None else node)
    if kind != "ok":
        return kind, info
    node, hospital, metrics, content = info["node"], info["hospital"], info["metrics"], reply.content
    try:
        entry = json.loads(content["ledger"]["entry"])
        # one entry per DP mechanism of the round (client/app.py); older nodes sent one
        entries = (json.loads(content["ledger"]["entries"])
                   if "entries" in content["ledger"] else [entry])
        record = content["weights"]
        weights.unpack(record, models.build(cfg))          # keys, dtypes, shapes, finite
        arrays = {k: record[k].numpy() for k in record.keys()}
    except (KeyError, ValueError, weights.WeightsError) as e:
        return "error", {"node": node, "hospital": hospital, "reason": f"rejected update: {e}"}
    received = weights.digest(arrays)
    if not entries or entries[-1] != entry or \
            any(not isinstance(e, dict) or e.get("weights_sha256") != received for e in entries):
        return "error", {"node": node, "hospital": hospital,
                         "reason": "update does not match the digest in its ledger entry"}
    try:
        chain = replies.ledger_chain(content, entries)
    except ValueError as e:
        return "error", {"node": node, "hospital": hospital, "reason": f"rejected ledger: {e}"}
    return "ok", {"node": node, "hospital": hospital, "metrics": metrics, "entry": entry,
                  "chain": chain,
                  "arrays": arrays, "digest": received,
                  "public_key": str(content["ledger"]["public-key"])}


def run(grid: Grid, cfg: RunConfig) -> Path:
    """Run (or resume) the federation to its release; returns the release directory."""
    out = Path(cfg.output_dir)
    state, global_w, ema_w = start_state(cfg)
    excluded: set[int] = set()      # nodes whose hospital's budget is exhausted
    stopped = ""
    for rnd in range(state.round + 1, cfg.num_rounds + 1):
        nodes = [n for n in wait_for_nodes(grid, cfg) if n not in excluded]
        if len(nodes) < cfg.min_hospitals:
            stopped = f"only {len(nodes)} hospitals available, min-hospitals = {cfg.min_hospitals}"
            break
        started = time.monotonic()
        sent = train_messages(nodes, global_w, state.run_id, rnd)
        ids = list(grid.push_messages(sent))         # Flower sets the message ids here
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        del sent
        fedavg, record = FedAvg(), {"round": rnd, "clients": {}, "received": {},
                                    "failures": [], "exhausted": []}
        accepted, replied = [], set()
        for reply in stream_replies(grid, ids):
            node = dst.get(reply.metadata.reply_to_message_id)
            replied.add(node)
            kind, info = check_reply(reply, cfg, node)
            del reply
            if kind == "error":
                record["failures"].append({k: v for k, v in info.items()})
                _say(f"round {rnd}: node {info['node']} failed: {info['reason']}")
            elif kind == "budget":
                excluded.add(info["node"])
                if info["hospital"] not in state.dropped:
                    state.dropped.append(info["hospital"])
                record["exhausted"].append(info["hospital"])
                _say(f"round {rnd}: {info['hospital']} stopped: its privacy budget "
                     f"(epsilon {info['metrics'].get('budget-epsilon')}) would be exceeded")
            else:
                fedavg.add(info.pop("arrays"), int(info["metrics"]["num-examples"]))
                hospital = info["hospital"]
                record["clients"][hospital] = info["metrics"]
                record["received"][hospital] = info["digest"]
                accepted.append(info)
        for node in sorted(set(dst.values()) - replied):
            record["failures"].append({"node": node, "reason": "no reply within the timeout"})
            _say(f"round {rnd}: node {node} did not reply within {ROUND_TIMEOUT_S:.0f}s")
        record["clients"] = dict(sorted(record["clients"].items()))
        record["received"] = dict(sorted(record["received"].items()))
        if fedavg.count < cfg.min_hospitals:
            stopped = (f"round {rnd}: {fedavg.count} hospitals trained, "
                       f"min-hospitals = {cfg.min_hospitals}")
            break
        # Only a completed round's entries join the state: the release (and its audit)
        # then shows exactly the rounds it is made of, each with its recorded update. A
        # hospital's spend on an abandoned round stays counted in its own ledger.
        for info in accepted:
            state.ledger[info["hospital"]] = info["chain"]
            state.public_keys[info["hospital"]] = info["public_key"]

        global_w = fedavg.result()
        ema_w = ema(ema_w, generator_part(global_w), cfg.g_ema_decay)
        state.round = rnd
        if rnd in cfg.eval_rounds:   # before the checkpoint: a resumed run keeps the scores
            record["evaluation"] = evaluation.evaluate_release(
                grid, cfg, state, release.sampler_weights(global_w, ema_w), [n for n in wait_for_nodes(grid, cfg) if n not in excluded],
                evaluation.EVALUATIONS)
            _say(f"round {rnd}: " + evaluation.summary_line(record["evaluation"]))
        state.rounds.append(record)
        path = checkpoint.save(out, state, global_w, ema_w)
        round_metrics.write(out / round_metrics.FILENAME, round_metrics.rows(state))
        release.save_grid(release.generator_from(cfg, release.sampler_weights(global_w, ema_w)), cfg,
                          out / "samples" / f"round-{rnd:04d}.png")
        eps = {h: m["epsilon"] for h, m in record["clients"].items()}
        _say(f"round {rnd}/{cfg.num_rounds}: {fedavg.count} hospitals, "
             f"{time.monotonic() - started:.0f}s, epsilon "
             + ", ".join(f"{h} {e:.2f}" for h, e in sorted(eps.items()))
             + f"; checkpoint {path}")
        if cfg.stop_after_round and rnd == cfg.stop_after_round and rnd < cfg.num_rounds:
            _say(f"stop-after-round = {rnd}: stopping as if crashed; resume with resume = true")
            return path
    if stopped:
        _say(f"stopping early: {stopped}")
        if state.round == 0:
            raise StopRun(f"{stopped}; no round completed, nothing to release")
    scores = None
    if cfg.evaluate:
        _say(f"evaluating the release on the hospitals' held-out images "
             f"(eval-epsilon {cfg.eval_epsilon:g} each)")
        sampler = release.sampler_weights(global_w, ema_w)
        synthetic = evaluation.synthetic_side(cfg, sampler)
        nodes = wait_for_nodes(grid, cfg)
        scores = evaluation.evaluate_release(grid, cfg, state, sampler, nodes,
                                             evaluation.RELEASE_EVALUATIONS, synthetic)
        _say(evaluation.summary_line(scores))
        if cfg.utility_epsilon > 0 and scores["scores"]:
            _say(f"training the utility table's real-data classifiers with DP-SGD at the "
                 f"hospitals (utility-epsilon {cfg.utility_epsilon:g} each per row)")
            real = utility.run(grid, cfg, state, synthetic, nodes, say=_say)
            scores["scores"]["utility"] = evaluation.utility_table(
                scores["scores"].get("train_on_synthetic"), real)
            _say(utility.summary_line(real))
    where = release.write_release(out, cfg, state, global_w, ema_w, stopped=stopped,
                                  evaluation=scores)
    table = round_metrics.rows(state, scores)
    round_metrics.write(out / round_metrics.FILENAME, table)
    round_metrics.write(where / round_metrics.FILENAME, table)
    summary = release.privacy_summary(state)
    for hospital, p in summary["per_hospital"].items():
        _say(f"{hospital}: epsilon {p['epsilon']:.3f} (delta {p['delta']:.2e}, "
             f"budget {p['budget_epsilon']})")
    _say(f"release: {where} (max epsilon {summary['max_epsilon']:.3f})")
    return where
