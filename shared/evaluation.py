"""The federated evaluation protocol: what the server sends a hospital, what may come back.

Server -> hospital, one EVALUATE message (everything in it is derived from synthetic images,
so it is public):

    config               run-id, round, evaluations (comma-separated names of RELEASES)
    fid-transform        center (d,), projection (d, k) (absent when k = d), clip_norm (1,):
                         the public FeatureTransform each hospital applies to its features
                         (synthetic mean; a fixed random subspace, FID_BASIS_SEED)
    synthetic-features   features (M, d) of the synthetic images                  (recall)
    released-features    features (R, d) of exactly the released synthetic images (the
                         release's samples-per-class per class)            (memorization)
    classifier           SmallCNN state dict trained on synthetic images only   (classifier)
    classifier-<variant> SmallCNN state dict trained with DP-SGD at the hospitals on real
                         images (shared/utility.py)                   (utility-<variant>)
    score-edges-<variant>
                         edges (SCORE_BINS + 1,) from 0 to 1: that classifier's score bins,
                         from its scores on the synthetic images       (utility-<variant>)
    distance-bins        edges (B + 1,): public bins of nearest-synthetic distances,
                         from 0, made from the released images' features   (memorization)

Hospital -> server: only noised statistics. Each record below is the output of one Gaussian
mechanism, charged to the hospital's ledger before it is sent; the ledger entry's
``weights_sha256`` is the record's ``shared.weights.digest``:

    fid-stats            per class c: class-<c>.count (1,), class-<c>.sum (k,),
                         class-<c>.sum-outer (k, k), class-<c>.outer-noise-std (1,)
    recall-counts        counts (2,): real images inside / outside the synthetic k-NN manifold
    classifier-counts    confusion (K, K) [true, predicted], score-histograms (H, 2, B)
    utility-<variant>-counts
                         the same for a utility classifier (shared/utility.py)
    memorization-histograms
                         train (B + 1,), holdout (B + 1,): how many of the hospital's
                         training images (a random subset of at most eval-memorization-train)
                         and held-out images have their nearest synthetic image at a
                         distance in each bin (shared/dp_stats.py dp_memorization_histograms)

plus ``status``, ``metrics`` (privacy figures) and ``ledger`` (the signed entries, JSON).
No per-image value, no exact count, no pixel leaves: the number of held-out images is
known to the server only through the noised counts.

Budget: the requested releases share the run's ``eval-epsilon`` by RDP composition
(``shared.dp_stats.split_epsilon``) in the proportions ``BUDGET_WEIGHTS``, normalised over
the releases asked for: the FID covariance has k^2 noisy entries per class and gets most of
it. An evaluation every eval-every rounds asks for fid-stats, recall and classifier; the
release's adds memorization; each costs eval-epsilon in all. The utility classifiers' counts
are paid from utility-epsilon instead (``release_epsilons``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from shared.dp_stats import ClassificationCounts, FeatureStats, FeatureTransform, split_epsilon

# name -> (ledger purpose, share of eval-epsilon, reply record)
RELEASES: dict[str, tuple[str, float, str]] = {
    "fid-stats": ("eval-fid-stats", 0.7, "fid-stats"),
    "recall": ("eval-recall", 0.1, "recall-counts"),
    "classifier": ("eval-classifier", 0.2, "classifier-counts"),
    "memorization": ("eval-memorization", 0.15, "memorization-histograms"),
    # the utility table's real-data classifiers (shared/utility.py): paid from utility-epsilon
    "utility-real": ("utility-eval-real", 0.0, "utility-real-counts"),
    "utility-real-augmented": ("utility-eval-real-augmented", 0.0, "utility-real-augmented-counts"),
    "utility-real-synthetic": ("utility-eval-real-synthetic", 0.0, "utility-real-synthetic-counts"),
}
BUDGET_WEIGHTS = {name: weight for name, (_, weight, _) in RELEASES.items() if weight > 0}
UTILITY_RELEASES = tuple(name for name in RELEASES if name.startswith("utility-"))
RECALL_K = 3             # k of the k-NN manifolds (Kynkäänniemi et al. 2019)
FID_BASIS_SEED = 2048    # the random FID subspace: one for every generator and run
SCORE_BINS = 10          # bins of the classifier's score histograms (ROC AUC)
MEMORIZATION_BINS = 10          # distance bins (+ overflow) of the memorization histograms


class ProtocolError(ValueError):
    """An evaluation message or reply does not have the expected records or shapes."""


def purpose(name: str) -> str:
    return RELEASES[name][0]


def record_name(name: str) -> str:
    return RELEASES[name][2]


def parse_evaluations(text: str) -> list[str]:
    """``"fid-stats,recall"`` -> ``["fid-stats", "recall"]``; unknown or repeated names refused."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in RELEASES]
    if unknown or not names or len(set(names)) != len(names):
        raise ProtocolError(f"evaluations = {text!r}: expected distinct names among {', '.join(RELEASES)}")
    return names


