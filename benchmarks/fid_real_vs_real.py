"""Real-vs-real FID/KID on PneumoniaMNIST with the FID Inception network, exact and under DP.

The training split plays the hospitals' real data (split over ``--hospitals`` equal shards) and
the test split plays the public synthetic set: everything derived from it (center, PCA basis,
distance scales) is what the server could send. The figures are the floor a perfect generator
would reach and the error each DP release adds on top of it.

    python benchmarks/fid_real_vs_real.py                     # ~6 min on 2 CPU cores
    python benchmarks/fid_real_vs_real.py --train-size 4708   # whole training split, ~12 min

Inception runs at about 8 images/s on 2 cores, so the training split is subsampled (seeded) to
``--train-size`` images by default; FID is biased upwards at small sample sizes, so compare
figures only at equal sizes.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.dp_stats import (  # noqa: E402
    FeatureStats,
    FeatureTransform,
    dp_kernel_terms,
    dp_recall_counts,
    fid_from_stats,
    gaussian_stats,
    kid_from_terms,
    pooled_real_kernel_term,
    recall_from_counts,
)
from shared.features import InceptionFeatures, uint8_to_unit_range  # noqa: E402
from shared.metrics import frechet_distance, kernel_distance, precision_recall  # noqa: E402

# (label, clip_norm, center on the synthetic mean, PCA dimensions or None)
FID_SETTINGS = [
    ("2048-d, no center, C=30", 30.0, False, None),
    ("2048-d, centered, C=12", 12.0, True, None),
    ("PCA-64, centered, C=6", 6.0, True, 64),
    ("PCA-16, centered, C=10", 10.0, True, 16),
    ("PCA-16, centered, C=6", 6.0, True, 16),
]
KID_CLIP = 30.0  # above every Inception feature norm seen on PneumoniaMNIST (max ~29.3)
N_CAP = 2000  # public cap on the real images per hospital in the real/real kernel sum


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/pneumoniamnist.npz")
    parser.add_argument("--train-size", type=int, default=1500, help="seeded subsample of the training split")
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--repeats", type=int, default=5, help="independent noise draws per DP figure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features-cache", type=Path, help="reuse/save extracted features (.pt)")
    return parser.parse_args()


def extract(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, float]:
    if args.features_cache and args.features_cache.exists():
        cached = torch.load(args.features_cache)
        if cached["train_size"] == args.train_size and cached["seed"] == args.seed:
            return cached["train"], cached["test"], cached["seconds"]
    data = np.load(args.data)
    order = np.random.default_rng(args.seed).permutation(len(data["train_images"]))[: args.train_size]
    extractor = InceptionFeatures()
    start = time.perf_counter()
    train = extractor(uint8_to_unit_range(data["train_images"][order])).double()
    test = extractor(uint8_to_unit_range(data["test_images"])).double()
    seconds = time.perf_counter() - start
    if args.features_cache:
        torch.save({"train": train, "test": test, "seconds": seconds, "train_size": args.train_size, "seed": args.seed},
                   args.features_cache)
    return train, test, seconds


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    train, test, extract_seconds = extract(args)
    hospitals = train.chunk(args.hospitals)
    print(f"command: python benchmarks/{Path(__file__).name} " + " ".join(sys.argv[1:]))
    print(f"real (train split, subsample): {len(train)} images in {args.hospitals} hospitals; "
          f"synthetic stand-in (test split): {len(test)}; Inception features: {extract_seconds:.0f} s "
          f"({(len(train) + len(test)) / extract_seconds:.1f} images/s), torch threads {torch.get_num_threads()}")

    # Exact figures: central torchmetrics vs pooled federated statistics.
    central_fid = frechet_distance(train, test)
    pooled = FeatureStats.from_features(hospitals[0])
    for hospital in hospitals[1:]:
        pooled = pooled.merge(FeatureStats.from_features(hospital))
    federated_fid = fid_from_stats(pooled, test)
    kid_mean, kid_std = kernel_distance(train, test, subsets=100, subset_size=500, seed=args.seed)
    exact_terms = [dp_kernel_terms(h, test, clip_norm=KID_CLIP, epsilon=math.inf, delta=args.delta)[0] for h in hospitals]
    federated_kid = kid_from_terms(exact_terms, test, clip_norm=KID_CLIP)
    single_terms, _ = dp_kernel_terms(train, test, clip_norm=KID_CLIP, epsilon=math.inf, delta=args.delta, n_cap=len(train))
    pooled_kid = kid_from_terms([single_terms], test, clip_norm=KID_CLIP)
    pr = precision_recall(train, test, k=3)
    print("\n## Exact (no noise)\n")
    print("| metric | value |\n|---|---|")
    print(f"| FID, torchmetrics, central | {central_fid:.3f} |")
    print(f"| FID, pooled federated statistics | {federated_fid:.3f} (difference {federated_fid - central_fid:.1e}) |")
    print(f"| KID, torchmetrics, 100 subsets of 500 | {kid_mean:.5f} ± {kid_std:.5f} |")
    print(f"| KID, unbiased full-set MMD², one pool | {pooled_kid:.5f} |")
    print(f"| KID, federated ({args.hospitals} within-hospital real terms) | {federated_kid:.5f} |")
    print(f"| precision / recall (k=3) | {pr['precision']:.3f} / {pr['recall']:.3f} |")

    print(f"\n## FID under the DP Gaussian mechanism (per hospital, delta={args.delta:g}; "
          f"mean ± std over {args.repeats} draws)\n")
    print("| features | exact, no clip | exact, clipped | epsilon | DP, PSD projection | DP, soft threshold |")
    print("|---|---|---|---|---|---|")
    for label, clip_norm, centered, dims in FID_SETTINGS:
        transform = FeatureTransform.from_synthetic(test, clip_norm=clip_norm, dim=dims)
        if not centered:
            transform = FeatureTransform(clip_norm=clip_norm)
        exact = fid_from_stats(FeatureStats.from_features(train, transform), test)
        unclipped_transform = FeatureTransform(None, transform.center, transform.projection)
        unclipped = fid_from_stats(FeatureStats.from_features(train, unclipped_transform), test)
        for epsilon in args.epsilons:
            psd, soft = [], []
            for repeat in range(args.repeats):
                generator = torch.Generator().manual_seed(1000 * repeat + int(epsilon))
                noisy = None
                for hospital in hospitals:
                    stats, mechanism = gaussian_stats(
                        hospital, clip_norm=clip_norm, epsilon=epsilon, delta=args.delta, center=transform.center,
                        projection=transform.projection, generator=generator,
                    )
                    noisy = stats if noisy is None else noisy.merge(stats)
                psd.append(fid_from_stats(noisy, test, denoise="psd"))
                soft.append(fid_from_stats(noisy, test, denoise="soft_threshold"))
            print(f"| {label} | {unclipped:.3f} | {exact:.3f} | {epsilon:g} (z={mechanism.noise_multiplier:.2f}) | "
                  f"{mean_std(psd)} | {mean_std(soft)} |")

    print(f"\n## KID and recall under DP (clip {KID_CLIP:g}; real/real pairs capped at {N_CAP} per hospital)\n")
    print("KID (all terms) releases count, cross and real/real sums; KID (cross only) releases count and")
    print("cross sums and takes the generator-independent real/real term as known (released once and cached).\n")
    print("| epsilon | KID, DP, all terms | KID, DP, cross only | KID exact | recall, DP | recall exact |")
    print("|---|---|---|---|---|---|")
    real_term = pooled_real_kernel_term(exact_terms)
    for epsilon in args.epsilons:
        kids, cross_kids, recalls = [], [], []
        for repeat in range(args.repeats):
            generator = torch.Generator().manual_seed(2000 + 1000 * repeat + int(epsilon))
            terms = [
                dp_kernel_terms(h, test, clip_norm=KID_CLIP, epsilon=epsilon, delta=args.delta, n_cap=N_CAP,
                                generator=generator)[0]
                for h in hospitals
            ]
            kids.append(kid_from_terms(terms, test, clip_norm=KID_CLIP))
            cross_terms = [
                dp_kernel_terms(h, test, clip_norm=KID_CLIP, epsilon=epsilon, delta=args.delta, include_pairs=False,
                                generator=generator)[0]
                for h in hospitals
            ]
            cross_kids.append(kid_from_terms(cross_terms, test, clip_norm=KID_CLIP, real_term=real_term))
            counts = [dp_recall_counts(h, test, epsilon=epsilon, delta=args.delta, generator=generator)[0] for h in hospitals]
            recalls.append(recall_from_counts(counts))
        print(f"| {epsilon:g} | {np.mean(kids):.4f} ± {np.std(kids):.4f} | {np.mean(cross_kids):.4f} ± {np.std(cross_kids):.4f} | "
              f"{federated_kid:.4f} | {np.mean(recalls):.3f} ± {np.std(recalls):.3f} | {pr['recall']:.3f} |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
