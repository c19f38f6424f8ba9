"""Start and stop real Flower processes for integration tests: SuperLink, SuperNodes, `flwr run`.

    with FlowerProcesses(tmp_path) as flower:
        port = flower.superlink("--insecure")
        flower.supernode("hospital-a", port, {"hospital-id": "a", ...}, "--insecure")
        flower.connection(port, insecure=True)
        result = flower.flwr_run(REPO, run_config)
        assert result.returncode == 0, flower.report(result)

Every process starts in its own session on free loopback ports and logs to
`<workdir>/logs/<name>.log`; leaving the `with` block (or a failing test) stops them all,
SIGTERM then SIGKILL to the whole process group, so no ClientApp or ServerApp child
outlives the test. `report()` gathers the tails of every log for an assertion message.
Flower's own state (installed apps, the connection config) lives in `<workdir>/flwr-home`.
TLS tests pass the certificate options as extra arguments and `tls_ca` for health checks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

BIN = Path(sys.executable).parent  # the venv's flower-superlink, flower-supernode, flwr
from server.launch import OFFLINE_ENV, free_port  # noqa: E402  (one definition of each)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        if "'" in v or "\n" in v:
            raise ValueError(f"cannot write {v!r} as a TOML literal string")
        return f"'{v}'"
    if isinstance(v, (int, float)):
        return repr(v)
    raise TypeError(f"unsupported config value {v!r}")


def node_config_arg(values: dict[str, Any]) -> str:
    """--node-config string: space-separated key=value, strings quoted (no spaces in values)."""
    parts = []
    for k, v in values.items():
        text = f'"{v}"' if isinstance(v, str) else toml_value(v)
        if " " in text:
            raise ValueError(f"node config {k} = {v!r}: Flower's parser splits on spaces")
        parts.append(f"{k}={text}")
    return " ".join(parts)


class FlowerProcesses:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(self.home),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ processes

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        if name in self.procs:
            raise ValueError(f"a process named {name!r} was already started")
        log = open(self.logs / f"{name}.log", "w")
        try:
            proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=self.workdir, start_new_session=True)
        finally:
            log.close()  # the child holds its own descriptor
        self.procs[name] = proc
        return proc

    def superlink(self, *extra: str, name: str = "superlink",
                  tls_ca: Path | None = None, timeout: float = 60.0) -> int:
        """Start a SuperLink on a free port (Control, Fleet and runtime APIs share it);
        return the port once /health answers. `extra`: e.g. "--insecure" or TLS options."""
        port = free_port()
        proc = self.start(name, [str(BIN / "flower-superlink"), "--host", "127.0.0.1",
                                 "--port", str(port), "--disable-runtime-dependency-installation",
                                 *extra])
        self.wait_healthy(name, proc, port, tls_ca, timeout)
        return port

    def supernode(self, name: str, superlink_port: int, node_config: dict[str, Any],
                  *extra: str) -> subprocess.Popen:
        """Start a SuperNode for one hospital; its ClientApp runtime API gets its own port."""
        return self.start(name, [str(BIN / "flower-supernode"),
                                 "--superlink", f"127.0.0.1:{superlink_port}",
                                 "--port", str(free_port()),
                                 "--node-config", node_config_arg(node_config), *extra])

    def wait_healthy(self, name: str, proc: subprocess.Popen, port: int,
                     tls_ca: Path | None = None, timeout: float = 60.0) -> None:
        scheme = "https" if tls_ca else "http"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}\n{self.report()}")
            try:
                if httpx.get(f"{scheme}://127.0.0.1:{port}/health", timeout=1.0,
                             verify=str(tls_ca) if tls_ca else True).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{name} not healthy after {timeout:.0f}s\n{self.report()}")

    def stop(self, name: str, grace: float = 20.0) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=grace)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=grace)
        # children left in the group (ClientApp/ServerApp) go too
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)

    def __enter__(self) -> "FlowerProcesses":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    # ------------------------------------------------------------------ flwr CLI

    def connection(self, port: int, name: str = "local", insecure: bool = True,
                   root_certificates: Path | None = None) -> str:
        """Write FLWR_HOME/config.toml with one SuperLink connection (the default); return its name."""
        lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]",
                 f'address = "127.0.0.1:{port}"']
        if insecure:
            lines.append("insecure = true")
        if root_certificates:
            lines.append(f"root-certificates = {toml_value(str(root_certificates))}")
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")
        return name

    def flwr_run(self, app_dir: Path, run_config: dict[str, Any], connection: str = "local",
                 timeout: float = 540) -> subprocess.CompletedProcess:
        """`flwr run APP CONNECTION --stream --run-config FILE`; output also saved to logs/flwr-run.log."""
        config_file = self.workdir / "run-config.toml"
        config_file.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
        result = subprocess.run([str(BIN / "flwr"), "run", str(app_dir), connection, "--stream",
                                 "--run-config", str(config_file)],
                                env=self.env, cwd=self.workdir, capture_output=True, text=True,
                                timeout=timeout, start_new_session=True)
        (self.logs / "flwr-run.log").write_text(result.stdout + result.stderr)
        return result

    def report(self, result: subprocess.CompletedProcess | None = None, chars: int = 4000) -> str:
        """The tail of every log (and of a flwr run's output), for assertion messages."""
        parts = []
        if result is not None:
            parts.append(f"--- flwr run: exit {result.returncode}\n"
                         f"{(result.stdout + result.stderr)[-chars:]}")
        for log in sorted(self.logs.glob("*.log")):
            if log.name != "flwr-run.log":
                parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)
