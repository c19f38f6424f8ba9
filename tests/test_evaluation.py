"""Federated evaluation: what a hospital's evaluate reply carries, what it charges, when it
refuses, how far DP noise moves FID, and a whole run that evaluates its release.

Fast: the features come from `TinyFeatureNet` (eval-features = tiny), not Inception.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, smoke_config, smoke_values
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from fake_grid import FakeGrid
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from client import app as client_app
from client import evaluate as client_evaluate
from client.data import load_hospital
from client.ledger import read_entries, verify_chain
from client.node import Hospital
from server import evaluation, federation
from shared import evaluation as protocol
from shared import models, partition, weights
from shared.dp_stats import (
    FeatureStats,
    FeatureTransform,
    fid_from_stats,
    gaussian_stats_per_class,
    rdp_epsilon,
)
from shared.features import TinyFeatureNet, uint8_to_unit_range
from shared.metrics import frechet_distance

NODE = {"partition-id": 0, "num-partitions": 2}
EVAL = {"evaluate": True, "eval_features": "tiny", "eval_fid_dims": 8, "eval_clip_norm": 5.0,
        "eval_samples": 40}
NAMES = list(evaluation.EVALUATIONS)
FORBIDDEN = [".npz", ".png", "/", "\\"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> evaluation.Synthetic:
    """The server's public side for an untrained smoke generator (features, transform, TSTR)."""
    cfg = smoke_config(tmp_path_factory.mktemp("synthetic"), **EVAL)
    torch.set_num_threads(1)
    return evaluation.synthetic_side(cfg, weights.to_numpy(models.build(cfg)))


def evaluate_content(synthetic, names=NAMES):
    return evaluation.evaluate_content(synthetic, "t", 2, names)


def held_out_count(tmp_path: Path, **overrides) -> int:
    cfg = smoke_config(tmp_path, **overrides)
    return len(load_hospital(Hospital.from_node_config(NODE, cfg), cfg, cfg.eval_split))


def test_evaluate_reply_carries_only_noised_statistics_and_charges_them(tmp_path, synthetic):
    values = smoke_values(tmp_path, **EVAL)
    cfg = smoke_config(tmp_path, **EVAL)
    n_eval = held_out_count(tmp_path, **EVAL)                     # 312: half the test split
    reply = client_app.evaluate_reply(evaluate_content(synthetic), values, NODE)

    assert set(reply.keys()) == {"fid-stats", "recall-counts", "classifier-counts", "metrics",
                                 "status", "ledger"}
    assert dict(reply["status"]) == {"status": "ok", "hospital-id": "hospital-0"}
    k, classes = cfg.eval_fid_dims, cfg.num_classes
    expected_shapes = {
        "fid-stats": {**{f"class-{c}.count": (1,) for c in range(classes)},
                      **{f"class-{c}.sum": (k,) for c in range(classes)},
                      **{f"class-{c}.sum-outer": (k, k) for c in range(classes)},
                      **{f"class-{c}.outer-noise-std": (1,) for c in range(classes)}},
        "recall-counts": {"counts": (2,)},
        "classifier-counts": {"confusion": (classes, classes), "score-histograms": (1, 2, 10)},
    }
    for name, shapes in expected_shapes.items():
        record = reply[name]
        assert isinstance(record, ArrayRecord)
        got = {key: record[key].numpy() for key in record.keys()}
        assert {key: a.shape for key, a in got.items()} == shapes, name
        for key, a in got.items():
            assert a.dtype == np.float64 and np.isfinite(a).all(), key
            assert tuple(a.shape[-2:]) != (cfg.image_size, cfg.image_size), f"{key} is image-shaped"
            assert n_eval not in a.shape, f"{key} has one row per held-out image"
    assert isinstance(reply["metrics"], MetricRecord)
    assert all(type(v) in (int, float) for v in reply["metrics"].values())
    for key, value in reply["status"].items():
        assert not any(bad in str(value) for bad in FORBIDDEN), key

    # Noised: no count is the exact (integer) number of held-out images of its class.
    fid = reply["fid-stats"]
    exact = torch.bincount(load_hospital(Hospital.from_node_config(NODE, cfg), cfg, "test").labels,
                           minlength=classes)
    for c in range(classes):
        noised = float(fid[f"class-{c}.count"].numpy()[0])
        assert noised != int(exact[c]) and not noised.is_integer()
    counts = reply["recall-counts"]["counts"].numpy()
    assert not np.allclose(counts, np.round(counts))

    # One signed "gaussian" ledger entry per release, logged before the reply, naming its digest.
    entries = json.loads(reply["ledger"]["entries"])
    on_disk = read_entries(tmp_path / "hospitals" / "hospital-0" / "ledger.jsonl")
    assert entries == on_disk
    assert [e["purpose"] for e in entries] == ["eval-fid-stats", "eval-recall", "eval-classifier"]
    key = load_pem_public_key(reply["ledger"]["public-key"].encode())
    assert verify_chain(entries, key) == []
    for entry, record in zip(entries, ["fid-stats", "recall-counts", "classifier-counts"]):
        assert (entry["mechanism"], entry["sample_rate"], entry["steps"]) == ("gaussian", 1.0, 1)
        assert entry["weights_sha256"] == weights.record_digest(reply[record])
        assert entry["run_id"] == "t" and entry["round"] == 2
        assert entry["dataset_size"] == 2354             # the declared training size, not n_eval
    # The three releases together cost eval-epsilon (RDP composition), and no more.
    composed = entries[-1]["epsilon"]
    assert composed == pytest.approx(reply["metrics"]["epsilon"])
    assert cfg.eval_epsilon * 0.99 <= composed <= cfg.eval_epsilon
    assert rdp_epsilon(entries[0]["noise_multiplier"], entries[0]["delta"]) < composed


