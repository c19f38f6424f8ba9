"""The coordinator's side of the utility table's real-data rows (shared/utility.py).

    classifiers: one SmallCNN per variant, the same seeded initial weights
    for utility round r = 1 .. utility-rounds:
        send "train.utility" to every hospital still in: the classifiers, the evaluation's
            synthetic images (public), run-id, round, r
        check each reply: status; one signed ledger entry per variant, in order, naming this
            run and the variant's purpose, whose digest is the classifier sent back; the
            node's whole ledger ending with them
        FedAvg per variant, weighted by the declared n; a hospital that refuses (budget) or
            fails is out for the rest of the phase
    score: one EVALUATE message with the three classifiers and, for each, public score bins
        that follow its scores on the synthetic images (shared/dp_stats.py
        public_score_edges); each hospital releases DP counts of them on its held-out
        images (server/evaluation.py pool), paid from utility-epsilon
    rows: accuracy and ROC AUC per variant with the real test count, the hospitals that
        trained, and each variant's own epsilon (its DP-SGD entries and its counts, composed)

Every entry the hospitals sign joins ``state.ledger``, so the release's audit and privacy
summary include the utility phase's spend.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from client.ledger import rdp_epsilon
from server import evaluation
from server.checkpoint import ServerState
from server.replies import ledger_chain, status as reply_status
from server.strategy import FedAvg
from shared import evaluation as protocol
from shared import utility as utility_protocol
from shared import weights
from shared.classifier import SmallCNN, predict_proba
from shared.config import RunConfig
from shared.dp_stats import public_score_edges

log = logging.getLogger("fedsynth.server")
VARIANTS = list(utility_protocol.VARIANTS)
UTILITY_TIMEOUT_S = 3600.0


def initial_classifiers(cfg: RunConfig) -> dict[str, dict[str, np.ndarray]]:
    """The same seeded SmallCNN for every variant, as numpy arrays."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + utility_protocol.WEIGHT_SEED_OFFSET)
        model = SmallCNN(cfg.num_classes)
    arrays = protocol.record_arrays(protocol.classifier_record(model))
    return {v: {k: a.copy() for k, a in arrays.items()} for v in VARIANTS}


def _model(cfg: RunConfig, arrays: dict[str, np.ndarray]) -> SmallCNN:
    return protocol.load_classifier(protocol.to_record(arrays), SmallCNN(cfg.num_classes))


def train_content(classifiers: dict[str, dict[str, np.ndarray]], synthetic: RecordDict | Any,
                  run_id: str, rnd: int, utility_round: int) -> RecordDict:
    content = RecordDict({"config": ConfigRecord({"run-id": run_id, "round": rnd,
                                                  "utility-round": utility_round}),
                          "synthetic": synthetic})
    for variant, arrays in classifiers.items():
        content[utility_protocol.classifier_key(variant)] = protocol.to_record(arrays)
    return content


def check_reply(reply: Message, cfg: RunConfig, run_id: str,
                reference: dict[str, dict[str, np.ndarray]]) -> tuple[str, dict[str, Any]]:
    """("error" | "budget" | "ok", details) for one "train.utility" reply; never raises."""
    kind, info = reply_status(reply, reply.metadata.src_node_id)
    if kind != "ok":
        return kind, info
    hospital, content = info["hospital"], reply.content
    try:
        entries = json.loads(content["ledger"]["entries"])
        if len(entries) != len(VARIANTS):
            raise protocol.ProtocolError(f"{len(entries)} ledger entries for {len(VARIANTS)} classifiers")
        arrays = {}
        for variant, entry in zip(VARIANTS, entries, strict=True):
            got = protocol.record_arrays(content[utility_protocol.classifier_key(variant)])
            expected = reference[variant]
            if set(got) != set(expected) or any(got[k].shape != expected[k].shape or got[k].dtype != expected[k].dtype
                                                or not np.isfinite(got[k]).all() for k in expected):
                raise protocol.ProtocolError(f"classifier {variant}: weights of the wrong shape, type or not finite")
            if (entry.get("purpose") != utility_protocol.train_purpose(variant)
                    or entry.get("mechanism") != "subsampled-gaussian"
                    or entry.get("run_id") != run_id or entry.get("hospital_id") != hospital):
                raise protocol.ProtocolError(f"the ledger entry for {variant} names another release")
            if entry.get("weights_sha256") != weights.digest(got):
                raise protocol.ProtocolError(f"classifier {variant} does not match its ledger entry's digest")
            arrays[variant] = got
        num_examples = int(info["metrics"]["num-examples"])
        chain = ledger_chain(content, entries)
    except (KeyError, ValueError, TypeError) as e:
        return "error", {**info, "reason": f"rejected utility update: {e}"}
    return "ok", {**info, "entries": entries, "chain": chain, "arrays": arrays,
                  "num_examples": num_examples, "public_key": str(content["ledger"]["public-key"])}


