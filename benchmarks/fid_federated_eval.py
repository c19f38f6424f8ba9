"""Federated DP evaluation with the FID Inception network: how far the evaluate protocol's DP
releases move FID and recall from their exact values, and what they cost.

Three hospitals hold PneumoniaMNIST's test split (Dirichlet alpha 0.5, seed 0: how the demo
splits its eval split). Three stand-in "generators", scored against them:

    perfect     --per-class real training images per class (the floor a perfect generator reaches)
    blurred     the same images through a 5x5 box blur (a visibly worse generator)
    collapsed   one of those images, repeated (mode collapse; features jittered by 1e-3)

Each hospital releases what `client/evaluate.py` releases: per-class FID statistics of its
features centred on the synthetic mean, projected (a fixed random subspace as in the release,
or for contrast the synthetic features' top principal directions) and clipped, and recall
counts, with the shares of eval-epsilon that `shared/evaluation.py` gives them; the server
pools them and computes FID with the release's estimator. Exact figures use the same
statistics without noise.

    python benchmarks/fid_federated_eval.py --features-cache outputs/eval-features.pt

About 3 minutes of Inception on 2 CPU cores for 1424 images, then seconds per setting.
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

from server.evaluation import FID_ESTIMATOR  # noqa: E402
from shared import evaluation as protocol  # noqa: E402
from shared.classifier import evaluate_classifier, predict_proba, train_classifier  # noqa: E402
from shared.config import defaults  # noqa: E402
from shared import partition  # noqa: E402
from shared.dp_stats import (  # noqa: E402
    FeatureStats,
    FeatureTransform,
    calibrate_noise_multiplier,
    dp_classification_counts,
    dp_recall_counts,
    fid_from_stats,
    gaussian_stats_per_class,
    recall_from_counts,
)
from shared.features import InceptionFeatures, uint8_to_unit_range  # noqa: E402
from shared.metrics import frechet_distance, precision_recall  # noqa: E402

RELEASES = list(protocol.BUDGET_WEIGHTS)  # fid-stats, recall, classifier, memorization: the release's request
# (basis, eval-fid-dims, eval-clip-norm); 0 dims = all 2048 features. Random subspaces are
# scaled to full-feature units, so their clips compare with the 2048-d ones.
SETTINGS = [("random", 8, 15.0), ("random", 16, 14.0), ("random", 16, 18.0), ("random", 16, 22.0),
            ("random", 32, 20.0), ("random", 64, 22.0), ("pca", 8, 10.0), ("pca", 16, 10.0), ("none", 0, 30.0)]
GENERATORS = ("perfect", "blurred", "collapsed")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/pneumoniamnist.npz")
    parser.add_argument("--per-class", type=int, default=200, help="synthetic stand-ins per class (eval-samples)")
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 10.0], help="eval-epsilon values")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--features-cache", type=Path)
    parser.add_argument("--test-features-from", type=Path,
                        help="reuse the test split's features from a fid_real_vs_real.py --features-cache file")
    return parser.parse_args()


def extract(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    if args.features_cache and args.features_cache.exists():
        cached = torch.load(args.features_cache)
        if cached["per_class"] == args.per_class:
            return cached
    with np.load(args.data) as npz:
        train_images, train_labels = npz["train_images"], npz["train_labels"].reshape(-1)
        test_images, test_labels = npz["test_images"], npz["test_labels"].reshape(-1)
    rng = np.random.default_rng(0)
    chosen = np.concatenate([rng.permutation(np.flatnonzero(train_labels == c))[: args.per_class]
                             for c in np.unique(train_labels)])
    fake = uint8_to_unit_range(train_images[chosen])
    blurred = torch.nn.functional.avg_pool2d(fake, 5, stride=1, padding=2)
    extractor = InceptionFeatures()
    start = time.perf_counter()
    reused = torch.load(args.test_features_from) if args.test_features_from else None
    out = {
        "test": reused["test"] if reused else extractor(uint8_to_unit_range(test_images)).double(),
        "test_labels": torch.as_tensor(test_labels.astype(np.int64)),
        "perfect": extractor(fake).double(),
        "blurred": extractor(blurred).double(),
        "fake_labels": torch.as_tensor(train_labels[chosen].astype(np.int64)),
        "per_class": args.per_class,
    }
    out["seconds"] = time.perf_counter() - start
    if args.features_cache:
        args.features_cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, args.features_cache)
    return out


def describe(draws: list[float], exact: float) -> str:
    rmse = math.sqrt(np.mean((np.array(draws) - exact) ** 2))
    return f"{np.mean(draws):.2f} ± {np.std(draws):.2f} | {rmse:.2f}"


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    feats = extract(args)
    jitter = torch.randn(feats["perfect"].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    feats["collapsed"] = feats["perfect"][:1] + 1e-3 * jitter
    labels = feats["test_labels"]
    parts = partition.split(labels.numpy(), args.hospitals, "dirichlet", 0.5, 0)
    hospitals = [(feats["test"][idx], labels[idx]) for idx in parts]
    print(f"command: python benchmarks/{Path(__file__).name} " + " ".join(sys.argv[1:]))
    print(f"real: PneumoniaMNIST test split, {len(labels)} images in {args.hospitals} hospitals "
          f"({', '.join(str(len(p)) for p in parts)}); synthetic stand-ins: {len(feats['fake_labels'])} "
          f"({args.per_class} per class); Inception features took {feats['seconds']:.0f} s")
    for epsilon in args.epsilons:
        shares = protocol.release_epsilons(RELEASES, epsilon, args.delta)
        print(f"eval-epsilon {epsilon:g}: per-release epsilon " + ", ".join(
            f"{name} {e:.3f} (z={calibrate_noise_multiplier(e, args.delta):.2f})" for name, e in shares.items()))

    print(f"\n## FID: exact vs DP (mean ± std over {args.repeats} noise draws; RMSE against the exact clipped "
          f"FID)\n\nEstimators (shared/dp_stats.py fid_from_stats): {FID_ESTIMATOR} (the release's) and psd "
          "(every covariance projected to PSD).\n")
    print("| generator | space | clip | central 2048-d FID | exact, this space | clipped | eval-epsilon | "
          f"DP FID, {FID_ESTIMATOR} | RMSE | DP FID, psd | RMSE |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for basis, dims, clip in SETTINGS:
        for name in GENERATORS:
            fake = feats[name]
            if basis == "random":
                transform = FeatureTransform.random_projection(fake.mean(dim=0), dims, clip_norm=clip,
                                                               seed=protocol.FID_BASIS_SEED)
            else:
                transform = FeatureTransform.from_synthetic(fake, clip_norm=clip, dim=dims or None)
            unclipped = FeatureTransform(None, transform.center, transform.projection)
            exact = fid_from_stats(FeatureStats.from_features(feats["test"], unclipped), fake)
            clipped = fid_from_stats(FeatureStats.from_features(feats["test"], transform), fake)
            central = frechet_distance(feats["test"], fake)
            for epsilon in args.epsilons:
                share = protocol.release_epsilons(RELEASES, epsilon, args.delta)["fid-stats"]
                draws, psd_draws = [], []
                repeats = args.repeats if dims else min(args.repeats, 2)   # 2048-d: slow, and far off
                for repeat in range(repeats):
                    generator = torch.Generator().manual_seed(1000 * repeat + int(epsilon))
                    pooled = None
                    for features, hospital_labels in hospitals:
                        per_class, _ = gaussian_stats_per_class(
                            features, hospital_labels, classes=[0, 1], clip_norm=clip, center=transform.center,
                            projection=transform.projection, epsilon=share, delta=args.delta, generator=generator)
                        for stats in per_class.values():
                            pooled = stats if pooled is None else pooled.merge(stats)
                    draws.append(fid_from_stats(pooled, fake, denoise=FID_ESTIMATOR))
                    psd_draws.append(fid_from_stats(pooled, fake, denoise="psd"))
                space = {"random": f"random-{dims}", "pca": f"PCA-{dims}", "none": "2048-d"}[basis]
                default = (dims, clip) == (defaults()["eval-fid-dims"], defaults()["eval-clip-norm"]) and basis == "random"
                print(f"| {name} | {space}{' (default)' if default else ''} | {clip:g} | {central:.1f} | {exact:.2f} | "
                      f"{clipped:.2f} | {epsilon:g} | {describe(draws, clipped)} | {describe(psd_draws, clipped)} |")

    print("\n## Recall (k=3, 2048-d features): exact vs DP\n")
    print("| generator | exact recall | eval-epsilon | DP recall |")
    print("|---|---|---|---|")
    for name in GENERATORS:
        exact = precision_recall(feats["test"], feats[name], k=protocol.RECALL_K)["recall"]
        for epsilon in args.epsilons:
            share = protocol.release_epsilons(RELEASES, epsilon, args.delta)["recall"]
            values = []
            for repeat in range(args.repeats):
                generator = torch.Generator().manual_seed(2000 + 1000 * repeat + int(epsilon))
                counts = [dp_recall_counts(f, feats[name], k=protocol.RECALL_K, epsilon=share, delta=args.delta,
                                           generator=generator)[0] for f, _ in hospitals]
                values.append(recall_from_counts(counts))
            print(f"| {name} | {exact:.3f} | {epsilon:g} | {np.mean(values):.3f} ± {np.std(values):.3f} |")

    print("\n## Classifier accuracy and ROC AUC: exact vs DP counts\n")
    print("The noise does not depend on who trained the classifier; a real-trained one (300 training")
    print(f"images, 20 epochs) stands in for the train-on-synthetic one. {protocol.SCORE_BINS} score bins.\n")
    print("| eval-epsilon | exact accuracy | DP accuracy | exact AUC | DP AUC |")
    print("|---|---|---|---|---|")
    with np.load(args.data) as npz:
        order = np.random.default_rng(0).permutation(len(npz["train_labels"]))[:300]
        model = train_classifier(uint8_to_unit_range(npz["train_images"][order]),
                                 torch.as_tensor(npz["train_labels"][order]), epochs=20, augment=False, seed=0)
        test_images = uint8_to_unit_range(npz["test_images"])
    exact = evaluate_classifier(model, test_images, labels)
    probabilities = predict_proba(model, test_images)
    for epsilon in args.epsilons:
        share = protocol.release_epsilons(RELEASES, epsilon, args.delta)["classifier"]
        accuracies, aucs = [], []
        for repeat in range(4 * args.repeats):
            generator = torch.Generator().manual_seed(3000 + repeat)
            pooled = None
            for idx in parts:
                counts, _ = dp_classification_counts(probabilities[idx], labels[idx], epsilon=share, delta=args.delta,
                                                     num_bins=protocol.SCORE_BINS, generator=generator)
                pooled = counts if pooled is None else pooled.merge(counts)
            accuracies.append(pooled.accuracy())
            aucs.append(pooled.auc())
        print(f"| {epsilon:g} | {exact['accuracy']:.3f} | {np.mean(accuracies):.3f} ± {np.std(accuracies):.3f} | "
              f"{exact['auc']:.3f} | {np.mean(aucs):.3f} ± {np.std(aucs):.3f} |")

    norms = {}
    for basis, dims, _ in SETTINGS:
        if basis == "random" and dims not in norms:
            transform = FeatureTransform.random_projection(feats["perfect"].mean(dim=0), dims, clip_norm=1e9,
                                                           seed=protocol.FID_BASIS_SEED)
            q = torch.quantile(transform(feats["test"]).norm(dim=1), torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
            norms[dims] = ", ".join(f"{v:.1f}" for v in q.tolist())
    print("\nreal feature norms, centred on the perfect generator's mean and projected (50/90/99 %): "
          + "; ".join(f"random-{d}: {v}" for d, v in norms.items()))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