def test_evaluation_is_refused_without_headroom_and_spends_nothing(tmp_path, synthetic):
    # The hospital's budget is below eval-epsilon: it must refuse before touching its images.
    values = smoke_values(tmp_path, sim_hospital_epsilon=0.5, **EVAL)
    reply = client_app.evaluate_reply(evaluate_content(synthetic), values, NODE)

    assert set(reply.keys()) == {"status", "metrics"}
    assert not reply.array_records
    assert dict(reply["status"]) == {"status": "budget-exhausted", "hospital-id": "hospital-0"}
    assert reply["metrics"]["epsilon"] == 0.0
    assert reply["metrics"]["epsilon-next"] > reply["metrics"]["budget-epsilon"] == 0.5
    ledger = tmp_path / "hospitals" / "hospital-0" / "ledger.jsonl"
    assert not ledger.exists() or ledger.read_bytes() == b""


def test_a_hospital_that_trained_to_its_target_needs_eval_headroom(tmp_path, synthetic):
    # With evaluate = true a simulated hospital's budget is target + eval epsilon (node.py).
    cfg = smoke_config(tmp_path, **EVAL)
    assert Hospital.from_node_config(NODE, cfg).epsilon_budget == cfg.target_epsilon + cfg.eval_epsilon
    # A hospital whose own budget is exactly target-epsilon trains, then refuses to evaluate.
    values = smoke_values(tmp_path, sim_hospital_epsilon=cfg.target_epsilon, **EVAL)
    for rnd in (1, 2):
        sent = RecordDict({"weights": weights.pack(models.build(cfg)),
                           "config": ConfigRecord({"run-id": "t", "round": rnd})})
        assert client_app.train_reply(sent, values, NODE)["status"]["status"] == "ok"
    reply = client_app.evaluate_reply(evaluate_content(synthetic), values, NODE)
    assert reply["status"]["status"] == "budget-exhausted"
    assert cfg.target_epsilon < reply["metrics"]["epsilon-next"] < cfg.target_epsilon + cfg.eval_epsilon


