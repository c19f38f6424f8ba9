"""`fedsynth audit`: check the hospitals' privacy ledgers without trusting the server.

    for each hospital (release/ledger/<hospital>.jsonl, key <keys>/<hospital>.pub.pem):
        read every line                           truncated or not JSON    -> failure
        fields, types, mechanism names            missing or unknown       -> failure
        hash = SHA-256 of the canonical entry     a number edited          -> failure
        Ed25519 signature of the hash             wrong key, swapped       -> failure
        prev_hash = the previous entry's hash     removed, inserted, reordered -> failure
        run id = the release's; a training entry's weights_sha256 = the digest the
        server recorded for that hospital and round (updates.json), and every recorded
        update has an entry (DP statistics count against the budget but are no update);
        for a model whose generators read patient images (release.json's config: cyclegan)
        an entry of each of its mechanisms (train-discriminator, train-generator)
        epsilon recomputed from (noise_multiplier, sample_rate, steps) of every entry
        so far, in order:
            Opacus RDP   must equal the claimed epsilon (relative 1e-6)
            Opacus PRV   reported beside it (numerical, usually tighter)
        claimed and recomputed epsilon <= the hospital's budget; delta <= 1/n
    one row per hospital; exit code 1 if anything failed, each failure named
    (hospital, entry, round, what); 2 if the input cannot be read at all.

The ledger format (canonical JSON, hash, signature) is re-implemented here from its
specification in client/ledger.py instead of calling the node's code, so that a bug
on the node cannot vouch for itself. Keys should come from the hospitals: the copies
in a release were handed over by the server, the party being audited.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

MECHANISMS = ("subsampled-gaussian", "gaussian")
NUMBERS = ("noise_multiplier", "sample_rate", "max_grad_norm", "epsilon", "delta",
           "budget_epsilon")
INTEGERS = ("round", "steps", "dataset_size")
STRINGS = ("hospital_id", "run_id", "mechanism", "weights_sha256", "prev_hash", "hash",
           "signature")
REQUIRED = ("version",) + STRINGS + NUMBERS + INTEGERS
EPSILON_RTOL = 1e-6
TRAIN_PURPOSE = "train-discriminator"          # client/train.py PURPOSE_DISCRIMINATOR
# every mechanism whose output is the round's model update (client/train.py: the
# generator's own mechanism where the family's generator reads patient images)
TRAIN_PURPOSES = (TRAIN_PURPOSE, "train-generator")
NODE_LEDGER = "ledger.jsonl"
NODE_PUBLIC_KEY = Path("keys") / "ledger-ed25519.pub.pem"


class AuditInputError(ValueError):
    """The input cannot be audited at all (no such release, no key); exit code 2."""


@dataclass(frozen=True)
class Failure:
    """One failed check. `entry` is the 1-based line of the ledger file (None: whole ledger)."""

    hospital: str
    what: str
    entry: int | None = None
    round: int | None = None
    file: str = ""

    def __str__(self) -> str:
        where = self.hospital
        if self.entry is not None:
            where += f" entry {self.entry}"
        if self.round is not None:
            where += f" (round {self.round})"
        line = f" ({self.file}:{self.entry})" if self.file and self.entry else ""
        return f"{where}: {self.what}{line}"


@dataclass
class HospitalAudit:
    """One row of the table: what the hospital's ledger claims and what was recomputed."""

    hospital: str
    ledger: str
    key: str
    entries: int = 0
    rounds: list[int] = field(default_factory=list)
    steps: int = 0
    noise_multipliers: list[float] = field(default_factory=list)
    sample_rates: list[float] = field(default_factory=list)
    delta: float | None = None
    claimed_epsilon: float | None = None
    rdp_epsilon: float | None = None
    prv_epsilon: float | None = None
    prv_note: str = ""
    budget_epsilon: float | None = None
    failures: list[Failure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, what: str, entry: int | None = None, round: int | None = None) -> None:
        self.failures.append(Failure(self.hospital, what, entry, round, self.ledger))


