"""The hospital's ledger and budget on the node: key files, crash safety, and that no run
config from the server can make a hospital spend past its own node-config budget."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from client.app import STATUS_BUDGET, STATUS_OK, train_reply
from client.ledger import (LEDGER_FILE, PRIVATE_KEY, PUBLIC_KEY, Ledger, LedgerError,
                           history, rdp_epsilon, read_entries, verify_chain)
from fake_grid import epsilon_after_rounds, node_config, run_config, train_content

REPO = Path(__file__).resolve().parents[1]
RUN = "run-ledger-test"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Deployment nodes never touch the server's output-dir; one fixed value lets the node's
# noise calibration (cached per run config) be shared between tests.
SERVER_OUT = Path("/nonexistent/fedsynth-ledger-test")


@pytest.fixture
def rc() -> dict:
    """Two planned rounds at target epsilon 3 (what the server asks for)."""
    return run_config(SERVER_OUT, num_rounds=2, num_hospitals=1, target_epsilon=3.0)


def spend(ledger: Ledger, rnd: int, run_id: str = RUN) -> dict:
    return ledger.append(run_id=run_id, round=rnd, mechanism="subsampled-gaussian",
                         purpose="train-discriminator", noise_multiplier=1.0, sample_rate=0.25,
                         steps=4, max_grad_norm=1.0, dataset_size=64, delta=1e-5,
                         budget_epsilon=50.0, weights_sha256="ab" * 32)


def test_private_key_is_0600_and_the_chain_verifies(tmp_path):
    ledger = Ledger(tmp_path, "hospital-0")
    assert stat.S_IMODE((tmp_path / PRIVATE_KEY).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / PRIVATE_KEY).parent.stat().st_mode) == 0o700
    assert (tmp_path / PUBLIC_KEY).read_text().startswith("-----BEGIN PUBLIC KEY-----")
    first, second = spend(ledger, 1), spend(ledger, 2)
    assert first["prev_hash"] == "" and second["prev_hash"] == first["hash"]
    assert stat.S_IMODE((tmp_path / LEDGER_FILE).stat().st_mode) == 0o600
    entries = read_entries(tmp_path / LEDGER_FILE)
    assert verify_chain(entries, ledger.public_key) == []
    # Reopening continues the same chain with the same key.
    assert Ledger(tmp_path, "hospital-0").entries == entries


def test_a_readable_private_key_is_refused(tmp_path):
    Ledger(tmp_path, "hospital-0")
    os.chmod(tmp_path / PRIVATE_KEY, 0o644)
    with pytest.raises(LedgerError, match="chmod 600"):
        Ledger(tmp_path, "hospital-0")


def test_truncated_last_line_names_file_and_line_and_is_left_alone(tmp_path):
    ledger = Ledger(tmp_path, "hospital-0")
    spend(ledger, 1)
    spend(ledger, 2)
    path = tmp_path / LEDGER_FILE
    # A crash in the middle of writing entry 3: part of a line, no newline.
    with open(path, "ab") as f:
        f.write(b'{"version":1,"hospital_id":"hospital-0","run_id":"run-led')
    before = path.read_bytes()
    with pytest.raises(LedgerError, match=rf"{path}:3: truncated"):
        Ledger(tmp_path, "hospital-0")
    assert path.read_bytes() == before          # nothing repaired, nothing overwritten


def test_an_edited_entry_stops_the_node(tmp_path):
    ledger = Ledger(tmp_path, "hospital-0")
    spend(ledger, 1)
    spend(ledger, 2)
    path = tmp_path / LEDGER_FILE
    path.write_text(path.read_text().replace('"steps":4', '"steps":1', 1))
    with pytest.raises(LedgerError, match="entry 1 .*will not train on a broken ledger"):
        Ledger(tmp_path, "hospital-0")


def test_budget_smaller_than_one_round_refuses_without_spending(tmp_path, rc):
    node = node_config(tmp_path, "hospital-0", epsilon=0.5)
    reply = train_reply(train_content(rc, RUN, 1), rc, node)
    assert reply["status"]["status"] == STATUS_BUDGET
    assert "weights" not in reply and "ledger" not in reply
    assert reply["metrics"]["epsilon"] == 0.0 and reply["metrics"]["epsilon-next"] > 0.5
    assert read_entries(Path(node["state-dir"]) / LEDGER_FILE) == []


def test_the_server_cannot_push_a_node_past_its_own_budget(tmp_path, rc):
    node = node_config(tmp_path, "hospital-0", epsilon=3.0)   # the hospital's budget
    state = Path(node["state-dir"])
    assert train_reply(train_content(rc, RUN, 1), rc, node)["status"]["status"] == STATUS_OK
    spent = read_entries(state / LEDGER_FILE)[-1]["epsilon"]
    greedy = [
        # ... asks for a larger epsilon (less noise) than the hospital allows,
        run_config(SERVER_OUT, num_rounds=2, num_hospitals=1, target_epsilon=30.0),
        # ... or sets the noise itself and asks for many more steps.
        run_config(SERVER_OUT, num_rounds=2, num_hospitals=1, noise_multiplier=0.5,
                   local_d_steps=40),
    ]
    for greedy_rc in greedy:
        reply = train_reply(train_content(greedy_rc, RUN, 2), greedy_rc, node)
        assert reply["status"]["status"] == STATUS_BUDGET and "weights" not in reply
        assert reply["metrics"]["epsilon-next"] > 3.0
    entries = read_entries(state / LEDGER_FILE)
    assert len(entries) == 1 and entries[-1]["epsilon"] == spent
    # The plan the hospital agreed to still fits, and ends within the budget.
    assert train_reply(train_content(rc, RUN, 2), rc, node)["status"]["status"] == STATUS_OK
    final = read_entries(state / LEDGER_FILE)[-1]
    assert final["epsilon"] <= 3.0 and final["budget_epsilon"] == 3.0


CRASH = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from shared import weights
    from client.app import train_reply
    from fake_grid import train_content

    def die(*args, **kwargs):       # reached only after the ledger entry is on disk
        os._exit(17)

    weights.pack = die
    rc, node = json.loads(sys.argv[2]), json.loads(sys.argv[3])
    train_reply(train_content(rc, "run-ledger-test", 1), rc, node)
    sys.exit(0)                     # not reached
""")


