"""The utility table's real-data rows: classifiers trained on the hospitals' real images.

A classifier trained on real images depends on every one of them, so it may leave a hospital
only as the output of DP-SGD, and its scores on held-out images only as DP counts. The rows
are a small federation of their own, run after the GAN's last round when utility-epsilon > 0:

    variants (training sets), one SmallCNN each (shared/classifier.py; the synthetic-only row
    trains the same network on the synthetic images alone, server/evaluation.py):
        real               the hospital's training images
        real-augmented     the same, each image augmented on its own draw (rotation, zoom,
                           flip, intensity: shared/classifier.py AUGMENTATION) before its
                           gradient is clipped
        real-synthetic     the training images and the evaluation's synthetic images (public)
                           as one data set
    for utility round r = 1 .. utility-rounds:
        server -> hospital  TRAIN message "train.utility" (MESSAGE_TYPE): run-id, round,
                            utility-round; per variant its global classifier
                            (classifier-<variant>); the synthetic images and labels
        hospital            budget check for the rest of the phase; per variant
                            utility-steps DP-SGD steps (Opacus: Poisson sampling at
                            q = 1 / ceil(N / batch-size) over its N records, per-sample
                            clip max-grad-norm, Gaussian noise sigma * max-grad-norm, RDP);
                            one signed ledger entry per variant, on disk before the reply
        hospital -> server  the classifiers' weights, the declared n (FedAvg weight),
                            privacy figures and the entries
        server              FedAvg per variant (server/strategy.py)
    then one EVALUATE message (shared/evaluation.py): each classifier's confusion matrix and
    score histograms on the hospital's held-out images, one Gaussian mechanism per variant
    (the "classifier" mechanism of the synthetic-only row)

Budget: each variant costs a hospital utility-epsilon: TRAIN_SHARE (half) of it for its
DP-SGD steps over all utility rounds, the rest for its DP counts (RDP composes them to less than
utility-epsilon). The three variants cost 3 x utility-epsilon on top of the GAN and its
evaluation before RDP composition, less after; each node's ledger checks the exact figure.

In real+synthetic the synthetic images are records of the data set like the real ones:
each real image is still sampled with probability q and clipped to max-grad-norm, which is
all the accountant assumes; the synthetic images dilute nothing but the batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord

from shared.evaluation import ProtocolError, record_arrays, to_record
from shared.features import uint8_to_unit_range

MESSAGE_TYPE = "train.utility"
# variant -> the utility table's training set (server/evaluation.py utility_table)
VARIANTS: dict[str, str] = {
    "real": "real only",
    "real-augmented": "real + traditional augmentation",
    "real-synthetic": "real + synthetic",
}
# Of utility-epsilon, per variant: its DP-SGD steps; the rest (at least 0.5, as
# utility-epsilon >= 1) for its DP counts. With a quarter for the counts the demo's score
# histograms drowned in noise (ROC AUC 0.0-0.3 at accuracy 0.66-0.71; benchmarks/RESULTS.md);
# and one Gaussian release at delta 1e-5 cannot be calibrated below epsilon ~0.19 at all
# with Opacus' RDP orders (<= 63).
TRAIN_SHARE = 0.5
LEARNING_RATE = 0.03     # Adam, on the noised summed gradient (of 0.002, 0.01, 0.03: best AUC
                         # at utility-epsilon 1 and 3, 100 steps; benchmarks/RESULTS.md)
WEIGHT_SEED_OFFSET = 7919   # the classifiers' initial weights: seed + this


def train_purpose(variant: str) -> str:
    """The ledger purpose of a variant's DP-SGD steps."""
    return f"utility-train-{variant}"


def release_name(variant: str) -> str:
    """The evaluation release (shared/evaluation.py RELEASES) of a variant's DP counts."""
    return f"utility-{variant}"


def variant_of(release: str) -> str:
    """``"utility-real"`` -> ``"real"``."""
    return release.removeprefix("utility-")


def classifier_key(variant: str) -> str:
    """The record carrying a variant's classifier, both ways."""
    return f"classifier-{variant}"


def score_edges_key(variant: str) -> str:
    """The record carrying a variant's public score bins (server -> hospital, evaluation)."""
    return f"score-edges-{variant}"


def synthetic_record(images: torch.Tensor, labels: torch.Tensor) -> ArrayRecord:
    """The public synthetic images (N, 1, S, S) in [-1, 1] as uint8 (N, S, S), and labels."""
    pixels = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return to_record({"images": pixels, "labels": np.asarray(labels, np.int64).reshape(-1)})


def synthetic_from_record(record: ArrayRecord, image_size: int,
                          num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, S, S) float in [-1, 1], labels (N,) int64), checked."""
    arrays: Mapping[str, np.ndarray] = record_arrays(record)
    images, labels = arrays.get("images"), arrays.get("labels")
    if (set(arrays) != {"images", "labels"} or images.dtype != np.uint8 or images.ndim != 3
            or images.shape[1:] != (image_size, image_size) or labels.shape != (images.shape[0],)
            or labels.dtype != np.int64):
        raise ProtocolError(f"synthetic: expected uint8 images (N, {image_size}, {image_size}) "
                            "and int64 labels (N,)")
    if images.shape[0] == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ProtocolError(f"synthetic: needs images, with labels in [0, {num_classes})")
    return uint8_to_unit_range(images), torch.as_tensor(labels)
