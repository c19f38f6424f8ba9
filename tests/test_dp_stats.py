"""DP evaluation releases: calibration against independent accountants, noise scale, and that the
noise-free releases reproduce the exact metrics (torchmetrics, NumPy, brute force)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from scipy.stats import norm
from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

from shared.dp_stats import (
    FeatureStats,
    FeatureTransform,
    classification_counts,
    coverage_sensitivity,
    dp_classification_counts,
    dp_fake_coverage,
    dp_kernel_terms,
    dp_nearest_fake_histogram,
    dp_recall_counts,
    fid_from_stats,
    gaussian_stats,
    gaussian_stats_per_class,
    histogram_quantiles,
    kid_from_terms,
    recall_from_counts,
)
from shared.features import TinyFeatureNet, uint8_to_unit_range
from shared.metrics import kernel_distance, precision_recall

DATA = Path(__file__).resolve().parents[1] / "data" / "pneumoniamnist.npz"
DELTA = 1e-5


@pytest.fixture(scope="module")
def features() -> dict[str, torch.Tensor]:
    """TinyFeatureNet features of 300 shuffled training images (3 hospitals of 100) and 100 test images."""
    data = np.load(DATA)
    order = np.random.default_rng(0).permutation(len(data["train_images"]))[:300]
    net = TinyFeatureNet(num_features=64, seed=0)
    return {
        "train": net(uint8_to_unit_range(data["train_images"][order])).double(),
        "train_labels": torch.as_tensor(data["train_labels"][order]).reshape(-1).long(),
        "test": net(uint8_to_unit_range(data["test_images"][:100])).double(),
    }


def independent_rdp_epsilon(noise_multiplier: float, delta: float) -> float:
    """Full-batch Gaussian: RDP alpha / (2 z^2), converted by Balle et al. 2020 (Thm 21), over a fine grid."""
    alphas = np.concatenate([np.linspace(1.01, 12, 2000), np.arange(12, 256)])
    rdp = alphas / (2 * noise_multiplier**2)
    eps = rdp + np.log((alphas - 1) / alphas) - (np.log(delta) + np.log(alphas)) / (alphas - 1)
    return float(eps.min())


def analytic_gaussian_delta(noise_multiplier: float, epsilon: float) -> float:
    """Exact delta(epsilon) of the Gaussian mechanism (Balle & Wang 2018, Thm 8), sensitivity 1."""
    z = noise_multiplier
    return float(norm.cdf(-epsilon * z + 1 / (2 * z)) - math.exp(epsilon) * norm.cdf(-epsilon * z - 1 / (2 * z)))


@pytest.mark.parametrize("epsilon", [1.0, 10.0])
def test_mechanism_epsilon_matches_independent_accountants(features, epsilon):
    _, mechanism = gaussian_stats(
        features["train"][:100], clip_norm=5.0, epsilon=epsilon, delta=DELTA, generator=torch.Generator().manual_seed(0)
    )
    assert (mechanism.name, mechanism.sample_rate, mechanism.steps, mechanism.delta) == ("gaussian", 1.0, 1, DELTA)
    assert epsilon * 0.998 <= mechanism.epsilon <= epsilon

    accountant = RDPAccountant()  # what the hospital's ledger does with the entry
    accountant.history = [mechanism.accountant_entry()]
    assert accountant.get_epsilon(delta=DELTA) == pytest.approx(mechanism.epsilon, rel=1e-12)
    # Opacus uses a coarser grid of orders, so it can only be slightly above the fine-grid value.
    independent = independent_rdp_epsilon(mechanism.noise_multiplier, DELTA)
    assert independent * (1 - 1e-12) <= mechanism.epsilon <= independent * 1.02
    # RDP is an upper bound: the exact privacy curve at the reported epsilon is within delta.
    assert analytic_gaussian_delta(mechanism.noise_multiplier, mechanism.epsilon) <= DELTA


def test_noise_scale_of_each_part_matches_the_mechanism(features):
    exact = FeatureStats.from_features(features["train"], FeatureTransform(clip_norm=5.0))
    noisy, mechanism = gaussian_stats(
        features["train"], clip_norm=5.0, epsilon=1.0, delta=DELTA, generator=torch.Generator().manual_seed(1)
    )
    z, weights = mechanism.noise_multiplier, (0.05, 0.15, 0.80)
    sum_noise = (noisy.sum - exact.sum).std()
    off_diagonal = ~torch.eye(64, dtype=torch.bool)
    outer_noise = (noisy.sum_outer - exact.sum_outer)[off_diagonal].std()
    assert float(sum_noise) == pytest.approx(z * 5.0 / math.sqrt(weights[1]), rel=0.25)  # 64 draws
    assert float(outer_noise) == pytest.approx(z * 25.0 / math.sqrt(weights[2]) / math.sqrt(2), rel=0.05)
    assert noisy.outer_noise_std == pytest.approx(z * 25.0 / math.sqrt(weights[2]) / math.sqrt(2))
    assert torch.equal(noisy.sum_outer, noisy.sum_outer.T)


def test_dp_fid_moves_by_a_finite_measured_amount(features):
    clip, shifts = 5.0, {}
    exact = fid_from_stats(FeatureStats.from_features(features["train"], FeatureTransform(clip_norm=clip)), features["test"])
    for epsilon in (1.0, 10.0, math.inf):
        generator = torch.Generator().manual_seed(2)
        pooled = None
        for hospital in features["train"].chunk(3):
            stats, _ = gaussian_stats(hospital, clip_norm=clip, epsilon=epsilon, delta=DELTA, generator=generator)
            pooled = stats if pooled is None else pooled.merge(stats)
        fid = fid_from_stats(pooled, features["test"])
        assert math.isfinite(fid) and fid >= 0
        shifts[epsilon] = fid - exact
    print(f"TinyFeatureNet FID exact {exact:.4f}; DP shift at eps=1: {shifts[1.0]:+.4f}, eps=10: {shifts[10.0]:+.4f}")
    assert shifts[math.inf] == pytest.approx(0.0, abs=1e-9)
    assert abs(shifts[10.0]) < abs(shifts[1.0])


def test_per_class_release_is_one_mechanism_and_exact_without_noise(features):
    x, y = features["train"], features["train_labels"]
    per_class, mechanism = gaussian_stats_per_class(x, y, classes=[0, 1, 2], clip_norm=5.0, epsilon=math.inf, delta=DELTA)
    for label in (0, 1):
        exact = FeatureStats.from_features(x[y == label], FeatureTransform(clip_norm=5.0))
        torch.testing.assert_close(per_class[label].sum_outer, exact.sum_outer)
        assert per_class[label].count == exact.count
    assert per_class[2].count == 0  # a class absent at this hospital is still released

    _, noisy_mechanism = gaussian_stats_per_class(x, y, classes=[0, 1, 2], clip_norm=5.0, epsilon=1.0, delta=DELTA)
    _, single = gaussian_stats(x, clip_norm=5.0, epsilon=1.0, delta=DELTA)
    assert noisy_mechanism.noise_multiplier == single.noise_multiplier
    assert noisy_mechanism.detail["0/sum_outer_noise_std"] == single.detail["sum_outer_noise_std"]


def test_stats_survive_a_message_round_trip(features):
    transform = FeatureTransform.from_synthetic(features["test"], clip_norm=3.0, dim=8)
    stats, _ = gaussian_stats(
        features["train"], clip_norm=3.0, center=transform.center, projection=transform.projection,
        epsilon=10.0, delta=DELTA, generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    again = FeatureStats.from_arrays(stats.to_arrays())
    assert fid_from_stats(again, features["test"]) == fid_from_stats(stats, features["test"])


def numpy_unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    def k(a, b):
        return (a @ b.T / a.shape[1] + 1.0) ** 3

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n, m = len(x), len(y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    )


def test_noise_free_kid_terms_match_torchmetrics_and_numpy(features):
    real, fake = features["train"][:100], features["test"]
    clip = float(real.norm(dim=1).max()) + 1.0  # no feature reaches it
    terms, _ = dp_kernel_terms(real, fake, clip_norm=clip, epsilon=math.inf, delta=DELTA)
    federated = kid_from_terms([terms], fake, clip_norm=clip)
    torchmetrics_kid, _ = kernel_distance(real, fake, subsets=1, subset_size=100)
    assert federated == pytest.approx(numpy_unbiased_mmd2(real.numpy(), fake.numpy()), rel=1e-9)
    assert federated == pytest.approx(torchmetrics_kid, rel=1e-9)


def test_dp_kid_terms_charge_sensitivities_from_the_kernel_range(features):
    real, fake = features["train"], features["test"]
    terms, mechanism = dp_kernel_terms(
        real, fake, clip_norm=4.0, epsilon=10.0, delta=DELTA, n_cap=200, generator=torch.Generator().manual_seed(4)
    )
    k_min, k_max = 1.0, (1.0 + 16.0 / 64) ** 3  # non-negative features, |x| <= 4, gamma = 1/64
    assert mechanism.detail["cross_sum_sensitivity"] == pytest.approx((k_max - k_min) / 2)
    assert mechanism.detail["pair_sum_sensitivity"] == pytest.approx(2 * 199 * (k_max - k_min))
    exact_terms, _ = dp_kernel_terms(real, fake, clip_norm=4.0, epsilon=math.inf, delta=DELTA, n_cap=200)
    noisy = kid_from_terms([terms], fake, clip_norm=4.0)
    exact = kid_from_terms([exact_terms], fake, clip_norm=4.0)
    print(f"TinyFeatureNet KID exact {exact:.5f}, DP eps=10 {noisy:.5f}")
    assert math.isfinite(noisy)


def test_recall_counts_pool_to_the_exact_recall(features):
    hospitals = features["train"].chunk(3)
    exact = precision_recall(features["train"], features["test"], k=3)["recall"]
    counts = [dp_recall_counts(h, features["test"], epsilon=math.inf, delta=DELTA)[0] for h in hospitals]
    assert recall_from_counts(counts) == pytest.approx(exact)
    generator = torch.Generator().manual_seed(5)
    noisy = [dp_recall_counts(h, features["test"], epsilon=10.0, delta=DELTA, generator=generator)[0] for h in hospitals]
    assert recall_from_counts(noisy) == pytest.approx(exact, abs=0.05)  # noise std ~0.9 count per cell


def test_coverage_sensitivity_bounds_any_single_real_image(features):
    fake = features["test"]
    radius = float(torch.cdist(fake, fake).median()) / 4
    bound = coverage_sensitivity(fake, radius)
    # Try every fake sample, and random points near them, as the added real image.
    candidates = torch.cat([fake, fake + 0.1 * torch.randn(fake.shape, generator=torch.Generator().manual_seed(6))])
    worst = int((torch.cdist(candidates, fake) <= radius).sum(dim=1).max())
    assert 1 <= worst <= bound < fake.shape[0]
    counts, mechanism = dp_fake_coverage(features["train"], fake, [radius], epsilon=math.inf, delta=DELTA)
    exact = int((torch.cdist(fake, features["train"]).min(dim=1).values <= radius).sum())
    assert float(counts[0]) == exact
    assert mechanism.detail["r0_sensitivity"] == bound


def test_nearest_fake_histogram_counts_and_quantiles(features):
    real, fake = features["train"], features["test"]
    nearest = torch.cdist(real, fake).min(dim=1).values
    edges = torch.linspace(0, float(nearest.max()) * 0.8, 41, dtype=torch.float64)
    groups = {"train": real[:200], "holdout": real[200:]}
    histograms, mechanism = dp_nearest_fake_histogram(groups, fake, edges, epsilon=math.inf, delta=DELTA)
    assert float(histograms["train"].sum()) == 200 and float(histograms["holdout"].sum()) == 100
    assert float(histograms["train"][-1] + histograms["holdout"][-1]) == float((nearest >= edges[-1]).sum())
    median = histogram_quantiles(histograms["train"] + histograms["holdout"], edges, [0.5])[0]
    assert median == pytest.approx(float(nearest.median()), abs=float(edges[1]))
    assert mechanism.detail["histograms_sensitivity"] == 1.0


@pytest.mark.parametrize("num_classes", [2, 3])
def test_classification_counts_reproduce_accuracy_and_auc(num_classes):
    generator = torch.Generator().manual_seed(7)
    labels = torch.randint(0, num_classes, (400,), generator=generator)
    logits = torch.randn(400, num_classes, generator=generator) + 1.5 * torch.nn.functional.one_hot(labels, num_classes)
    probabilities = logits.softmax(dim=1)
    counts = classification_counts(probabilities, labels, num_bins=1000)
    if num_classes == 2:
        reference_auc = binary_auroc(probabilities[:, 1], labels)
    else:
        reference_auc = multiclass_auroc(probabilities, labels, num_classes=num_classes, average="macro")
    assert counts.accuracy() == pytest.approx(float((probabilities.argmax(1) == labels).double().mean()))
    assert counts.auc() == pytest.approx(float(reference_auc), abs=2e-3)
    noisy, mechanism = dp_classification_counts(probabilities, labels, epsilon=10.0, delta=DELTA, generator=generator)
    assert noisy.auc() == pytest.approx(float(reference_auc), abs=0.1)
    assert mechanism.detail["confusion_sensitivity"] == 1.0
