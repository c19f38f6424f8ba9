"""`fedsynth audit` on releases built by hand from real signed ledgers: what passes, what is
caught and named, and the recomputed epsilon against independent computations."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant
from scipy.optimize import brentq
from scipy.stats import norm
from typer.testing import CliRunner

from client.ledger import PRIVATE_KEY, PUBLIC_KEY, Ledger, entry_hash, load_private_key
from shared.audit import audit_ledger, prv_epsilon, rdp_epsilon
from shared.cli import app

RUN = "run-0001"
SIGMA, Q, STEPS, N = 1.1, 0.25, 4, 64
DELTA = 1e-5
BUDGET = 10.0


def digest(hospital: str, rnd: int) -> str:
    return hashlib.sha256(f"{hospital} update {rnd}".encode()).hexdigest()


def node_ledger(state_dir: Path, hospital: str, rounds: int, run_id: str = RUN,
                budget: float = BUDGET, first_round: int = 1) -> Ledger:
    """A hospital's ledger with one DP-SGD entry per round, as client/app.py writes it."""
    ledger = Ledger(state_dir, hospital)
    for rnd in range(first_round, first_round + rounds):
        ledger.append(run_id=run_id, round=rnd, mechanism="subsampled-gaussian",
                      purpose="train-discriminator", noise_multiplier=SIGMA, sample_rate=Q,
                      steps=STEPS, max_grad_norm=1.0, dataset_size=N, delta=DELTA,
                      budget_epsilon=budget, weights_sha256=digest(hospital, rnd))
    return ledger


def write_release(root: Path, ledgers: dict[str, Ledger], run_id: str = RUN) -> Path:
    """A release directory laid out as server/release.py writes it (ledgers, keys, updates)."""
    release = root / "release"
    (release / "ledger").mkdir(parents=True)
    (release / "keys").mkdir()
    rounds: dict[int, dict[str, str]] = {}
    per = {}
    for hospital, ledger in ledgers.items():
        shutil.copy(ledger.path, release / "ledger" / f"{hospital}.jsonl")
        shutil.copy(ledger.state_dir / PUBLIC_KEY, release / "keys" / f"{hospital}.pub.pem")
        for e in ledger.entries:
            rounds.setdefault(e["round"], {})[hospital] = e["weights_sha256"]
        last = ledger.entries[-1]
        per[hospital] = {"epsilon": last["epsilon"], "delta": last["delta"],
                         "budget_epsilon": last["budget_epsilon"]}
    updates = [{"round": r, "received": rounds[r]} for r in sorted(rounds)]
    (release / "updates.json").write_text(json.dumps(updates))
    (release / "release.json").write_text(json.dumps({
        "run_id": run_id, "rounds": max(rounds), "hospitals": sorted(ledgers),
        "privacy": {"per_hospital": per, "max_epsilon": max(p["epsilon"] for p in per.values()),
                    "dropped_budget_exhausted": []}}))
    return release


@pytest.fixture(scope="module")
def signed(tmp_path_factory) -> Path:
    """Two hospitals' node state dirs and the release of their 3 rounds, built once."""
    root = tmp_path_factory.mktemp("signed")
    ledgers = {h: node_ledger(root / "nodes" / h, h, rounds=3)
               for h in ("hospital-0", "hospital-1")}
    write_release(root, ledgers)
    return root


@pytest.fixture
def release(signed: Path, tmp_path: Path) -> Path:
    """A fresh copy per test (tests tamper with it); tmp_path/nodes are the node dirs."""
    for name in ("nodes", "release"):
        shutil.copytree(signed / name, tmp_path / name)
    return tmp_path / "release"


def hospital_keys(tmp_path: Path) -> Path:
    """The keys as an auditor gets them from the hospitals (their state dirs)."""
    keys = tmp_path / "from-hospitals"
    keys.mkdir(exist_ok=True)
    for node in (tmp_path / "nodes").iterdir():
        shutil.copy(node / PUBLIC_KEY, keys / f"{node.name}.pub.pem")
    return keys


def cli(*args: str):
    return CliRunner().invoke(app, ["audit", *map(str, args)])


def audit_json(*args: str) -> tuple[int, dict]:
    result = cli(*args, "--json")
    return result.exit_code, json.loads(result.stdout)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_lines(path: Path, entries: list[dict]) -> None:
    path.write_text("".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n"
                            for e in entries))


