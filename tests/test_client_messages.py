"""What leaves a hospital: every value in the ClientApp's reply, walked and checked.

Allowed out: model weights (DP outputs), scalar metrics from a documented list (losses on
generated images, the declared dataset size, privacy parameters), the hospital's name and
its signed ledger entry. Never pixels, labels, file names, paths or anything data-shaped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, smoke_config, smoke_values
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client import app as client_app
from client.ledger import REQUIRED, verify_chain
from shared import models, weights

NODE = {"partition-id": 0, "num-partitions": 2}

TRAINED_METRICS = {"num-examples", "d-loss-fake", "g-loss", "epsilon", "steps", "g-steps",
                   "g-private-steps",
                   "delta", "budget-epsilon", "noise-multiplier", "sample-rate"}
REFUSED_METRICS = {"epsilon", "epsilon-next", "delta", "budget-epsilon", "noise-multiplier",
                   "sample-rate"}
LEDGER_FIELDS = set(REQUIRED) | {"purpose", "accountant", "budget_epsilon", "time"}
STATUS_FIELDS = {"status", "hospital-id"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _content(cfg, rnd: int = 1) -> RecordDict:
    return RecordDict({"weights": weights.pack(models.build(cfg)),
                       "config": ConfigRecord({"run-id": "t", "round": rnd})})


def _forbidden_substrings(tmp_path: Path) -> list[str]:
    return [str(DATA), str(DATA.parent), DATA.name, DATA.stem, str(tmp_path), tmp_path.name,
            ".npz", ".png", ".dcm", ".nii", ".jpg", "/", "\\"]


def _check_string(s: str, forbidden: list[str], where: str) -> None:
    for bad in forbidden:
        assert bad not in s, f"{where}: {s!r} contains {bad!r}"


def _check_json(value, forbidden: list[str], where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _check_json(v, forbidden, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json(v, forbidden, f"{where}[{i}]")
    elif isinstance(value, str):
        _check_string(value, forbidden, where)
    else:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where


def walk_reply(reply: RecordDict, cfg, n: int, total: int, forbidden: list[str]) -> dict:
    """Check every record of a reply; return {record name: record} for further checks."""
    model_arrays = weights.to_numpy(models.build(cfg))
    image_shape = (cfg.image_size, cfg.image_size)
    seen = {}
    for name, record in reply.items():
        seen[name] = record
        if isinstance(record, ArrayRecord):
            assert name == "weights"
            assert set(record.keys()) == set(model_arrays)
            for key in record.keys():
                a = record[key].numpy()
                assert a.dtype == np.float32, key
                assert a.shape == model_arrays[key].shape, key
                assert tuple(a.shape[-2:]) != image_shape, f"{key} is image-shaped"
                assert n not in a.shape and total not in a.shape, f"{key} is data-sized"
                assert np.isfinite(a).all(), key
        elif isinstance(record, MetricRecord):
            assert name == "metrics"
            for key, value in record.items():
                assert type(value) in (int, float), f"metric {key} = {value!r} is not a scalar"
        elif isinstance(record, ConfigRecord):
            for key, value in record.items():
                assert isinstance(value, (str, int, float)) and not isinstance(value, bytes), key
                if name == "ledger" and key == "public-key":
                    # base64 may contain '/': check it is exactly one PEM public key instead
                    assert isinstance(load_pem_public_key(value.encode()), Ed25519PublicKey)
                    assert value.startswith("-----BEGIN PUBLIC KEY-----\n")
                    assert value.count("-----BEGIN") == 1 and "PRIVATE" not in value
                elif name == "ledger" and key == "entry":
                    _check_json(json.loads(value), forbidden, "ledger entry")
                else:
                    _check_string(str(value), forbidden, f"{name}.{key}")
        else:
            pytest.fail(f"unexpected record {name!r} of type {type(record).__name__}")
    return seen


def test_trained_reply_carries_only_weights_scalars_and_the_signed_entry(tmp_path):
    cfg = smoke_config(tmp_path)
    sent = _content(cfg)
    reply = client_app.train_reply(sent, smoke_values(tmp_path), NODE, node_id=7)

    seen = walk_reply(reply, cfg, n=2354, total=4708, forbidden=_forbidden_substrings(tmp_path))
    assert set(seen) == {"weights", "metrics", "status", "ledger"}
    metrics = dict(seen["metrics"])
    assert set(metrics) == TRAINED_METRICS
    assert set(seen["status"].keys()) == STATUS_FIELDS
    assert dict(seen["status"]) == {"status": "ok", "hospital-id": "hospital-0"}
    assert set(seen["ledger"].keys()) == {"entry", "entries", "chain", "public-key"}

    entry = json.loads(seen["ledger"]["entry"])
    # one DP mechanism this round (the cGAN's generator is post-processing): one entry
    assert json.loads(seen["ledger"]["entries"]) == [entry]
    # the node's whole ledger goes along (its first round: just this entry), so an auditor
    # recomputes epsilon from the node's first spend; it holds ledger entries only
    assert json.loads(seen["ledger"]["chain"]) == [entry]
    assert set(entry) == LEDGER_FIELDS
    assert entry["hospital_id"] == "hospital-0" and entry["run_id"] == "t" and entry["round"] == 1
    # the entry is signed by the key sent with it and names the digest of the weights sent
    key = load_pem_public_key(seen["ledger"]["public-key"].encode())
    assert verify_chain([entry], key) == []
    assert entry["weights_sha256"] == weights.record_digest(seen["weights"])
    # the declared dataset size is the FedAvg weight; nothing else data-sized goes out
    assert metrics["num-examples"] == entry["dataset_size"] == 2354
    assert metrics["steps"] == cfg.local_d_steps
    assert metrics["g-steps"] == cfg.local_d_steps // cfg.d_steps_per_g_step
    # it trained: the weights that come back are not the ones that were sent
    before = {k: sent["weights"][k].numpy() for k in sent["weights"].keys()}
    after = {k: seen["weights"][k].numpy() for k in seen["weights"].keys()}
    assert not np.array_equal(before["discriminator.linear.weight"],
                              after["discriminator.linear.weight"])
    assert not np.array_equal(before["generator.embed.weight"], after["generator.embed.weight"])


def test_budget_exhausted_reply_carries_no_weights(tmp_path):
    cfg = smoke_config(tmp_path, sim_hospital_epsilon=0.01)
    reply = client_app.train_reply(_content(cfg), smoke_values(tmp_path, sim_hospital_epsilon=0.01),
                                   NODE)

    seen = walk_reply(reply, cfg, n=2354, total=4708, forbidden=_forbidden_substrings(tmp_path))
    assert set(seen) == {"status", "metrics"}
    assert not reply.array_records
    assert dict(seen["status"]) == {"status": "budget-exhausted", "hospital-id": "hospital-0"}
    metrics = dict(seen["metrics"])
    assert set(metrics) == REFUSED_METRICS
    assert metrics["epsilon"] == 0.0 and metrics["epsilon-next"] > metrics["budget-epsilon"] == 0.01
    # nothing was spent: the node's ledger holds no entry
    ledger_file = tmp_path / "hospitals" / "hospital-0" / "ledger.jsonl"
    assert not ledger_file.exists() or ledger_file.read_bytes() == b""


def test_node_refuses_the_round_that_would_cross_its_budget(tmp_path):
    # budget between the first round's spend (8.8) and the second's (10.0): round 2 is refused
    values = smoke_values(tmp_path, sim_hospital_epsilon=9.5)
    cfg = smoke_config(tmp_path, sim_hospital_epsilon=9.5)
    first = client_app.train_reply(_content(cfg, 1), values, NODE)
    second = client_app.train_reply(_content(cfg, 2), values, NODE)
    assert first["status"]["status"] == "ok"
    assert second["status"]["status"] == "budget-exhausted" and "weights" not in second
    assert second["metrics"]["epsilon"] == first["metrics"]["epsilon"] < 9.5
    assert second["metrics"]["epsilon-next"] > 9.5
    lines = (tmp_path / "hospitals" / "hospital-0" / "ledger.jsonl").read_text().splitlines()
    assert len(lines) == 1


def test_the_noise_seed_follows_the_whole_request(tmp_path, monkeypatch):
    """Identical requests redraw the same noise (nothing new is released); requests that
    differ in weights or knobs draw independent noise (as the accountant's composition
    assumes), except for the knobs that only say how the server runs (resume)."""
    from client import ledger as ledger_mod

    seeds = []
    real_seed = ledger_mod.node_seed
    monkeypatch.setattr(ledger_mod, "node_seed",
                        lambda *a: seeds.append(real_seed(*a)) or seeds[-1])
    values = smoke_values(tmp_path, sim_hospital_epsilon=1000.0)   # room for 5 rounds
    cfg = smoke_config(tmp_path)
    other = models.build(cfg)
    with torch.no_grad():
        other["generator"].embed.weight.add_(0.01)
    requests = [
        (_content(cfg), values),
        (_content(cfg), values),                                    # the same again
        (_content(cfg), {**values, "resume": True}),                # a resumed server
        (RecordDict({"weights": weights.pack(other),                # other weights
                     "config": ConfigRecord({"run-id": "t", "round": 1})}), values),
        (_content(cfg), {**values, "lr-g": values["lr-g"] * 2}),   # another knob
    ]
    for content, run_config in requests:
        client_app.train_reply(content, run_config, NODE)
    assert seeds[0] == seeds[1] == seeds[2]
    assert len({seeds[0], seeds[3], seeds[4]}) == 3
