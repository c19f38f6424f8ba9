"""The server's side of hospital budgets, on an in-process grid (tests/fake_grid.py): a
hospital that refuses is dropped and the run goes on, or stops cleanly below
min-hospitals; either way the release names it and `fedsynth audit` verifies it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from client.ledger import LEDGER_FILE, PUBLIC_KEY, read_entries
from fake_grid import FakeGrid, epsilon_after_rounds, node_config, run_config
from server import federation
from shared.cli import app
from shared.config import RunConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def two_rounds_budget(rc: dict, node: dict) -> float:
    """A budget that allows exactly 2 rounds of the run's plan: halfway to the third."""
    return (epsilon_after_rounds(rc, node, 2) + epsilon_after_rounds(rc, node, 3)) / 2


def run(tmp: Path, rc: dict, nodes: dict[int, dict]) -> tuple[Path, FakeGrid]:
    with FakeGrid(rc, nodes) as grid:
        release = federation.run(grid, RunConfig.from_flat(rc))
    return release, grid


def keys_from_hospitals(tmp: Path, nodes: dict[int, dict]) -> Path:
    """The auditor's keys, taken from the hospitals' own state dirs, not from the release."""
    keys = tmp / "auditor-keys"
    keys.mkdir(exist_ok=True)
    for node in nodes.values():
        shutil.copy(Path(node["state-dir"]) / PUBLIC_KEY, keys / f"{node['hospital-id']}.pub.pem")
    return keys


def audit(*args) -> tuple[int, dict]:
    result = CliRunner().invoke(app, ["audit", *map(str, args), "--json"])
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture(scope="module")
def dropped_run(tmp_path_factory):
    """5 rounds, 3 hospitals, min 2; hospital-c's own budget allows exactly 2 rounds."""
    tmp = tmp_path_factory.mktemp("dropped")
    rc = run_config(tmp / "out", num_rounds=5, num_hospitals=3, min_hospitals=2)
    nodes = {11: node_config(tmp, "hospital-a", 100.0, (0, 64)),
             12: node_config(tmp, "hospital-b", 100.0, (64, 64))}
    probe = node_config(tmp, "hospital-c", 1.0, (128, 64))
    budget = two_rounds_budget(rc, probe)
    nodes[13] = node_config(tmp, "hospital-c", budget, (128, 64))
    release, grid = run(tmp, rc, nodes)
    return tmp, rc, nodes, budget, release, grid


def test_a_hospital_out_of_budget_is_dropped_and_the_others_finish(dropped_run):
    tmp, rc, nodes, budget, release, grid = dropped_run
    # hospital-c (node 13) trains 2 rounds, refuses the 3rd and is not asked again.
    assert [r for r, n in grid.sent if n == 13] == [1, 2, 3]
    assert [r for r, n in grid.sent if n == 11] == [1, 2, 3, 4, 5]
    own = read_entries(Path(nodes[13]["state-dir"]) / LEDGER_FILE)
    assert [e["round"] for e in own] == [1, 2]
    assert own[-1]["epsilon"] <= budget < epsilon_after_rounds(rc, nodes[13], 3)

    meta = json.loads((release / "release.json").read_text())
    assert meta["rounds"] == 5 and meta["stopped_early"] == ""
    assert meta["privacy"]["dropped_budget_exhausted"] == ["hospital-c"]
    per = meta["privacy"]["per_hospital"]
    assert per["hospital-c"]["rounds"] == [1, 2]
    assert per["hospital-c"]["epsilon"] == own[-1]["epsilon"]
    assert per["hospital-a"]["rounds"] == [1, 2, 3, 4, 5]
    updates = json.loads((release / "updates.json").read_text())
    assert [sorted(u["received"]) for u in updates] == \
        [["hospital-a", "hospital-b", "hospital-c"]] * 2 + [["hospital-a", "hospital-b"]] * 3


def test_the_release_audits_clean_with_the_hospitals_keys(dropped_run):
    tmp, rc, nodes, budget, release, grid = dropped_run
    code, report = audit(release, "--keys", keys_from_hospitals(tmp, nodes))
    assert code == 0, report["failures"]
    assert report["warnings"] == []
    rows = {h["hospital"]: h for h in report["hospitals"]}
    assert rows["hospital-c"]["rounds"] == [1, 2]
    assert rows["hospital-c"]["budget_epsilon"] == pytest.approx(budget)
    for row in rows.values():
        assert row["rdp_epsilon"] == pytest.approx(row["claimed_epsilon"], rel=1e-6)
        assert row["prv_epsilon"] <= row["rdp_epsilon"] + 0.02
    assert report["guarantee"]["epsilon"] == pytest.approx(rows["hospital-a"]["rdp_epsilon"])
    # A node's own ledger audits clean as well, against the key from its state dir.
    a = Path(nodes[11]["state-dir"])
    code, report = audit(a / LEDGER_FILE, "--key", a / PUBLIC_KEY)
    assert code == 0 and report["hospitals"][0]["steps"] == 5 * rc["local-d-steps"]


