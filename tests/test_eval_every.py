"""Evaluation every K rounds: when it runs, what it costs each hospital, and metrics.csv.

Fast: tiny feature network (eval-features = tiny), the smoke config's tiny GAN, in process.
"""

from __future__ import annotations

import json

import pytest
from conftest import smoke_config, smoke_values
from fake_grid import FakeGrid

from client import app as client_app
from client.ledger import rdp_epsilon, read_entries
from client.node import Hospital
from server import evaluation, federation, round_metrics
from shared import evaluation as protocol
from shared.config import ConfigError, validate
from shared.dp_stats import calibrate_noise_multiplier

EVAL = {"evaluate": True, "eval_features": "tiny", "eval_fid_dims": 8, "eval_clip_norm": 5.0,
        "eval_samples": 40}
NODES = {11: {"partition-id": 0, "num-partitions": 2}, 12: {"partition-id": 1, "num-partitions": 2}}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_eval_rounds_and_the_simulated_budget_count_every_evaluation(tmp_path):
    cfg = smoke_config(tmp_path, num_rounds=10, eval_every=3, **EVAL)
    assert cfg.eval_rounds == (3, 6, 9) and cfg.planned_evaluations == 4   # 3 interim + the release
    assert smoke_config(tmp_path, num_rounds=9, eval_every=3, **EVAL).eval_rounds == (3, 6)
    assert smoke_config(tmp_path, **EVAL).planned_evaluations == 1
    assert smoke_config(tmp_path).planned_evaluations == 0
    hospital = Hospital.from_node_config(NODES[11], cfg)
    assert hospital.epsilon_budget == cfg.target_epsilon + 4 * cfg.eval_epsilon
    with pytest.raises(ConfigError, match="eval-every = 2 needs evaluate = true"):
        validate({"eval-every": 2}, "x.toml")


def test_a_run_evaluating_every_round_writes_metrics_csv_and_charges_each_evaluation(tmp_path):
    values = smoke_values(tmp_path, num_rounds=3, eval_every=1, **EVAL)
    cfg = smoke_config(tmp_path, num_rounds=3, eval_every=1, **EVAL)
    with FakeGrid(values, NODES) as grid:
        where = federation.run(grid, cfg)
    release = json.loads((where / "release.json").read_text())
    table = round_metrics.read(tmp_path / "metrics.csv")
    assert (where / "metrics.csv").read_text() == (tmp_path / "metrics.csv").read_text()

    assert [row["round"] for row in table] == [1, 2, 3]
    assert [row["evaluation"] for row in table] == ["interim", "interim", "release"]
    states = [json.loads((tmp_path / "checkpoints" / f"round-{r:04d}" / "state.json").read_text())
              for r in (1, 2, 3)]
    for row, state in zip(table, states):
        clients = state["rounds"][-1]["clients"]
        assert row["hospitals"] == 2
        for hospital in ("hospital-0", "hospital-1"):
            assert row[f"{hospital}/epsilon"] == clients[hospital]["epsilon"]
            assert row[f"{hospital}/g-loss"] == clients[hospital]["g-loss"]
            assert row[f"{hospital}/d-loss-fake"] == clients[hospital]["d-loss-fake"]
            assert row[f"{hospital}/num-examples"] == clients[hospital]["num-examples"]
        assert row["epsilon_max"] == max(c["epsilon"] for c in clients.values())
        # every score with its (noised) sample sizes
        for column in ("fid", "fid.real_count", "fid.synthetic_count", "fid_per_class.normal",
                       "fid_per_class.pneumonia.real_count", "recall", "recall.real_count",
                       "train_on_synthetic.accuracy", "train_on_synthetic.auc",
                       "train_on_synthetic.real_count", "diversity_ssim.per_class.normal",
                       "classifier_score", "eval_epsilon_after/hospital-0"):
            assert column in row, column
        assert 500 < row["fid.real_count"] < 750 and row["fid.synthetic_count"] == 80
    # the interim rows are the checkpoints' records; the last is the release's evaluation
    for row, state in zip(table[:2], states[:2]):
        assert row["fid"] == state["rounds"][-1]["evaluation"]["scores"]["fid"]["value"]
    scores = release["evaluation"]["scores"]
    assert table[2]["fid"] == scores["fid"]["value"] and table[2]["recall"] == scores["recall"]["value"]
    # the interim evaluations measure different generators: the scores move
    assert len({row["fid"] for row in table}) == 3

    # Each evaluation is charged to every hospital's ledger, and all of them fit its budget.
    for hospital in ("hospital-0", "hospital-1"):
        entries = read_entries(tmp_path / "hospitals" / hospital / "ledger.jsonl")
        evaluation = ["eval-fid-stats", "eval-recall", "eval-classifier"]
        train = ["train-discriminator"]
        purposes = [e["purpose"] for e in entries]
        assert purposes[:len(train + evaluation) * 2] == (train + evaluation) * 2
        assert purposes[8:] == train + [protocol.purpose(n) for n in release["evaluation"]["evaluations"]]
        budget = cfg.target_epsilon + 3 * cfg.eval_epsilon
        assert entries[-1]["budget_epsilon"] == budget
        epsilons = [e["epsilon"] for e in entries]
        assert epsilons == sorted(epsilons) and epsilons[-1] <= budget
        # the per-round epsilon in metrics.csv includes the interim evaluations' spend
        assert table[1][f"eval_epsilon_after/{hospital}"] == entries[7]["epsilon"]
        assert table[1][f"{hospital}/epsilon"] > table[0][f"eval_epsilon_after/{hospital}"]


