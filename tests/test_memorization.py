"""The memorization check at release: exact histograms equal an independent NumPy computation,
one training image moves one count however many synthetic images it is nearest to, the reply
carries only noised histograms charged to the ledger, and a copying generator is flagged
while one that never saw the training images is not (under the release's DP noise).

Fast: TinyFeatureNet features of the bundled PneumoniaMNIST images.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import DATA, smoke_config, smoke_values

from client import app as client_app
from client import evaluate as client_evaluate
from client.ledger import read_entries
from client.node import Hospital
from server import evaluation, release
from server.checkpoint import ServerState
from shared import evaluation as protocol
from shared import models, weights
from shared.config import RunConfig
from shared.dp_stats import closer_probability, dp_memorization_histograms
from shared.features import TinyFeatureNet, uint8_to_unit_range
from shared.metrics import in_manifold, manifold_radii

NODE = {"partition-id": 0, "num-partitions": 2}
EVAL = {"evaluate": True, "eval_features": "tiny", "eval_fid_dims": 8, "eval_clip_norm": 5.0,
        "eval_samples": 40}
DELTA = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def features() -> dict[str, torch.Tensor]:
    """Tiny features: 1000 'training' images, 400 other real images, the 624 test images."""
    net = TinyFeatureNet(num_features=64, seed=0)
    with np.load(DATA) as npz:
        train = net(uint8_to_unit_range(npz["train_images"][:1400])).double()
        test = net(uint8_to_unit_range(npz["test_images"])).double()
    return {"train": train[:1000], "unseen": train[1000:], "holdout": test}


def numpy_histogram(queries: np.ndarray, support: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Independent: nearest-support distance of each query, binned [e_i, e_i+1) + overflow."""
    nearest = np.sqrt(((queries[:, None, :] - support[None, :, :]) ** 2).sum(-1)).min(axis=1)
    inside, _ = np.histogram(nearest[nearest < edges[-1]], bins=edges)
    return np.append(inside, (nearest >= edges[-1]).sum()).astype(float)


def test_without_noise_the_histograms_are_the_exact_nearest_synthetic_distances(features):
    fake = features["unseen"][:200]
    edges = evaluation.memorization_bins(fake, fallback=5.0)
    assert edges.shape == (protocol.MEMORIZATION_BINS + 1,) and edges[0] == 0
    released, mechanism = dp_memorization_histograms(
        features["train"][:300], features["holdout"], fake, edges, max_train=1000,
        epsilon=math.inf, delta=DELTA, generator=torch.Generator().manual_seed(0))
    assert mechanism.noise_multiplier == 0
    for part, queries in (("train", features["train"][:300]), ("holdout", features["holdout"])):
        expected = numpy_histogram(queries.numpy(), fake.numpy(), edges.numpy())
        np.testing.assert_array_equal(released[part].numpy(), expected)
        assert 0 < expected[:-1].sum()                 # the bins cover where real images are
    # Capped: a random 100 of the 300 training images are measured, all of the held-out ones.
    capped, _ = dp_memorization_histograms(
        features["train"][:300], features["holdout"], fake, edges, max_train=100,
        epsilon=math.inf, delta=DELTA, generator=torch.Generator().manual_seed(0))
    assert capped["train"].sum() == 100 and capped["holdout"].sum() == features["holdout"].shape[0]


def test_one_training_image_moves_one_count_even_when_it_is_nearest_to_every_synthetic_image(features):
    train = features["train"][:200]
    # 50 synthetic images crowd around training image 0: it is the nearest real image of all.
    fake = train[:1] + 1e-3 * torch.randn(50, train.shape[1], generator=torch.Generator().manual_seed(1),
                                          dtype=torch.float64)
    nearest_real = torch.cdist(fake, train).argmin(dim=1)
    assert (nearest_real == 0).all()
    edges = torch.linspace(0, 1.0, 21, dtype=torch.float64)

    def histogram(images):
        out, _ = dp_memorization_histograms(images, features["holdout"][:10], fake, edges, max_train=1000,
                                            epsilon=math.inf, delta=DELTA, generator=torch.Generator().manual_seed(0))
        return out["train"]

    change = histogram(train) - histogram(train[1:])
    assert change.abs().sum() == 1 and change.norm() == 1
    # A per-synthetic-image count would have moved by all 50 (why it is not released).
    with_it = (torch.cdist(fake, train).min(dim=1).values < edges[1]).sum()
    without = (torch.cdist(fake, train[1:]).min(dim=1).values < edges[1]).sum()
    assert with_it - without == 50


def test_closer_probability_is_the_mann_whitney_statistic_of_the_binned_distances():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 12, 300), rng.integers(3, 15, 200)    # bin indices
    expected = ((a[:, None] < b[None, :]).sum() + 0.5 * (a[:, None] == b[None, :]).sum()) / (300 * 200)
    histogram = lambda x: torch.bincount(torch.as_tensor(x), minlength=16).double()  # noqa: E731
    assert closer_probability(histogram(a), histogram(b)) == pytest.approx(expected, abs=1e-12)
    assert closer_probability(histogram(a), histogram(a)) == pytest.approx(0.5)


def _pooled(features, fake, edges, seed):
    """Two hospitals, each half of the training and held-out images, at the release's share."""
    share = protocol.release_epsilons(list(evaluation.RELEASE_EVALUATIONS), 1.0, DELTA)["memorization"]
    pooled = evaluation.Pooled()
    generator = torch.Generator().manual_seed(seed)
    for half in (slice(0, 500), slice(500, 1000)):
        held = slice(0, 312) if half.start == 0 else slice(312, 624)
        released, mechanism = dp_memorization_histograms(
            features["train"][half], features["holdout"][held], fake, edges, max_train=1000,
            epsilon=share, delta=DELTA, generator=generator)
        for part, sensitivity in (("train", math.sqrt(2)), ("holdout", 1.0)):
            pooled.memorization[part] = pooled.memorization.get(part, 0) + released[part]
            pooled.memorization_noise_var[part] = (pooled.memorization_noise_var.get(part, 0.0)
                                                   + (mechanism.noise_multiplier * sensitivity) ** 2)
    return pooled


