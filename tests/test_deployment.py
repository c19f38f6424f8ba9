"""The same Flower app on Flower's Deployment Engine: a SuperLink and two hospital SuperNodes
on loopback, each hospital with its own data file, state directory and privacy budget from
its node config, and a run submitted with `flwr run`.
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO, smoke_values
from fake_grid import hospital_npz
from flower_procs import FlowerProcesses

from client.ledger import read_entries


@pytest.mark.slow
def test_two_hospitals_on_the_deployment_engine_reach_a_release(tmp_path):
    out = tmp_path / "coordinator"
    hospitals = {
        "hospital-a": {"images": (0, 600), "epsilon": 10.0},
        "hospital-b": {"images": (3000, 600), "epsilon": 10.0},  # the file is ordered by class
    }
    run_config = smoke_values(out)
    with FlowerProcesses(tmp_path / "flower") as flower:
        port = flower.superlink("--insecure")
        for name, h in hospitals.items():
            flower.supernode(name, port, {
                "hospital-id": name,
                "data-path": str(hospital_npz(tmp_path / name / "data.npz", *h["images"])),
                "state-dir": str(tmp_path / name / "state"),
                "epsilon": h["epsilon"],
            }, "--insecure")
        flower.connection(port, insecure=True)
        result = flower.flwr_run(REPO, run_config)
        assert result.returncode == 0, flower.report(result)
        assert (out / "release" / "release.json").exists(), flower.report(result)

    summary = json.loads((out / "release" / "release.json").read_text())
    assert summary["rounds"] == 2 and summary["hospitals"] == sorted(hospitals)
    for name in hospitals:
        p = summary["privacy"]["per_hospital"][name]
        assert p["epsilon"] <= 10.0 and p["rounds"] == [1, 2]
        # each hospital's ledger lives in its own state dir, and the release holds the same
        own = read_entries(tmp_path / name / "state" / "ledger.jsonl")
        assert own == read_entries(out / "release" / "ledger" / f"{name}.jsonl")
        assert [e["dataset_size"] for e in own] == [600, 600]
    assert not (out / "hospitals").exists()  # no simulated hospital state on the coordinator
    assert len(list((out / "release" / "images").rglob("*.png"))) == 2 * run_config["samples-per-class"]