def test_an_edited_weights_hash_in_the_real_release_is_named(dropped_run, tmp_path):
    tmp, rc, nodes, budget, release, grid = dropped_run
    copy = shutil.copytree(release, tmp_path / "release")
    path = copy / "ledger" / "hospital-b.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    entries[3]["weights_sha256"] = "0" * 64
    path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    code, report = audit(copy, "--keys", keys_from_hospitals(tmp, nodes))
    assert code == 1
    named = {(f["hospital"], f["entry"], f["round"]) for f in report["failures"]}
    # the entry's signature no longer covers it, and the update the server recorded in
    # round 4 now matches no entry
    assert named == {("hospital-b", 4, 4), ("hospital-b", None, 4)}


def test_below_min_hospitals_the_run_stops_and_releases_the_last_round(tmp_path):
    rc = run_config(tmp_path / "out", num_rounds=4, num_hospitals=2, min_hospitals=2)
    nodes = {21: node_config(tmp_path, "hospital-a", 100.0, (0, 64))}
    nodes[22] = node_config(tmp_path, "hospital-b", 1.0, (64, 64))
    nodes[22]["epsilon"] = two_rounds_budget(rc, nodes[22])
    release, grid = run(tmp_path, rc, nodes)

    meta = json.loads((release / "release.json").read_text())
    assert meta["rounds"] == 2 and meta["rounds_planned"] == 4
    assert "min-hospitals = 2" in meta["stopped_early"]
    assert meta["privacy"]["dropped_budget_exhausted"] == ["hospital-b"]
    assert (tmp_path / "out" / "checkpoints" / "round-0002").is_dir()
    assert not (tmp_path / "out" / "checkpoints" / "round-0003").exists()
    # hospital-a trained round 3 too: its node counts that spend, though the round was
    # never aggregated, and the release shows exactly the rounds it is made of.
    own = read_entries(Path(nodes[21]["state-dir"]) / LEDGER_FILE)
    assert [e["round"] for e in own] == [1, 2, 3]
    assert meta["privacy"]["per_hospital"]["hospital-a"]["rounds"] == [1, 2]
    code, report = audit(release, "--keys", keys_from_hospitals(tmp_path, nodes))
    assert code == 0, report["failures"]


def test_no_round_completed_means_no_release(tmp_path):
    rc = run_config(tmp_path / "out", num_rounds=2, num_hospitals=1)
    nodes = {31: node_config(tmp_path, "hospital-a", 0.1)}
    with pytest.raises(federation.StopRun, match="no round completed"):
        run(tmp_path, rc, nodes)
    assert not (tmp_path / "out" / "release").exists()


def test_release_json_carries_the_recomputed_epsilon_and_the_guarantee(dropped_run):
    tmp, rc, nodes, budget, release, grid = dropped_run
    privacy = json.loads((release / "release.json").read_text())["privacy"]
    code, report = audit(release, "--keys", keys_from_hospitals(tmp, nodes))
    rows = {h["hospital"]: h for h in report["hospitals"]}
    assert set(privacy["recomputed"]) == set(rows) == {"hospital-a", "hospital-b", "hospital-c"}
    for hospital, figures in privacy["recomputed"].items():
        assert figures["rdp_epsilon"] == pytest.approx(rows[hospital]["rdp_epsilon"])
        assert figures["prv_epsilon"] == pytest.approx(rows[hospital]["prv_epsilon"])
        assert figures["rdp_epsilon"] == pytest.approx(
            privacy["per_hospital"][hospital]["epsilon"], rel=1e-6)
    assert privacy["guarantee"] == report["guarantee"]


def test_the_server_refuses_to_write_a_release_whose_ledger_does_not_verify(dropped_run):
    from server import checkpoint, release as release_mod

    tmp, rc, nodes, budget, release, grid = dropped_run
    before = (release / "release.json").read_text()
    state, global_w, ema_w = checkpoint.load(checkpoint.latest(Path(rc["output-dir"])))
    state.ledger["hospital-b"][1]["epsilon"] = 0.01     # a claim the signature does not cover
    with pytest.raises(ValueError, match="do not verify.*hospital-b"):
        release_mod.write_release(Path(rc["output-dir"]), RunConfig.from_flat(rc), state,
                                  global_w, ema_w)
    assert (release / "release.json").read_text() == before   # the last good release stays
    assert sorted(p.name for p in release.parent.iterdir() if "release" in p.name) == ["release"]
