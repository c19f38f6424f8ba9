"""`fedsynth enroll`: the node's keys in the formats Flower 1.42 reads, owner-only, never replaced."""

from __future__ import annotations

import base64
import hashlib
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from typer.testing import CliRunner

from client import ledger
from client.enroll import EnrollError, enroll
from shared.cli import app


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_what_flower_and_the_ledger_read(tmp_path):
    node = enroll(tmp_path / "state", "st-elsewhere")
    assert node.created
    # flower-supernode --auth-supernode-private-key: load_ssh_private_key, an EC key
    private = serialization.load_ssh_private_key(node.supernode_key.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    # flwr supernode register: Flower's own loader (OpenSSH public key, NIST curve)
    registered = try_load_public_key(node.supernode_public_key)
    assert registered == public_key_to_bytes(private.public_key())
    assert node.supernode_public_key.read_text().rstrip().endswith("fedsynth:st-elsewhere")
    # the ledger's Ed25519 pair, where client/ledger.py and `fedsynth audit` look for it
    signing = ledger.load_private_key(node.state_dir / ledger.PRIVATE_KEY)
    public = ledger.load_public_key(node.ledger_public_key)
    assert isinstance(public, Ed25519PublicKey)
    assert signing.public_key().public_bytes_raw() == public.public_bytes_raw()
    assert (node.state_dir / ledger.NOISE_SECRET).stat().st_size == 32


def test_private_files_are_owner_only(tmp_path):
    node = enroll(tmp_path / "state", "h1")
    keys = node.state_dir / "keys"
    assert mode(keys) == 0o700
    for name in ("supernode-ec", "ledger-ed25519.pem", "noise-seed"):
        assert mode(keys / name) == 0o600, name


def test_fingerprint_is_openssh_sha256(tmp_path):
    node = enroll(tmp_path / "state", "h1")
    blob = base64.b64decode(node.supernode_public_key.read_text().split()[1])
    expected = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert node.fingerprint == f"SHA256:{expected}"


def test_enrolling_again_keeps_every_key(tmp_path):
    first = enroll(tmp_path / "state", "h1")
    before = {p.name: p.read_bytes() for p in (first.state_dir / "keys").iterdir()}
    again = enroll(tmp_path / "state", "h1")
    assert not again.created
    assert {p.name: p.read_bytes() for p in (again.state_dir / "keys").iterdir()} == before


def test_a_readable_private_key_is_refused(tmp_path):
    node = enroll(tmp_path / "state", "h1")
    node.supernode_key.chmod(0o644)
    with pytest.raises(EnrollError, match="chmod 600"):
        enroll(tmp_path / "state", "h1")


@pytest.mark.parametrize("bad", ["", "has space", "../up", "-leading", "x" * 65])
def test_bad_hospital_ids_are_refused(tmp_path, bad):
    with pytest.raises(EnrollError, match="--hospital-id"):
        enroll(tmp_path / "state", bad)


def test_cli_prints_what_to_send_whom(tmp_path):
    result = CliRunner().invoke(app, ["enroll", str(tmp_path / "s"), "--hospital-id", "h1",
                                      "--superlink", "coordinator.example.org:9092"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "supernode-ec.pub" in out and "flwr supernode register" in out
    assert "ledger-ed25519.pub.pem" in out and "h1.pub.pem" in out
    assert "--auth-supernode-private-key" in out and "coordinator.example.org:9092" in out
    assert "SHA256:" in out
    bad = CliRunner().invoke(app, ["enroll", str(tmp_path / "s"), "--hospital-id", "a b"])
    assert bad.exit_code == 2


def test_a_public_key_of_another_node_is_refused(tmp_path):
    mine, other = enroll(tmp_path / "mine", "h1"), enroll(tmp_path / "other", "h2")
    mine.supernode_public_key.write_bytes(other.supernode_public_key.read_bytes())
    with pytest.raises(EnrollError, match="not the public key"):
        enroll(tmp_path / "mine", "h1")
