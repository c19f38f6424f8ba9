"""The utility table's real-data rows: DP-SGD classifiers at the hospitals, charged, scored with DP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import smoke_config, smoke_values
from fake_grid import FakeGrid, node_config, run_config
from flwr.app import ConfigRecord, RecordDict
from opacus.validators import ModuleValidator
from torchmetrics.functional.classification import binary_auroc

from client import app as client_app
from client import utility as client_utility
from client.ledger import rdp_epsilon, read_entries
from server import federation
from server import utility as server_utility
from shared import evaluation as protocol
from shared import utility
from shared.audit import audit_release
from shared.classifier import SmallCNN
from shared.config import ConfigError, RunConfig, validate
from shared.dp_stats import calibrate_noise_multiplier, classification_counts, public_score_edges

pytestmark = pytest.mark.usefixtures("one_thread")

UTILITY = {"evaluate": True, "utility_epsilon": 1.0, "utility_rounds": 2, "utility_steps": 3}
EVAL = {"eval_features": "tiny", "eval_fid_dims": 8, "eval_clip_norm": 5.0, "eval_samples": 40}


def synthetic(count: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(count, 1, 28, 28, generator=generator) * 2 - 1,
            torch.arange(count) % 2)


def request(cfg: RunConfig, utility_round: int = 1) -> RecordDict:
    classifiers = server_utility.initial_classifiers(cfg)
    return server_utility.train_content(classifiers, utility.synthetic_record(*synthetic()),
                                        "run-u", 3, utility_round)


def test_the_classifier_passes_opacus_validation():
    assert ModuleValidator.validate(SmallCNN(2), strict=False) == []


def test_config_needs_evaluate_and_the_knobs_default_to_off():
    assert validate({})["utility-epsilon"] == 0.0
    with pytest.raises(ConfigError, match="utility-epsilon = 1.0 needs evaluate = true"):
        validate({"utility-epsilon": 1.0})
    with pytest.raises(ConfigError, match=r"utility-epsilon = 0.5: must be 0 \(off\) or >= 1"):
        validate({"utility-epsilon": 0.5, "evaluate": True})


def test_calibration_reaches_the_training_share_and_the_row_stays_within_utility_epsilon():
    cfg = RunConfig.from_flat(validate({"evaluate": True, "utility-epsilon": 2.0, "utility-rounds": 4,
                                        "utility-steps": 10, "batch-size": 32}))
    plan = client_utility.plan_variant(cfg, 400, 1e-5)
    assert plan.sample_rate == pytest.approx(1 / 13)
    training = rdp_epsilon(plan.history() * cfg.utility_rounds, 1e-5)
    assert training == pytest.approx(utility.TRAIN_SHARE * 2.0, rel=0.01) and training <= 1.0
    counts_epsilon = protocol.release_epsilons(["utility-real"], 1.0, 1e-5, 2.0)["utility-real"]
    assert counts_epsilon == pytest.approx(1.0)
    row = rdp_epsilon(plan.history() * cfg.utility_rounds
                      + [(calibrate_noise_multiplier(counts_epsilon, 1e-5), 1.0, 1)], 1e-5)
    assert training < row <= 2.0


def test_a_utility_round_trains_three_classifiers_charges_each_and_sends_only_weights(tmp_path):
    values = run_config(tmp_path / "out", **UTILITY)
    cfg = RunConfig.from_flat(values)
    node = node_config(tmp_path, "hospital-a", epsilon=50.0, images=(0, 96))
    reply = client_app.utility_reply(request(cfg), values, node)

    assert reply["status"]["status"] == "ok"
    entries = read_entries(tmp_path / "nodes" / "hospital-a" / "ledger.jsonl")
    assert [e["purpose"] for e in entries] == [utility.train_purpose(v) for v in utility.VARIANTS]
    q_real = 1 / np.ceil(96 / cfg.batch_size)
    q_mixed = 1 / np.ceil((96 + 12) / cfg.batch_size)
    assert [e["sample_rate"] for e in entries] == pytest.approx([q_real, q_real, q_mixed])
    assert all(e["steps"] == 3 and e["dataset_size"] == 96 and e["mechanism"] == "subsampled-gaussian"
               for e in entries)
    assert entries[-1]["epsilon"] == pytest.approx(rdp_epsilon(
        [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries], entries[-1]["delta"]))

    # What leaves: three parameter sets shaped like SmallCNN's, scalar metrics, the entries.
    shapes = {k: tuple(v.shape) for k, v in SmallCNN(2).state_dict().items()}
    assert set(reply.array_records) == {utility.classifier_key(v) for v in utility.VARIANTS}
    for key in reply.array_records:
        got = {k: tuple(a.shape) for k, a in reply[key].items()}
        assert got == shapes
    assert all(isinstance(v, (int, float)) for v in reply["metrics"].values())
    assert reply["metrics"]["num-examples"] == 96
    sent = json.dumps(dict(reply["ledger"])) + json.dumps(dict(reply["status"]))
    assert ".npz" not in sent and str(tmp_path) not in sent

    # The classifiers moved (they trained) and differ between variants (different data).
    start = server_utility.initial_classifiers(cfg)["real"]
    trained = {v: protocol.record_arrays(reply[utility.classifier_key(v)]) for v in utility.VARIANTS}
    assert not all(np.array_equal(trained["real"][k], start[k]) for k in start)
    assert not all(np.array_equal(trained["real"][k], trained["real-synthetic"][k]) for k in start)


def test_a_hospital_refuses_a_utility_phase_its_budget_cannot_finish(tmp_path):
    values = run_config(tmp_path / "out", **UTILITY)
    cfg = RunConfig.from_flat(values)
    # a budget that one round of the three classifiers fits in, but not the whole phase
    plans = [client_utility.plan_variant(cfg, n, 1e-5) for n in (96, 96, 108)]
    one_round = rdp_epsilon([h for p in plans for h in p.history()], 1e-5)
    budget = one_round + 0.1
    node = node_config(tmp_path, "hospital-a", epsilon=budget, images=(0, 96))
    reply = client_app.utility_reply(request(cfg), values, node)
    assert reply["status"]["status"] == client_app.STATUS_BUDGET
    assert reply["metrics"]["epsilon-next"] > budget
    assert not (tmp_path / "nodes" / "hospital-a" / "ledger.jsonl").exists() or \
        read_entries(tmp_path / "nodes" / "hospital-a" / "ledger.jsonl") == []
    assert not reply.array_records


def test_bad_synthetic_images_and_rounds_outside_the_plan_are_refused(tmp_path):
    values = run_config(tmp_path / "out", **UTILITY)
    cfg = RunConfig.from_flat(values)
    node = node_config(tmp_path, "hospital-a", epsilon=50.0)
    content = request(cfg)
    content["synthetic"] = protocol.to_record({"images": np.zeros((4, 64, 64), np.uint8),
                                               "labels": np.zeros(4, np.int64)})
    with pytest.raises(protocol.ProtocolError, match="synthetic: expected uint8 images"):
        client_app.utility_reply(content, values, node)
    content = request(cfg, utility_round=3)
    with pytest.raises(protocol.ProtocolError, match="utility round 3 is not in this run's plan"):
        client_app.utility_reply(content, values, node)
    content = request(cfg)
    content["config"] = ConfigRecord({"run-id": "run-u", "round": 3, "utility-round": 1})
    off = run_config(tmp_path / "out", evaluate=True)
    with pytest.raises(protocol.ProtocolError, match="not in this run's plan"):
        client_app.utility_reply(content, off, node)


def test_a_run_with_utility_epsilon_releases_all_four_rows_and_the_audit_passes(tmp_path):
    values = smoke_values(tmp_path, **EVAL, **UTILITY)
    nodes = {11: {"partition-id": 0, "num-partitions": 2}, 12: {"partition-id": 1, "num-partitions": 2}}
    with FakeGrid(values, nodes) as grid:
        where = federation.run(grid, smoke_config(tmp_path, **EVAL, **UTILITY))
    result = json.loads((where / "release.json").read_text())

    table = result["evaluation"]["scores"]["utility"]
    rows = {row["training_set"]: row for row in table["rows"]}
    assert list(rows) == ["real only", "real + traditional augmentation", "synthetic only", "real + synthetic"]
    assert all(row["released"] for row in rows.values())
    for name in ("real only", "real + traditional augmentation", "real + synthetic"):
        row = rows[name]
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["auc"] <= 1
        assert 300 < row["real_test_count"] < 950   # 624 held-out images, noised (epsilon 0.5)
        assert 0 < row["epsilon_per_hospital"] <= 1.0 and row["dp_sgd_steps"] == 6
    assert rows["real + synthetic"]["synthetic_train_count"] == 80
    assert table["utility_training"]["hospitals"] == ["hospital-0", "hospital-1"]

    variants = list(utility.VARIANTS)
    for hospital in ("hospital-0", "hospital-1"):
        purposes = [json.loads(line)["purpose"]
                    for line in (where / "ledger" / f"{hospital}.jsonl").read_text().splitlines()]
        assert purposes[-9:] == ([utility.train_purpose(v) for v in variants] * 2
                                 + [protocol.purpose(utility.release_name(v)) for v in variants])
        summary = result["privacy"]["per_hospital"][hospital]
        assert summary["utility_releases"] == 9 and summary["evaluation_releases"] == 4
        assert summary["rounds"] == [1, 2]
        assert summary["epsilon_training"] < summary["epsilon"] <= summary["budget_epsilon"]
    report = audit_release(where)
    assert report.ok, [str(f) for f in report.all_failures()]


def test_public_score_edges_resolve_a_dp_classifiers_narrow_scores():
    # A classifier trained with DP-SGD at a small epsilon: every score within 0.6-0.66,
    # positives a little higher. Ten equal bins put them all in one (AUC 0.5 by ties).
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 2
    p = 0.6 + 0.03 * labels + 0.03 * torch.rand(600, generator=generator, dtype=torch.float64)
    probabilities = torch.stack([1 - p, p], dim=1)
    exact = float(binary_auroc(p, labels))
    edges = public_score_edges(probabilities, 10)
    assert edges[0] == 0 and edges[-1] == 1 and bool((edges.diff() > 0).all())
    assert 0.55 < float(edges[1]) and float(edges[-2]) < 0.7
    assert classification_counts(probabilities, labels, edges=edges).auc() == pytest.approx(exact, abs=0.03)
    assert classification_counts(probabilities, labels, num_bins=10).auc() == pytest.approx(0.5)
    record = protocol.score_edges_record(edges)
    assert torch.equal(protocol.score_edges_from_record(record), edges)
    with pytest.raises(protocol.ProtocolError, match="increase from 0 to 1"):
        protocol.score_edges_from_record(protocol.score_edges_record(edges.flip(0)))
