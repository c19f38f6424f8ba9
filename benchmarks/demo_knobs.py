"""The demo's federation with some knobs changed: sample grids and central scores, quickly.

    python -m benchmarks.demo_knobs NAME [key=value ...]      # e.g. base, or max-grad-norm=0.1

configs/demo.toml (3 hospitals, label skew, 28 px, epsilon 9 for training) with the given
overrides, every round run in this process through the real hospital handler and the
server's FedAvg + EMA (`benchmarks.compare_models.federate`: no Flower transport, no DP
evaluation), so one variant takes 4-7 minutes on one core and two run side by side on two.
Writes outputs/demo-knobs/NAME/grid.png (the release's sampler: EMA generator, and the best of
release-candidates by the final discriminator), grid-plain.png (the EMA generator alone, one
draw per image), sampler.npz (the weights) and appends one JSON line of scores to
outputs/demo-knobs/results.jsonl, for the plain and (release-candidates > 1) the selected
images: central, non-DP scores against PneumoniaMNIST's public test split in the "tiny" random-conv
features (`compare_models.score_sampler`; fast on 2 cores, not comparable with published
FIDs). A hospital's noise secret is fresh per run, so a rerun of one variant draws other
noise: read single rows with benchmarks/RESULTS.md's spread in mind.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.compare_models import federate, score_sampler
from server.release import generator_from, sampler_weights, save_grid
from shared.config import load_toml, validate

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "outputs" / "demo-knobs"


def values_for(overrides: list[str], output_dir: Path) -> dict:
    values = load_toml(REPO / "configs" / "demo.toml")
    values.update({"data-path": str(REPO / "data" / "pneumoniamnist.npz"), "evaluate": False,
                   "output-dir": str(output_dir)})
    for item in overrides:
        key, _, text = item.partition("=")
        default = values.get(key, "")
        values[key] = (text.lower() == "true" if isinstance(default, bool)
                       else type(default)(text))
    return validate(values, "demo_knobs overrides")


def main(argv: list[str] | None = None) -> dict:
    args = sys.argv[1:] if argv is None else argv
    if not args or "=" in args[0]:
        raise SystemExit(__doc__)
    name, overrides = args[0], args[1:]
    out = OUT / name
    values = values_for(overrides, out)
    cfg, global_w, ema_w, seconds, epsilon = federate(values, int(values["num-hospitals"]))
    sampler = sampler_weights(global_w, ema_w)
    save_grid(generator_from(cfg, sampler), cfg, out / "grid.png")
    plain = dataclasses.replace(cfg, release_candidates=1)
    save_grid(generator_from(plain, ema_w), plain, out / "grid-plain.png")
    np.savez(out / "sampler.npz", **sampler)
    row = {"name": name, "overrides": overrides, "train_s": round(seconds),
           "max_epsilon": round(epsilon, 3)}
    for label, c in (("selected", cfg), ("plain", plain)):
        if label == "plain" or cfg.release_candidates > 1:
            scores = score_sampler(c, sampler, "tiny")
            row[label] = {k: round(v, 4) if isinstance(v, float) else v
                          for k, v in scores.items()}
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