def test_a_malformed_request_is_rejected_before_any_spend(tmp_path, synthetic):
    values = smoke_values(tmp_path, **EVAL)
    content = evaluate_content(synthetic, ["fid-stats"])
    del content["fid-transform"]
    with pytest.raises(protocol.ProtocolError, match="fid-transform"):
        client_app.evaluate_reply(content, values, NODE)
    content = evaluate_content(synthetic, ["recall"])
    content["config"] = ConfigRecord({"run-id": "t", "round": 2, "evaluations": "recall,precision"})
    with pytest.raises(protocol.ProtocolError, match="precision"):
        client_app.evaluate_reply(content, values, NODE)
    ledger = tmp_path / "hospitals" / "hospital-0" / "ledger.jsonl"
    assert not ledger.exists() or ledger.read_bytes() == b""


def deployment_node(tmp_path: Path, eval_images: int) -> dict:
    """A hospital with its own training .npz and a separate held-out .npz (eval-data-path)."""
    with np.load(DATA) as npz:
        np.savez(tmp_path / "train.npz", train_images=npz["train_images"][:64],
                 train_labels=npz["train_labels"][:64])
        np.savez(tmp_path / "held-out.npz", test_images=npz["test_images"][:eval_images],
                 test_labels=npz["test_labels"][:eval_images])
    return {"hospital-id": "st-elsewhere", "data-path": str(tmp_path / "train.npz"),
            "eval-data-path": str(tmp_path / "held-out.npz"), "state-dir": str(tmp_path / "state"),
            "epsilon": 20.0, "delta": 1e-5}


def test_a_deployed_hospital_evaluates_on_its_eval_data_path(tmp_path, synthetic):
    node = deployment_node(tmp_path, eval_images=48)
    cfg = smoke_config(tmp_path, **EVAL)
    hospital = Hospital.from_node_config(node, cfg)
    assert len(client_evaluate.held_out_data(hospital, cfg)) == 48       # not the 64 training images
    reply = client_app.evaluate_reply(evaluate_content(synthetic), smoke_values(tmp_path, **EVAL), node)
    assert reply["status"]["status"] == "ok" and reply["status"]["hospital-id"] == "st-elsewhere"
    entries = read_entries(tmp_path / "state" / "ledger.jsonl")
    assert [e["dataset_size"] for e in entries] == [64] * 3 and entries[0]["delta"] == 1e-5


@pytest.mark.slow
def test_the_inception_path_end_to_end(tmp_path):
    """The real FID network on both sides, the release's evaluation: 2 x 16 synthetic images
    (2 x 8 released), 32 held-out and 64 training images."""
    # eval-epsilon 20: this test is about the Inception path, not about the noise
    values = dict(EVAL, eval_features="inception", eval_samples=16, eval_clip_norm=10.0,
                  eval_epsilon=20.0)
    cfg = smoke_config(tmp_path, **values)
    names = list(evaluation.RELEASE_EVALUATIONS)
    synthetic = evaluation.synthetic_side(cfg, weights.to_numpy(models.build(cfg)))
    assert synthetic.features.shape == (32, 2048) and synthetic.released_features.shape == (16, 2048)
    reply = client_app.evaluate_reply(evaluate_content(synthetic, names), smoke_values(tmp_path, **values),
                                      deployment_node(tmp_path, eval_images=32))
    assert reply["status"]["status"] == "ok"
    assert reply["fid-stats"]["class-0.sum-outer"].numpy().shape == (8, 8)
    with FakeGrid({}, {}):   # sets the task identity that Messages made outside Flower need
        request = evaluation.evaluate_messages([1], synthetic, "t", 2, names)[0]
        pooled = evaluation.pool([Message(content=reply, reply_to=request)], cfg, names, synthetic, "t")
    assert pooled.hospitals == ["st-elsewhere"], pooled.failures
    scores = evaluation.scores(cfg, synthetic, pooled, names, dict.fromkeys(names, 1.0))
    assert math.isfinite(scores["fid"]["estimate"]) and scores["fid"]["features"] == "inception"
    memorization = scores["memorization"]
    assert 0 <= memorization["closer_probability"] <= 1 and memorization["synthetic_count"] == 16
    assert 0 < memorization["bin_edges"][-1] and len(memorization["train_histogram"]) == 11


# --------------------------------------------------------------------------- DP noise vs exact FID