@dataclass
class AuditReport:
    source: str
    kind: str                                   # "release" or "ledger"
    run_id: str | None = None
    keys: str = ""
    warnings: list[str] = field(default_factory=list)
    hospitals: list[HospitalAudit] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)   # not tied to one ledger entry

    @property
    def all_failures(self) -> list[Failure]:
        return self.failures + [f for h in self.hospitals for f in h.failures]

    @property
    def ok(self) -> bool:
        return not self.all_failures

    def guarantee(self) -> dict[str, float | None]:
        """The federation's (epsilon, delta): the worst hospital, RDP recomputed."""
        eps = [h.rdp_epsilon for h in self.hospitals if h.rdp_epsilon is not None]
        deltas = [h.delta for h in self.hospitals if h.delta is not None]
        return {"epsilon": max(eps) if eps else None, "delta": max(deltas) if deltas else None}

    def to_json(self) -> dict[str, Any]:
        hospitals = []
        for h in self.hospitals:
            row = asdict(h)
            row["ok"] = h.ok
            row["failures"] = [asdict(f) | {"message": str(f)} for f in h.failures]
            hospitals.append(row)
        return {
            "ok": self.ok,
            "source": self.source,
            "kind": self.kind,
            "run_id": self.run_id,
            "keys": self.keys,
            "warnings": self.warnings,
            "hospitals": hospitals,
            "failures": [asdict(f) | {"message": str(f)} for f in self.all_failures],
            "guarantee": self.guarantee(),
        }


# --------------------------------------------------------------------------- the format

def canonical(obj: Any) -> bytes:
    """The bytes an entry's hash covers: sorted keys, no spaces, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k not in ("hash", "signature")}
    return hashlib.sha256(canonical(body)).hexdigest()


def read_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as e:
        raise AuditInputError(f"{path}: cannot read the public key ({e.strerror})") from None
    except ValueError as e:
        raise AuditInputError(f"{path}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditInputError(f"{path}: not an Ed25519 public key")
    return key


def read_lines(path: Path) -> tuple[list[dict[str, Any]], tuple[int, str] | None]:
    """Every entry up to the first unreadable line, and (line, what) for that line."""
    entries: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                return entries, (number, "truncated line (no newline at the end): a partial "
                                         "write; nothing after it is checked")
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError as e:
                return entries, (number, f"not valid JSON ({e.msg}); lines after it were "
                                         "not checked")
            if not isinstance(entry, dict):
                return entries, (number, "not a JSON object; lines after it were not checked")
            entries.append(entry)
    return entries, None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def field_problems(e: dict[str, Any]) -> list[str]:
    """Missing fields, wrong types, values outside their domain, unknown mechanisms."""
    missing = [k for k in REQUIRED if k not in e]
    if missing:
        return [f"missing fields {', '.join(missing)}"]
    out = [f"{k} = {e[k]!r} is not a string" for k in STRINGS if not isinstance(e[k], str)]
    out += [f"{k} = {e[k]!r} is not a finite number" for k in NUMBERS if not _is_number(e[k])]
    out += [f"{k} = {e[k]!r} is not an integer" for k in INTEGERS
            if not isinstance(e[k], int) or isinstance(e[k], bool)]
    if out:
        return out
    if e["mechanism"] not in MECHANISMS:
        out.append(f"unknown mechanism {e['mechanism']!r} (known: {', '.join(MECHANISMS)})")
    if e["mechanism"] == "gaussian" and (e["sample_rate"] != 1.0 or e["steps"] != 1):
        out.append("a 'gaussian' release must have sample_rate 1 and steps 1")
    if not e["noise_multiplier"] > 0:
        out.append(f"noise_multiplier = {e['noise_multiplier']}: must be > 0")
    if not 0 < e["sample_rate"] <= 1:
        out.append(f"sample_rate = {e['sample_rate']}: must be in (0, 1]")
    if e["steps"] < 1:
        out.append(f"steps = {e['steps']}: must be >= 1")
    if e["dataset_size"] < 1:
        out.append(f"dataset_size = {e['dataset_size']}: must be >= 1")
    if not 0 < e["delta"] < 1:
        out.append(f"delta = {e['delta']}: must be in (0, 1)")
    if e.get("accountant", "rdp") != "rdp":
        out.append(f"accountant = {e['accountant']!r}: this tool recomputes 'rdp' claims")
    return out


def is_training_update(e: dict[str, Any]) -> bool:
    """A round's model update (checked against updates.json), not a DP statistic.

    Other releases (e.g. "gaussian" evaluation statistics) count against the same
    budget and are checked like every entry, but the server records no update for them.
    """
    default = TRAIN_PURPOSE if e.get("mechanism") == "subsampled-gaussian" else ""
    return e.get("purpose", default) in TRAIN_PURPOSES


# --------------------------------------------------------------------------- accountants

def accountant_history(entries: list[dict[str, Any]]) -> list[tuple[float, float, int]]:
    """(sigma, q, steps) per entry, in ledger order: what the accountants compose."""
    return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
            for e in entries]


class RDPComposition:
    """Opacus' RDP accountant, composed one entry at a time.

    `RDPAccountant.get_epsilon` recomputes every (sigma, q) term from scratch (about 0.25 s
    each: the fractional orders are series); here each distinct (sigma, q) is computed
    once and the entries are summed in order -- the same arithmetic in the same order,
    so the epsilon is bit for bit what `RDPAccountant` with this history returns.
    """

    def __init__(self) -> None:
        self.rdp: Any = 0

    def add(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        self.rdp = self.rdp + _rdp_per_step(noise_multiplier, sample_rate) * steps

    def epsilon(self, delta: float) -> float:
        from opacus.accountants.analysis import rdp as analysis

        if isinstance(self.rdp, int):
            return 0.0
        eps, _ = analysis.get_privacy_spent(orders=_orders(), rdp=self.rdp, delta=delta)
        return float(eps)


@functools.lru_cache(maxsize=1)
def _orders() -> list[float]:
    from opacus.accountants import RDPAccountant  # slow import: only when auditing

    return list(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one step at every order (read-only: it is shared between ledgers)."""
    from opacus.accountants.analysis import rdp as analysis

    rdp = analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                               orders=_orders())
    rdp.flags.writeable = False
    return rdp


def rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a history of (sigma, q, steps) under Opacus' RDP accountant."""
    composition = RDPComposition()
    for sigma, q, steps in history:
        composition.add(sigma, q, steps)
    return composition.epsilon(delta)


def prv_epsilon(history: list[tuple[float, float, int]], delta: float) -> tuple[float | None, str]:
    """Epsilon under Opacus' PRV accountant (an upper bound, eps_error 0.01), or (None, why).

    Consecutive entries with the same (sigma, q) are one self-composition: the same
    privacy loss, computed with one FFT instead of a tree of convolutions. A 'gaussian'
    entry is q = 1, where PRV's subsampled-Gaussian PRV is exactly the Gaussian one
    (numpy warns about log(1 - q) = log 0, which the formula then masks out).
    """
    merged: list[tuple[float, float, int]] = []
    for sigma, q, steps in history:
        if merged and merged[-1][:2] == (sigma, q):
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        else:
            merged.append((sigma, q, steps))
    return _prv_epsilon(tuple(merged), delta) if merged else (0.0, "")


@functools.lru_cache(maxsize=64)
def _prv_epsilon(history: tuple[tuple[float, float, int], ...],
                 delta: float) -> tuple[float | None, str]:
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = list(history)
    try:
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(accountant.get_epsilon(delta)), ""
    except Exception as e:  # noqa: BLE001 -- numerical failures of PRV are reported, not fatal
        return None, f"PRV could not compute epsilon: {type(e).__name__}: {e}"


# --------------------------------------------------------------------------- one ledger

def required_purposes(model: Any) -> tuple[str, ...]:
    """The mechanisms a round's update must be charged for, by the release's model family:
    where the generator reads patient images (CycleGAN), its own mechanism too."""
    from shared.models import FAMILIES, family

    if isinstance(model, str) and model in FAMILIES and family(model).generator_mechanism:
        return TRAIN_PURPOSES
    return (TRAIN_PURPOSE,)