def test_a_crash_between_ledger_and_reply_still_counts_the_spend(tmp_path):
    # A fixed noise multiplier: no calibration, in either process.
    rc = run_config(SERVER_OUT, num_rounds=2, num_hospitals=1, noise_multiplier=1.0)
    node = node_config(tmp_path, "hospital-0", epsilon=50.0)
    state = Path(node["state-dir"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", CRASH, str(REPO / "tests"), json.dumps(rc),
                           json.dumps(node)], env=env, cwd=REPO, capture_output=True,
                          timeout=120)
    assert done.returncode == 17, done.stderr.decode()[-2000:]
    [logged] = read_entries(state / LEDGER_FILE)      # fsync'ed before the process died
    assert logged["round"] == 1

    # The server never got a reply and asks for round 1 again: the node trains it again,
    # and its ledger counts both spends.
    reply = train_reply(train_content(rc, RUN, 1), rc, node)
    assert reply["status"]["status"] == STATUS_OK
    entries = read_entries(state / LEDGER_FILE)
    assert [e["round"] for e in entries] == [1, 1]
    assert entries[1]["prev_hash"] == entries[0]["hash"]
    both = rdp_epsilon(history(entries), entries[1]["delta"])
    assert entries[1]["epsilon"] == pytest.approx(both) and both > logged["epsilon"]
    assert reply["metrics"]["epsilon"] == pytest.approx(both)
    assert Ledger(state, "hospital-0").epsilon(entries[1]["delta"]) == pytest.approx(both)
    one_round = epsilon_after_rounds(rc, node, 1)
    assert logged["epsilon"] == pytest.approx(one_round)


def test_ledger_epsilon_is_opacus_rdp_accountant_bit_for_bit():
    from opacus.accountants import RDPAccountant

    hist = [(1.1, 0.25, 4), (1.1, 0.25, 4), (8.0, 1.0, 1), (0.9, 0.1, 20)]
    accountant = RDPAccountant()
    accountant.history = list(hist)
    assert rdp_epsilon(hist, 1e-5) == accountant.get_epsilon(1e-5)
    assert rdp_epsilon([], 1e-5) == 0.0


def test_a_lost_signing_key_is_named_and_never_replaced(tmp_path):
    ledger = Ledger(tmp_path, "hospital-0")
    spend(ledger, 1)
    (tmp_path / PRIVATE_KEY).unlink()
    public, entries = (tmp_path / PUBLIC_KEY).read_bytes(), (tmp_path / LEDGER_FILE).read_bytes()
    with pytest.raises(LedgerError, match=rf"{tmp_path / PRIVATE_KEY}: the ledger signing key "
                                          "is missing but .*ledger.jsonl exists; restore"):
        Ledger(tmp_path, "hospital-0")
    assert not (tmp_path / PRIVATE_KEY).exists()
    assert (tmp_path / PUBLIC_KEY).read_bytes() == public
    assert (tmp_path / LEDGER_FILE).read_bytes() == entries


def _budget(*args) -> tuple[int, str]:
    from typer.testing import CliRunner

    from shared.cli import app

    result = CliRunner().invoke(app, ["client", "budget", *map(str, args)])
    return result.exit_code, result.output


def test_client_budget_shows_each_entry_the_spend_and_what_remains(tmp_path):
    ledger = Ledger(tmp_path, "hospital-0")
    spend(ledger, 1)
    last = spend(ledger, 2)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, out = _budget(tmp_path)
    assert code == 0, out
    assert [line.split()[4] for line in out.splitlines()[:2]] == ["1", "2"]   # round numbers
    assert out.splitlines()[-1] == (f"spent: epsilon {last['epsilon']:.3f} of 50 at delta "
                                    f"1.0e-05; remaining: {50 - last['epsilon']:.3f}")
    code, out = _budget(tmp_path, "--epsilon", 10.0)
    assert out.endswith(f"of 10 at delta 1.0e-05; remaining: {10 - last['epsilon']:.3f}\n")
    # it only reads
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files


def test_client_budget_refuses_a_tampered_ledger_or_a_missing_key(tmp_path):
    ledger = Ledger(tmp_path, "hospital-0")
    spend(ledger, 1)
    spend(ledger, 2)
    path = tmp_path / LEDGER_FILE
    good = path.read_text()
    path.write_text(good.replace('"steps":4', '"steps":1', 1))
    code, out = _budget(tmp_path)
    assert code == 1 and "entry 1 (round 1): hash does not match" in out
    path.write_text(good)
    (tmp_path / PUBLIC_KEY).unlink()
    code, out = _budget(tmp_path)
    assert code == 1 and "ledger-ed25519.pub.pem" in out
    assert not (tmp_path / PUBLIC_KEY).exists()
    code, out = _budget(tmp_path / "elsewhere")
    assert code == 2 and "no ledger.jsonl" in out