def release_epsilons(names: Sequence[str], epsilon: float, delta: float,
                     utility_epsilon: float = 0.0) -> dict[str, float]:
    """Each requested release's own epsilon: the evaluation's releases together cost
    ``epsilon`` (RDP); a utility classifier's counts cost the share of ``utility_epsilon``
    (utility-epsilon) that its DP-SGD training left (shared/utility.py)."""
    from shared.utility import TRAIN_SHARE

    utility = [n for n in names if n in UTILITY_RELEASES]
    if utility and not utility_epsilon > 0:
        raise ProtocolError(f"{', '.join(utility)}: this run has no utility-epsilon")
    out = {n: (1.0 - TRAIN_SHARE) * utility_epsilon for n in utility}
    shared = [n for n in names if n not in UTILITY_RELEASES]
    if shared:
        out.update(split_epsilon(epsilon, delta, {n: BUDGET_WEIGHTS[n] for n in shared}))
    return {n: out[n] for n in names}


def _record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


def _finite(arrays: Mapping[str, np.ndarray], what: str) -> None:
    for key, value in arrays.items():
        if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
            raise ProtocolError(f"{what}: {key} must hold finite floats")


# --------------------------------------------------------------------------- server -> hospital

def transform_record(transform: FeatureTransform) -> ArrayRecord:
    arrays = {"clip_norm": np.array([transform.clip_norm], np.float64)}
    if transform.center is not None:
        arrays["center"] = transform.center.numpy()
    if transform.projection is not None:
        arrays["projection"] = transform.projection.numpy()
    return _record(arrays)


def transform_from_record(record: ArrayRecord, num_features: int) -> FeatureTransform:
    """The public transform, checked against the hospital's feature width ``d``."""
    arrays = record_arrays(record)
    _finite(arrays, "fid-transform")
    clip = arrays.get("clip_norm")
    if clip is None or clip.shape != (1,) or not clip[0] > 0:
        raise ProtocolError("fid-transform: clip_norm must be one positive number")
    center = arrays.get("center")
    if center is not None and center.shape != (num_features,):
        raise ProtocolError(f"fid-transform: center has shape {center.shape}, features have {num_features}")
    projection = arrays.get("projection")
    if projection is not None and (projection.ndim != 2 or projection.shape[0] != num_features):
        raise ProtocolError(f"fid-transform: projection has shape {projection.shape}, features have {num_features}")
    as_tensor = lambda a: None if a is None else torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    return FeatureTransform(float(clip[0]), as_tensor(center), as_tensor(projection))


def features_record(features: torch.Tensor) -> ArrayRecord:
    return _record({"features": features.float().numpy()})


def features_from_record(record: ArrayRecord, num_features: int, min_rows: int = RECALL_K + 1,
                         what: str = "synthetic-features") -> torch.Tensor:
    arrays = record_arrays(record)
    features = arrays.get("features")
    if features is None or features.ndim != 2 or features.shape[1] != num_features:
        raise ProtocolError(f"{what}: expected (M, {num_features}) features")
    if features.shape[0] < min_rows:
        raise ProtocolError(f"{what}: needs at least {min_rows} synthetic samples")
    _finite(arrays, what)
    return torch.as_tensor(features, dtype=torch.float64)


def classifier_record(model: torch.nn.Module) -> ArrayRecord:
    return _record({k: v.detach().numpy() for k, v in model.state_dict().items()
                    if not k.endswith("num_batches_tracked")})


def load_classifier(record: ArrayRecord, model: torch.nn.Module) -> torch.nn.Module:
    """Load a classifier's weights into ``model`` (keys and shapes must match); eval mode."""
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    arrays = record_arrays(record)
    if set(arrays) != set(expected) or any(arrays[k].shape != tuple(v.shape) for k, v in expected.items()):
        raise ProtocolError("classifier: weights do not match the SmallCNN of this run's classes")
    _finite(arrays, "classifier")
    model.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()}, strict=False)
    return model.eval()


def score_edges_record(edges: torch.Tensor) -> ArrayRecord:
    return _record({"edges": torch.as_tensor(edges, dtype=torch.float64).numpy()})


def score_edges_from_record(record: ArrayRecord) -> torch.Tensor:
    """Public score-histogram edges: SCORE_BINS + 1 numbers increasing from 0 to 1."""
    arrays = record_arrays(record)
    edges = arrays.get("edges")
    if set(arrays) != {"edges"} or edges.shape != (SCORE_BINS + 1,):
        raise ProtocolError(f"score-edges: expected one array 'edges' of {SCORE_BINS + 1} numbers")
    _finite(arrays, "score-edges")
    if edges[0] != 0 or edges[-1] != 1 or not (np.diff(edges) > 0).all():
        raise ProtocolError("score-edges: edges must increase from 0 to 1")
    return torch.as_tensor(edges, dtype=torch.float64)


