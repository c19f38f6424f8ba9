"""How much more DP noise federated training carries than one central DP-SGD run.

For a run config (default: configs/demo.toml), at the same epsilon and delta and the same
number of steps:

    federated: hospital k runs DP-SGD on its n_k images, batch B_k = q_k n_k, noise
               sigma_k (calibrated to the target over the run); FedAvg weights w_k = n_k / n.
               Noise std per coordinate of the averaged per-step gradient:
               sqrt( sum_k w_k^2 (sigma_k C / B_k)^2 )
    central:   one DP-SGD run on the pooled n images with batch B = sum_k B_k (the same
               images per step), noise sigma calibrated the same way: sigma C / B

The ratio is what averaging K locally noised updates costs; it grows like sqrt(K) for
equal hospitals. Usage: python -m benchmarks.federated_noise [CONFIG]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from client.data import read_npz
from client.train import calibrate_noise, sample_rate
from server.launch import resolve_paths
from shared import partition
from shared.config import RunConfig, load_toml


def compare(cfg: RunConfig) -> dict:
    _, labels = read_npz(Path(cfg.data_path), "train")
    parts = partition.split(labels, cfg.num_hospitals, cfg.partition, cfg.dirichlet_alpha,
                            cfg.seed)
    sizes = [len(p) for p in parts]
    n = sum(sizes)
    fed_var, rows = 0.0, []
    for k, n_k in enumerate(sizes):
        q_k = sample_rate(cfg, n_k)
        delta = min(cfg.target_delta, 1 / n_k)
        sigma_k = calibrate_noise(cfg, n_k, cfg.target_epsilon, delta)
        b_k = q_k * n_k
        std_k = sigma_k * cfg.max_grad_norm / b_k
        fed_var += (n_k / n) ** 2 * std_k ** 2
        rows.append((f"hospital-{k}", n_k, q_k, b_k, sigma_k, std_k))
    batch = sum(r[3] for r in rows)
    central = RunConfig.from_flat({**cfg.to_flat(), "batch-size": max(1, round(batch))})
    q = sample_rate(central, n)
    sigma = calibrate_noise(central, n, cfg.target_epsilon, min(cfg.target_delta, 1 / n))
    std_c = sigma * cfg.max_grad_norm / (q * n)
    return {"rows": rows, "central": (n, q, q * n, sigma, std_c),
            "federated_std": math.sqrt(fed_var), "ratio": math.sqrt(fed_var) / std_c}


def main(argv: list[str]) -> None:
    path = Path(argv[0]) if argv else Path("configs/demo.toml")
    cfg = RunConfig.from_flat(resolve_paths(load_toml(path), Path.cwd()))
    out = compare(cfg)
    print(f"{path}: epsilon {cfg.target_epsilon}, {cfg.num_rounds * cfg.local_d_steps} steps, "
          f"C = {cfg.max_grad_norm}")
    print(f"{'':<12} {'n':>6} {'q':>7} {'batch':>7} {'sigma':>7} {'noise std/step':>15}")
    for name, n_k, q_k, b_k, s_k, std in out["rows"]:
        print(f"{name:<12} {n_k:>6} {q_k:>7.4f} {b_k:>7.1f} {s_k:>7.3f} {std:>15.5f}")
    n, q, b, s, std_c = out["central"]
    print(f"{'central':<12} {n:>6} {q:>7.4f} {b:>7.1f} {s:>7.3f} {std_c:>15.5f}")
    print(f"federated (FedAvg) noise std {out['federated_std']:.5f} = "
          f"{out['ratio']:.2f}x central (sqrt(K) = {math.sqrt(cfg.num_hospitals):.2f})")


if __name__ == "__main__":
    main(sys.argv[1:])
