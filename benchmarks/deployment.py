"""Item 3 (`--deployment`): a federated round on Flower's Deployment Engine vs the same work alone.

    deployment   flower-superlink + 3 flower-supernodes on loopback (tests/flower_procs.py),
                 `flwr run` of this app with the demo config; each hospital its own data
                 file, state dir and budget (node config). Per-round time is the ServerApp's
                 own figure (`round r/R: ... Ns`: send -> all replies -> FedAvg -> checkpoint
                 and sample grid), whole seconds.
    standalone   the same three hospitals, node configs and run config, each in its own
                 worker process (the SuperNodes' parallelism), `client.app.train_reply`
                 called directly with the global weights, FedAvg in the parent: no SuperLink,
                 no messages, no ServerApp, no checkpoint.

The ratio is deployment / standalone per round. Every child process gets the same torch
thread count (OMP_NUM_THREADS), so three hospitals share the cores the same way in both.

Where the difference goes (measured separately, same machine, same run):

    ClientApp start   Flower 1.42's SuperNode starts a fresh `flwr-clientapp` process for
                      every message: Python + imports of client.app (torch, opacus, flwr,
                      MONAI), timed in a fresh interpreter
    cold handler      a fresh process also loses the handler's caches: data loading, sigma
                      calibration; first train_reply of a worker minus its warm ones
    server per round  checkpoint + sample grid after FedAvg (server/federation.py)
    rest              Flower: message transport through the SuperLink, FAB, scheduling
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np

from benchmarks.timing import quartiles, table
from benchmarks.workload import REPO, demo_values

HOSPITALS = {"hospital-a": (0, 1570), "hospital-b": (1570, 1570), "hospital-c": (3140, 1568)}
ROUND_LINE = re.compile(r"round (\d+)/(\d+): (\d+) hospitals, (\d+)s")


def _tests_on_path() -> None:
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def node_configs(workdir: Path) -> dict[str, dict]:
    _tests_on_path()
    from fake_grid import hospital_npz
    return {name: {"hospital-id": name,
                   "data-path": str(hospital_npz(workdir / name / "data.npz", *span)),
                   "state-dir": str(workdir / name / "state"),
                   "epsilon": 1e9}
            for name, span in HOSPITALS.items()}


def deployment(workdir: Path, run_values: dict, threads: int) -> tuple[float, list[float], str]:
    """(flwr run wall seconds, per-round seconds from the ServerApp, log tail)."""
    _tests_on_path()
    from flower_procs import FlowerProcesses
    os.environ["OMP_NUM_THREADS"] = str(threads)   # inherited by every Flower process
    with FlowerProcesses(workdir / "flower") as flower:
        port = flower.superlink("--insecure")
        for name, node in node_configs(workdir / "deployment").items():
            flower.supernode(name, port, node, "--insecure")
        flower.connection(port, insecure=True)
        start = time.perf_counter()
        result = flower.flwr_run(REPO, run_values, timeout=3000)
        wall = time.perf_counter() - start
        output = result.stdout + result.stderr
        if result.returncode != 0:
            raise RuntimeError(f"flwr run failed:\n{flower.report(result)}")
    rounds = [float(m.group(4)) for m in ROUND_LINE.finditer(output)]
    return wall, rounds, output[-2000:]


def _hospital_worker(conn, run_values: dict, node: dict, threads: int) -> None:
    import warnings

    import torch
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from client.app import train_reply
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    while (job := conn.recv()) is not None:
        rnd, global_w = job
        content = RecordDict({
            "weights": ArrayRecord(array_dict={k: Array(v) for k, v in global_w.items()}),
            "config": ConfigRecord({"run-id": "standalone", "round": rnd})})
        start = time.perf_counter()
        reply = train_reply(content, run_values, node)
        seconds = time.perf_counter() - start
        arrays = {k: reply["weights"][k].numpy() for k in reply["weights"].keys()}
        conn.send((arrays, int(reply["metrics"]["num-examples"]), seconds))


def standalone(workdir: Path, run_values: dict, threads: int) -> tuple[list[float], float]:
    """Per-round seconds (global weights out to 3 worker processes, replies folded), and
    the median over workers of first train_reply minus the median of its later ones."""
    from server.strategy import FedAvg
    from shared import models, weights
    from shared.config import RunConfig
    cfg = RunConfig.from_flat(run_values)
    global_w = weights.to_numpy(models.build(cfg))
    ctx = mp.get_context("spawn")
    workers = []
    for node in node_configs(workdir / "standalone").values():
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_hospital_worker, args=(child, run_values, node, threads))
        proc.start()
        workers.append((proc, parent))
    rounds, handler_seconds = [], [[] for _ in workers]
    try:
        for rnd in range(1, cfg.num_rounds + 1):
            start = time.perf_counter()
            for _, conn in workers:
                conn.send((rnd, global_w))
            replies = [conn.recv() for _, conn in workers]
            fedavg = FedAvg()
            for arrays, n, _ in sorted(replies, key=lambda r: r[1]):
                fedavg.add(arrays, n)
            global_w = fedavg.result()
            rounds.append(time.perf_counter() - start)
            for mine, (_, _, seconds) in zip(handler_seconds, replies):
                mine.append(seconds)
    finally:
        for proc, conn in workers:
            conn.send(None)
            proc.join(timeout=60)
    assert all(np.isfinite(v).all() for v in global_w.values())
    cold = median(h[0] - median(h[1:]) for h in handler_seconds) if cfg.num_rounds > 1 else 0.0
    return rounds, cold


def import_seconds(threads: int, repeats: int = 3) -> float:
    """Wall seconds for 3 fresh interpreters importing client.app at once, as the three
    hospitals' ClientApp processes do at the start of every round."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", "import client.app"], cwd=REPO,
                                  env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for _ in HOSPITALS]
        if any(p.wait() != 0 for p in procs):
            raise RuntimeError("`python -c 'import client.app'` failed")
        times.append(time.perf_counter() - start)
    return median(times)


