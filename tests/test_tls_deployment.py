"""The deployment the runbooks describe, with real processes on loopback: a SuperLink with TLS
and SuperNode authentication, hospitals enrolled with `fedsynth enroll` and registered with
`flwr supernode register`, and the ways in that must stay shut.

    coordinator   fedsynth certs -> flower-superlink (TLS, --enable-supernode-auth)
    hospitals a, b   fedsynth enroll -> registered -> flower-supernode (--root-certificates,
                     --auth-supernode-private-key, own data file and state dir) -> trained
    intruder      enrolled, trusts the right CA, never registered        -> refused
    elsewhere     registered, but trusts another CA                       -> cannot connect
    plaintext     a SuperNode, an HTTP request and the flwr CLI without TLS -> cannot talk
    the run (smoke config, num-hospitals = 2) completes with a and b only; `flwr pull` is
    not available without an artifact provider, so the release is read from output-dir;
    the auditor verifies it with the ledger keys the hospitals' enrolment made.
    a hospital killed mid-round is dropped from that round and rejoins the next.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import httpx
import pytest
from conftest import REPO, smoke_values
from fake_grid import hospital_npz
from flower_procs import BIN, FlowerProcesses, toml_value
from typer.testing import CliRunner

from client.enroll import enroll
from client.ledger import read_entries
from shared.certs import create_certificates
from shared.cli import app

HOSPITALS = {"hospital-a": (0, 300), "hospital-b": (4000, 300)}   # slices of PneumoniaMNIST


def write_connections(flower: FlowerProcesses, port: int, ca) -> None:
    """FLWR_HOME/config.toml as the coordinator's runbook writes it, plus a plaintext one."""
    (flower.home / "config.toml").write_text(
        '[superlink]\ndefault = "federation"\n\n'
        f'[superlink.federation]\naddress = "127.0.0.1:{port}"\n'
        f"root-certificates = {toml_value(str(ca))}\n\n"
        f'[superlink.plaintext]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')


def flwr(flower: FlowerProcesses, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "flwr"), *args], env=flower.env, cwd=flower.workdir,
                            capture_output=True, text=True, timeout=timeout)
    with open(flower.logs / "flwr-cli.log", "a") as log:
        log.write(f"$ flwr {' '.join(args)}  -> {result.returncode}\n{result.stdout}{result.stderr}\n")
    return result


def wait_exit(proc: subprocess.Popen, timeout: float = 90) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    return proc.poll()


def wait_for_text(path, text: str, timeout: float, proc: subprocess.Popen | None = None) -> str:
    """Poll a log until `text` appears; return the log. Fails early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = path.read_text(errors="replace") if path.exists() else ""
        if text in log:
            return log
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path.name} after {timeout:.0f}s")


def start_tls_superlink(flower: FlowerProcesses, certs) -> int:
    """coordinator.md, step 2 (on loopback); returns the port."""
    flower.env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # a small shared machine
    port = flower.superlink(
        "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
        "--ssl-keyfile", str(certs.server_key), "--enable-supernode-auth",
        tls_ca=certs.ca_cert)
    write_connections(flower, port, certs.ca_cert)
    return port


def node_config(tmp_path, node, images: tuple[int, int] = (0, 64)) -> dict:
    """hospital.md, step 2: the hospital's own data file, state dir and budget."""
    data = hospital_npz(tmp_path / node.hospital_id / "data" / "scans.npz", *images)
    return {"hospital-id": node.hospital_id, "data-path": str(data),
            "state-dir": str(node.state_dir), "epsilon": 10.0, "delta": 1e-5}


def auth(node, ca) -> tuple[str, ...]:
    """hospital.md, step 5: trust the federation's CA, sign with the enrolled key."""
    return ("--root-certificates", str(ca), "--auth-supernode-private-key", str(node.supernode_key))