def _epsilon_after(cfg, node, evaluations: int) -> float:
    """A hospital's RDP epsilon after all the run's training and ``evaluations`` evaluations."""
    hospital = Hospital.from_node_config(node, cfg)
    plan, delta = client_app.plan_round(hospital, cfg, len(client_app.hospital_data(hospital, cfg)))
    shares = protocol.release_epsilons(list(evaluation.EVALUATIONS), cfg.eval_epsilon, delta)
    one = [(calibrate_noise_multiplier(e, delta), 1.0, 1) for e in shares.values()]
    return rdp_epsilon([(plan.noise_multiplier, plan.sample_rate, plan.steps)] * cfg.num_rounds
                       + one * evaluations, delta)


def test_a_budget_with_room_for_one_evaluation_refuses_the_second(tmp_path):
    # The run plans two evaluations (after round 1, and the release's); each hospital's budget
    # has room for training and one of them: it answers the first and refuses the release's.
    overrides = dict(num_rounds=2, eval_every=1, **EVAL)
    cfg = smoke_config(tmp_path, **overrides)
    one = max(_epsilon_after(cfg, node, 1) for node in NODES.values())
    two = min(_epsilon_after(cfg, node, 2) for node in NODES.values())
    assert one < two
    overrides["sim_hospital_epsilon"] = budget = (one + two) / 2
    with FakeGrid(smoke_values(tmp_path, **overrides), NODES) as grid:
        where = federation.run(grid, smoke_config(tmp_path, **overrides))
    section = json.loads((where / "release.json").read_text())["evaluation"]
    assert section["hospitals"] == [] and section["refused_budget"] == ["hospital-0", "hospital-1"]
    table = round_metrics.read(tmp_path / "metrics.csv")
    assert table[0]["evaluation"] == "interim" and "fid" in table[0]
    assert table[1]["evaluation"] == "release" and "fid" not in table[1]
    for hospital in ("hospital-0", "hospital-1"):
        entries = read_entries(tmp_path / "hospitals" / hospital / "ledger.jsonl")
        assert [e["purpose"] for e in entries][-1] == "train-discriminator"
        assert entries[-1]["epsilon"] <= budget