def test_dp_noise_moves_fid_by_a_measured_amount_and_keeps_the_ranking():
    """Three hospitals hold the test split (Dirichlet label skew, as in the demo); the
    "generators" are 400 real training images (a perfect one), the same images blurred, and one
    of them repeated (mode collapse). In the release's FID space (a fixed random subspace),
    exact pooled FID equals central FID; under the protocol's share of eval-epsilon the DP FID
    moves by the printed amounts (5 noise draws), less than the gaps between the generators."""
    net = TinyFeatureNet(num_features=64, seed=0)
    with np.load(DATA) as npz:
        test_images, test_labels = npz["test_images"], npz["test_labels"].reshape(-1).astype(np.int64)
        order = np.random.default_rng(1).permutation(len(npz["train_labels"]))[:400]
        fake_images = uint8_to_unit_range(npz["train_images"][order])
    parts = partition.split(test_labels, 3, "dirichlet", 0.5, 0)
    hospitals = [(net(uint8_to_unit_range(test_images[idx])).double(), torch.as_tensor(test_labels[idx]))
                 for idx in parts]
    real = torch.cat([features for features, _ in hospitals])
    blurred = torch.nn.functional.avg_pool2d(fake_images, 5, stride=1, padding=2)
    generators = {"perfect": net(fake_images).double(), "blurred": net(blurred).double(),
                  "collapsed": net(fake_images[:1].repeat(400, 1, 1, 1)).double()}
    delta, clip, dims = 1e-5, 1.0, 8   # TinyFeatureNet features lie ~0.4 (median), 1.4 (99 %) from their mean

    def pooled_stats(transform, epsilon, seed):
        generator = torch.Generator().manual_seed(seed)
        pooled = None
        for features, labels in hospitals:
            per_class, _ = gaussian_stats_per_class(
                features, labels, classes=[0, 1], clip_norm=clip, center=transform.center,
                projection=transform.projection, epsilon=epsilon, delta=delta, generator=generator)
            for stats in per_class.values():
                pooled = stats if pooled is None else pooled.merge(stats)
        return pooled

    report = {}
    for name, fake in generators.items():
        transform = FeatureTransform.random_projection(fake.mean(dim=0), dims, clip_norm=clip,
                                                       seed=protocol.FID_BASIS_SEED)
        exact = fid_from_stats(FeatureStats.from_features(real, transform), fake)
        pooled_exact = pooled_stats(transform, math.inf, 0)
        assert fid_from_stats(pooled_exact, fake, denoise=evaluation.FID_ESTIMATOR) == pytest.approx(exact, rel=1e-9)
        report[name] = {"exact": exact,
                        "unclipped": frechet_distance(real @ transform.projection, fake @ transform.projection)}
        for eval_epsilon in (1.0, 10.0):
            share = protocol.release_epsilons(NAMES, eval_epsilon, delta)["fid-stats"]
            draws = {"psd_sqrt": [], "psd": []}
            for seed in range(5):
                noisy = pooled_stats(transform, share, seed)
                for estimator in draws:
                    draws[estimator].append(fid_from_stats(noisy, fake, denoise=estimator))
            report[name][eval_epsilon] = {
                estimator: (float(np.mean(v)), float(np.std(v)), float(np.sqrt(np.mean((np.array(v) - exact) ** 2))))
                for estimator, v in draws.items()}
    for name, r in report.items():
        line = f"{name}: exact FID {r['exact']:.4f} (unclipped {r['unclipped']:.4f})"
        for eps in (1.0, 10.0):
            for estimator, (mean, std, rmse) in r[eps].items():
                line += f"; eval-epsilon {eps:g} {estimator}: {mean:.4f} ± {std:.4f} (RMSE {rmse:.4f})"
        print(line)

    exact = [report[name]["exact"] for name in ("perfect", "blurred", "collapsed")]
    gap = min(exact[1] - exact[0], exact[2] - exact[1])
    assert gap > 0                                           # perfect < blurred < collapsed
    for r in report.values():
        rmse_1, rmse_10 = r[1.0]["psd_sqrt"][2], r[10.0]["psd_sqrt"][2]
        assert rmse_10 < rmse_1 < gap                        # less noise, closer
        assert rmse_10 < gap / 4
        assert rmse_1 < r[1.0]["psd"][2]                     # why the release uses psd_sqrt
    # Under DP at eval-epsilon 1 the ranking holds (mean of draws).
    dp = [report[name][1.0]["psd_sqrt"][0] for name in ("perfect", "blurred", "collapsed")]
    assert dp[0] < dp[1] < dp[2]