def audit_ledger_entries(audit: HospitalAudit, entries: list[dict[str, Any]],
                         key: Ed25519PublicKey | None, run_id: str | None = None,
                         recorded: dict[int, str] | None = None,
                         required: tuple[str, ...] = (TRAIN_PURPOSE,)) -> None:
    """All checks on one hospital's entries; fills `audit` in place.

    run_id/recorded: in a release, the run's id and the digest the server recorded for
    this hospital per round (None when auditing a node's own ledger). required: the
    purposes every recorded update must have an entry of (`required_purposes`).
    """
    prev = ""
    composition = RDPComposition()
    purposes: dict[int, set[str]] = {}
    seen_rounds: set[int] = set()
    digests: dict[int, set[str]] = {}
    valid: list[dict[str, Any]] = []
    for i, e in enumerate(entries, start=1):
        rnd = e.get("round") if isinstance(e.get("round"), int) else None
        problems = field_problems(e)
        if problems:
            for p in problems:
                audit.fail(p, i, rnd)
            if rnd is not None and is_training_update(e) and e.get("run_id") == run_id:
                seen_rounds.add(rnd)     # the entry exists; what is wrong with it is named
                digests.setdefault(rnd, set()).add(str(e.get("weights_sha256")))
                purposes.setdefault(rnd, set()).add(str(e.get("purpose", TRAIN_PURPOSE)))
            # A broken entry still links the chain if it carries a hash.
            prev = e.get("hash", prev) if isinstance(e.get("hash"), str) else prev
            continue
        try:
            recomputed_hash = entry_hash(e)
        except ValueError as err:
            audit.fail(f"cannot be hashed ({err})", i, rnd)
            recomputed_hash = ""
        if e["hash"] != recomputed_hash:
            audit.fail("hash does not match the entry's contents (altered after signing)",
                       i, rnd)
        if key is not None:
            try:
                key.verify(bytes.fromhex(e["signature"]), e["hash"].encode())
            except (InvalidSignature, ValueError):
                audit.fail("signature is not valid for this hospital's public key", i, rnd)
        if e["prev_hash"] != prev and i == 1:
            audit.fail("the first entry follows one that is not in this file (prev_hash is "
                       "not empty): spend logged before it is not shown, so its epsilon "
                       "cannot be recomputed from here; audit the hospital's own "
                       "ledger.jsonl", i, rnd)
        elif e["prev_hash"] != prev:
            audit.fail("prev_hash does not match the entry before it: an entry was removed, "
                       "inserted or reordered here" + (
                           " (or the hospital logged spend it never sent: audit its own "
                           "ledger.jsonl)" if recorded is not None else ""), i, rnd)
        prev = e["hash"]
        if e["hospital_id"] != audit.hospital:
            audit.fail(f"hospital_id is {e['hospital_id']!r}, not {audit.hospital!r}", i, rnd)
        if e["delta"] > 1.0 / e["dataset_size"]:
            audit.fail(f"delta {e['delta']:.3g} exceeds 1/dataset_size = "
                       f"{1.0 / e['dataset_size']:.3g}", i, rnd)

        if run_id is not None and e["run_id"] == run_id and recorded is not None \
                and is_training_update(e):
            # Several entries may name one round (a round re-sent after a crash: each was
            # spent) and some rounds may have no recorded update (abandoned, lost, or
            # refused): all of it counts in epsilon. What must hold is that every update
            # the server recorded is one of the entries (checked after the loop).
            digests.setdefault(rnd, set()).add(e["weights_sha256"])
            seen_rounds.add(rnd)
            if recorded.get(rnd) == e["weights_sha256"]:
                purposes.setdefault(rnd, set()).add(str(e.get("purpose", TRAIN_PURPOSE)))

        # Epsilon: the composition of every entry so far, as the node accounted it.
        composition.add(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
        recomputed = composition.epsilon(float(e["delta"]))
        claimed = float(e["epsilon"])
        if not math.isclose(claimed, recomputed, rel_tol=EPSILON_RTOL, abs_tol=1e-12):
            audit.fail(f"claimed epsilon {claimed:.6g} but the RDP accountant gives "
                       f"{recomputed:.6g} for the entries up to here", i, rnd)
        budget = float(e["budget_epsilon"])
        if max(claimed, recomputed) > budget:
            audit.fail(f"epsilon {max(claimed, recomputed):.6g} exceeds the hospital's budget "
                       f"{budget:g}", i, rnd)
        valid.append(e)

    if recorded is not None:
        for rnd in sorted(set(recorded) - seen_rounds):
            audit.fail("the server recorded an update from this hospital but the ledger has "
                       "no entry for it", None, rnd)
        for rnd in sorted(set(recorded) & seen_rounds):
            if recorded[rnd] not in digests.get(rnd, set()):
                audit.fail(f"the update the server recorded ({recorded[rnd][:12]}...) matches "
                           "the weights_sha256 of no ledger entry of this round", None, rnd)
                continue
            for purpose in required:
                if purpose not in purposes.get(rnd, set()):
                    audit.fail(f"the update the server recorded has no {purpose!r} entry: "
                               "every private mechanism behind it must be charged (this "
                               "model's generators read patient images)", None, rnd)

    audit.entries = len(entries)
    if not valid:
        return
    last = valid[-1]
    ours = [e for e in valid if is_training_update(e)
            and (run_id is None or e["run_id"] == run_id)]
    audit.rounds = sorted({int(e["round"]) for e in ours})
    audit.steps = sum(int(e["steps"]) for e in valid)
    audit.noise_multipliers = sorted({float(e["noise_multiplier"]) for e in valid})
    audit.sample_rates = sorted({float(e["sample_rate"]) for e in valid})
    audit.delta = float(last["delta"])
    claimed = entries[-1].get("epsilon")          # the last line, valid or not
    audit.claimed_epsilon = float(claimed if _is_number(claimed) else last["epsilon"])
    audit.budget_epsilon = float(last["budget_epsilon"])
    audit.rdp_epsilon = composition.epsilon(audit.delta)
    audit.prv_epsilon, audit.prv_note = prv_epsilon(accountant_history(valid), audit.delta)
    if len(valid) < len(entries):
        audit.prv_note = (audit.prv_note + "; " if audit.prv_note else "") + \
            f"recomputed from the {len(valid)} readable entries of {len(entries)}"


# --------------------------------------------------------------------------- inputs

def _load_json(path: Path, report: AuditReport, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        report.failures.append(Failure("release", f"{path.name} is missing: {what}"))
    except (OSError, json.JSONDecodeError) as e:
        report.failures.append(Failure("release", f"{path}: unreadable ({e})"))
    return None


def recorded_updates(updates: Any, report: AuditReport) -> dict[str, dict[int, str]]:
    """updates.json [{round, received: {hospital: sha256}}] -> hospital -> round -> sha256."""
    out: dict[str, dict[int, str]] = {}
    if not isinstance(updates, list):
        if updates is not None:
            report.failures.append(Failure("release", "updates.json is not a list of rounds"))
        return out
    for item in updates:
        try:
            rnd, received = int(item["round"]), dict(item["received"])
        except (KeyError, TypeError, ValueError):
            report.failures.append(Failure("release", f"updates.json: malformed round {item!r}"))
            continue
        for hospital, digest in received.items():
            out.setdefault(hospital, {})[rnd] = str(digest)
    return out


def audit_release(release: Path, keys: Path | None = None) -> AuditReport:
    """Audit a release directory; keys: a folder of <hospital>.pub.pem from the hospitals."""
    release = Path(release)
    if not (release / "release.json").is_file():
        raise AuditInputError(f"{release}: no release.json (not a release directory)")
    if not (release / "ledger").is_dir():
        raise AuditInputError(f"{release}: no ledger/ folder (a release without ledgers "
                              "cannot be audited)")
    report = AuditReport(source=str(release), kind="release")
    if keys is None:
        keys = release / "keys"
        report.warnings.append(
            f"using the public keys in {keys}, which came from the server (the party being "
            "audited); obtain each hospital's key from the hospital itself "
            "(<state-dir>/keys/ledger-ed25519.pub.pem) and pass --keys DIR")
    elif not Path(keys).is_dir():
        raise AuditInputError(f"--keys {keys}: not a directory of <hospital>.pub.pem files")
    report.keys = str(keys)

    meta = _load_json(release / "release.json", report, "the release's run id and claims")
    meta = meta if isinstance(meta, dict) else {}
    report.run_id = meta.get("run_id")
    updates = recorded_updates(
        _load_json(release / "updates.json", report, "the digests of the updates received"),
        report)

    ledgers = {p.stem: p for p in sorted((release / "ledger").glob("*.jsonl"))}
    listed = meta.get("hospitals")
    if isinstance(listed, list):
        for hospital in sorted(set(listed) - set(ledgers)):
            report.failures.append(Failure(hospital, f"listed in release.json but "
                                                     f"ledger/{hospital}.jsonl is missing"))
    for hospital in sorted(set(updates) - set(ledgers)):
        report.failures.append(Failure(hospital, "the server recorded updates from it but "
                                                 f"ledger/{hospital}.jsonl is missing"))
    for hospital, path in ledgers.items():
        audit = HospitalAudit(hospital, str(path), str(Path(keys) / f"{hospital}.pub.pem"))
        report.hospitals.append(audit)
        key = _hospital_key(audit)
        entries, unreadable = read_lines(path)
        if unreadable:
            audit.fail(unreadable[1], unreadable[0])
        audit_ledger_entries(audit, entries, key, run_id=report.run_id or "",
                             recorded=updates.get(hospital, {}),
                             required=required_purposes((meta.get("config") or {}).get("model")))
        _check_release_claims(audit, meta)
    said = (meta.get("privacy") or {}).get("max_epsilon")
    worst = report.guarantee()["epsilon"]
    if worst is not None and (not _is_number(said) or said < worst * (1 - EPSILON_RTOL)):
        report.failures.append(Failure("release", f"release.json states max_epsilon {said!r}, "
                                                  f"below the recomputed {worst:.6g}"))
    return report


def _hospital_key(audit: HospitalAudit) -> Ed25519PublicKey | None:
    try:
        return read_public_key(Path(audit.key))
    except AuditInputError as e:
        audit.fail(f"no usable public key: {e}; signatures not checked")
        return None


def _check_release_claims(audit: HospitalAudit, meta: dict[str, Any]) -> None:
    """release.json's per-hospital epsilon must be what the hospital's ledger claims."""
    per = (meta.get("privacy") or {}).get("per_hospital") or {}
    claim = per.get(audit.hospital)
    if claim is None or audit.claimed_epsilon is None:
        if claim is None and audit.entries:
            audit.fail("release.json reports no privacy figures for this hospital")
        return
    said = claim.get("epsilon")
    if not _is_number(said) or not math.isclose(said, audit.claimed_epsilon,
                                                  rel_tol=EPSILON_RTOL):
        audit.fail(f"release.json says epsilon {said!r}, the ledger's last entry "
                   f"{audit.claimed_epsilon:.6g}")


def audit_ledger(path: Path, key: Path | None = None) -> AuditReport:
    """Audit one ledger file (a node's <state-dir>/ledger.jsonl or a release's copy)."""
    path = Path(path)
    if path.is_dir():
        path = path / NODE_LEDGER
    if not path.is_file():
        raise AuditInputError(f"{path}: no such ledger file")
    report = AuditReport(source=str(path), kind="ledger")
    if key is None:
        node_key = path.parent / NODE_PUBLIC_KEY
        release_key = path.parent.parent / "keys" / f"{path.stem}.pub.pem"
        if node_key.is_file():
            key = node_key
            report.warnings.append(f"using {key}, found next to the ledger; an auditor "
                                   "should obtain the hospital's key independently (--key)")
        elif path.parent.name == "ledger" and release_key.is_file():
            key = release_key
            report.warnings.append(f"using {key}, which came from the server; obtain the "
                                   "hospital's key from the hospital itself (--key)")
        else:
            raise AuditInputError(f"{path}: no public key given; pass --key FILE (the "
                                  "hospital's keys/ledger-ed25519.pub.pem)")
    public_key = read_public_key(key)
    report.keys = str(key)
    entries, unreadable = read_lines(path)
    if path.parent.name == "ledger" and path.name != NODE_LEDGER:
        hospital = path.stem                        # a release's ledger/<hospital>.jsonl
    elif entries and isinstance(entries[0].get("hospital_id"), str):
        hospital = entries[0]["hospital_id"]
    else:
        hospital = path.stem
    audit = HospitalAudit(hospital, str(path), str(key))
    if unreadable:
        audit.fail(unreadable[1], unreadable[0])
    report.hospitals.append(audit)
    audit_ledger_entries(audit, entries, public_key)
    return report


# --------------------------------------------------------------------------- output

def _span(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(values[0], fmt)}..{format(values[-1], fmt)}"


def _eps(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def print_report(report: AuditReport) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # Rich assumes 80 columns when piped; a cut hospital name helps nobody.
    out = Console(width=None if sys.stdout.isatty() else 140)
    err = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
    for w in report.warnings:
        err.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False)
    table = Table(title=f"privacy audit of {report.source}"
                  + (f" (run {report.run_id})" if report.run_id else ""))
    for name in ("hospital", "rounds", "steps", "noise", "sample rate", "claimed eps",
                 "RDP eps", "PRV eps", "budget", "verdict"):
        table.add_column(name, justify="left" if name in ("hospital", "verdict") else "right")
    for h in report.hospitals:
        verdict = "[green]PASS[/green]" if h.ok else f"[red]FAIL ({len(h.failures)})[/red]"
        prv = _eps(h.prv_epsilon) if h.prv_epsilon is not None else (
            "n/a" if h.prv_note else "-")
        rounds = len(h.rounds) if report.kind == "release" else h.entries
        table.add_row(h.hospital, str(rounds), str(h.steps),
                      _span(h.noise_multipliers, ".4g"), _span(h.sample_rates, ".4g"),
                      _eps(h.claimed_epsilon), _eps(h.rdp_epsilon), prv,
                      "-" if h.budget_epsilon is None else f"{h.budget_epsilon:g}", verdict)
    out.print(table)
    for h in report.hospitals:
        if h.prv_note:
            out.print(f"note: {h.hospital}: {escape(h.prv_note)}", highlight=False)
    g = report.guarantee()
    if report.kind == "release" and g["epsilon"] is not None:
        out.print(f"federation: epsilon {g['epsilon']:.4f} (max over hospitals, RDP "
                  f"recomputed), delta {g['delta']:.3g}", highlight=False)
    for f in report.all_failures:
        err.print(f"[red]FAIL[/red] {escape(str(f))}", highlight=False, soft_wrap=True)
    if report.ok:
        out.print("[green]verified:[/green] every signature, the hash chains, the update "
                  "digests and every claimed epsilon check out", highlight=False)


def audit_command(
    path: Annotated[Path, typer.Argument(
        help="A release directory, a ledger .jsonl file, or a node's state directory.")],
    keys: Annotated[Optional[Path], typer.Option(
        help="Folder of <hospital>.pub.pem obtained from the hospitals "
             "(default: the release's keys/, which came from the server).")] = None,
    key: Annotated[Optional[Path], typer.Option(
        help="The hospital's public key, when PATH is one ledger file.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Verify the privacy ledgers of a release and recompute every hospital's epsilon.

    Checks every signature, the hash chains and the update digests, recomputes epsilon
    with two accountants (Opacus RDP and PRV) and checks it against the claims and the
    budgets. Exit code 0: verified; 1: a check failed (each failure is named); 2: the
    input cannot be read.
    """
    try:
        if path.is_dir() and (path / "release.json").exists():
            if key is not None:
                raise AuditInputError("--key is for one ledger file; for a release use --keys DIR")
            report = audit_release(path, keys)
        elif path.is_file() or (path.is_dir() and (path / NODE_LEDGER).exists()):
            if keys is not None and key is None:
                stem = path.stem if path.is_file() else None
                candidate = Path(keys) / f"{stem}.pub.pem" if stem else None
                if candidate is None or not candidate.is_file():
                    raise AuditInputError("for one ledger file pass --key FILE")
                key = candidate
            report = audit_ledger(path, key)
        else:
            raise AuditInputError(f"{path}: neither a release directory (release.json), a "
                                  "node state directory (ledger.jsonl) nor a ledger file")
    except AuditInputError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    if json_:
        typer.echo(json.dumps(report.to_json(), indent=1, sort_keys=True))
    else:
        print_report(report)
    raise typer.Exit(0 if report.ok else 1)
