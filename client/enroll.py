"""Enrol a hospital's node: the keys it needs before it may join the federation.

    <state-dir>/keys/supernode-ec          EC P-384 private key, OpenSSH format, 0600:
                                           flower-supernode --auth-supernode-private-key
    <state-dir>/keys/supernode-ec.pub      its public key, OpenSSH format: the coordinator
                                           registers it with `flwr supernode register`
    <state-dir>/keys/ledger-ed25519.pem    the ledger's signing key (client/ledger.py), 0600
    <state-dir>/keys/ledger-ed25519.pub.pem  what the auditor verifies the ledger with
    <state-dir>/keys/noise-seed            the node's secret for its DP randomness, 0600

Flower 1.42 reads the SuperNode key with `load_ssh_private_key` and wants an EC key on a
NIST curve; `flwr supernode register` reads the public key with `load_ssh_public_key`.
With `--enable-supernode-auth` the SuperLink refuses any SuperNode whose public key was
not registered. Enrolling again keeps existing keys (a new key would need registering
again): nothing is ever overwritten.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client import ledger

SUPERNODE_KEY = Path("keys") / "supernode-ec"
SUPERNODE_PUBLIC_KEY = Path("keys") / "supernode-ec.pub"
HOSPITAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class EnrollError(ValueError):
    """Enrolment cannot proceed; the message names the file or value and the fix."""


@dataclass(frozen=True)
class Enrolment:
    hospital_id: str
    state_dir: Path
    supernode_key: Path
    supernode_public_key: Path
    ledger_public_key: Path
    created: bool            # False: the node was already enrolled, its keys are kept

    @property
    def fingerprint(self) -> str:
        return ssh_fingerprint(self.supernode_public_key.read_bytes())


def ssh_fingerprint(openssh_public_key: bytes) -> str:
    """OpenSSH-style `SHA256:...` fingerprint of an OpenSSH public key line."""
    blob = base64.b64decode(openssh_public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _check_private_mode(path: Path) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise EnrollError(f"{path}: private key is readable by others (mode {mode:o}); "
                          f"run: chmod 600 {path}")


def ensure_supernode_key(state_dir: Path, hospital_id: str) -> tuple[Path, Path, bool]:
    """Create the SuperNode's EC P-384 key pair if absent; return (private, public, created)."""
    private_path, public_path = state_dir / SUPERNODE_KEY, state_dir / SUPERNODE_PUBLIC_KEY
    if private_path.exists():
        _check_private_mode(private_path)
        try:
            key = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise EnrollError(f"{private_path}: not an OpenSSH private key ({e}); move it "
                              "away to enrol with a new key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise EnrollError(f"{private_path}: not an EC key, which Flower requires; move it "
                              "away to enrol with a new key")
        if not public_path.exists():
            public_path.write_bytes(_public_line(key, hospital_id))
        elif public_path.read_bytes().split()[:2] != _public_line(key, hospital_id).split()[:2]:
            raise EnrollError(f"{public_path} is not the public key of {private_path}; delete "
                              "it and enrol again to write the right one")
        return private_path, public_path, False
    private_path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(private_path.parent, 0o700)
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(_public_line(key, hospital_id))
    return private_path, public_path, True


def _public_line(key: ec.EllipticCurvePrivateKey, hospital_id: str) -> bytes:
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH)
    return line + f" fedsynth:{hospital_id}\n".encode()


def enroll(state_dir: Path, hospital_id: str) -> Enrolment:
    """Create (or find) every key of this node in `state_dir`; never overwrite one."""
    if not HOSPITAL_ID.match(hospital_id):
        raise EnrollError(f"--hospital-id {hospital_id!r}: use letters, digits, '.', '_' or '-' "
                          "(at most 64), the same as hospital-id in the node config")
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path, created = ensure_supernode_key(state_dir, hospital_id)
    try:
        ledger.ensure_keys(state_dir)
        ledger.load_private_key(state_dir / ledger.PRIVATE_KEY)   # checks its mode
    except ledger.LedgerError as e:
        raise EnrollError(str(e)) from None
    # The secret behind the node's DP randomness is made at enrolment (README, Privacy).
    ledger.node_seed(state_dir)
    return Enrolment(hospital_id, state_dir, private_path, public_path,
                     state_dir / ledger.PUBLIC_KEY, created)


def enroll_command(
    state_dir: Annotated[Path, typer.Argument(
        help="The node's state directory (state-dir in its --node-config).")],
    hospital_id: Annotated[str, typer.Option(
        help="The hospital's name, as hospital-id in its --node-config.")],
    superlink: Annotated[Optional[str], typer.Option(
        help="The coordinator's SuperLink host:port, to print the full SuperNode command.")] = None,
) -> None:
    """Hospital: create this node's SuperNode key and ledger key; print what to send whom.

    The coordinator registers the SuperNode public key (`flwr supernode register`); the
    auditor gets the ledger public key. Private keys stay in STATE_DIR/keys (mode 0600).
    Running it again keeps the existing keys.
    """
    try:
        e = enroll(state_dir, hospital_id)
    except EnrollError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    typer.echo(f"{e.hospital_id}: {'enrolled' if e.created else 'already enrolled, keys kept'} "
               f"in {e.state_dir}")
    typer.echo(f"  SuperNode private key (stays here, mode 0600): {e.supernode_key}")
    typer.echo("send to the coordinator (public), who registers it with "
               f"`flwr supernode register <file> <connection> --name {e.hospital_id}`:")
    typer.echo(f"  {e.supernode_public_key}")
    typer.echo(f"  {e.supernode_public_key.read_text().strip()}")
    typer.echo(f"  fingerprint {e.fingerprint} (read it out to the coordinator, who checks "
               "it with `ssh-keygen -lf <file>`)")
    typer.echo(f"send to the auditor (public), as {e.hospital_id}.pub.pem:")
    typer.echo(f"  {e.ledger_public_key}")
    address = superlink or "<coordinator-host>:<port>"
    typer.echo("then start the SuperNode:\n"
               f"  flower-supernode --superlink {address} --root-certificates <ca.crt> "
               f"--auth-supernode-private-key {e.supernode_key} \\\n"
               f"    --node-config \"hospital-id='{e.hospital_id}' data-path='<data>' "
               f"state-dir='{e.state_dir}' epsilon=<budget> delta=<delta>\"")
