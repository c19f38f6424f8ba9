"""The hospital's privacy ledger: a signed, hash-chained, write-ahead log of every DP release.

One JSON object per line in `<state-dir>/ledger.jsonl`. Each entry records one DP
mechanism the node ran on its images (a round of discriminator training, a noised
statistic for evaluation) with everything needed to recompute its privacy cost:

    mechanism         "subsampled-gaussian" (DP-SGD: Poisson rate q, `steps` compositions)
                      or "gaussian" (one release, q = 1, steps = 1)
    noise_multiplier  sigma (noise std / sensitivity)
    sample_rate       q
    steps             number of compositions
    max_grad_norm     clipping bound C (the sensitivity)
    dataset_size      n as the hospital declares it (public)
    epsilon, delta    cumulative over *all* entries of this ledger, RDP accountant
    weights_sha256    digest of the update sent with it (`shared.weights.digest`), or of
                      the statistic released
    prev_hash         `hash` of the previous entry ("" for the first): the hash chain
    hash              SHA-256 of the canonical JSON of the entry without hash/signature
    signature         Ed25519 signature of `hash` by the hospital's ledger key

Write-ahead: an entry is appended, flushed and fsync'ed *before* the update leaves
the node. Spend is counted as soon as it is logged, so a crash between logging and
sending can never let the node spend the same budget twice.

The private key is created at enrolment (`ensure_keys`, or the first time the node
trains) as `<state-dir>/keys/ledger-ed25519.pem` with mode 0600; the public key next
to it is what an auditor uses (`fedsynth audit`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

LEDGER_FILE = "ledger.jsonl"
PRIVATE_KEY = Path("keys") / "ledger-ed25519.pem"
PUBLIC_KEY = Path("keys") / "ledger-ed25519.pub.pem"
NOISE_SECRET = Path("keys") / "noise-seed"
MECHANISMS = ("subsampled-gaussian", "gaussian")
VERSION = 1
RDP_ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)


class LedgerError(ValueError):
    """The ledger is unreadable, broken or tampered with; the message names file and line."""


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k not in ("hash", "signature")}
    return hashlib.sha256(canonical(body)).hexdigest()


# --------------------------------------------------------------------------- keys

def ensure_keys(state_dir: Path) -> Ed25519PublicKey:
    """Create the node's Ed25519 ledger key pair if it does not exist; return the public key."""
    state_dir = Path(state_dir)
    private_path, public_path = state_dir / PRIVATE_KEY, state_dir / PUBLIC_KEY
    if private_path.exists():
        return load_private_key(private_path).public_key()
    # A lost key is not replaced where something was signed with it: a new key would leave
    # the ledger unverifiable and overwrite the public key the auditor holds.
    for signed in (state_dir / LEDGER_FILE, public_path):
        if signed.exists():
            raise LedgerError(f"{private_path}: the ledger signing key is missing but {signed} "
                              "exists; restore the key file from the node's backup")
    private_path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(private_path.parent, 0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key.public_key()


def node_seed(state_dir: Path, *parts: object) -> int:
    """A 63-bit seed for this node's DP randomness (Poisson sampling, noise, augmentation).

    DP noise drawn from a seed anyone can read (the run config's `seed` is public) could
    be subtracted again. So the node mixes a secret of its own (32 random bytes made at
    enrolment, mode 0600, never sent) with the public parts (run id, round): the draws
    are unpredictable to everyone else, yet a resumed run redraws exactly the same.
    """
    path = Path(state_dir) / NOISE_SECRET
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    h = hashlib.sha256(path.read_bytes())
    h.update(canonical([str(p) for p in parts]))
    return int.from_bytes(h.digest()[:8], "big") >> 1


def load_private_key(path: Path) -> Ed25519PrivateKey:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise LedgerError(f"{path}: private key is readable by others (mode {mode:o}); "
                          "run: chmod 600 " + str(path))
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise LedgerError(f"{path}: not a readable PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(f"{path}: not an Ed25519 public key")
    return key


def public_key_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


# --------------------------------------------------------------------------- accounting

def history(entries: list[dict[str, Any]]) -> list[tuple[float, float, int]]:
    """The accountant history (sigma, q, steps) these entries spent, in order."""
    return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
            for e in entries]


@functools.lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one subsampled-Gaussian step at the accountant's orders (read-only, shared)."""
    rdp = rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier,
                                   steps=1, orders=RDP_ORDERS)
    rdp.flags.writeable = False
    return rdp


