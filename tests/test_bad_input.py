"""`fedsynth run` refuses bad input before any round: non-zero exit, one line on stderr starting
with "error:" that names the file or key and the problem, and nothing written to output-dir.

Two mistakes run as a real process (exit code and stderr exactly as a user sees them, with
nothing else printed while the CLI imports); every case goes through typer's test runner,
which calls the same command in process (seconds faster per case).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, REPO, SMOKE
from typer.testing import CliRunner

from shared.cli import app


def _case_files(tmp_path: Path) -> dict[str, Path]:
    files = {"missing": tmp_path / "missing.npz", "not-npz": tmp_path / "scan.npz",
             "bad-label": tmp_path / "three-classes.npz", "unknown-key": tmp_path / "typo.toml",
             "nested": tmp_path / "nested.toml"}
    files["not-npz"].write_text("this is not a zip archive\n")
    with np.load(DATA) as npz:
        labels = npz["train_labels"][:400].copy()
        labels[7] = 2  # a third class the run's class-names do not know
        np.savez(files["bad-label"], train_images=npz["train_images"][:400], train_labels=labels)
    files["unknown-key"].write_text(SMOKE.read_text() + "num-round = 3\n")
    files["nested"].write_text("[privacy]\ntarget-epsilon = 1.0\n")
    files["one-domain"] = tmp_path / "normal-only.npz"
    with np.load(DATA) as npz:
        normal = npz["train_labels"].reshape(-1) == 0
        np.savez(files["one-domain"], train_images=npz["train_images"][normal][:400],
                 train_labels=npz["train_labels"][normal][:400])
    return files


# (name, arguments after `run`, substrings the one error line must contain)
# {x} placeholders are filled from _case_files; output-dir is always set to a fresh tmp path.
IN_A_PROCESS = [
    ("missing data file", [str(SMOKE), "--set", "data-path='{missing}'"],
     ["{missing}", "data file not found"]),
    ("unknown key in --set", [str(SMOKE), "--set", "num-round=3"],
     [str(SMOKE), "unknown config key 'num-round'", "did you mean num-rounds"]),
]

IN_PROCESS = [
    ("zero epsilon", [str(SMOKE), "--set", "target-epsilon=0"],
     ["target-epsilon = 0.0: must be > 0"]),
    ("more hospitals than samples", [str(SMOKE), "--set", "num-hospitals=1000"],
     [str(DATA), "num-hospitals = 1000 needs at least 10000 samples", "the data set has 4708"]),
    ("unknown key in the file", ["{unknown-key}"],
     ["{unknown-key}", "unknown config key 'num-round'"]),
    ("negative epsilon", [str(SMOKE), "--set", "target-epsilon=-1.5"],
     ["target-epsilon = -1.5: must be > 0"]),
    ("batch larger than a hospital", [str(SMOKE), "--set", "batch-size=4000"],
     [str(DATA), "hospital-0 would hold 2354 images, fewer than batch-size = 4000"]),
    ("missing config file", ["{missing}.toml"], ["{missing}.toml: config file not found"]),
    ("tables in the config", ["{nested}"], ["{nested}", "tables are not allowed ([privacy])"]),
    ("--set without =", [str(SMOKE), "--set", "num-rounds"], ["--set 'num-rounds': expected key=value"]),
    ("wrong type", [str(SMOKE), "--set", 'num-rounds="two"'],
     ["num-rounds = 'two': expected int"]),
    ("epsilon as text", [str(SMOKE), "--set", "target-epsilon=ten"],
     ["target-epsilon = 'ten': expected float"]),
    ("zero delta", [str(SMOKE), "--set", "target-delta=0.0"], ["target-delta = 0.0: must be in (0, 1)"]),
    ("more min-hospitals than hospitals", [str(SMOKE), "--set", "min-hospitals=3"],
     ["min-hospitals = 3 exceeds num-hospitals = 2"]),
    ("unreadable data file", [str(SMOKE), "--set", "data-path='{not-npz}'"],
     ["{not-npz}", "not a readable .npz file"]),
    ("label outside class-names", [str(SMOKE), "--set", "data-path='{bad-label}'"],
     ["{bad-label}", "label 2 outside class-names"]),
    ("unknown model family", [str(SMOKE), "--set", "model='stylegan2'"],
     [str(SMOKE), "model = 'stylegan2': must be one of: cgan, cyclegan, stylegan"]),
    ("stylegan at a size that is not a power of two",
     [str(SMOKE), "--set", "model='stylegan'", "--set", "image-size=28"],
     [str(SMOKE), "model = 'stylegan' needs image-size a power of two", "got 28"]),
    ("cyclegan where a hospital has one domain only",
     [str(SMOKE), "--set", "model='cyclegan'", "--set", "data-path='{one-domain}'"],
     ["{one-domain}", "hospital-0: cyclegan needs images of both domains",
      "none of domain 'pneumonia'"]),
    ("cyclegan with three classes",
     [str(SMOKE), "--set", "model='cyclegan'", "--set", "class-names='a,b,c'"],
     ["class-names needs exactly 2 names"]),
    ("dirichlet that cannot fill the hospitals",
     [str(SMOKE), "--set", "partition='dirichlet'", "--set", "dirichlet-alpha=0.001",
      "--set", "num-hospitals=40", "--set", "batch-size=8"],
     ["raise alpha or use fewer hospitals"]),
]


def _fill(items: list[str], files: dict[str, Path]) -> list[str]:
    names = {k: str(v) for k, v in files.items()}
    return [s.format(**names) for s in items]


def _check(code: int, stderr: str, out: Path, expected: list[str]) -> None:
    assert code != 0
    assert stderr.endswith("\n") and stderr.count("\n") == 1, f"not one line: {stderr!r}"
    assert stderr.startswith("error: "), stderr
    for part in expected:
        assert part in stderr, f"{part!r} not in {stderr!r}"
    assert not out.exists(), "output-dir was created for a run that never started"


@pytest.mark.parametrize("name, args, expected", IN_A_PROCESS, ids=[c[0] for c in IN_A_PROCESS])
def test_bad_input_fails_in_one_line_before_any_round(tmp_path, name, args, expected):
    files, out = _case_files(tmp_path), tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "shared.cli", "run", *_fill(args, files), "--set", f"output-dir={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"})
    assert proc.stdout == ""
    _check(proc.returncode, proc.stderr, out, _fill(expected, files))


@pytest.mark.parametrize("name, args, expected", IN_A_PROCESS + IN_PROCESS,
                         ids=[c[0] for c in IN_A_PROCESS + IN_PROCESS])
def test_more_bad_input_fails_in_one_line(tmp_path, monkeypatch, name, args, expected):
    files, out = _case_files(tmp_path), tmp_path / "run"
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, ["run", *_fill(args, files), "--set", f"output-dir={out}"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    _check(result.exit_code, result.stderr, out, _fill(expected, files))
