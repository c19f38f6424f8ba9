"""End to end on the Simulation Engine (`fedsynth run`), and resuming a run bit for bit.

The release is checked file by file. Resuming is checked twice: in process (the server's
round loop against real ClientApp handlers, `fake_grid.FakeGrid`), and, marked slow, through
`fedsynth run` stopped after round 1 and continued with `--resume` in a new process.

A simulated hospital's DP randomness is seeded from a secret in its state dir and from
the run id (client/ledger.py `node_seed`), so "the same run" means the same run id and the
same hospital secrets: the uninterrupted reference run is given both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SMOKE, smoke_config, smoke_values
from fake_grid import FakeGrid
from PIL import Image

from client.ledger import NOISE_SECRET, load_public_key, read_entries, verify_chain
from server import federation, release
from shared import models
from shared.config import ConfigError

HOSPITALS = ["hospital-0", "hospital-1"]
SIM_NODES = {11: {"partition-id": 0, "num-partitions": 2},
             12: {"partition-id": 1, "num-partitions": 2}}


def fedsynth_run(*args: str, timeout: float = 540) -> subprocess.CompletedProcess:
    """`fedsynth run ...` as a user types it, from the repository root."""
    return subprocess.run([sys.executable, "-m", "shared.cli", "run", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"})


def _explain(proc: subprocess.CompletedProcess, out: Path) -> str:
    log = out / "flower.log"
    tail = log.read_text()[-6000:] if log.exists() else "(no flower.log)"
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\nflower.log:\n{tail}"


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} arrays differ, e.g. {different[:3]}"


def plant_secrets(output_dir: Path, secrets: dict[str, bytes]) -> None:
    """Give simulated hospitals a known noise secret before their first round."""
    for hospital, secret in secrets.items():
        path = output_dir / "hospitals" / hospital / NOISE_SECRET
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(secret)
        path.chmod(0o600)


def run_in_process(output_dir: Path, run_id: str, monkeypatch, **overrides) -> Path:
    """server.federation.run against two in-process simulated hospitals, with a fixed run id."""
    monkeypatch.setattr(federation.uuid, "uuid4", lambda: uuid.UUID(run_id))
    values = smoke_values(output_dir, **overrides)
    with FakeGrid(values, SIM_NODES) as grid:
        return federation.run(grid, smoke_config(output_dir, **overrides))


# --------------------------------------------------------------------------- fedsynth run

def test_fedsynth_run_smoke_produces_a_complete_release(tmp_path):
    out = tmp_path / "run"
    proc = fedsynth_run(str(SMOKE), "--set", f"output-dir={out}")
    assert proc.returncode == 0, _explain(proc, out)
    assert proc.stderr.strip() == "", _explain(proc, out)
    assert "round 2/2: 2 hospitals" in proc.stdout
    assert f"done: open {out / 'release' / 'grid.png'}" in proc.stdout
    cfg = smoke_config(out)
    rel = out / "release"

    summary = json.loads((rel / "release.json").read_text())
    assert (summary["rounds"], summary["rounds_planned"], summary["stopped_early"]) == (2, 2, "")
    assert summary["hospitals"] == HOSPITALS
    assert summary["config"] == cfg.to_flat()
    privacy = summary["privacy"]
    assert set(privacy["per_hospital"]) == set(HOSPITALS)
    for p in privacy["per_hospital"].values():
        assert cfg.target_epsilon - 0.01 <= p["epsilon"] <= cfg.target_epsilon
        assert p["delta"] == cfg.target_delta and p["rounds"] == [1, 2]
        assert p["steps"] == 2 * cfg.local_d_steps
    assert privacy["max_epsilon"] <= cfg.target_epsilon
    assert privacy["dropped_budget_exhausted"] == []

    # images/<class>/*.png and synthetic.npz (MedMNIST layout) hold the same images
    with np.load(rel / "synthetic.npz") as npz:
        assert set(npz.files) == {"train_images", "train_labels"}
        images, labels = npz["train_images"], npz["train_labels"]
    per_class = cfg.samples_per_class
    assert images.dtype == np.uint8 and images.shape == (2 * per_class, 28, 28)
    assert labels.dtype == np.uint8 and labels.shape == (2 * per_class, 1)
    assert labels.reshape(-1).tolist() == [0] * per_class + [1] * per_class
    for c, name in enumerate(cfg.class_names):
        pngs = sorted((rel / "images" / name).glob("*.png"))
        assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(per_class)]
        for i, png in enumerate(pngs):
            with Image.open(png) as im:
                assert im.mode == "L"
                assert np.array_equal(np.asarray(im), images[c * per_class + i])
    assert images.std() > 0  # not a constant image

    # the released EMA generator regenerates exactly the released images
    generator = models.build(cfg)["generator"]
    missing, unexpected = generator.load_state_dict(torch.load(rel / "generator-ema.pt"), strict=False)
    assert unexpected == [] and all(k.endswith("num_batches_tracked") for k in missing)
    again = release.generate(generator.eval(), labels.reshape(-1), cfg.latent_dim,
                             summary["seeds"]["release_samples"])
    assert np.array_equal(again, images)
    final = torch.load(rel / "generator.pt")
    assert set(final) == set(torch.load(rel / "generator-ema.pt"))
    with Image.open(rel / "grid.png") as im:
        assert im.size[0] > 28 and im.size[1] > 28

    # ledgers: two signed entries per hospital, the same the hospital itself holds
    updates = json.loads((rel / "updates.json").read_text())
    for hospital in HOSPITALS:
        released = read_entries(rel / "ledger" / f"{hospital}.jsonl")
        own = read_entries(out / "hospitals" / hospital / "ledger.jsonl")
        assert released == own and [e["round"] for e in own] == [1, 2]
        key = load_public_key(rel / "keys" / f"{hospital}.pub.pem")
        assert verify_chain(released, key) == []
        assert [u["received"][hospital] for u in updates] == [e["weights_sha256"] for e in own]
    # no hospital's private key or secret travelled into the release
    for f in rel.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".pem"):
            assert "PRIVATE" not in f.read_text(), f

    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-0001", "round-0002"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["round-0001.png", "round-0002.png"]
    assert_same_arrays(_arrays(out / "checkpoints" / "round-0002" / "ema.npz"),
                       {"generator." + k: v.numpy() for k, v in torch.load(rel / "generator-ema.pt").items()},
                       "release generator vs last checkpoint")


# --------------------------------------------------------------------------- resume, in process

@pytest.mark.usefixtures("one_thread")
def test_stopped_and_resumed_run_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    run_id = uuid.uuid4().hex
    secrets = {h: os.urandom(32) for h in HOSPITALS}
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    plant_secrets(whole, secrets)
    plant_secrets(parts, secrets)

    run_in_process(whole, run_id, monkeypatch)

    stopped_at = run_in_process(parts, run_id, monkeypatch, stop_after_round=1)
    assert stopped_at == parts / "checkpoints" / "round-0001"
    assert not (parts / "release").exists()
    # a crash leaves the config fixed: resuming with another one, or starting over, is refused
    with pytest.raises(ConfigError, match=r"cannot resume with a different config \(num-rounds changed\)"):
        federation.start_state(smoke_config(parts, resume=True, num_rounds=3))
    with pytest.raises(ConfigError, match="already holds checkpoints of another run"):
        federation.start_state(smoke_config(parts))
    run_in_process(parts, run_id, monkeypatch, resume=True)

    for rnd in ("round-0001", "round-0002"):
        for name in ("global.npz", "ema.npz"):
            assert_same_arrays(_arrays(whole / "checkpoints" / rnd / name),
                               _arrays(parts / "checkpoints" / rnd / name), f"{rnd}/{name}")
    assert np.array_equal(_arrays(whole / "release" / "synthetic.npz")["train_images"],
                          _arrays(parts / "release" / "synthetic.npz")["train_images"])
    # each round was spent once: the resumed run did not train round 1 again
    for hospital in HOSPITALS:
        a = read_entries(whole / "hospitals" / hospital / "ledger.jsonl")
        b = read_entries(parts / "hospitals" / hospital / "ledger.jsonl")
        assert [e["round"] for e in b] == [1, 2]
        assert [(e["epsilon"], e["weights_sha256"]) for e in a] == \
               [(e["epsilon"], e["weights_sha256"]) for e in b]


# --------------------------------------------------------------------------- resume, fedsynth run

@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_fedsynth_run_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    parts = tmp_path / "parts"
    first = fedsynth_run(str(SMOKE), "--set", f"output-dir={parts}", "--set", "stop-after-round=1")
    assert first.returncode == 0, _explain(first, parts)
    assert "stopped after round 1; continue with --resume" in first.stdout
    assert not (parts / "release").exists()

    again = fedsynth_run(str(SMOKE), "--set", f"output-dir={parts}")
    assert again.returncode != 0 and again.stderr.count("\n") == 1
    assert again.stderr.startswith("error: ") and "pass --resume to continue it" in again.stderr

    resumed = fedsynth_run(str(SMOKE), "--set", f"output-dir={parts}", "--resume")
    assert resumed.returncode == 0, _explain(resumed, parts)
    assert "resuming run" in resumed.stdout and "round 2/2" in resumed.stdout
    assert "round 1/2" not in resumed.stdout

    # the reference: the same run (run id, hospital secrets) without the interruption. The
    # Simulation Engine runs each ClientApp on one thread, so this process does too.
    run_id = json.loads((parts / "checkpoints" / "round-0002" / "state.json").read_text())["run_id"]
    whole = tmp_path / "whole"
    plant_secrets(whole, {h: (parts / "hospitals" / h / NOISE_SECRET).read_bytes() for h in HOSPITALS})
    run_in_process(whole, run_id, monkeypatch)
    for name in ("global.npz", "ema.npz"):
        assert_same_arrays(_arrays(whole / "checkpoints" / "round-0002" / name),
                           _arrays(parts / "checkpoints" / "round-0002" / name), name)


# --------------------------------------------------------------------------- other families

def _audit_passes(release_dir: Path) -> None:
    from shared.audit import audit_release

    report = audit_release(release_dir)
    assert report.ok, [str(f) for f in report.all_failures]


def _one_round(tmp_path, *settings: str):
    """`fedsynth run` of the smoke config for one round with `settings` (key=value):
    (output dir, process, release dir, release.json)."""
    out = tmp_path / "run"
    sets = [a for kv in (f"output-dir={out}", "num-rounds=1", *settings) for a in ("--set", kv)]
    proc = fedsynth_run(str(SMOKE), *sets)
    assert proc.returncode == 0, _explain(proc, out)
    rel = out / "release"
    return out, proc, rel, json.loads((rel / "release.json").read_text())


@pytest.mark.usefixtures("one_thread")
def test_fedsynth_run_stylegan_trains_a_round_and_releases(tmp_path):
    out, proc, rel, summary = _one_round(tmp_path, "model='stylegan'", "image-size=32",
                                         "local-d-steps=2")
    assert "round 1/1: 2 hospitals" in proc.stdout
    assert summary["model"] == "stylegan" and summary["hospitals"] == HOSPITALS
    cfg = smoke_config(out, model="stylegan", image_size=32, num_rounds=1, local_d_steps=2)
    for p in summary["privacy"]["per_hospital"].values():
        assert cfg.target_epsilon - 0.01 <= p["epsilon"] <= cfg.target_epsilon
    with np.load(rel / "synthetic.npz") as npz:
        images, labels = npz["train_images"], npz["train_labels"].reshape(-1)
    assert images.shape == (2 * cfg.samples_per_class, 32, 32)
    # the release regenerates from its EMA generator (eval mode: fixed noise inputs)
    generator = models.build(cfg)["generator"]
    generator.load_state_dict(torch.load(rel / "generator-ema.pt"), strict=False)
    again = release.generate(generator.eval(), labels, cfg.latent_dim,
                             summary["seeds"]["release_samples"])
    assert np.array_equal(again, images)
    _audit_passes(rel)


@pytest.mark.usefixtures("one_thread")
def test_fedsynth_run_cyclegan_trains_a_round_releases_translators_and_audits(tmp_path):
    out, proc, rel, summary = _one_round(tmp_path, "model='cyclegan'", "local-d-steps=2",
                                         "d-steps-per-g-step=1")
    assert summary["model"] == "cyclegan"
    info = summary["images"]
    assert info["kind"] == "translator" and info["domains"] == {"a": "normal", "b": "pneumonia"}
    for name in (*info["translators"].values(), "grid.png", "examples.npz", "generator-ema.pt"):
        assert (rel / name).is_file(), name
    with np.load(rel / "examples.npz") as npz:
        assert set(npz.files) == {f"{d}-{what}" for d in ("normal", "pneumonia")
                                  for what in ("input", "translated", "reconstructed")}
        assert npz["normal-input"].shape == npz["normal-translated"].shape == (8, 28, 28)
    # both mechanisms in every hospital's ledger, each naming the update the server recorded
    updates = json.loads((rel / "updates.json").read_text())
    for hospital in HOSPITALS:
        entries = read_entries(rel / "ledger" / f"{hospital}.jsonl")
        assert [(e["purpose"], e["steps"]) for e in entries] == \
            [("train-discriminator", 2), ("train-generator", 2)]
        assert {e["weights_sha256"] for e in entries} == {updates[0]["received"][hospital]}
        assert summary["privacy"]["per_hospital"][hospital]["steps"] == 4
        assert 9.99 <= entries[-1]["epsilon"] <= 10.0
    _audit_passes(rel)

    # fedsynth translate: PNG in, PNG out, at the release's size
    from typer.testing import CliRunner

    from shared.cli import app

    pngs = tmp_path / "pngs"
    pngs.mkdir()
    with np.load(REPO / "data" / "pneumoniamnist.npz") as npz:
        for i, image in enumerate(npz["test_images"][:3]):
            Image.fromarray(image).resize((40, 40)).save(pngs / f"scan-{i}.png")
    result = CliRunner().invoke(app, ["translate", str(rel), str(pngs), str(tmp_path / "out"),
                                      "--to", "pneumonia"])
    assert result.exit_code == 0, result.output
    written = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in written] == ["scan-0.png", "scan-1.png", "scan-2.png"]
    with Image.open(written[0]) as im:
        assert im.mode == "L" and im.size == (28, 28)


def test_a_checkpoint_from_before_a_knob_existed_resumes_at_its_default(tmp_path, monkeypatch):
    """A run checkpointed by an older fedsynth (without a knob added since) ran at that knob's
    default: resuming it with the default is the same run; with another value it is not."""
    import json as _json

    out = tmp_path / "run"
    run_in_process(out, uuid.uuid4().hex, monkeypatch, stop_after_round=1)
    state_file = out / "checkpoints" / "round-0001" / "state.json"
    state = _json.loads(state_file.read_text())
    del state["config"]["loss"]                       # as written before the knob existed
    state_file.write_text(_json.dumps(state))
    federation.start_state(smoke_config(out, resume=True))
    with pytest.raises(ConfigError, match=r"\(loss changed\)"):
        federation.start_state(smoke_config(out, resume=True, loss="hinge"))
