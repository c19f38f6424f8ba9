"""FID and KID of a release's synthetic images against the real PneumoniaMNIST splits (exact).

A central benchmark on the bundled public data, not the federated evaluation: it measures what
the DP figures of a release estimate, in the standard 2048-d Inception space, comparable with
published numbers. Beside it the same figures for the real train split against the real test
split: the floor a perfect generator would reach at these sample sizes.

    python benchmarks/fid_release.py outputs/demo/release --features-cache outputs/release-features.pt
    python benchmarks/fid_release.py /tmp/smoke/release --features tiny    # seconds: a check only

Inception runs at about 2-9 images/s on 2 shared CPU cores: the demo's 400 synthetic images,
the 624 test images and a 1000-image training subsample take minutes (cached per file).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.features import feature_network, uint8_to_unit_range  # noqa: E402
from shared.metrics import diversity_ssim, frechet_distance, kernel_distance, precision_recall  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("release", type=Path, help="a release directory (holds synthetic.npz)")
    parser.add_argument("--data", type=Path, default=Path("data/pneumoniamnist.npz"))
    parser.add_argument("--train-size", type=int, default=1000, help="seeded subsample of the train split")
    parser.add_argument("--features", choices=("inception", "tiny"), default="inception")
    parser.add_argument("--kid-subset", type=int, default=200, help="KID subset size (100 subsets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features-cache", type=Path, help="reuse/save extracted features (.pt)")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """uint8 images and labels: synthetic (the release), train (subsample), test."""
    with np.load(args.release / "synthetic.npz") as npz:
        synthetic = (npz["train_images"], npz["train_labels"].reshape(-1))
    with np.load(args.data) as npz:
        order = np.random.default_rng(args.seed).permutation(len(npz["train_labels"]))[: args.train_size]
        train = (npz["train_images"][order], npz["train_labels"].reshape(-1)[order])
        test = (npz["test_images"], npz["test_labels"].reshape(-1))
    return {"synthetic": synthetic, "train": train, "test": test}


def features(args: argparse.Namespace, sets: dict) -> tuple[dict[str, torch.Tensor], float]:
    # the images' digest, not only the path: a new release in the same folder must not reuse
    # the old one's features
    digest = hashlib.sha256(np.ascontiguousarray(sets["synthetic"][0]).tobytes()).hexdigest()
    key = {"release": str(args.release.resolve()), "features": args.features, "train_size": args.train_size,
           "seed": args.seed, "synthetic_count": len(sets["synthetic"][1]), "synthetic_sha256": digest}
    if args.features_cache and args.features_cache.exists():
        cached = torch.load(args.features_cache)
        if cached.get("key") == key:
            return cached["features"], cached["seconds"]
    net = feature_network(args.features)
    start = time.perf_counter()
    out = {name: net(uint8_to_unit_range(images)).double() for name, (images, _) in sets.items()}
    seconds = time.perf_counter() - start
    if args.features_cache:
        torch.save({"key": key, "features": out, "seconds": seconds}, args.features_cache)
    return out, seconds


def scores(real: torch.Tensor, fake: torch.Tensor, subset: int, seed: int) -> dict[str, float]:
    kid, kid_std = kernel_distance(real, fake, subsets=100, subset_size=subset, seed=seed)
    pr = precision_recall(real, fake, k=3)
    return {"fid": frechet_distance(real, fake), "kid": kid, "kid_std": kid_std, **pr}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    sets = load(args)
    feats, seconds = features(args, sets)
    images = {name: uint8_to_unit_range(imgs) for name, (imgs, _) in sets.items()}
    labels = {name: torch.as_tensor(lab.astype(np.int64)) for name, (_, lab) in sets.items()}
    print(f"command: python benchmarks/{Path(__file__).name} " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"features: {args.features}; synthetic {len(labels['synthetic'])}, train {len(labels['train'])} "
          f"(seeded subsample), test {len(labels['test'])} images; feature extraction {seconds:.0f} s\n")
    rows = {
        "real train vs real test": scores(feats["test"], feats["train"], args.kid_subset, args.seed),
        "release vs real test": scores(feats["test"], feats["synthetic"], args.kid_subset, args.seed),
        "release vs real train": scores(feats["train"], feats["synthetic"], args.kid_subset, args.seed),
    }
    print("| compared | FID | KID (100 subsets) | precision | recall |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['fid']:.2f} | {r['kid']:.4f} ± {r['kid_std']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    print("\n| class | FID release vs test | FID train vs test | diversity SSIM release | diversity SSIM test |")
    print("|---|---|---|---|---|")
    for c in sorted(set(labels["synthetic"].tolist())):
        fake, test, train = (feats[n][labels[n] == c] for n in ("synthetic", "test", "train"))
        ssim_fake = diversity_ssim(images["synthetic"][labels["synthetic"] == c], seed=args.seed)
        ssim_test = diversity_ssim(images["test"][labels["test"] == c], seed=args.seed)
        rows[f"class {c}"] = {"fid": frechet_distance(test, fake), "fid_real": frechet_distance(test, train),
                              "ssim": ssim_fake, "ssim_real": ssim_test}
        print(f"| {c} | {rows[f'class {c}']['fid']:.2f} | {rows[f'class {c}']['fid_real']:.2f} | "
              f"{ssim_fake:.3f} | {ssim_test:.3f} |")
    return rows


if __name__ == "__main__":
    main()