def failures(report: dict, hospital: str) -> list[dict]:
    return [f for f in report["failures"] if f["hospital"] == hospital]


# --------------------------------------------------------------------------- valid

def test_valid_release_passes_and_rdp_recomputation_equals_the_claim(release, tmp_path):
    code, report = audit_json(release, "--keys", hospital_keys(tmp_path))
    assert code == 0, report["failures"]
    assert report["ok"] and report["warnings"] == []
    history = [(SIGMA, Q, STEPS)] * 3
    for row in report["hospitals"]:
        assert row["rounds"] == [1, 2, 3] and row["steps"] == 3 * STEPS
        assert row["rdp_epsilon"] == pytest.approx(row["claimed_epsilon"], rel=1e-9)
        # The claim against Opacus' RDP accountant driven step by step, as DP-SGD drives it.
        stepped = RDPAccountant()
        for _ in range(3 * STEPS):
            stepped.step(noise_multiplier=SIGMA, sample_rate=Q)
        assert row["claimed_epsilon"] == pytest.approx(stepped.get_epsilon(DELTA), rel=1e-6)
        # PRV is a tighter numerical accountant: below RDP, and not absurdly so.
        assert 0.7 * row["rdp_epsilon"] < row["prv_epsilon"] <= row["rdp_epsilon"] + 0.02
        assert row["rdp_epsilon"] == pytest.approx(rdp_epsilon(history, DELTA))
    assert report["guarantee"]["epsilon"] == pytest.approx(report["hospitals"][0]["rdp_epsilon"])


def test_table_output_and_warning_about_server_supplied_keys(release):
    result = cli(release)
    assert result.exit_code == 0, result.output
    assert "came from the server" in result.stderr
    for word in ("hospital-0", "hospital-1", "PASS", "RDP eps", "PRV eps", "verified"):
        assert word in result.stdout


def test_a_node_ledger_with_its_key(tmp_path):
    ledger = node_ledger(tmp_path / "node", "hospital-0", rounds=2)
    code, report = audit_json(ledger.path, "--key", ledger.state_dir / PUBLIC_KEY)
    assert code == 0 and report["kind"] == "ledger"
    assert report["hospitals"][0]["hospital"] == "hospital-0"
    # The state dir itself works too; its own key is used, with a warning.
    code, report = audit_json(ledger.state_dir)
    assert code == 0 and "found next to the ledger" in report["warnings"][0]


# --------------------------------------------------------------------------- tampering

def test_edited_epsilon_is_named(release):
    path = release / "ledger" / "hospital-1.jsonl"
    entries = lines(path)
    entries[1]["epsilon"] = entries[1]["epsilon"] / 2
    write_lines(path, entries)
    code, report = audit_json(release)
    assert code == 1
    named = failures(report, "hospital-1")
    assert {(f["entry"], f["round"]) for f in named} == {(2, 2)}
    whats = " | ".join(f["what"] for f in named)
    assert "hash does not match" in whats and "RDP accountant gives" in whats
    assert "hospital-1 entry 2 (round 2)" in named[0]["message"]
    assert failures(report, "hospital-0") == []


def test_edited_epsilon_with_recomputed_hash_fails_the_signature(release):
    path = release / "ledger" / "hospital-0.jsonl"
    entries = lines(path)
    entries[2]["epsilon"] = 0.5
    entries[2]["hash"] = entry_hash(entries[2])
    write_lines(path, entries)
    code, report = audit_json(release)
    whats = [f["what"] for f in failures(report, "hospital-0")]
    assert code == 1
    assert any("signature is not valid" in w for w in whats)
    assert any("claimed epsilon 0.5" in w for w in whats)


def test_deleted_middle_entry_breaks_the_chain(release):
    path = release / "ledger" / "hospital-0.jsonl"
    entries = lines(path)
    write_lines(path, [entries[0], entries[2]])
    code, report = audit_json(release)
    named = failures(report, "hospital-0")
    assert code == 1
    chain = [f for f in named if "prev_hash" in f["what"]]
    assert [(f["entry"], f["round"]) for f in chain] == [(2, 3)]
    # The server recorded round 2's update: its missing entry is named as well.
    assert any(f["round"] == 2 and "no entry" in f["what"] for f in named)