def run(grid: Grid, cfg: RunConfig, state: ServerState, synthetic: evaluation.Synthetic,
        nodes: Iterable[int], say=log.info) -> dict[str, Any]:
    """Train and score the three real-data classifiers; returns the rows' figures per
    training set (server/evaluation.py utility_table) and who took part."""
    nodes = list(nodes)
    classifiers = initial_classifiers(cfg)
    synthetic_record = utility_protocol.synthetic_record(synthetic.images, synthetic.labels)
    trained: dict[str, list[dict[str, Any]]] = {}     # hospital -> its utility entries
    refused, failures = [], []
    for utility_round in range(1, cfg.utility_rounds + 1):
        content = train_content(classifiers, synthetic_record, state.run_id, state.round, utility_round)
        messages = [Message(content=content, dst_node_id=node, message_type=utility_protocol.MESSAGE_TYPE)
                    for node in nodes]
        replies = grid.send_and_receive(messages, timeout=UTILITY_TIMEOUT_S)
        accepted, answered = [], set()
        for reply in replies:
            kind, info = check_reply(reply, cfg, state.run_id, classifiers)
            answered.add(info["node"])
            if kind == "ok":
                accepted.append(info)
            elif kind == "budget":
                refused.append(info["hospital"])
            else:
                failures.append({"utility_round": utility_round, **{k: v for k, v in info.items()
                                                                     if k in ("node", "hospital", "reason")}})
        failures += [{"utility_round": utility_round, "node": n, "reason": "no reply within the timeout"}
                     for n in sorted(set(nodes) - answered)]
        if not accepted:
            say(f"utility round {utility_round}: no hospital trained; the real-data rows stop here")
            break
        accepted.sort(key=lambda i: i["hospital"])
        for variant in VARIANTS:
            fedavg = FedAvg()
            for info in accepted:
                fedavg.add(info["arrays"][variant], info["num_examples"])
            classifiers[variant] = fedavg.result()
        for info in accepted:
            state.ledger[info["hospital"]] = info["chain"]
            state.public_keys[info["hospital"]] = info["public_key"]
            trained.setdefault(info["hospital"], []).extend(info["entries"])
        nodes = [info["node"] for info in accepted]
        say(f"utility round {utility_round}/{cfg.utility_rounds}: {len(accepted)} hospitals, epsilon "
            + ", ".join(f"{i['hospital']} {i['entries'][-1]['epsilon']:.2f}" for i in accepted))

    out: dict[str, Any] = {"rounds": cfg.utility_rounds, "steps_per_round": cfg.utility_steps,
                           "utility_epsilon": cfg.utility_epsilon, "refused_budget": sorted(set(refused)),
                           "failures": failures, "hospitals": [], "rows": {}}
    complete = [h for h, e in trained.items() if len(e) == len(VARIANTS) * cfg.utility_rounds]
    if not complete:
        return out
    names = [utility_protocol.release_name(v) for v in VARIANTS]
    content = RecordDict({"config": ConfigRecord({"run-id": state.run_id, "round": state.round,
                                                  "evaluations": ",".join(names)})})
    for variant in VARIANTS:
        content[utility_protocol.classifier_key(variant)] = protocol.to_record(classifiers[variant])
        scores = predict_proba(_model(cfg, classifiers[variant]), synthetic.images)
        content[utility_protocol.score_edges_key(variant)] = protocol.score_edges_record(
            public_score_edges(scores, protocol.SCORE_BINS))
    messages = [Message(content=content, dst_node_id=node, message_type=MessageType.EVALUATE) for node in nodes]
    pooled = evaluation.pool(grid.send_and_receive(messages, timeout=UTILITY_TIMEOUT_S),
                             cfg, names, synthetic, state.run_id)
    for hospital in pooled.hospitals:
        state.ledger[hospital] = pooled.chains[hospital]
        state.public_keys[hospital] = pooled.public_keys[hospital]
    out["hospitals"] = pooled.hospitals
    out["refused_budget"] = sorted(set(refused) | set(pooled.refused))
    out["failures"] += pooled.failures
    counts = {name: pooled_counts(pooled, name) for name in names}
    for position, variant in enumerate(VARIANTS):
        found = counts[names[position]]
        if found is None:
            continue
        # the variant's own epsilon: its DP-SGD entries and its counts, composed (largest
        # over hospitals: a smaller delta pays a little more for the same noise)
        own = max(rdp_epsilon([(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
                               for e in trained[h] if e["purpose"] == utility_protocol.train_purpose(variant)]
                              + [(float(pooled.entries[h][position]["noise_multiplier"]), 1.0, 1)],
                              float(pooled.entries[h][position]["delta"]))
                  for h in pooled.hospitals)
        out["rows"][utility_protocol.VARIANTS[variant]] = {
            "accuracy": found.accuracy(), "auc": found.auc(), "real_test_count": round(found.count(), 1),
            "epsilon_per_hospital": own, "dp_sgd_steps": cfg.utility_rounds * cfg.utility_steps,
            "synthetic_train_count": int(synthetic.labels.shape[0]) if variant == "real-synthetic" else 0,
            "augmentation": variant == "real-augmented"}
    return out


def pooled_counts(pooled: evaluation.Pooled, name: str):
    """The pooled DP counts of one utility release, or None when no hospital sent them."""
    return pooled.utility.get(name)


def summary_line(real: dict[str, Any]) -> str:
    """One progress line: each real-data row's accuracy and AUC, and who took part."""
    rows = [f"{name}: accuracy {row['accuracy']:.2f}, AUC {row['auc']:.2f} "
            f"(epsilon {row['epsilon_per_hospital']:.2f})" for name, row in real["rows"].items()]
    return "utility: " + ("; ".join(rows) or "no real-data row") + f" ({evaluation.who_took_part(real)})"
