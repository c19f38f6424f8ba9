"""Splitting PneumoniaMNIST's real labels across simulated hospitals: seeded, disjoint, skewed on request."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import DATA

from shared.partition import PartitionError, split


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    with np.load(DATA) as npz:
        return npz["train_labels"].reshape(-1).astype(np.int64)  # 4708 labels, ordered by class


def _pneumonia_share(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    return np.array([labels[p].mean() for p in parts])


def _mean_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Size-weighted mean |share of class 1 at a hospital - global share| (= total variation)."""
    sizes = np.array([len(p) for p in parts])
    gap = np.abs(_pneumonia_share(labels, parts) - labels.mean())
    return float((gap * sizes).sum() / sizes.sum())


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_parts_are_disjoint_sorted_and_cover_everything(labels, scheme):
    parts = split(labels, 3, scheme, alpha=0.5, seed=0)
    assert len(parts) == 3
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0) and len(p) >= 10


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_same_seed_same_split_other_seed_other_split(labels, scheme):
    a = split(labels, 3, scheme, alpha=0.5, seed=7)
    b = split(labels, 3, scheme, alpha=0.5, seed=7)
    c = split(labels, 3, scheme, alpha=0.5, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_shares_match_the_global_label_ratio(labels):
    # the file lists all normal images first: without the shuffle hospital 0 would get no pneumonia
    q = labels.mean()
    for seed in range(3):
        parts = split(labels, 3, "iid", seed=seed)
        assert [len(p) for p in parts] == [1570, 1569, 1569]
        # 4 standard deviations of a binomial share: fails by chance ~1e-4 per hospital
        bound = 4 * math.sqrt(q * (1 - q) / 1569)
        assert np.all(np.abs(_pneumonia_share(labels, parts) - q) < bound)


def test_dirichlet_small_alpha_gives_strong_label_skew(labels):
    iid = np.mean([_mean_skew(labels, split(labels, 3, "iid", seed=s)) for s in range(5)])
    skewed = np.mean([_mean_skew(labels, split(labels, 3, "dirichlet", alpha=0.1, seed=s))
                      for s in range(5)])
    mild = np.mean([_mean_skew(labels, split(labels, 3, "dirichlet", alpha=100.0, seed=s))
                    for s in range(5)])
    assert iid < 0.02
    assert skewed > 0.15 and skewed > 10 * iid
    assert iid < mild < skewed
    # with alpha = 0.1 some hospital is (almost) all one class
    shares = np.concatenate([_pneumonia_share(labels, split(labels, 3, "dirichlet", alpha=0.1, seed=s))
                             for s in range(5)])
    assert shares.min() < 0.05 or shares.max() > 0.99


def test_more_hospitals_than_samples_is_refused(labels):
    few = labels[:25]
    with pytest.raises(PartitionError, match=r"num-hospitals = 3 needs at least 30 samples "
                                             r"\(10 each\), the data set has 25"):
        split(few, 3)
    with pytest.raises(PartitionError, match="num-hospitals = 5000 needs at least 50000"):
        split(labels, 5000, "dirichlet")
    with pytest.raises(PartitionError, match="num-hospitals = 0: must be >= 1"):
        split(labels, 0)


def test_unknown_scheme_is_refused(labels):
    with pytest.raises(PartitionError, match="partition = 'random': must be iid or dirichlet"):
        split(labels, 2, "random")


def test_dirichlet_that_cannot_fill_every_hospital_says_what_to_change(labels):
    with pytest.raises(PartitionError, match="raise alpha or use fewer hospitals"):
        split(labels[:300], 30, "dirichlet", alpha=0.01, seed=0)