def test_reordered_entries_break_the_chain(release):
    path = release / "ledger" / "hospital-1.jsonl"
    e = lines(path)
    write_lines(path, [e[0], e[2], e[1]])
    code, report = audit_json(release)
    assert code == 1
    assert any("prev_hash" in f["what"] for f in failures(report, "hospital-1"))


def test_wrong_key_fails_every_signature(release, tmp_path):
    keys = hospital_keys(tmp_path)
    shutil.copy(keys / "hospital-0.pub.pem", keys / "hospital-1.pub.pem")
    code, report = audit_json(release, "--keys", keys)
    assert code == 1
    bad = [f for f in failures(report, "hospital-1") if "signature" in f["what"]]
    assert [f["entry"] for f in bad] == [1, 2, 3]
    assert failures(report, "hospital-0") == []


def test_signature_swapped_between_hospitals(release):
    a, b = release / "ledger" / "hospital-0.jsonl", release / "ledger" / "hospital-1.jsonl"
    ea, eb = lines(a), lines(b)
    ea[0]["signature"] = eb[0]["signature"]
    write_lines(a, ea)
    code, report = audit_json(release)
    assert code == 1
    assert [(f["entry"], "signature" in f["what"]) for f in failures(report, "hospital-0")] \
        == [(1, True)]


def test_weights_digest_not_the_update_the_server_recorded(release):
    updates = json.loads((release / "updates.json").read_text())
    updates[1]["received"]["hospital-0"] = "0" * 64
    (release / "updates.json").write_text(json.dumps(updates))
    code, report = audit_json(release)
    named = failures(report, "hospital-0")
    assert code == 1
    assert [(f["entry"], f["round"]) for f in named] == [(None, 2)]
    assert "matches the weights_sha256 of no ledger entry" in named[0]["what"]


def test_update_recorded_without_an_entry(release):
    updates = json.loads((release / "updates.json").read_text())
    updates.append({"round": 4, "received": {"hospital-1": "ab" * 32}})
    (release / "updates.json").write_text(json.dumps(updates))
    code, report = audit_json(release)
    assert code == 1
    assert [(f["entry"], f["round"]) for f in failures(report, "hospital-1")] == [(None, 4)]


def test_claimed_epsilon_above_the_budget(tmp_path):
    # A signed, internally consistent ledger whose spend passed the hospital's budget.
    ledgers = {"hospital-0": node_ledger(tmp_path / "nodes" / "hospital-0", "hospital-0",
                                         rounds=3, budget=4.0)}
    release = write_release(tmp_path, ledgers)
    code, report = audit_json(release)
    eps = [e["epsilon"] for e in ledgers["hospital-0"].entries]
    over = [i + 1 for i, x in enumerate(eps) if x > 4.0]
    assert over and code == 1
    named = failures(report, "hospital-0")
    assert all("exceeds the hospital's budget 4" in f["what"] for f in named)
    assert [f["entry"] for f in named] == over


def test_release_of_another_run_has_no_entries_for_its_updates(tmp_path):
    ledger = node_ledger(tmp_path / "nodes" / "hospital-0", "hospital-0", rounds=2)
    release = write_release(tmp_path, {"hospital-0": ledger}, run_id="another-run")
    code, report = audit_json(release)
    assert code == 1
    named = failures(report, "hospital-0")
    assert named and all("no entry for it" in f["what"] for f in named)


def test_spend_of_earlier_runs_counts_in_epsilon_and_passes(tmp_path):
    # The node's whole ledger travels with its replies: a run's release starts at the
    # node's first entry, so epsilon is recomputed over everything it ever spent.
    state = tmp_path / "nodes" / "hospital-0"
    node_ledger(state, "hospital-0", rounds=2, run_id="an-earlier-run")
    ledger = node_ledger(state, "hospital-0", rounds=2)
    assert len(ledger.entries) == 4
    release = write_release(tmp_path, {"hospital-0": ledger})
    code, report = audit_json(release)
    assert code == 0, report["failures"]
    (row,) = report["hospitals"]
    assert row["rdp_epsilon"] == pytest.approx(rdp_epsilon([(SIGMA, Q, STEPS)] * 4, DELTA))


