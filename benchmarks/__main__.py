"""Run the benchmarks and print Markdown for benchmarks/RESULTS.md.

    python -m benchmarks                  # items 1, 2, 4, 5: about 10 minutes on 2 loaded cores
    python -m benchmarks --quick          # the same, fewer sizes and repeats: 1-2 minutes
    python -m benchmarks --deployment     # adds item 3 (SuperLink + 3 SuperNodes): minutes more
    python -m benchmarks --only step      # one item: step, round, deployment, aggregation,
                                          # throughput
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings

import torch

from benchmarks import aggregation, deployment, dp_step, local_round, throughput
from benchmarks.timing import machine

ITEMS = ("step", "round", "deployment", "aggregation", "throughput")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1-2 minute version")
    parser.add_argument("--deployment", action="store_true",
                        help="also item 3: Deployment Engine on loopback (minutes)")
    parser.add_argument("--only", choices=ITEMS, action="append",
                        help="run only these items (repeatable)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: steadier on a shared machine)")
    parser.add_argument("--repeats", type=int, default=0, help="override the repeat count")
    parser.add_argument("--rounds", type=int, default=3, help="item 3: federated rounds")
    args = parser.parse_args(argv)
    items = set(args.only or [i for i in ITEMS if i != "deployment" or args.deployment])
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    # the ledger's epsilon after hundreds of benchmark rounds, far past any real budget
    warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")

    quick = args.quick
    repeats = args.repeats or (3 if quick else 7)
    command = "python -m benchmarks" + "".join(" " + shlex.quote(a) for a in
                                               (argv if argv is not None else sys.argv[1:]))
    print(f"# `{command}`\n\nMachine: {machine(args.threads)}.\n", flush=True)
    started = time.perf_counter()

    def section(title: str, body) -> None:
        t0 = time.perf_counter()
        text = body()
        print(f"## {title}\n\n{text}\n\n_({time.perf_counter() - t0:.0f} s)_\n", flush=True)

    if "step" in items:
        configs = [(28, 128), (64, 64)] if quick else [(28, 64), (28, 128), (64, 64), (64, 128)]
        section("1. Discriminator step: DP / non-DP",
                lambda: dp_step.run(configs, repeats, calls=2 if quick else 3,
                                    generation=(True, False)))
    if "round" in items:
        section("2. Local round: ClientApp train handler vs plain train_round loop",
                lambda: local_round.run(repeats=args.repeats or (2 if quick else 4),
                                        local_d_steps=10 if quick else None))
    if "deployment" in items:
        section("3. Federated round: Deployment Engine vs the same work standalone",
                lambda: deployment.run(args.rounds, args.threads,
                                       local_d_steps=10 if quick else None))
    if "aggregation" in items:
        section("4. Server aggregation: time and peak memory",
                lambda: aggregation.run((3, 10) if quick else (3, 10, 50), repeats))
    if "throughput" in items:
        section("5. Throughput: Inception features, synthetic images",
                lambda: throughput.run(inception_images=8 if quick else 32,
                                       generated_images=500 if quick else 2000,
                                       repeats=2 if quick else 3))
    print(f"_Total {time.perf_counter() - started:.0f} s._")
    return 0


if __name__ == "__main__":
    sys.exit(main())
