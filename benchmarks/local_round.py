"""Item 2: one hospital's local round through the ClientApp's train handler vs a plain loop.

    handler      client.app.train_reply: run config -> hospital, data (cached per process),
                 DP plan (sigma cached), ledger budget check, build + unpack the global
                 weights, train_round, pack + digest, signed ledger entry (fsync), reply
    plain loop   client.train.train_round on the same data, plan and networks: nothing else

Both train the demo's networks for the same number of DP steps on simulated hospital 0.
The handler's first call (cold: data loading, noise calibration) is reported on its own.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from benchmarks.timing import interleaved, table
from benchmarks.workload import SIM_NODE, demo_config, demo_values, describe, hospital_data
from client import app as client_app
from client.node import Hospital
from client.train import train_round
from shared import models, weights


def run(repeats: int, local_d_steps: int | None = None) -> str:
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"local-d-steps": local_d_steps} if local_d_steps else {}
        values = demo_values(Path(tmp), **overrides)
        cfg = demo_config(Path(tmp), **overrides)
        global_weights = weights.pack(models.build(cfg))
        rounds = iter(range(1, 10_000))

        def handler():
            instruction = ConfigRecord({"run-id": "bench", "round": next(rounds)})
            content = RecordDict({"weights": global_weights, "config": instruction})
            reply = client_app.train_reply(content, values, SIM_NODE)
            assert reply["status"]["status"] == client_app.STATUS_OK

        start = time.perf_counter()
        handler()                                   # cold: loads data, calibrates sigma
        cold = time.perf_counter() - start

        data = hospital_data(cfg)
        hospital = Hospital.from_node_config(SIM_NODE, cfg)
        plan, _ = client_app.plan_round(hospital, cfg, len(data))
        seeds = iter(range(10_000))

        def plain():
            # fresh networks from the global weights, as the handler builds them, so both
            # train the same model from the same state every time
            nets = models.build(cfg)
            weights.unpack(global_weights, nets)
            train_round(nets["generator"], nets["discriminator"], data, cfg, plan,
                        seed=next(seeds))

        timed = interleaved({"plain train_round loop": plain, "train_reply (handler)": handler},
                            "plain train_round loop", repeats, calls=1, warmup=0)
        rows = [[t.name] + t.row(unit=1.0)[1:] for t in timed]
        rows.append(["train_reply, first call (cold)", f"{cold:.2f}", "", "", ""])
        header = ["", "s (median)", "s (q1-q3)", "ratio (median)", "ratio (q1-q3)"]
        return (f"Demo config ({describe(cfg)}), simulated hospital 0 of 3 (n = {len(data)}), "
                f"{plan.steps} DP discriminator steps and {plan.steps // cfg.d_steps_per_g_step} "
                f"generator steps per round, batch-size {cfg.batch_size}; {repeats} repeats\n\n"
                + table(header, rows))