def test_a_round_resent_after_a_crash_counts_twice_and_passes(tmp_path):
    # Round 2 was logged and trained, the server crashed before recording it, the resumed
    # server sent round 2 again: two entries, one recorded update, both spends counted.
    state = tmp_path / "nodes" / "hospital-0"
    ledger = node_ledger(state, "hospital-0", rounds=1)
    ledger.append(run_id=RUN, round=2, mechanism="subsampled-gaussian",
                  purpose="train-discriminator", noise_multiplier=SIGMA, sample_rate=Q,
                  steps=STEPS, max_grad_norm=1.0, dataset_size=N, delta=DELTA,
                  budget_epsilon=BUDGET, weights_sha256="f" * 64)
    ledger = node_ledger(state, "hospital-0", rounds=2, first_round=2)
    release = write_release(tmp_path, {"hospital-0": ledger})
    updates = [{"round": r, "received": {"hospital-0": digest("hospital-0", r)}} for r in (1, 2, 3)]
    (release / "updates.json").write_text(json.dumps(updates))
    code, report = audit_json(release)
    assert code == 0, report["failures"]
    (row,) = report["hospitals"]
    assert row["rdp_epsilon"] == pytest.approx(rdp_epsilon([(SIGMA, Q, STEPS)] * 4, DELTA))


def test_unknown_mechanism_is_named(release, tmp_path):
    # Signed with the hospital's own key, so only the mechanism is wrong.
    key = load_private_key(tmp_path / "nodes" / "hospital-0" / PRIVATE_KEY)
    path = release / "ledger" / "hospital-0.jsonl"
    entries = lines(path)
    entries[2]["mechanism"] = "laplace"
    entries[2]["hash"] = entry_hash(entries[2])
    entries[2]["signature"] = key.sign(entries[2]["hash"].encode()).hex()
    write_lines(path, entries)
    code, report = audit_json(release)
    named = failures(report, "hospital-0")
    assert code == 1 and [(f["entry"], f["what"][:26]) for f in named] == \
        [(3, "unknown mechanism 'laplace")]


def test_truncated_final_line_is_named_with_file_and_line(release):
    path = release / "ledger" / "hospital-0.jsonl"
    path.write_bytes(path.read_bytes()[:-40])
    result = cli(release)
    assert result.exit_code == 1
    assert f"{path}:3" in result.stderr and "truncated" in result.stderr


def test_missing_key_file(release, tmp_path):
    keys = hospital_keys(tmp_path)
    (keys / "hospital-1.pub.pem").unlink()
    code, report = audit_json(release, "--keys", keys)
    assert code == 1
    [f] = failures(report, "hospital-1")
    assert "hospital-1.pub.pem" in f["what"] and "no usable public key" in f["what"]
    result = cli(release / "ledger" / "hospital-0.jsonl", "--key", tmp_path / "nope.pem")
    assert result.exit_code == 2 and "nope.pem" in result.stderr


def test_not_a_release(tmp_path):
    result = cli(tmp_path)
    assert result.exit_code == 2 and str(tmp_path) in result.stderr


# --------------------------------------------------------------------------- accountants

