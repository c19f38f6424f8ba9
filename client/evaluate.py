"""A hospital's side of federated evaluation: DP statistics of its held-out real images.

    held-out images and labels (never the training images: `held_out_data`)
    features = the run's feature network (the FID InceptionV3, offline) on them
    for each release the server asked for (shared/evaluation.py), one Gaussian mechanism:
        fid-stats    per class: count, sum, sum of outer products of the clipped,
                     centred, projected features (public transform from the server)
        recall       [inside, outside] counts of the real images against the public
                     synthetic k-NN manifold (sensitivity 1)
        classifier   confusion matrix and score histograms of the server's classifier,
                     trained on synthetic images only, on the real labelled images
        utility-*    the same for the utility table's real-data classifiers, which the
                     hospitals trained with DP-SGD (shared/utility.py), over public score
                     bins from their scores on the synthetic images
        memorization histograms of the distance from each TRAINING image (a random
                     subset of at most eval-memorization-train) and each held-out image to
                     its nearest public synthetic image, over public bins (sensitivity
                     sqrt 2 and 1: shared/dp_stats.py dp_memorization_histograms)

Each function returns the noised arrays and the `Mechanism` the ledger charges; the ClientApp
(`client/app.py evaluate_reply`) checks the budget before, logs the entries, and sends only
these arrays. Precision (Kynkäänniemi et al.) is not released: one real image moves the real
k-NN radii of others and its own ball can cover every synthetic sample, so its sensitivity is
the whole synthetic set (shared/dp_stats.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from client.data import DataError, HospitalData, load_hospital
from client.node import Hospital
from shared import evaluation as protocol
from shared import utility as utility_protocol
from shared.classifier import SmallCNN, predict_proba
from shared.config import RunConfig
from shared.dp_stats import (
    FeatureTransform,
    Mechanism,
    dp_classification_counts,
    dp_memorization_histograms,
    dp_recall_counts,
    gaussian_stats_per_class,
)
from shared.features import extract_features, feature_network


@dataclass
class Release:
    """One noised statistic ready to leave the hospital, and what it cost."""

    name: str                       # key of shared.evaluation.RELEASES
    arrays: dict[str, np.ndarray]   # exactly what is sent
    mechanism: Mechanism


def held_out_data(hospital: Hospital, cfg: RunConfig) -> HospitalData:
    """The hospital's held-out images: its node config's eval-data-path, else the run's
    eval-split of its .npz (partitioned across simulated hospitals like the training split).

    A folder of scans has no split: without eval-data-path it is not evaluated, since scoring
    the generator on its own training images would measure memorisation, not fidelity.
    """
    if hospital.eval_data_path is not None:
        source = dataclasses.replace(hospital, data_path=hospital.eval_data_path, preprocess_cache=False)
        return load_hospital(source, cfg, cfg.eval_split)
    if hospital.data_path.is_dir():
        raise DataError(f"{hospital.hospital_id}: no held-out images for evaluation; set "
                        "eval-data-path in the node config")
    return load_hospital(hospital, cfg, cfg.eval_split)


def real_features(data: HospitalData, cfg: RunConfig) -> torch.Tensor:
    """(N, d) features of the held-out images, float64."""
    return extract_features(feature_network(cfg.eval_features), data.images).double()


def release_fid_stats(features: torch.Tensor, labels: torch.Tensor, transform: FeatureTransform,
                      cfg: RunConfig, *, epsilon: float, delta: float,
                      generator: torch.Generator) -> Release:
    """Per-class DP FID statistics: one mechanism for all classes (each image is in one)."""
    per_class, mechanism = gaussian_stats_per_class(
        features, labels, classes=list(range(cfg.num_classes)), clip_norm=transform.clip_norm,
        center=transform.center, projection=transform.projection, epsilon=epsilon, delta=delta,
        generator=generator)
    return Release("fid-stats", protocol.fid_stats_arrays(per_class), mechanism)


def release_recall(features: torch.Tensor, synthetic: torch.Tensor, *, epsilon: float, delta: float,
                   generator: torch.Generator) -> Release:
    counts, mechanism = dp_recall_counts(features, synthetic, k=protocol.RECALL_K, epsilon=epsilon,
                                         delta=delta, generator=generator)
    return Release("recall", protocol.recall_arrays(counts), mechanism)


def release_classifier(data: HospitalData, classifier: SmallCNN, *, epsilon: float, delta: float,
                       generator: torch.Generator, name: str = "classifier",
                       edges: torch.Tensor | None = None) -> Release:
    counts, mechanism = dp_classification_counts(
        predict_proba(classifier, data.images), data.labels, epsilon=epsilon, delta=delta,
        num_bins=protocol.SCORE_BINS, generator=generator, edges=edges)
    return Release(name, protocol.classification_arrays(counts), mechanism)


def release_memorization(training: torch.Tensor, held_out: torch.Tensor, synthetic: torch.Tensor,
                         edges: torch.Tensor, *, max_train: int, epsilon: float, delta: float,
                         generator: torch.Generator) -> Release:
    histograms, mechanism = dp_memorization_histograms(
        training, held_out, synthetic, edges, max_train=max_train,
        epsilon=epsilon, delta=delta, generator=generator)
    return Release("memorization", protocol.memorization_arrays(histograms), mechanism)


def releases(names: list[str], content, data: HospitalData, cfg: RunConfig,
             epsilons: dict[str, float], delta: float, generator: torch.Generator,
             training: HospitalData | None = None) -> list[Release]:
    """Every release the message asks for, in the order asked. ``content`` is the message's
    RecordDict; its public inputs are checked before use (ProtocolError). ``data`` are the
    held-out images; ``training`` the training images (needed by memorization only)."""
    needs_features = {"fid-stats", "recall", "memorization"} & set(names)
    features = real_features(data, cfg) if needs_features else None
    width = feature_network(cfg.eval_features).num_features

    def needed(key: str):
        if key not in content:
            raise protocol.ProtocolError(f"the evaluate message has no '{key}' record")
        return content[key]

    out = []
    for name in names:
        if name == "fid-stats":
            transform = protocol.transform_from_record(needed("fid-transform"), width)
            out.append(release_fid_stats(features, data.labels, transform, cfg, epsilon=epsilons[name],
                                         delta=delta, generator=generator))
        elif name == "recall":
            synthetic = protocol.features_from_record(needed("synthetic-features"), width)
            out.append(release_recall(features, synthetic, epsilon=epsilons[name], delta=delta,
                                      generator=generator))
        elif name == "memorization":
            if training is None:
                raise ValueError("memorization needs the hospital's training images")
            synthetic = protocol.features_from_record(needed("released-features"), width, min_rows=1,
                                                      what="released-features")
            edges = protocol.distance_bins_from_record(needed("distance-bins"))
            # The measured training images are a uniformly random subset of at most
            # eval-memorization-train (dp_memorization_histograms' privacy argument); drawing
            # it before the Inception pass, not after, spares features never measured.
            subset = torch.randperm(len(training.images), generator=generator)
            subset = subset[:cfg.eval_memorization_train]
            train_features = extract_features(feature_network(cfg.eval_features),
                                              training.images[subset]).double()
            out.append(release_memorization(train_features, features, synthetic, edges,
                                            max_train=cfg.eval_memorization_train,
                                            epsilon=epsilons[name], delta=delta, generator=generator))
        elif name == "classifier":
            classifier = protocol.load_classifier(needed("classifier"), SmallCNN(cfg.num_classes))
            out.append(release_classifier(data, classifier, epsilon=epsilons[name], delta=delta,
                                          generator=generator))
        elif name in protocol.UTILITY_RELEASES:
            variant = utility_protocol.variant_of(name)
            classifier = protocol.load_classifier(needed(utility_protocol.classifier_key(variant)),
                                                  SmallCNN(cfg.num_classes))
            edges = protocol.score_edges_from_record(needed(utility_protocol.score_edges_key(variant)))
            out.append(release_classifier(data, classifier, epsilon=epsilons[name], delta=delta,
                                          generator=generator, name=name, edges=edges))
    return out