def distance_bins_record(edges: torch.Tensor) -> ArrayRecord:
    return _record({"edges": torch.as_tensor(edges, dtype=torch.float64).numpy()})


def distance_bins_from_record(record: ArrayRecord) -> torch.Tensor:
    arrays = record_arrays(record)
    edges = arrays.get("edges")
    if set(arrays) != {"edges"} or edges.ndim != 1 or not 2 <= edges.shape[0] <= 1001:
        raise ProtocolError("distance-bins: expected one array 'edges' of 2 to 1001 numbers")
    _finite(arrays, "distance-bins")
    if edges[0] != 0 or not (np.diff(edges) > 0).all():
        raise ProtocolError("distance-bins: edges must start at 0 and increase")
    return torch.as_tensor(edges, dtype=torch.float64)


# --------------------------------------------------------------------------- hospital -> server

def fid_stats_arrays(per_class: Mapping[int, FeatureStats]) -> dict[str, np.ndarray]:
    arrays = {}
    for label, stats in per_class.items():
        arrays[f"class-{label}.count"] = np.array([stats.count], np.float64)
        arrays[f"class-{label}.sum"] = stats.sum.numpy()
        arrays[f"class-{label}.sum-outer"] = stats.sum_outer.numpy()
        arrays[f"class-{label}.outer-noise-std"] = np.array([stats.outer_noise_std], np.float64)
    return arrays


def fid_stats_from_arrays(arrays: Mapping[str, np.ndarray], transform: FeatureTransform,
                          classes: Sequence[int], dim: int) -> dict[int, FeatureStats]:
    """A hospital's noised per-class statistics, checked; in the transform the server sent."""
    expected = {f"class-{c}.{part}" for c in classes for part in ("count", "sum", "sum-outer", "outer-noise-std")}
    if set(arrays) != expected:
        raise ProtocolError(f"fid-stats: unexpected arrays {sorted(set(arrays) ^ expected)[:3]}")
    _finite(arrays, "fid-stats")
    out = {}
    for c in classes:
        total, outer = arrays[f"class-{c}.sum"], arrays[f"class-{c}.sum-outer"]
        if total.shape != (dim,) or outer.shape != (dim, dim):
            raise ProtocolError(f"fid-stats: class {c} has shapes {total.shape}, {outer.shape}; expected ({dim},)")
        noise = float(arrays[f"class-{c}.outer-noise-std"][0])
        out[c] = FeatureStats(float(arrays[f"class-{c}.count"][0]), torch.as_tensor(total, dtype=torch.float64),
                              torch.as_tensor(outer, dtype=torch.float64), transform, noisy=noise > 0,
                              outer_noise_std=noise)
    return out


def recall_arrays(counts: torch.Tensor) -> dict[str, np.ndarray]:
    return {"counts": torch.as_tensor(counts, dtype=torch.float64).numpy()}


def recall_from_arrays(arrays: Mapping[str, np.ndarray]) -> torch.Tensor:
    counts = arrays.get("counts")
    if set(arrays) != {"counts"} or counts.shape != (2,):
        raise ProtocolError("recall-counts: expected one array 'counts' of shape (2,)")
    _finite(arrays, "recall-counts")
    return torch.as_tensor(counts, dtype=torch.float64)


def classification_arrays(counts: ClassificationCounts) -> dict[str, np.ndarray]:
    return {"confusion": counts.confusion.numpy(), "score-histograms": counts.score_histograms.numpy()}


def classification_from_arrays(arrays: Mapping[str, np.ndarray], num_classes: int) -> ClassificationCounts:
    histograms = 1 if num_classes == 2 else num_classes
    confusion, scores = arrays.get("confusion"), arrays.get("score-histograms")
    if (set(arrays) != {"confusion", "score-histograms"} or confusion.shape != (num_classes, num_classes)
            or scores.shape != (histograms, 2, SCORE_BINS)):
        raise ProtocolError(f"classifier-counts: expected confusion ({num_classes}, {num_classes}) and "
                            f"score-histograms ({histograms}, 2, {SCORE_BINS})")
    _finite(arrays, "classifier-counts")
    return ClassificationCounts(torch.as_tensor(confusion, dtype=torch.float64),
                                torch.as_tensor(scores, dtype=torch.float64))


def memorization_arrays(histograms: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: torch.as_tensor(histograms[k], dtype=torch.float64).numpy() for k in ("train", "holdout")}


def memorization_from_arrays(arrays: Mapping[str, np.ndarray], num_edges: int) -> dict[str, torch.Tensor]:
    if set(arrays) != {"train", "holdout"} or any(a.shape != (num_edges,) for a in arrays.values()):
        raise ProtocolError(f"memorization-histograms: expected arrays 'train' and 'holdout' of "
                            f"shape ({num_edges},)")
    _finite(arrays, "memorization-histograms")
    return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in arrays.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return _record(arrays)
