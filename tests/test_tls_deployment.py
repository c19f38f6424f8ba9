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
"""

from __future__ import annotations

import json
import shutil
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


@pytest.mark.slow
def test_tls_federation_admits_only_registered_hospitals(tmp_path):
    certs = create_certificates(tmp_path / "coordinator" / "certs", ["127.0.0.1"])
    other_ca = create_certificates(tmp_path / "elsewhere-ca", ["127.0.0.1"])
    nodes = {name: enroll(tmp_path / name / "state", name)
             for name in [*HOSPITALS, "intruder", "elsewhere"]}
    out = tmp_path / "coordinator" / "outputs" / "study"
    run_config = smoke_values(out, num_hospitals=2)

    with FlowerProcesses(tmp_path / "flower") as flower:
        flower.env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # a small shared machine
        port = flower.superlink(
            "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
            "--ssl-keyfile", str(certs.server_key), "--enable-supernode-auth",
            tls_ca=certs.ca_cert)
        write_connections(flower, port, certs.ca_cert)

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

        def node_config(name: str, images: tuple[int, int] = (0, 64)) -> dict:
            return {"hospital-id": name,
                    "data-path": str(hospital_npz(tmp_path / name / "data" / "scans.npz", *images)),
                    "state-dir": str(nodes[name].state_dir), "epsilon": 10.0, "delta": 1e-5}

        def auth(name: str, ca=certs.ca_cert) -> tuple[str, ...]:
            return ("--root-certificates", str(ca),
                    "--auth-supernode-private-key", str(nodes[name].supernode_key))

        for name, images in HOSPITALS.items():
            flower.supernode(name, port, node_config(name, images), *auth(name))
        intruder = flower.supernode("intruder", port, node_config("intruder"), *auth("intruder"),
                                    "--max-retries", "2")
        elsewhere = flower.supernode("elsewhere", port, node_config("elsewhere"),
                                     *auth("elsewhere", other_ca.ca_cert), "--max-retries", "2")
        plaintext = flower.supernode("plaintext", port, node_config("intruder"), "--insecure",
                                     "--max-retries", "2")

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
