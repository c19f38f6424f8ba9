"""Exact (non-private) image-quality metrics on features or images.

These run where the data are: on synthetic images anywhere (they are public), on real images only
inside a hospital or in central benchmarks. Nothing here adds noise; what may leave a hospital is
built from these pieces in ``shared.dp_stats``.

* ``frechet_distance`` / ``kernel_distance``: FID and KID computed by torchmetrics from features
  extracted once (``shared.features.extract_features``), for central comparisons and benchmarks.
* ``precision_recall``: improved precision and recall (Kynkäänniemi et al., NeurIPS 2019), exact.
* ``diversity_ssim``: mean SSIM between random pairs of samples (1 = all samples identical).
* ``inception_score``: the Inception Score formula on class logits from any classifier.
"""

from __future__ import annotations

import math
import warnings

import torch
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from shared.features import PrecomputedFeatures

# Rows of the query set handled per pairwise-distance block; bounds memory to block x support floats.
_DISTANCE_BLOCK = 1024


def _as_features(features: torch.Tensor, name: str) -> torch.Tensor:
    features = torch.as_tensor(features)
    if features.ndim != 2:
        raise ValueError(f"{name}: expected features of shape (N, d), got {tuple(features.shape)}")
    return features.double()


def frechet_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """FID between two feature sets ``(N, d)``, ``(M, d)`` computed by torchmetrics (float64)."""
    real_features = _as_features(real_features, "real_features")
    fake_features = _as_features(fake_features, "fake_features")
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real_features.shape[1]))
    metric.update(real_features, real=True)
    metric.update(fake_features, real=False)
    return float(metric.compute())


def kernel_distance(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets of ``subset_size``) computed by torchmetrics.

    The cubic polynomial kernel ``(x.y / d + 1) ** 3`` by default, as in Binkowski et al. 2018.
    ``subset_size`` is lowered to the smaller set's size when needed. torchmetrics draws the
    subsets from the global torch RNG, which is seeded here with ``seed`` and restored after.
    """
    real_features = _as_features(real_features, "real_features")
    fake_features = _as_features(fake_features, "fake_features")
    subset_size = min(subset_size, real_features.shape[0], fake_features.shape[0])
    with warnings.catch_warnings():
        # torchmetrics warns that KID keeps all features in memory; here they are already in memory.
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=PrecomputedFeatures(real_features.shape[1]),
            subsets=subsets,
            subset_size=subset_size,
            degree=degree,
            gamma=gamma,
            coef=coef,
        )
    metric.update(real_features, real=True)
    metric.update(fake_features, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(N, M)`` between rows of ``a`` ``(N, d)`` and ``b`` ``(M, d)``, float64."""
    a, b = a.double(), b.double()
    return torch.cat([torch.cdist(block, b) for block in a.split(_DISTANCE_BLOCK)])


def manifold_radii(features: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Distance from each sample to its k-th nearest *other* sample in the same set, shape ``(N,)``.

    The radius of its ball in the k-NN manifold estimate of Kynkäänniemi et al. 2019.
    """
    features = _as_features(features, "features")
    if features.shape[0] <= k:
        raise ValueError(f"k-NN radii need more than k={k} samples, got {features.shape[0]}")
    radii = []
    for start in range(0, features.shape[0], _DISTANCE_BLOCK):
        block = torch.cdist(features[start : start + _DISTANCE_BLOCK], features)
        # Index 0 of the sorted row is the sample itself (distance 0), so k is the k-th other sample.
        radii.append(block.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def in_manifold(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Boolean ``(N,)``: is ``query[i]`` inside some ball ``B(support[j], radii[j])``."""
    query = _as_features(query, "query")
    support = _as_features(support, "support")
    inside = [
        (torch.cdist(block, support) <= radii.double().unsqueeze(0)).any(dim=1)
        for block in query.split(_DISTANCE_BLOCK)
    ]
    return torch.cat(inside)


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), exact.

    precision: fraction of fake samples inside the real k-NN manifold (quality);
    recall: fraction of real samples inside the fake k-NN manifold (coverage).
    A mode-collapsed generator (identical samples) has fake radii 0, hence recall 0.
    """
    real_features = _as_features(real_features, "real_features")
    fake_features = _as_features(fake_features, "fake_features")
    precision = in_manifold(fake_features, real_features, manifold_radii(real_features, k)).double().mean()
    recall = in_manifold(real_features, fake_features, manifold_radii(fake_features, k)).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


def diversity_ssim(images: torch.Tensor, pairs: int = 500, seed: int = 0) -> float:
    """Mean SSIM over ``pairs`` random pairs of distinct samples of ``images`` ``(N, 1, H, W)`` in [-1, 1].

    1.0 means every pair is identical (mode collapse); independent natural images score far lower.
    SSIM, not MS-SSIM: torchmetrics' MS-SSIM with its default 5 scales and 11-pixel Gaussian
    window needs images larger than 160 pixels a side, and fedsynth images are 28 or 64. SSIM
    uses the 11x11 Gaussian window (sigma 1.5), ``data_range=2`` for [-1, 1] images.
    """
    if images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"expected at least 2 images of shape (N, C, H, W), got {tuple(images.shape)}")
    if min(images.shape[-2:]) < 11:
        raise ValueError(f"SSIM's 11-pixel window needs images of at least 11x11, got {tuple(images.shape[-2:])}")
    generator = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    first = torch.randint(0, n, (pairs,), generator=generator)
    # An offset in [1, n-1] guarantees the second index differs from the first.
    second = (first + torch.randint(1, n, (pairs,), generator=generator)) % n
    scores = structural_similarity_index_measure(
        images[first].float(), images[second].float(), data_range=2.0, reduction="none"
    )
    return float(scores.mean())


def inception_score(logits: torch.Tensor, splits: int = 1) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` from class logits ``(N, K)``: (mean, std) over splits.

    The FID InceptionV3 we can load offline has no classification head (its TorchScript stops at
    the 2048-d pool), so the ImageNet Inception Score cannot be computed. This is the same
    formula (via torchmetrics' ``InceptionScore``) on logits of whatever classifier is given,
    e.g. ``shared.classifier`` trained for the data set's labels: a "domain classifier score",
    bounded by K (2 for PneumoniaMNIST), not comparable with published Inception Scores.
    Privacy: scoring synthetic images with a classifier trained on *synthetic* images is public
    post-processing; with a classifier trained on a hospital's real images the score depends on
    those images and must not leave the hospital (no DP version is provided).
    torchmetrics shuffles before splitting; with ``splits=1`` the result is deterministic.
    """
    logits = torch.as_tensor(logits)
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape (N, K), got {tuple(logits.shape)}")
    with warnings.catch_warnings():
        # torchmetrics warns that IS keeps all features in memory; here they are already in memory.
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=PrecomputedFeatures(logits.shape[1]), splits=splits)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # One split has no spread; torchmetrics' std() warns about zero degrees of freedom.
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")
        mean, std = metric.compute()
    return float(mean), (float(std) if splits > 1 else math.nan)