def test_a_copying_generator_is_flagged_and_a_fresh_one_is_not(features):
    generators = {"fresh": features["unseen"],                              # never saw the training images
                  "copying": torch.cat([features["train"][:200], features["unseen"][:200]])}
    results = {}
    for name, fake in generators.items():
        edges = evaluation.memorization_bins(fake, fallback=5.0)
        draws = [evaluation.memorization_scores(edges, _pooled(features, fake, edges, seed), 400, seed=seed, cap=300)
                 for seed in range(3)]
        results[name] = draws
        print(name, [(round(d["closer_probability"], 3), round(d["standard_error"], 3),
                      round(d["train_fraction_below_holdout_p1"], 3), d["flagged"]) for d in draws])
    for d in results["fresh"]:
        assert not d["flagged"] and abs(d["closer_probability"] - 0.5) < 3 * d["standard_error"]
        assert 800 < d["train_count"] < 1200 and 450 < d["holdout_count"] < 800
    for d in results["copying"]:
        assert d["flagged"] and d["closer_probability"] > 0.55
        assert d["train_fraction_below_holdout_p1"] > 0.1       # 20 % of training images copied
        assert d["train_quantiles"]["p1"] < d["holdout_quantiles"]["p1"]


def test_the_release_reply_carries_only_noised_histograms_charged_to_the_ledger(tmp_path):
    values = smoke_values(tmp_path, **EVAL)
    cfg = smoke_config(tmp_path, **EVAL)
    synthetic = evaluation.synthetic_side(cfg, weights.to_numpy(models.build(cfg)))
    content = evaluation.evaluate_content(synthetic, "t", 2, ["memorization"])
    assert set(content.keys()) == {"config", "released-features", "distance-bins"}
    # the check is about exactly the released images (samples-per-class 8, not eval-samples 40)
    labels = np.repeat(np.arange(cfg.num_classes), cfg.samples_per_class)
    released = release.generate(synthetic.generator, labels, cfg.latent_dim,
                                cfg.seed + release.SAMPLE_SEED_OFFSET + 1)
    with np.load(release.write_release(tmp_path / "r", cfg, ServerState("t", 0, {}), {},
                                       weights.to_numpy(models.build(cfg))) / "synthetic.npz") as npz:
        np.testing.assert_array_equal(npz["train_images"], released)
    expected = TinyFeatureNet(num_features=64, seed=0)(uint8_to_unit_range(released)).double()
    assert synthetic.released_features.shape == (16, 64)
    torch.testing.assert_close(synthetic.released_features, expected)
    reply = client_app.evaluate_reply(content, values, NODE)
    assert set(reply.keys()) == {"memorization-histograms", "metrics", "status", "ledger"}
    arrays = protocol.record_arrays(reply["memorization-histograms"])
    bins = len(synthetic.distance_bins)
    assert {k: a.shape for k, a in arrays.items()} == {"train": (bins,), "holdout": (bins,)}
    for a in arrays.values():
        assert a.dtype == np.float64 and not np.allclose(a, np.round(a))   # noised, not counts
    # eval-memorization-train training images (the cap; the hospital holds 2354) and 312
    # held out, give or take the noise (a std of about 50 on these sums)
    cap = RunConfig.from_flat({}).eval_memorization_train
    assert abs(arrays["train"].sum() - cap) < 200 and 150 < arrays["holdout"].sum() < 450
    entries = json.loads(reply["ledger"]["entries"])
    assert entries == read_entries(tmp_path / "hospitals" / "hospital-0" / "ledger.jsonl")
    (entry,) = entries
    assert entry["purpose"] == "eval-memorization" and entry["mechanism"] == "gaussian"
    assert entry["weights_sha256"] == weights.record_digest(reply["memorization-histograms"])
    assert cfg.eval_epsilon * 0.99 <= entry["epsilon"] <= cfg.eval_epsilon   # one release: all of it


def test_the_noise_is_fresh_for_a_different_request_under_the_same_round(tmp_path):
    """Two requests with one (run-id, round) but different synthetic images must not get the
    same noise (their difference would be noise-free); the same request redraws the same."""
    values = smoke_values(tmp_path, **EVAL)
    cfg = smoke_config(tmp_path, **EVAL)
    initial = weights.to_numpy(models.build(cfg))
    other = {k: v + 0.05 for k, v in initial.items()}          # another generator
    hospital = Hospital.from_node_config(NODE, cfg)
    real = client_evaluate.real_features(client_evaluate.held_out_data(hospital, cfg), cfg)
    noise = []
    for arrays in (initial, other, initial):
        synthetic = evaluation.synthetic_side(cfg, arrays)
        reply = client_app.evaluate_reply(evaluation.evaluate_content(synthetic, "t", 2, ["recall"]), values, NODE)
        released = reply["recall-counts"]["counts"].numpy()
        exact = np.array(recall_counts(real, synthetic.features))
        noise.append(released - exact)
    assert not np.allclose(noise[0], noise[1])
    np.testing.assert_array_equal(noise[0], noise[2])
    assert len(read_entries(tmp_path / "hospitals" / "hospital-0" / "ledger.jsonl")) == 3   # each charged


def recall_counts(real, fake):
    inside = in_manifold(real, fake, manifold_radii(fake, protocol.RECALL_K))
    return [float(inside.sum()), float((~inside).sum())]
