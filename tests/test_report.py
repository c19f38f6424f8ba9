"""`fedsynth report`: metrics.csv round-trips, the plotted series are the CSV's numbers, PNGs
are written, and a directory without a run fails in one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from server import checkpoint, report, round_metrics
from server.checkpoint import ServerState
from shared.cli import app


def _evaluation(rnd: int, fid: float) -> dict:
    """An evaluation section shaped like server/evaluation.py's."""
    return {"round": rnd, "epsilon_after": {"hospital-0": 4.0 + rnd, "hospital-1": 4.5 + rnd},
            "scores": {
                "fid": {"value": fid, "estimate": fid, "real_count": 611.3, "synthetic_count": 80,
                        "feature_space": "a subspace", "privacy": {"epsilon_per_hospital": 0.8}},
                "fid_per_class": {"normal": {"value": fid + 1, "real_count": 200.2, "privacy": "x"},
                                  "pneumonia": {"value": fid - 1, "real_count": 411.1}},
                "recall": {"value": 0.25 * rnd, "k": 3, "real_count": 611.0},
                "diversity_ssim": {"per_class": {"normal": 0.3, "pneumonia": 0.4}, "note": "n"},
                "memorization": {"flagged": False, "train_count": 2354.2},
            }}


def _state(rounds: int = 3) -> ServerState:
    state = ServerState(run_id="r", round=rounds, config={})
    for rnd in range(1, rounds + 1):
        clients = {h: {"epsilon": rnd * (1.0 + i), "budget-epsilon": 12.0, "g-loss": 0.7 + rnd,
                       "d-loss-fake": 1.3 - 0.1 * rnd, "num-examples": 100 + i, "steps": 4}
                   for i, h in enumerate(("hospital-0", "hospital-1"))}
        record = {"round": rnd, "clients": clients}
        if rnd == 2:
            record["evaluation"] = _evaluation(rnd, 90.0)
        state.rounds.append(record)
    return state


def test_rows_flatten_every_numeric_score_and_read_back_exactly(tmp_path):
    table = round_metrics.rows(_state(), _evaluation(3, 70.5))
    path = round_metrics.write(tmp_path / "metrics.csv", table)
    back = round_metrics.read(path)
    assert [r["evaluation"] for r in back] == ["", "interim", "release"]
    assert back[1]["fid"] == 90.0 and back[2]["fid"] == 70.5 and "fid" not in back[0]
    assert back[2]["fid.real_count"] == 611.3 and back[2]["fid.synthetic_count"] == 80
    assert back[2]["fid_per_class.pneumonia.real_count"] == 411.1
    assert back[2]["diversity_ssim.per_class.pneumonia"] == 0.4 and back[2]["memorization.flagged"] == 0.0
    assert back[2]["recall.k"] == 3 and back[2]["eval_epsilon_after/hospital-1"] == 7.5
    assert back[0]["hospital-1/epsilon"] == 2.0 and back[0]["epsilon_max"] == 2.0
    assert not any("privacy" in c or "feature_space" in c or "note" in c for c in back[2])
    assert back == [{k: v for k, v in row.items()} for row in table]


def test_report_plots_the_csv_numbers(tmp_path):
    round_metrics.write(tmp_path / "metrics.csv", round_metrics.rows(_state(), _evaluation(3, 70.5)))
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    names = ["fid.png", "fid-per-class.png", "epsilon.png", "losses.png", "scores.png"]
    assert result.output.split() == [str(tmp_path / "report" / n) for n in names]
    for name in names:
        with Image.open(tmp_path / "report" / name) as png:
            assert png.format == "PNG" and png.size[0] >= 600

    specs = report.figures(round_metrics.read(tmp_path / "metrics.csv"))
    assert specs["fid.png"]["panels"][0][1] == {"FID": ([2, 3], [90.0, 70.5])}
    assert specs["fid-per-class.png"]["panels"][0][1] == {"normal": ([2, 3], [91.0, 71.5]),
                                                          "pneumonia": ([2, 3], [89.0, 69.5])}
    epsilon = specs["epsilon.png"]["panels"][0][1]
    assert epsilon["hospital-1 (trained)"] == ([1, 2, 3], [2.0, 4.0, 6.0])
    assert epsilon["hospital-0 (evaluated)"] == ([2, 3], [6.0, 7.0])
    assert epsilon["hospital-0 budget"] == ([1, 2, 3], [12.0] * 3)
    losses = dict(specs["losses.png"]["panels"])
    assert losses["d-loss-fake"]["hospital-0"] == ([1, 2, 3], pytest.approx([1.2, 1.1, 1.0]))


def test_report_rebuilds_the_rows_from_the_newest_checkpoint(tmp_path):
    arrays = {"generator.w": np.zeros(1, np.float32)}
    checkpoint.save(tmp_path, _state(2), arrays, arrays)
    assert report.load_table(tmp_path) == round_metrics.rows(_state(2))
    paths = report.write_report(tmp_path, tmp_path / "plots")
    assert (tmp_path / "plots" / "fid.png") in paths


def test_report_of_a_directory_without_a_run_fails_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "no metrics.csv and no checkpoint" in result.output and len(result.output.strip().splitlines()) == 1
    help_text = CliRunner().invoke(app, ["report", "--help"]).output
    assert "OUTPUT_DIR" in help_text and "metrics.csv" in help_text


def test_report_draws_the_release_memorization_check(tmp_path):
    import json

    round_metrics.write(tmp_path / "metrics.csv", round_metrics.rows(_state()))
    check = {"bin_edges": [0.0, 0.5, 1.0], "train_histogram": [30.0, 50.0, -4.0],
             "holdout_histogram": [5.0, 10.0, 5.0], "flagged": True, "closer_probability": 0.66,
             "standard_error": 0.03}
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "release.json").write_text(json.dumps({"evaluation": {"scores": {"memorization": check}}}))
    assert report.memorization_shares(check) == {"train": [0.375, 0.625, 0.0], "holdout": [0.25, 0.5, 0.25]}
    paths = report.write_report(tmp_path)
    assert paths[-1] == tmp_path / "report" / "memorization.png"
    with Image.open(paths[-1]) as png:
        assert png.format == "PNG"