def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon of one Gaussian release, sensitivity 1 (Balle & Wang 2018, Thm. 8)."""
    def excess(eps: float) -> float:
        return (norm.cdf(0.5 / sigma - eps * sigma)
                - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma) - delta)
    return brentq(excess, 0.0, 100.0)


@pytest.mark.parametrize("sigma", [2.0, 5.0])
def test_gaussian_entries_against_the_exact_gaussian_curve(sigma):
    exact = analytic_gaussian_epsilon(sigma, DELTA)
    prv, note = prv_epsilon([(sigma, 1.0, 1)], DELTA)
    assert note == ""
    assert exact - 1e-3 <= prv <= exact + 0.03       # PRV returns an upper bound
    assert rdp_epsilon([(sigma, 1.0, 1)], DELTA) >= exact


def test_a_gaussian_release_counts_in_the_same_ledger(tmp_path):
    ledger = node_ledger(tmp_path / "node", "hospital-0", rounds=2)
    ledger.append(run_id=RUN, round=2, mechanism="gaussian", purpose="dp-feature-statistics",
                  noise_multiplier=8.0, sample_rate=1.0, steps=1, max_grad_norm=1.0,
                  dataset_size=N, delta=DELTA, budget_epsilon=BUDGET,
                  weights_sha256=digest("stats", 2))
    report = audit_ledger(ledger.path, ledger.state_dir / PUBLIC_KEY)
    [row] = report.hospitals
    assert report.ok, [str(f) for f in report.all_failures]
    assert row.prv_epsilon is not None and row.prv_epsilon <= row.rdp_epsilon + 0.02
    assert row.rdp_epsilon > rdp_epsilon([(SIGMA, Q, STEPS)] * 2, DELTA)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_prv_failure_is_reported_not_raised():
    eps, note = prv_epsilon([(1e-4, 0.5, 10)], DELTA)   # hopeless numerics
    assert (eps is None and note.startswith("PRV could not")) or eps > 100


def test_rdp_composition_is_opacus_rdp_accountant_bit_for_bit():
    history = [(1.1, 0.25, 4), (8.0, 1.0, 1), (1.1, 0.25, 4), (0.9, 0.1, 20)]
    for upto in (2, 4):
        accountant = RDPAccountant()
        accountant.history = history[:upto]
        assert rdp_epsilon(history[:upto], DELTA) == accountant.get_epsilon(DELTA)


def test_a_ledger_that_starts_mid_chain_is_named(release):
    path = release / "ledger" / "hospital-0.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[1:]))
    code, report = audit_json(release)
    named = failures(report, "hospital-0")
    assert code == 1
    assert (1, 2) in {(f["entry"], f["round"]) for f in named if "first entry" in f["what"]}


def test_a_dp_statistic_counts_against_the_budget_but_is_no_update(tmp_path):
    ledger = node_ledger(tmp_path / "nodes" / "hospital-0", "hospital-0", rounds=2)
    trained = ledger.entries[-1]["epsilon"]
    ledger.append(run_id=RUN, round=2, mechanism="gaussian", purpose="evaluate-fid-statistics",
                  noise_multiplier=6.0, sample_rate=1.0, steps=1, max_grad_norm=1.0,
                  dataset_size=N, delta=DELTA, budget_epsilon=BUDGET,
                  weights_sha256=digest("fid statistics", 2))
    release = write_release(tmp_path, {"hospital-0": ledger})
    updates = json.loads((release / "updates.json").read_text())
    for u in updates:                       # the server recorded only the two updates
        u["received"]["hospital-0"] = digest("hospital-0", u["round"])
    (release / "updates.json").write_text(json.dumps(updates))
    code, report = audit_json(release)
    assert code == 0, report["failures"]
    [row] = report["hospitals"]
    assert row["rounds"] == [1, 2] and row["steps"] == 2 * STEPS + 1
    assert row["rdp_epsilon"] == pytest.approx(row["claimed_epsilon"]) and \
        row["rdp_epsilon"] > trained


def _cycle_ledger(state_dir: Path, hospital: str, with_generator: bool) -> Ledger:
    """One CycleGAN round as client/app.py logs it: the discriminators' mechanism and, unless
    a node skipped it, the generators', both naming the one update."""
    ledger = Ledger(state_dir, hospital)
    purposes = ["train-discriminator"] + (["train-generator"] if with_generator else [])
    for purpose in purposes:
        ledger.append(run_id=RUN, round=1, mechanism="subsampled-gaussian", purpose=purpose,
                      noise_multiplier=SIGMA, sample_rate=Q, steps=STEPS, max_grad_norm=1.0,
                      dataset_size=N, delta=DELTA, budget_epsilon=BUDGET,
                      weights_sha256=digest(hospital, 1))
    return ledger


@pytest.mark.parametrize("with_generator", [True, False], ids=["charged", "not-charged"])
def test_cyclegan_release_must_charge_the_generator_mechanism(tmp_path, with_generator):
    ledgers = {"hospital-0": _cycle_ledger(tmp_path / "nodes" / "h0", "hospital-0", with_generator)}
    release = write_release(tmp_path, ledgers)
    meta = json.loads((release / "release.json").read_text())
    meta["config"] = {"model": "cyclegan"}
    (release / "release.json").write_text(json.dumps(meta))
    from shared.audit import audit_release

    report = audit_release(release)
    failures = [str(f) for f in report.all_failures]
    if with_generator:
        assert report.ok, failures
        both = RDPAccountant()
        both.history = [(SIGMA, Q, STEPS), (SIGMA, Q, STEPS)]
        assert report.hospitals[0].rdp_epsilon == pytest.approx(both.get_epsilon(DELTA), rel=1e-9)
    else:
        assert any("no 'train-generator' entry" in f for f in failures), failures
    # the same ledgers in a cGAN release need only the discriminator's entry
    meta["config"] = {"model": "cgan"}
    (release / "release.json").write_text(json.dumps(meta))
    assert audit_release(release).ok
