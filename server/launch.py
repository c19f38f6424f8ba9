"""Launch a run on Flower's Simulation Engine: a private SuperLink, then `flwr run`.

    validate the run config and the data (one-line errors, before anything starts)
    start `flower-superlink --simulation` on free loopback ports (our child process)
    write a Flower config (FLWR_HOME) whose one connection points at it
    `flwr run <app> fedsynth --stream -c <run config> --federation-config num-supernodes=K`
    stop the SuperLink; report where the release is

The SuperLink runs with runtime dependency installation, telemetry and update checks
off: everything the app needs is already installed (hospitals have no network).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import httpx

from client.data import DataError, read_npz
from shared import models, partition
from shared.config import ConfigError, RunConfig, Value

APP_DIR = Path(__file__).resolve().parent.parent  # the Flower app = this repository
OFFLINE_ENV = {"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
               "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_paths(values: dict[str, Value], base: Path) -> dict[str, Value]:
    """Make data-path and output-dir absolute: Flower runs the app from another directory."""
    out = dict(values)
    for key in ("data-path", "output-dir"):
        if key in out and not Path(str(out[key])).is_absolute():
            out[key] = str((base / str(out[key])).resolve())
    return out


def preflight(cfg: RunConfig) -> None:
    """Refuse, before any round, what would fail in a round: data missing, too small to split."""
    path = Path(cfg.data_path)
    images, labels = read_npz(path, "train")
    bad = labels[(labels < 0) | (labels >= cfg.num_classes)]
    if len(bad):
        raise DataError(f"{path}: label {int(bad[0])} outside class-names "
                        f"({', '.join(cfg.class_names)})")
    try:
        parts = partition.split(labels, cfg.num_hospitals, cfg.partition,
                                cfg.dirichlet_alpha, cfg.seed)
    except partition.PartitionError as e:
        raise ConfigError(f"{path}: {e}") from None
    family = models.family(cfg)
    for i, idx in enumerate(parts):
        problem = family.data_problem(labels[idx], cfg.class_names)
        if problem:
            raise ConfigError(f"{path}: hospital-{i}: {problem}")
        if len(idx) < cfg.batch_size:
            raise ConfigError(
                f"{path}: hospital-{i} would hold {len(idx)} images, fewer than "
                f"batch-size = {cfg.batch_size}; use fewer hospitals or a smaller batch")


def _toml_value(v: Value) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return "'" + v.replace("'", "") + "'"
    return repr(v)


def flwr_run_command(cfg: RunConfig, connection: str, cpus_per_hospital: int) -> list[str]:
    run_config = " ".join(f"{k}={_toml_value(v)}" for k, v in cfg.to_flat().items())
    fed_config = (f"num-supernodes={cfg.num_hospitals} "
                  f"client-resources-num-cpus={cpus_per_hospital}")
    return ["flwr", "run", str(APP_DIR), connection, "--stream",
            "--run-config", run_config, "--federation-config", fed_config]


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink did not become ready within {timeout:.0f}s")


def simulate(cfg: RunConfig, log_dir: Path, echo: Callable[[str], None] = print,
             verbose: bool = False) -> int:
    """Run `cfg` on the Simulation Engine; returns flwr's exit code.

    Lines the ServerApp prints with the `[fedsynth]` prefix are echoed; everything
    (SuperLink and flwr output) goes to `<log_dir>/flower.log`.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    flwr_home = Path(tempfile.mkdtemp(prefix="fedsynth-flwr-"))
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedsynth"\n\n[superlink.fedsynth]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(flwr_home)}
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    log_path = log_dir / "flower.log"
    cpus = 1 if (os.cpu_count() or 1) >= 2 else 1
    with open(log_path, "a") as log:
        superlink = subprocess.Popen(
            [str(bin_dir / "flower-superlink"), "--insecure", "--simulation",
             "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_healthy(port, superlink)
            proc = subprocess.Popen(flwr_run_command(cfg, "fedsynth", cpus), env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if verbose:
                    echo(line.rstrip())
                elif line.startswith("[fedsynth]"):
                    echo(line.rstrip()[len("[fedsynth] "):])
                elif "Error" in line or "Traceback" in line or "error" in line.lower()[:40]:
                    echo(line.rstrip())
            return proc.wait()
        finally:
            for p in (locals().get("proc"), superlink):
                if p is not None and p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGTERM)
                        p.wait(timeout=20)
                    except (ProcessLookupError, subprocess.TimeoutExpired):
                        try:
                            os.killpg(p.pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
            shutil.rmtree(flwr_home, ignore_errors=True)
