"""Downstream-utility classifier: learns PneumoniaMNIST from a few hundred images, reports scalars."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.classifier import evaluate_classifier, predict_proba, train_classifier
from shared.dp_stats import classification_counts, dp_classification_counts
from shared.features import uint8_to_unit_range

DATA = Path(__file__).resolve().parents[1] / "data" / "pneumoniamnist.npz"


@pytest.fixture(scope="module")
def splits() -> dict[str, torch.Tensor]:
    data = np.load(DATA)
    order = np.random.default_rng(0).permutation(len(data["train_images"]))[:300]  # split is label-ordered
    return {
        "train_images": uint8_to_unit_range(data["train_images"][order]),
        "train_labels": torch.as_tensor(data["train_labels"][order]),
        "test_images": uint8_to_unit_range(data["test_images"]),
        "test_labels": torch.as_tensor(data["test_labels"]),
    }


@pytest.fixture(scope="module")
def model(splits) -> torch.nn.Module:
    return train_classifier(splits["train_images"], splits["train_labels"], epochs=20, augment=True, seed=0)


def test_trained_on_300_real_images_it_beats_chance_on_the_test_split(splits, model):
    result = evaluate_classifier(model, splits["test_images"], splits["test_labels"])
    majority = float(splits["test_labels"].double().mean())  # 390 of 624 test images are pneumonia
    majority = max(majority, 1 - majority)
    assert result["count"] == 624
    assert result["accuracy"] >= majority + 0.1
    assert result["auc"] >= 0.85


def test_evaluation_returns_only_python_scalars(splits, model):
    result = evaluate_classifier(model, splits["test_images"][:50], splits["test_labels"][:50])
    assert set(result) == {"accuracy", "auc", "count"}
    assert type(result["accuracy"]) is float and type(result["auc"]) is float and type(result["count"]) is int


def test_same_seed_same_model(splits):
    images, labels = splits["train_images"][:64], splits["train_labels"][:64]
    first = train_classifier(images, labels, epochs=1, augment=True, seed=3)
    second = train_classifier(images, labels, epochs=1, augment=True, seed=3)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_multiclass_auc_is_one_vs_rest(splits):
    # Three classes: normal, pneumonia, and pneumonia images flipped upside down.
    images, labels = splits["train_images"][:150], splits["train_labels"][:150].reshape(-1).clone()
    flipped = labels == 1
    flipped[::2] = False
    images = torch.where(flipped.view(-1, 1, 1, 1), images.flip(2), images)
    labels[flipped] = 2
    model = train_classifier(images, labels, epochs=5, augment=False, seed=0)
    result = evaluate_classifier(model, images, labels)
    assert 0.0 <= result["auc"] <= 1.0 and math.isfinite(result["accuracy"])


def test_dp_counts_of_the_hospital_test_set_track_the_exact_scores(splits, model):
    probabilities = predict_proba(model, splits["test_images"])
    labels = splits["test_labels"].reshape(-1)
    exact = evaluate_classifier(model, splits["test_images"], labels)
    assert classification_counts(probabilities, labels, num_bins=1000).auc() == pytest.approx(exact["auc"], abs=2e-3)
    noisy, _ = dp_classification_counts(
        probabilities, labels, epsilon=1.0, delta=1e-5, generator=torch.Generator().manual_seed(0)
    )
    # At epsilon 1 and 624 images the AUC error is about -0.01 +- 0.026 (binning plus noise).
    assert noisy.accuracy() == pytest.approx(exact["accuracy"], abs=0.05)
    assert noisy.auc() == pytest.approx(exact["auc"], abs=0.08)