def server_round_seconds(run_values: dict, workdir: Path, repeats: int = 3) -> float:
    """checkpoint.save + release.save_grid, as server/federation.py does after FedAvg."""
    from server import checkpoint, release
    from server.checkpoint import ServerState
    from shared import models, weights
    from shared.config import RunConfig
    cfg = RunConfig.from_flat(run_values)
    global_w = weights.to_numpy(models.build(cfg))
    ema_w = {k: v for k, v in global_w.items() if k.startswith("generator.")}
    state = ServerState(run_id="bench", round=0, config=cfg.to_flat())
    times = []
    for rnd in range(1, repeats + 1):
        state.round = rnd
        start = time.perf_counter()
        checkpoint.save(workdir, state, global_w, ema_w)
        release.save_grid(release.generator_from(cfg, release.sampler_weights(global_w, ema_w)), cfg,
                          workdir / "samples" / f"round-{rnd:04d}.png")
        times.append(time.perf_counter() - start)
    return median(times)


def run(rounds: int, threads: int, local_d_steps: int | None = None) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        overrides = {"num-rounds": rounds}
        if local_d_steps:
            overrides["local-d-steps"] = local_d_steps
        values = demo_values(work / "coordinator", **overrides)
        alone, cold = standalone(work, values, threads)
        wall, deployed, tail = deployment(work, values, threads)
        imports = import_seconds(threads)
        server = server_round_seconds(values, work / "server-profile")
    if len(deployed) != rounds:
        return ("could not read the ServerApp's round times; flwr run output ends:\n"
                f"```\n{tail}\n```")
    d_q1, d_med, d_q3 = quartiles(deployed)
    warm = alone[1:] or alone    # round 1 of a worker also imports and loads: cold
    s_q1, s_med, s_q3 = quartiles(warm)
    rows = [
        ["standalone (3 worker processes, train_reply, FedAvg; warm rounds)", f"{s_med:.1f}",
         f"{s_q1:.1f}-{s_q3:.1f}", f"{sum(alone):.0f} (all rounds)", "1.00x"],
        ["Deployment Engine (SuperLink + 3 SuperNodes, loopback)", f"{d_med:.0f}",
         f"{d_q1:.0f}-{d_q3:.0f}", f"{wall:.0f} (flwr run, incl. start and release)",
         f"**{d_med / s_med:.2f}x**"],
    ]
    sizes = ", ".join(f"{k}: {v[1]} images" for k, v in HOSPITALS.items())
    return (f"Demo config, {rounds} rounds, 3 hospitals ({sizes}), "
            f"{values['local-d-steps']} DP steps per round each, torch threads {threads} "
            f"per process; "
            f"medians over rounds (deployment round times are the ServerApp's whole seconds)\n\n"
            + table(["", "s per round (median)", "s (q1-q3)", "s total", "ratio"], rows)
            + f"\n\nper-round seconds: standalone {[round(x, 1) for x in alone]}, "
              f"deployment {deployed}\n\nWhere the extra "
            f"{d_med - s_med:.1f} s per round go (estimates, measured apart):\n\n"
            + table(["", "s per round"], [
                ["ClientApp process start: Python + `import client.app`, 3 fresh processes "
                 "at once (Flower starts one per message)", f"{imports:.1f}"],
                ["cold handler in that fresh process: data loading, sigma calibration "
                 "(first train_reply minus warm)", f"{cold:.1f}"],
                ["server after FedAvg: checkpoint + sample grid", f"{server:.2f}"],
                ["rest: Flower transport, FAB, scheduling, polling",
                 f"{d_med - s_med - imports - cold - server:.1f}"],
            ]))
