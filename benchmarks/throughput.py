"""Item 5: images per second of the FID Inception features and of synthetic image generation.

    Inception features   shared.features.InceptionFeatures (TF-FID InceptionV3, offline):
                         gray [-1, 1] images -> 299x299 RGB -> (N, 2048), inference mode
    generation           server.release.generate: the demo's generator (EMA weights are the
                         same network), uint8 (N, S, S) images as released, batches of 500

Each figure is the median over repeats of N images / wall seconds, measured one after the
other in the same process, with the IQR.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.timing import quartiles, table
from benchmarks.workload import demo_config, describe
from server.release import generate
from shared import models


def _rates(fn, images: int, repeats: int) -> tuple[float, float, float]:
    fn()  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rates.append(images / (time.perf_counter() - start))
    return quartiles(rates)


def run(inception_images: int, generated_images: int, repeats: int) -> str:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (28, 64):
            overrides = {"image-size": size}
            if size == 64:
                overrides.update({"d-width": 32, "g-width": 32})
            cfg = demo_config(Path(tmp), **overrides)
            g = models.build(cfg)["generator"].eval()
            labels = np.arange(generated_images) % cfg.num_classes
            q1, med, q3 = _rates(lambda: generate(g, labels, cfg.latent_dim, seed=0),
                                 generated_images, repeats)
            rows.append([f"generation {size}x{size} ({describe(cfg)})", str(generated_images),
                         f"{med:,.0f}", f"{q1:,.0f}-{q3:,.0f}"])
    try:
        from shared.features import InceptionFeatures
        extractor = InceptionFeatures()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        rows.append(["Inception features", "-", f"not available: {e}", ""])
    else:
        for size in (28, 64):
            images = torch.rand(inception_images, 1, size, size) * 2 - 1
            q1, med, q3 = _rates(lambda: extractor(images), inception_images, repeats)
            rows.append([f"Inception features, {size}x{size} input (resized to 299x299)",
                         str(inception_images), f"{med:.1f}", f"{q1:.1f}-{q3:.1f}"])
    return (f"{repeats} repeats after one warm-up\n\n"
            + table(["", "images per run", "images/s (median)", "images/s (q1-q3)"], rows))