def rdp_epsilon(hist: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a history under the RDP accountant, exactly as Opacus' RDPAccountant.

    RDP composes by addition, so the per-step RDP curve of each distinct (sigma, q) is
    computed once and scaled by its step count (what `RDPAccountant.get_epsilon` computes
    entry by entry; a test checks they agree).
    """
    if not hist:
        return 0.0
    total = np.zeros(len(RDP_ORDERS))
    for sigma, q, steps in hist:
        total += _rdp_per_step(float(sigma), float(q)) * int(steps)
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=total, delta=delta)
    return float(eps)


# --------------------------------------------------------------------------- reading

def read_entries(path: Path) -> list[dict[str, Any]]:
    """Parse a ledger file; raises LedgerError naming the file and line of any bad line."""
    path = Path(path)
    if not path.exists():
        return []
    entries = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                raise LedgerError(f"{path}:{number}: truncated entry (no newline): "
                                  "the node stopped while writing it; it was never sent")
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError as e:
                raise LedgerError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(entry, dict):
                raise LedgerError(f"{path}:{number}: not a JSON object")
            entries.append(entry)
    return entries


@dataclass(frozen=True)
class Problem:
    where: str     # "hospital-0 round 3" or "file:line"
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


REQUIRED = ("version", "hospital_id", "run_id", "round", "mechanism", "noise_multiplier",
            "sample_rate", "steps", "max_grad_norm", "dataset_size", "epsilon", "delta",
            "weights_sha256", "prev_hash", "hash", "signature")


def verify_chain(entries: list[dict[str, Any]], public_key: Ed25519PublicKey,
                 label: str = "ledger") -> list[Problem]:
    """Check fields, hashes, the chain and every signature; return every problem found."""
    problems: list[Problem] = []
    prev = ""
    for i, e in enumerate(entries, start=1):
        where = f"{label} entry {i} (round {e.get('round', '?')})"
        missing = [k for k in REQUIRED if k not in e]
        if missing:
            problems.append(Problem(where, f"missing fields {missing}"))
            continue
        if e["mechanism"] not in MECHANISMS:
            problems.append(Problem(where, f"unknown mechanism {e['mechanism']!r}"))
        if e["hash"] != entry_hash(e):
            problems.append(Problem(where, "hash does not match the entry's contents "
                                           "(entry altered after signing)"))
        if e["prev_hash"] != prev:
            problems.append(Problem(where, "prev_hash does not match the previous entry "
                                           "(entry removed, inserted or reordered)"))
        try:
            public_key.verify(bytes.fromhex(e["signature"]), e["hash"].encode())
        except (InvalidSignature, ValueError):
            problems.append(Problem(where, "signature is not valid for this hospital's key"))
        prev = e["hash"]
    return problems


# --------------------------------------------------------------------------- the ledger

class Ledger:
    """A node's ledger: read its spend, check a planned spend, append signed entries."""

    def __init__(self, state_dir: Path, hospital_id: str):
        self.state_dir = Path(state_dir)
        self.hospital_id = hospital_id
        self.path = self.state_dir / LEDGER_FILE
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ensure_keys(self.state_dir)
        self._key = load_private_key(self.state_dir / PRIVATE_KEY)
        self.entries = read_entries(self.path)
        problems = verify_chain(self.entries, self._key.public_key(), str(self.path))
        if problems:
            raise LedgerError(f"{problems[0]}; the node will not train on a broken ledger")

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def history(self) -> list[tuple[float, float, int]]:
        return history(self.entries)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far (all entries, all runs), RDP accountant."""
        return rdp_epsilon(self.history(), delta)

    def epsilon_after(self, planned: list[tuple[float, float, int]], delta: float) -> float:
        """Epsilon this node would have spent after also running `planned`."""
        return rdp_epsilon(self.history() + list(planned), delta)

    def rounds(self, run_id: str) -> set[int]:
        return {int(e["round"]) for e in self.entries if e["run_id"] == run_id}

    def append(self, *, run_id: str, round: int, mechanism: str, purpose: str,
               noise_multiplier: float, sample_rate: float, steps: int,
               max_grad_norm: float, dataset_size: int, delta: float,
               budget_epsilon: float, weights_sha256: str) -> dict[str, Any]:
        """Account, sign and durably log one mechanism; return the entry.

        Call this *before* sending what the mechanism produced.
        """
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown mechanism {mechanism!r}")
        hist = self.history() + [(float(noise_multiplier), float(sample_rate), int(steps))]
        entry: dict[str, Any] = {
            "version": VERSION,
            "hospital_id": self.hospital_id,
            "run_id": run_id,
            "round": int(round),
            "purpose": purpose,
            "mechanism": mechanism,
            "noise_multiplier": float(noise_multiplier),
            "sample_rate": float(sample_rate),
            "steps": int(steps),
            "max_grad_norm": float(max_grad_norm),
            "dataset_size": int(dataset_size),
            "accountant": "rdp",
            "epsilon": rdp_epsilon(hist, delta),
            "delta": float(delta),
            "budget_epsilon": float(budget_epsilon),
            "weights_sha256": weights_sha256,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "prev_hash": self.entries[-1]["hash"] if self.entries else "",
        }
        entry["hash"] = entry_hash(entry)
        entry["signature"] = self._key.sign(entry["hash"].encode()).hex()
        line = canonical(entry) + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.entries.append(entry)
        return entry