# --------------------------------------------------------------------------- a whole run

class EvaluatingGrid(FakeGrid):
    """FakeGrid that also answers EVALUATE messages with `client.app.evaluate_reply`."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type != MessageType.EVALUATE]
        replies = list(super().send_and_receive(train, timeout=timeout)) if train else []
        for msg in messages:
            if msg.metadata.message_type != MessageType.EVALUATE:
                continue
            node = msg.metadata.dst_node_id
            try:
                content = client_app.evaluate_reply(msg.content, self.run_config, self.node_configs[node], node)
            except Exception as e:  # noqa: BLE001 -- Flower turns it into an error reply
                replies.append(Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg))
                continue
            replies.append(Message(content=content, reply_to=msg))
        return replies


def test_a_run_with_evaluate_releases_scores_with_their_privacy_cost(tmp_path):
    values = smoke_values(tmp_path, **EVAL)
    nodes = {11: {"partition-id": 0, "num-partitions": 2}, 12: {"partition-id": 1, "num-partitions": 2}}
    with EvaluatingGrid(values, nodes) as grid:
        where = federation.run(grid, smoke_config(tmp_path, **EVAL))
    result = json.loads((where / "release.json").read_text())

    section = result["evaluation"]
    assert section["hospitals"] == ["hospital-0", "hospital-1"] and section["refused_budget"] == []
    assert section["failures"] == []
    scores = section["scores"]
    assert set(scores) == {"fid", "fid_per_class", "recall", "train_on_synthetic", "diversity_ssim",
                           "classifier_score", "memorization", "utility"}
    assert scores["fid"]["value"] > 0 and 500 < scores["fid"]["real_count"] < 750   # 624 held out
    assert set(scores["fid_per_class"]) == {"normal", "pneumonia"}
    assert 0 <= scores["recall"]["value"] <= 1
    assert 0 <= scores["train_on_synthetic"]["accuracy"] <= 1 and 0 <= scores["train_on_synthetic"]["auc"] <= 1
    rows = {row["training_set"]: row for row in scores["utility"]["rows"]}
    assert list(rows) == ["real only", "real + traditional augmentation", "synthetic only", "real + synthetic"]
    assert [name for name, row in rows.items() if row["released"]] == ["synthetic only"]
    assert rows["synthetic only"]["accuracy"] == scores["train_on_synthetic"]["accuracy"]
    assert all("DP" in row["reason"] and "accuracy" not in row for row in rows.values() if not row["released"])
    assert scores["memorization"]["flagged"] in (True, False)
    cap = smoke_config(tmp_path, **EVAL).eval_memorization_train       # per hospital, 2 of them
    assert abs(scores["memorization"]["train_count"] - 2 * cap) < 300
    for name in ("fid", "recall", "train_on_synthetic", "memorization"):
        privacy = scores[name]["privacy"]
        assert privacy["mechanism"] == "gaussian" and 0 < privacy["epsilon_per_hospital"] < 1.0
    assert scores["diversity_ssim"]["privacy"]["mechanism"] == "none"

    # The evaluation's spend is in the release: ledgers and the privacy summary.
    for hospital in ("hospital-0", "hospital-1"):
        lines = (where / "ledger" / f"{hospital}.jsonl").read_text().splitlines()
        purposes = [json.loads(line)["purpose"] for line in lines]
        assert purposes == ["train-discriminator"] * 2 + ["eval-fid-stats", "eval-recall", "eval-classifier",
                                                          "eval-memorization"]
        summary = result["privacy"]["per_hospital"][hospital]
        assert summary["evaluation_releases"] == 4
        assert summary["epsilon_training"] < summary["epsilon"] <= summary["budget_epsilon"]
        assert summary["epsilon"] == pytest.approx(section["epsilon_after"][hospital])
        assert summary["rounds"] == [1, 2] and summary["sample_rate"] < 1.0