@pytest.mark.slow
def test_tls_federation_admits_only_registered_hospitals(tmp_path):
    certs = create_certificates(tmp_path / "coordinator" / "certs", ["127.0.0.1"])
    other_ca = create_certificates(tmp_path / "elsewhere-ca", ["127.0.0.1"])
    nodes = {name: enroll(tmp_path / name / "state", name)
             for name in [*HOSPITALS, "intruder", "elsewhere"]}
    out = tmp_path / "coordinator" / "outputs" / "study"
    run_config = smoke_values(out, num_hospitals=2)

    with FlowerProcesses(tmp_path / "flower") as flower:
        port = start_tls_superlink(flower, certs)

        # Plaintext cannot talk to the TLS port: neither HTTP nor the flwr CLI.
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5.0)
        plain = flwr(flower, "ls", "plaintext")
        assert plain.returncode != 0 and "unavailable" in plain.stdout + plain.stderr

        # The coordinator registers the hospitals' public keys (and "elsewhere", whose only
        # problem will be the CA it trusts); "intruder" is never registered.
        for name in [*HOSPITALS, "elsewhere"]:
            result = flwr(flower, "supernode", "register", str(nodes[name].supernode_public_key),
                          "federation", "--name", name, "--format", "json")
            assert result.returncode == 0, flower.report()
        listed = json.loads(flwr(flower, "supernode", "list", "federation",
                                 "--format", "json").stdout)
        assert len(listed["nodes"]) == 3

        ca = certs.ca_cert
        for name, images in HOSPITALS.items():
            flower.supernode(name, port, node_config(tmp_path, nodes[name], images),
                             *auth(nodes[name], ca))
        intruder = flower.supernode("intruder", port, node_config(tmp_path, nodes["intruder"]),
                                    *auth(nodes["intruder"], ca), "--max-retries", "2")
        elsewhere = flower.supernode("elsewhere", port, node_config(tmp_path, nodes["elsewhere"]),
                                     *auth(nodes["elsewhere"], other_ca.ca_cert),
                                     "--max-retries", "2")
        plaintext = flower.supernode("plaintext", port, node_config(tmp_path, nodes["intruder"]),
                                     "--insecure", "--max-retries", "2")

        for name, proc in [("intruder", intruder), ("elsewhere", elsewhere),
                           ("plaintext", plaintext)]:
            code = wait_exit(proc)
            assert code not in (None, 0), f"{name} was not turned away\n{flower.report()}"
        logs = {p.stem: p.read_text(errors="replace") for p in flower.logs.glob("*.log")}
        assert "No SuperNode found with the given public key" in logs["superlink"]
        assert "CERTIFICATE_VERIFY_FAILED" in logs["elsewhere"]

        result = flower.flwr_run(REPO, run_config, connection="federation")
        assert result.returncode == 0, flower.report(result)
        assert (out / "release" / "release.json").exists(), flower.report(result)

        # `flwr pull` needs an artifact provider (not in open-source Flower 1.42): the
        # coordinator's runbook takes the release from output-dir instead.
        runs = json.loads(flwr(flower, "ls", "federation", "--format", "json").stdout)["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"]
        pulled = flwr(flower, "pull", runs[0]["run-id"], "federation")
        assert pulled.returncode != 0 and "artifact provider" in pulled.stdout + pulled.stderr

    summary = json.loads((out / "release" / "release.json").read_text())
    assert summary["rounds"] == 2 and summary["hospitals"] == sorted(HOSPITALS)
    for name in HOSPITALS:
        assert summary["privacy"]["per_hospital"][name]["epsilon"] <= 10.0
        own = read_entries(nodes[name].state_dir / "ledger.jsonl")
        assert own == read_entries(out / "release" / "ledger" / f"{name}.jsonl")
        # the ledger was signed with the key `fedsynth enroll` made and told the auditor about
        assert (out / "release" / "keys" / f"{name}.pub.pem").read_bytes() == \
            nodes[name].ledger_public_key.read_bytes()
    for name in ("intruder", "elsewhere"):
        assert not (nodes[name].state_dir / "ledger.jsonl").exists()

    # The auditor's runbook: keys from the hospitals' enrolment, not from the coordinator.
    keys = tmp_path / "auditor" / "hospital-keys"
    keys.mkdir(parents=True)
    for name in HOSPITALS:
        shutil.copy(nodes[name].ledger_public_key, keys / f"{name}.pub.pem")
    audit = CliRunner().invoke(app, ["audit", str(out / "release"), "--keys", str(keys)])
    assert audit.exit_code == 0, audit.output


@pytest.mark.slow
def test_hospital_killed_mid_round_is_dropped_and_rejoins_the_next_round(tmp_path):
    """SIGKILL (no goodbye) to hospital-b while it trains round 1: the SuperLink notices it is
    gone (heartbeats), round 1 completes with hospital-a (min-hospitals = 1), hospital-b
    comes back with the same key and state dir and trains round 2."""
    certs = create_certificates(tmp_path / "coordinator" / "certs", ["127.0.0.1"])
    nodes = {name: enroll(tmp_path / name / "state", name) for name in HOSPITALS}
    out = tmp_path / "coordinator" / "outputs" / "study"
    run_config = smoke_values(out, num_hospitals=2, min_hospitals=1)

    with FlowerProcesses(tmp_path / "flower") as flower:
        port = start_tls_superlink(flower, certs)
        for node in nodes.values():
            assert flwr(flower, "supernode", "register", str(node.supernode_public_key),
                        "federation").returncode == 0, flower.report()
        configs = {name: node_config(tmp_path, nodes[name], images)
                   for name, images in HOSPITALS.items()}
        flower.supernode("hospital-a", port, configs["hospital-a"],
                         *auth(nodes["hospital-a"], certs.ca_cert))
        b = flower.supernode("hospital-b", port, configs["hospital-b"],
                             *auth(nodes["hospital-b"], certs.ca_cert))
        config_file = flower.workdir / "run-config.toml"
        config_file.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
        run = flower.start("flwr-run-stream", [str(BIN / "flwr"), "run", str(REPO), "federation",
                                        "--stream", "--run-config", str(config_file)])

        wait_for_text(flower.logs / "hospital-b.log", "Receiving: train message", 240, run)
        os.killpg(b.pid, signal.SIGKILL)
        b.wait(timeout=30)
        log = wait_for_text(flower.logs / "flwr-run-stream.log", "round 1/2", 300, run)
        assert "round 1/2: 1 hospitals" in log, flower.report()

        flower.supernode("hospital-b-back", port, configs["hospital-b"],
                         *auth(nodes["hospital-b"], certs.ca_cert))
        assert wait_exit(run, timeout=400) == 0, flower.report()
        log = (flower.logs / "flwr-run-stream.log").read_text()
        assert "round 2/2: 2 hospitals" in log, flower.report()

    summary = json.loads((out / "release" / "release.json").read_text())
    per_hospital = summary["privacy"]["per_hospital"]
    assert per_hospital["hospital-a"]["rounds"] == [1, 2]
    assert per_hospital["hospital-b"]["rounds"] == [2]
    # whatever b logged before it died stays counted in its own ledger; the release carries
    # only the entry of the round it completed, and that entry is in b's ledger
    own = read_entries(nodes["hospital-b"].state_dir / "ledger.jsonl")
    released = read_entries(out / "release" / "ledger" / "hospital-b.jsonl")
    assert [e["round"] for e in released] == [2] and released[0] in own
