"""Differentially private evaluation statistics that a hospital may send to the server.

Privacy model: the unit is one real image, add/remove adjacency. Synthetic images, their features
and the feature extractor are public. Every function named ``dp_*`` or ``gaussian_*`` runs at the
hospital on its real features, returns the noised release plus one ``Mechanism`` for the
hospital's ledger, and nothing else. Everything the server does with releases (pooling, FID, KID,
recall, quantiles, AUC) is post-processing.

Every release is a single Gaussian mechanism. A release made of several parts (count, sum, sum of
outer products, ...) with L2 sensitivities ``D_c`` gets per-part noise
``std_c = noise_multiplier * D_c / sqrt(w_c)`` with weights ``w_c`` summing to 1: that is the
Gaussian mechanism with ``noise_multiplier`` on the vector ``(sqrt(w_c) / D_c * part_c)_c``, whose
L2 sensitivity is ``sqrt(sum_c w_c) = 1``. The ledger therefore charges
``(noise_multiplier, sample_rate=1, steps=1)`` in Opacus' RDP accountant, and ``noise_multiplier``
is calibrated with that same accountant so that charges compose in one RDP ledger. (Treating the
concatenated raw vector with sensitivity ``sqrt(1 + C^2 + C^4)`` is the special case
``w = (1, C^2, C^4) / (1 + C^2 + C^4)``, which drowns the count in noise of std ``z * C^2``.)

What is released, and how accurate it can be (measured figures: ``benchmarks/fid_real_vs_real.py``):

* FID (``gaussian_stats``): count, sum and sum of outer products of clipped features, the
  sufficient statistics of torchmetrics' FID; pooled over hospitals exactly by addition.
* KID (``dp_kernel_terms``): the hospital sums kernel values against the public synthetic
  features it is sent. Cross-hospital real/real kernel pairs cannot be computed anywhere, so the
  real/real term is the count-weighted mean of within-hospital terms; by Jensen's inequality this
  over-estimates the pooled term, so federated KID is an upper bound (equal for IID hospitals).
* Recall (``dp_recall_counts``): counts of real samples inside / outside the *public* synthetic
  k-NN manifold; sensitivity 1. Exactly Kynkäänniemi et al.'s recall.
* Precision: one real image changes the k-NN radii of an unbounded number of other real samples
  and its own ball can cover every synthetic sample, so the sensitivity of Kynkäänniemi precision
  is the whole synthetic set: not releasable usefully. Offered instead (``dp_fake_coverage``):
  the number of synthetic samples within a *public fixed radius* of some real sample, whose
  sensitivity is bounded from the public synthetic features alone. Pooled over hospitals it is a
  union, which counts cannot give, so the server gets bounds (``coverage_bounds``).
* Memorization (``dp_nearest_fake_histogram``): a histogram, over public distance bins, of each
  real image's distance to its nearest synthetic sample; each real image falls in one bin, so the
  sensitivity is 1. Releasing it for training and held-out images in one call (disjoint images:
  one mechanism) gives the data-copying test. The other direction (each synthetic sample's
  distance to its nearest real) has sensitivity = the whole synthetic set, for the same reason as
  precision; ``dp_fake_coverage`` at small radii is its honest cumulative form.
  ``dp_memorization_histograms`` is the release's check: training (capped) and held-out
  histograms in one mechanism, with the sensitivity argument in its docstring.
* Downstream utility (``dp_classification_counts``): confusion matrix and per-class score
  histograms of a classifier on the hospital's real test images; accuracy and ROC AUC are
  computed from them at the server.

Caveat: noise is drawn with ``torch.randn`` on floating point (as Opacus does outside its
``secure_mode``), which is vulnerable to floating-point attacks on the Gaussian mechanism
(Mironov 2012). With ``generator=None`` a fresh generator is seeded from OS entropy.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from shared.metrics import in_manifold, manifold_radii, pairwise_distances

# Relative precision of the noise calibration search; the returned mechanism reports the epsilon
# actually spent, which is at most the target.
_EPSILON_TOLERANCE = 1e-3

# Default split of one FID release's budget between (count, sum, sum of outer products): the
# covariance has d^2 noisy entries and dominates the error of FID (measured in the benchmark).
FID_BUDGET_SPLIT = (0.05, 0.15, 0.80)


# --------------------------------------------------------------------------------------------
# Mechanism and calibration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Mechanism:
    """One Gaussian-mechanism release, as the privacy ledger charges and recomputes it.

    ``noise_multiplier`` is the noise std divided by ``sensitivity`` (the release's L2
    sensitivity in the units the noise was added in; 1.0 for the weighted releases of this
    module). ``(noise_multiplier, sample_rate, steps)`` is an Opacus ``RDPAccountant.history``
    entry; ``epsilon`` is what that entry costs at ``delta`` on its own. ``query`` names the
    release and ``detail`` records per-part sensitivities and noise stds for the audit trail.
    """

    name: str = "gaussian"
    noise_multiplier: float
    sensitivity: float = 1.0
    sample_rate: float = 1.0
    steps: int = 1
    epsilon: float
    delta: float
    query: str = ""
    detail: Mapping[str, float] = field(default_factory=dict)

    def accountant_entry(self) -> tuple[float, float, int]:
        """``(noise_multiplier, sample_rate, steps)``, ready for ``RDPAccountant.history``."""
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def recompute_epsilon(self, delta: float | None = None) -> float:
        """Epsilon of this release alone at ``delta`` (default: its own), from Opacus' RDP accountant."""
        return rdp_epsilon(self.noise_multiplier, self.delta if delta is None else delta, self.sample_rate, self.steps)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (for ledgers and messages)."""
        record = dataclasses.asdict(self)
        record["detail"] = dict(self.detail)
        return record


def rdp_epsilon(noise_multiplier: float, delta: float, sample_rate: float = 1.0, steps: int = 1) -> float:
    """Epsilon of ``steps`` Gaussian releases (Poisson rate ``sample_rate``) by Opacus' RDP accountant."""
    if noise_multiplier <= 0:
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta=delta))


def calibrate_noise_multiplier(epsilon: float, delta: float) -> float:
    """Smallest noise multiplier (to 0.1 %) whose single full-batch release costs <= ``epsilon`` at ``delta``.

    ``epsilon = inf`` returns 0 (no noise): for tests and for exact statistics that never leave
    the hospital.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if math.isinf(epsilon):
        return 0.0
    with warnings.catch_warnings():
        # The bisection visits huge noise multipliers whose optimal RDP order is the largest one
        # Opacus tries, and Opacus warns about each; the caller recomputes the final epsilon.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=1.0,
                steps=1,
                accountant="rdp",
                epsilon_tolerance=_EPSILON_TOLERANCE * epsilon,
            )
        )


def split_epsilon(epsilon: float, delta: float, weights: Mapping[str, float]) -> dict[str, float]:
    """Per-release epsilons for several Gaussian releases that together cost ``epsilon`` at ``delta``.

    Full-batch Gaussian mechanisms compose in RDP by adding ``alpha / (2 z_i^2)``; giving release
    i the noise multiplier ``z / sqrt(w_i)`` (``w`` normalised to sum 1, ``z`` calibrated for one
    release at ``epsilon``) makes their composition exactly that of one release at ``z``. Each
    release's own epsilon is returned, to be passed to the ``dp_*``/``gaussian_*`` functions:
    calibrating to it gives a noise multiplier of at least ``z / sqrt(w_i)``, so the composition
    costs at most ``epsilon`` (the ledger recomputes the exact figure).
    """
    total = sum(weights.values())
    if not weights or min(weights.values()) <= 0:
        raise ValueError(f"release weights must be positive, got {dict(weights)}")
    noise_multiplier = calibrate_noise_multiplier(epsilon, delta)
    if noise_multiplier == 0:
        return {name: math.inf for name in weights}
    return {name: rdp_epsilon(noise_multiplier / math.sqrt(w / total), delta) for name, w in weights.items()}


def _make_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(secrets.randbits(63))


def _gaussian_release(
    parts: Mapping[str, torch.Tensor],
    sensitivities: Mapping[str, float],
    weights: Mapping[str, float],
    *,
    epsilon: float,
    delta: float,
    query: str,
    generator: torch.Generator | None,
    disjoint_groups: int = 1,
) -> tuple[dict[str, torch.Tensor], Mechanism]:
    """Add Gaussian noise of std ``z * D_c / sqrt(w_c)`` to each part (see module docstring).

    Weights sum to 1, or to 1 within each of ``disjoint_groups`` groups of parts when the caller
    guarantees that no single image moves parts of two groups (per-class statistics): the
    weighted vector still has L2 sensitivity 1.
    """
    total = sum(weights.values())
    if not math.isclose(total, disjoint_groups, rel_tol=1e-9) or min(weights.values()) <= 0:
        raise ValueError(f"{query}: budget weights must be positive and sum to 1, got {dict(weights)}")
    noise_multiplier = calibrate_noise_multiplier(epsilon, delta)
    generator = _make_generator(generator)
    released, detail = {}, {}
    for name, value in parts.items():
        value = torch.as_tensor(value, dtype=torch.float64)
        std = noise_multiplier * sensitivities[name] / math.sqrt(weights[name])
        if std > 0:
            value = value + std * torch.randn(value.shape, generator=generator, dtype=torch.float64)
        released[name] = value
        detail[f"{name}_sensitivity"] = float(sensitivities[name])
        detail[f"{name}_noise_std"] = float(std)
    mechanism = Mechanism(
        noise_multiplier=noise_multiplier,
        epsilon=rdp_epsilon(noise_multiplier, delta),
        delta=delta,
        query=query,
        detail=detail,
    )
    return released, mechanism


# --------------------------------------------------------------------------------------------
# FID: sufficient statistics
# --------------------------------------------------------------------------------------------


def clip_rows(features: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale each row of ``(N, d)`` down to L2 norm at most ``clip_norm``."""
    norms = features.norm(dim=1, keepdim=True)
    return features * (clip_norm / norms.clamp_min(clip_norm))


@dataclass(frozen=True, eq=False)  # tensors: compare with same_as()
class FeatureTransform:
    """Public per-image transform ``t(x) = clip(P^T (x - center), clip_norm)`` applied before statistics.

    Each part is optional (None = skip). ``center`` (d,) and ``projection`` P (d, k) must not
    depend on real images: the server derives them from synthetic features or public randomness
    and sends them to every hospital. Centering shrinks the clip an image needs (FID is
    translation invariant, and the shift is added back to the mean); projecting onto k << d
    directions is what makes DP FID usable at hospital scale (the noise on a k x k covariance
    has spectral norm ~ sqrt(k)), at the price of measuring FID in that subspace.

    Two projections: ``from_synthetic`` (top principal directions of the synthetic features:
    most signal per dimension, but each generator gets its own subspace, so FIDs of different
    generators are not comparable, and a mode-collapsed generator, which spans almost nothing,
    scores deceptively well) and ``random_projection`` (one fixed random subspace for every
    generator: comparable, and blind to nothing in expectation).
    """

    clip_norm: float | None = None
    center: torch.Tensor | None = None
    projection: torch.Tensor | None = None

    @classmethod
    def from_synthetic(cls, fake_features: torch.Tensor, *, clip_norm: float, dim: int | None = None) -> FeatureTransform:
        """Center at the synthetic mean; project on its top ``dim`` principal directions (None: no projection)."""
        fake = torch.as_tensor(fake_features).double()
        center = fake.mean(dim=0)
        projection = None
        if dim is not None:
            projection = torch.linalg.svd(fake - center, full_matrices=False).Vh[:dim].T.contiguous()
        return cls(clip_norm, center, projection)

    @classmethod
    def random_projection(cls, center: torch.Tensor, dim: int, *, clip_norm: float, seed: int) -> FeatureTransform:
        """Center at ``center`` (d,); project on a random k = ``dim`` dimensional subspace.

        ``P = sqrt(d / k) Q`` with Q (d, k) orthonormal columns from the QR decomposition of a
        Gaussian matrix drawn with ``seed``: the same subspace for every generator and run with
        that seed. The scale makes ``E |P^T v|^2 = |v|^2`` for any fixed v, so norms, the clip and
        the mean and trace terms of FID stay in the units of the full d-dimensional features
        (the square-root term is not linear: the figure is an estimate, not the full FID).
        """
        center = torch.as_tensor(center, dtype=torch.float64)
        d = center.shape[0]
        if not 0 < dim <= d:
            raise ValueError(f"projection dimension must be in [1, {d}], got {dim}")
        gaussian = torch.randn(d, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r))  # a unique Q (Haar-distributed), whatever the QR sign convention
        return cls(clip_norm, center, (q * math.sqrt(d / dim)).contiguous())

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        features = torch.as_tensor(features).double()
        if features.ndim != 2:
            raise ValueError(f"expected features of shape (N, d), got {tuple(features.shape)}")
        if self.center is not None:
            features = features - self.center
        if self.projection is not None:
            features = features @ self.projection
        if self.clip_norm is not None:
            features = clip_rows(features, self.clip_norm)
        return features

    def shift(self) -> torch.Tensor | float:
        """What the centering removed from the mean, in output coordinates (added back by ``mean_cov``)."""
        if self.center is None:
            return 0.0
        return self.center if self.projection is None else self.center @ self.projection

    def same_as(self, other: FeatureTransform) -> bool:
        def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
            return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))

        return self.clip_norm == other.clip_norm and same(self.center, other.center) and same(self.projection, other.projection)

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"clip_norm": np.array(np.nan if self.clip_norm is None else self.clip_norm)}
        if self.center is not None:
            arrays["center"] = self.center.numpy()
        if self.projection is not None:
            arrays["projection"] = self.projection.numpy()
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> FeatureTransform:
        clip_norm = float(arrays["clip_norm"])
        return cls(
            None if math.isnan(clip_norm) else clip_norm,
            torch.as_tensor(np.asarray(arrays["center"]), dtype=torch.float64) if "center" in arrays else None,
            torch.as_tensor(np.asarray(arrays["projection"]), dtype=torch.float64) if "projection" in arrays else None,
        )


@dataclass
class FeatureStats:
    """Sufficient statistics of FID: ``count``, ``sum`` (k,), ``sum_outer`` (k, k) of ``transform(x)``.

    With the identity transform (default) these are exactly torchmetrics' FID states. ``noisy``
    statistics (from DP releases) may have a non-integer count and an indefinite ``sum_outer``;
    ``outer_noise_std`` is the public std of the noise on each off-diagonal entry of
    ``sum_outer`` (root-sum-square over pooled releases), used by ``mean_cov`` to denoise.
    """

    count: float
    sum: torch.Tensor
    sum_outer: torch.Tensor
    transform: FeatureTransform = field(default_factory=FeatureTransform)
    noisy: bool = False
    outer_noise_std: float = 0.0

    @classmethod
    def from_features(cls, features: torch.Tensor, transform: FeatureTransform | None = None) -> FeatureStats:
        """Exact statistics of ``(N, d)`` features (the hospital's ``update`` in one call)."""
        transform = FeatureTransform() if transform is None else transform
        transformed = transform(features)
        dim = transformed.shape[1]
        stats = cls(0.0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64), transform)
        return stats.update(features)

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    def update(self, features: torch.Tensor) -> FeatureStats:
        """Accumulate a batch of raw features ``(N, d)`` in place; returns self."""
        if self.noisy:
            raise ValueError("cannot add exact features to noised statistics; merge two FeatureStats instead")
        transformed = self.transform(features)
        if transformed.shape[1] != self.dim:
            raise ValueError(f"features give {transformed.shape[1]} dimensions after the transform, statistics have {self.dim}")
        self.count += float(transformed.shape[0])
        self.sum += transformed.sum(dim=0)
        self.sum_outer += transformed.T @ transformed
        return self

    def _check_compatible(self, other: FeatureStats) -> None:
        if self.dim != other.dim or not self.transform.same_as(other.transform):
            raise ValueError(
                "FeatureStats differ in dimension or public transform (clip_norm, center, projection): "
                f"every hospital and the server must use the same one (d={self.dim}/{other.dim})"
            )

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Statistics of the union of both sets (a new object): the server's pooling step."""
        self._check_compatible(other)
        return FeatureStats(
            self.count + other.count,
            self.sum + other.sum,
            self.sum_outer + other.sum_outer,
            self.transform,
            self.noisy or other.noisy,
            math.hypot(self.outer_noise_std, other.outer_noise_std),
        )

    def mean_cov(self, denoise: str = "psd") -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(k,)`` and unbiased covariance ``(k, k)``, float64, as torchmetrics' FID computes them.

        Exact statistics are returned as they are. Noisy ones are symmetrized and, since the
        matrix square root in FID needs a PSD matrix, denoised in their eigenbasis:
        ``"psd"`` sets negative eigenvalues to 0 (nearest PSD matrix in Frobenius norm; keeps the
        positive half of the noise spectrum, so FID is biased upwards); ``"soft_threshold"``
        subtracts the noise's expected spectral edge ``2 s sqrt(k)`` (s = the public noise std of
        one covariance entry) from every eigenvalue and clips at 0, which removes most of that
        bias when k is large (2048) and over-shrinks when k is small (see the benchmark);
        ``"none"`` returns the symmetrized noisy covariance as released (unbiased, indefinite).
        """
        if self.count < 2:
            raise ValueError(f"FID needs at least 2 samples, statistics hold {self.count:.1f}")
        mean = self.sum / self.count
        cov = (self.sum_outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        cov = (cov + cov.T) / 2
        if self.noisy and denoise != "none":
            eigenvalues, eigenvectors = torch.linalg.eigh(cov)
            if denoise == "psd":
                eigenvalues = eigenvalues.clamp_min(0.0)
            elif denoise == "soft_threshold":
                edge = 2.0 * self.outer_noise_std / (self.count - 1) * math.sqrt(self.dim)
                eigenvalues = (eigenvalues - edge).clamp_min(0.0)
            else:
                raise ValueError(f"denoise must be 'psd', 'soft_threshold' or 'none', got {denoise!r}")
            cov = (eigenvectors * eigenvalues) @ eigenvectors.T
        return mean + self.transform.shift(), cov

    def to_arrays(self) -> dict[str, np.ndarray]:
        """NumPy arrays for a message (float64); the transform's arrays are prefixed ``transform_``."""
        arrays = {
            "count": np.array(self.count),
            "sum": self.sum.numpy(),
            "sum_outer": self.sum_outer.numpy(),
            "noisy": np.array(self.noisy),
            "outer_noise_std": np.array(self.outer_noise_std),
        }
        arrays.update({f"transform_{name}": value for name, value in self.transform.to_arrays().items()})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> FeatureStats:
        transform = {name[len("transform_") :]: value for name, value in arrays.items() if name.startswith("transform_")}
        return cls(
            float(arrays["count"]),
            torch.as_tensor(np.asarray(arrays["sum"]), dtype=torch.float64),
            torch.as_tensor(np.asarray(arrays["sum_outer"]), dtype=torch.float64),
            FeatureTransform.from_arrays(transform),
            bool(arrays["noisy"]),
            float(arrays["outer_noise_std"]),
        )


def _fid_parts_and_sensitivities(stats: FeatureStats, clip_norm: float):
    parts = {"count": torch.tensor(stats.count, dtype=torch.float64), "sum": stats.sum, "sum_outer": stats.sum_outer}
    # Add/remove one image: count moves by 1, sum by t(x) (norm <= C), sum_outer by t(x) t(x)^T
    # (Frobenius norm ||t(x)||^2 <= C^2).
    sensitivities = {"count": 1.0, "sum": clip_norm, "sum_outer": clip_norm**2}
    return parts, sensitivities


def _noised_stats(stats: FeatureStats, released: Mapping[str, torch.Tensor], outer_std: float) -> FeatureStats:
    sum_outer = released["sum_outer"]
    # Symmetrizing averages two independent noise draws off the diagonal: std / sqrt(2) there.
    return FeatureStats(
        float(released["count"]),
        released["sum"],
        (sum_outer + sum_outer.T) / 2,
        stats.transform,
        noisy=outer_std > 0,
        outer_noise_std=outer_std / math.sqrt(2),
    )


def _fid_transform(clip_norm: float, center: torch.Tensor | None, projection: torch.Tensor | None) -> FeatureTransform:
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    center = None if center is None else torch.as_tensor(center, dtype=torch.float64)
    projection = None if projection is None else torch.as_tensor(projection, dtype=torch.float64)
    return FeatureTransform(float(clip_norm), center, projection)


def gaussian_stats(
    features: torch.Tensor,
    *,
    clip_norm: float,
    epsilon: float,
    delta: float,
    center: torch.Tensor | None = None,
    projection: torch.Tensor | None = None,
    budget_split: Sequence[float] = FID_BUDGET_SPLIT,
    generator: torch.Generator | None = None,
) -> tuple[FeatureStats, Mechanism]:
    """DP FID statistics of one hospital's real features ``(N, d)``: ``(FeatureStats, Mechanism)``.

    Each feature vector becomes ``t(x) = clip(P^T (x - center), clip_norm)`` (``center``,
    ``projection`` public, see ``FeatureTransform``); count, sum and sum of outer products of
    ``t(x)`` get Gaussian noise for sensitivities 1, C and C^2 (L2 / Frobenius norm), the budget
    split by ``budget_split`` (count, sum, sum_outer); the noised outer-product matrix is
    symmetrized. Pool hospitals with ``merge``; compare with ``fid_from_stats``.
    """
    transform = _fid_transform(clip_norm, center, projection)
    stats = FeatureStats.from_features(features, transform)
    parts, sensitivities = _fid_parts_and_sensitivities(stats, transform.clip_norm)
    weights = dict(zip(parts, budget_split, strict=True))
    released, mechanism = _gaussian_release(
        parts, sensitivities, weights, epsilon=epsilon, delta=delta, query="fid_stats", generator=generator
    )
    return _noised_stats(stats, released, mechanism.detail["sum_outer_noise_std"]), mechanism


def gaussian_stats_per_class(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    classes: Sequence[int],
    clip_norm: float,
    epsilon: float,
    delta: float,
    center: torch.Tensor | None = None,
    projection: torch.Tensor | None = None,
    budget_split: Sequence[float] = FID_BUDGET_SPLIT,
    generator: torch.Generator | None = None,
) -> tuple[dict[int, FeatureStats], Mechanism]:
    """DP FID statistics per class: ``({class: FeatureStats}, Mechanism)``, one mechanism for all.

    One image only touches its own class's statistics, so releasing every class costs the same
    as one ``gaussian_stats`` release (parallel composition: the weighted vector of all classes
    still has L2 sensitivity 1). ``classes`` is the public label set: every class is released,
    even one the hospital has no image of, so that absence is not revealed.
    """
    labels = torch.as_tensor(labels).reshape(-1)
    unknown = set(labels.tolist()) - set(classes)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not in the public class list {list(classes)}")
    transform = _fid_transform(clip_norm, center, projection)
    parts, sensitivities, weights, exact = {}, {}, {}, {}
    for label in classes:
        exact[label] = FeatureStats.from_features(features[labels == label], transform)
        class_parts, class_sensitivities = _fid_parts_and_sensitivities(exact[label], transform.clip_norm)
        for (name, value), weight in zip(class_parts.items(), budget_split, strict=True):
            parts[f"{label}/{name}"] = value
            sensitivities[f"{label}/{name}"] = class_sensitivities[name]
            weights[f"{label}/{name}"] = weight  # sums to 1 within each class
    released, mechanism = _gaussian_release(
        parts,
        sensitivities,
        weights,
        epsilon=epsilon,
        delta=delta,
        query="fid_stats_per_class",
        generator=generator,
        disjoint_groups=len(classes),
    )
    per_class = {
        label: _noised_stats(
            exact[label],
            {name: released[f"{label}/{name}"] for name in ("count", "sum", "sum_outer")},
            mechanism.detail[f"{label}/sum_outer_noise_std"],
        )
        for label in classes
    }
    return per_class, mechanism


def fid_from_stats(real: FeatureStats, fake: FeatureStats | torch.Tensor, denoise: str = "psd") -> float:
    """FID between pooled real statistics and synthetic features ``(M, d)`` or statistics.

    Synthetic features go through the real statistics' public transform first. Same formula as
    torchmetrics: ``|mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 sum sqrt(eig(S_r S_f))``, in float64.
    ``denoise`` is passed to ``FeatureStats.mean_cov`` (only matters for noisy statistics), or is
    ``"psd_sqrt"``: the trace terms, linear in the covariance, use the noisy covariance as
    released (zero-mean noise: unbiased) and only the square-root term, which needs a PSD
    matrix, uses the ``"psd"`` projection. Projecting everything adds the positive half of the
    noise spectrum to ``tr(S_r)``, a bias of the order of the noise itself; ``"psd_sqrt"`` leaves
    a much smaller bias (measured in tests/test_evaluation.py) but can go slightly below 0.
    """
    if not isinstance(fake, FeatureStats):
        fake = FeatureStats.from_features(fake, real.transform)
    real._check_compatible(fake)
    mean_real, cov_real = real.mean_cov("psd" if denoise == "psd_sqrt" else denoise)
    mean_fake, cov_fake = fake.mean_cov("psd" if denoise == "psd_sqrt" else denoise)
    mean_term = (mean_real - mean_fake).square().sum()
    if denoise == "psd_sqrt":
        trace_term = real.mean_cov("none")[1].trace() + fake.mean_cov("none")[1].trace()
    else:
        trace_term = cov_real.trace() + cov_fake.trace()
    sqrt_term = torch.linalg.eigvals(cov_real @ cov_fake).sqrt().real.sum()
    return float(mean_term + trace_term - 2 * sqrt_term)


# --------------------------------------------------------------------------------------------
# KID: kernel sums against public synthetic features
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolynomialKernel:
    """``k(x, y) = (gamma * x.y + coef) ** degree``; ``gamma=None`` means ``1 / d`` (torchmetrics' KID)."""

    degree: int = 3
    gamma: float | None = None
    coef: float = 1.0

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        gamma = 1.0 / a.shape[1] if self.gamma is None else self.gamma
        return (gamma * (a.double() @ b.double().T) + self.coef) ** self.degree

    def bounds(self, dim: int, clip_norm: float, nonnegative: bool) -> tuple[float, float]:
        """Range of ``k(x, y)`` over vectors of norm <= ``clip_norm`` (non-negative entries if asked)."""
        gamma = 1.0 / dim if self.gamma is None else self.gamma
        low = self.coef + gamma * (0.0 if nonnegative else -(clip_norm**2))
        high = self.coef + gamma * clip_norm**2
        values = [low**self.degree, high**self.degree]
        if low < 0 < high and self.degree % 2 == 0:
            values.append(0.0)
        return min(values), max(values)


@dataclass
class KernelTerms:
    """One hospital's (noised) KID terms, centred at ``kernel_center`` to halve the sensitivity.

    ``cross_sum = sum_i (mean_j k(x_i, y_j) - c)`` over all ``count`` real samples;
    ``pair_sum = sum_{i != j} (k(x_i, x_j) - c)`` over at most ``n_cap`` of them (None if not
    requested: the real/real term does not depend on the generator, so it can be released once
    and reused).
    """

    count: float
    cross_sum: float
    pair_sum: float | None
    kernel_center: float
    n_cap: int

    def cross_mean_sum(self) -> float:
        """``sum_i mean_j k(x_i, y_j)`` with the centring undone."""
        return self.cross_sum + self.kernel_center * self.count

    def real_term(self) -> float:
        """This hospital's U-statistic estimate of ``E k(x, x')`` (x, x' real)."""
        if self.pair_sum is None:
            raise ValueError("these KernelTerms were released without the real/real pair sum")
        used = min(max(self.count, 2.0), float(self.n_cap))
        return self.pair_sum / (used * (used - 1)) + self.kernel_center


def _kernel_features(features: torch.Tensor, clip_norm: float, nonnegative: bool) -> torch.Tensor:
    features = torch.as_tensor(features).double()
    if nonnegative:
        features = features.clamp_min(0.0)
    return clip_rows(features, clip_norm)


def dp_kernel_terms(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    *,
    clip_norm: float,
    epsilon: float,
    delta: float,
    n_cap: int = 2000,
    kernel: PolynomialKernel = PolynomialKernel(),
    nonnegative: bool = True,
    include_pairs: bool = True,
    budget_split: Sequence[float] = (0.1, 0.45, 0.45),
    generator: torch.Generator | None = None,
) -> tuple[KernelTerms, Mechanism]:
    """DP KID terms of one hospital against public synthetic features: ``(KernelTerms, Mechanism)``.

    Features are clipped to ``clip_norm`` (and clamped at 0 when ``nonnegative``: Inception pool
    features already are), so every kernel value lies in ``[k_min, k_max]``; values are centred at
    the midpoint ``c`` so each lies within ``R / 2`` of it, ``R = k_max - k_min``.
    Sensitivities (add/remove one real image): count 1; cross_sum ``R / 2``; pair_sum, computed
    on a random subset of at most ``n_cap`` real images (public cap) so that it stays bounded,
    ``2 (n_cap - 1) R`` (a replacement inside the subset moves ``2 (n_cap - 1)`` pair terms by at
    most R). Relative to the real/real mean this noise is ``~ 2 z R / n_cap``: usable for large
    hospitals only. ``budget_split`` is (count, cross_sum, pair_sum); without pairs the pair
    weight goes to cross_sum.

    The subset is a uniformly random one, drawn from ``generator`` like the noise. That is what
    the sensitivity needs: a uniform subset of a neighbouring data set can be coupled to differ
    by one replacement. A subset fixed by a public seed cannot (a permutation of n + 1 images
    shares nothing with one of n), so removing one image could change every pair.
    """
    generator = _make_generator(generator)
    real = _kernel_features(real_features, clip_norm, nonnegative)
    fake = _kernel_features(fake_features, clip_norm, nonnegative)
    k_min, k_max = kernel.bounds(real.shape[1], clip_norm, nonnegative)
    center, spread = (k_min + k_max) / 2, k_max - k_min
    parts = {
        "count": torch.tensor(float(real.shape[0])),
        "cross_sum": (kernel(real, fake).mean(dim=1) - center).sum(),
    }
    sensitivities = {"count": 1.0, "cross_sum": spread / 2}
    weights = {"count": budget_split[0], "cross_sum": budget_split[1]}
    if include_pairs:
        order = torch.randperm(real.shape[0], generator=generator)
        subset = real[order[:n_cap]]
        pair_values = kernel(subset, subset) - center
        parts["pair_sum"] = pair_values.sum() - pair_values.diagonal().sum()
        sensitivities["pair_sum"] = 2 * (n_cap - 1) * spread
        weights["pair_sum"] = budget_split[2]
    else:
        weights["cross_sum"] = budget_split[1] + budget_split[2]
    released, mechanism = _gaussian_release(
        parts, sensitivities, weights, epsilon=epsilon, delta=delta, query="kid_terms", generator=generator
    )
    terms = KernelTerms(
        count=float(released["count"]),
        cross_sum=float(released["cross_sum"]),
        pair_sum=float(released["pair_sum"]) if include_pairs else None,
        kernel_center=center,
        n_cap=n_cap,
    )
    return terms, mechanism


def pooled_real_kernel_term(terms: Sequence[KernelTerms]) -> float:
    """Count-weighted mean of the hospitals' real/real kernel terms (an over-estimate of the pooled one)."""
    counts = [max(t.count, 0.0) for t in terms]
    return sum(c * t.real_term() for c, t in zip(counts, terms, strict=True)) / sum(counts)


def kid_from_terms(
    terms: Sequence[KernelTerms],
    fake_features: torch.Tensor,
    *,
    clip_norm: float,
    kernel: PolynomialKernel = PolynomialKernel(),
    nonnegative: bool = True,
    real_term: float | None = None,
) -> float:
    """Federated KID (unbiased MMD^2) from the hospitals' terms and the public synthetic features.

    ``real_term`` overrides the real/real term (e.g. cached from an earlier release); otherwise it
    is ``pooled_real_kernel_term(terms)``. ``clip_norm``, ``kernel`` and ``nonnegative`` must be
    those the hospitals used. For one hospital and equal set sizes this equals torchmetrics' KID
    with one subset holding every sample.
    """
    fake = _kernel_features(fake_features, clip_norm, nonnegative)
    m = fake.shape[0]
    fake_values = kernel(fake, fake)
    fake_term = (fake_values.sum() - fake_values.diagonal().sum()) / (m * (m - 1))
    cross_term = sum(t.cross_mean_sum() for t in terms) / sum(t.count for t in terms)
    real_term = pooled_real_kernel_term(terms) if real_term is None else real_term
    return float(real_term + fake_term - 2 * cross_term)


# --------------------------------------------------------------------------------------------
# Recall, fixed-radius precision, memorization: counts against public synthetic features
# --------------------------------------------------------------------------------------------


def dp_recall_counts(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    *,
    k: int = 3,
    epsilon: float,
    delta: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, Mechanism]:
    """Noised ``[inside, outside]`` counts of real samples vs the public synthetic k-NN manifold.

    Each real sample lands in exactly one of the two cells, so the L2 sensitivity is 1.
    ``recall_from_counts`` pools hospitals. Same manifold as ``shared.metrics.precision_recall``.
    """
    inside = in_manifold(real_features, fake_features, manifold_radii(fake_features, k))
    counts = torch.stack([inside.sum(), (~inside).sum()]).double()
    released, mechanism = _gaussian_release(
        {"counts": counts}, {"counts": 1.0}, {"counts": 1.0}, epsilon=epsilon, delta=delta, query="recall_counts",
        generator=generator,
    )
    return released["counts"], mechanism


def recall_from_counts(counts: Sequence[torch.Tensor]) -> float:
    """Pooled recall from the hospitals' noised ``[inside, outside]`` counts, clamped to [0, 1]."""
    total = torch.stack([torch.as_tensor(c, dtype=torch.float64) for c in counts]).sum(dim=0).clamp_min(0.0)
    return float((total[0] / total.sum().clamp_min(1.0)).clamp(0.0, 1.0))


def coverage_sensitivity(fake_features: torch.Tensor, radius: float) -> int:
    """Upper bound on how many synthetic samples one real image's ball of ``radius`` can cover.

    Any ball of radius r that contains a synthetic sample y lies inside B(y, 2r), so the bound
    is the largest number of synthetic samples within 2r of a synthetic sample (at least 1).
    Computed from public features only.
    """
    return _coverage_sensitivity(pairwise_distances(fake_features, fake_features), radius)


def _coverage_sensitivity(fake_distances: torch.Tensor, radius: float) -> int:
    return max(1, int((fake_distances <= 2 * radius).sum(dim=1).max()))


def dp_fake_coverage(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    radii: Sequence[float],
    *,
    epsilon: float,
    delta: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, Mechanism]:
    """Noised count, per public radius r, of synthetic samples within r of some real sample.

    Fixed-radius precision (r ~ the synthetic k-NN radius) and, at small r, the cumulative
    histogram of synthetic-to-nearest-real distances (a memorization check). Adding or removing
    one real image changes the count at r by at most ``coverage_sensitivity(fake, r)``, a bound
    computed from the public synthetic features; the budget is split evenly over the radii.
    A mode-collapsed synthetic set has the whole set as sensitivity: its coverage is not
    measurable privately (and is not needed: recall already exposes the collapse).
    """
    nearest_real = pairwise_distances(real_features, fake_features).min(dim=0).values  # per synthetic sample
    fake_distances = pairwise_distances(fake_features, fake_features)
    parts, sensitivities, weights = {}, {}, {}
    for index, radius in enumerate(radii):
        parts[f"r{index}"] = (nearest_real <= radius).sum().double()
        sensitivities[f"r{index}"] = float(_coverage_sensitivity(fake_distances, radius))
        weights[f"r{index}"] = 1.0 / len(radii)
    released, mechanism = _gaussian_release(
        parts, sensitivities, weights, epsilon=epsilon, delta=delta, query="fake_coverage", generator=generator
    )
    return torch.stack([released[f"r{index}"] for index in range(len(radii))]), mechanism


def coverage_bounds(counts: Sequence[torch.Tensor], num_fake: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds on the fraction of synthetic samples covered by the union of all hospitals' balls.

    The union covers at least what the best single hospital covers and at most the sum; both
    from noised counts, clamped to [0, 1]. Returns ``(lower, upper)`` per radius.
    """
    stacked = torch.stack([torch.as_tensor(c, dtype=torch.float64) for c in counts]).clamp_min(0.0) / num_fake
    return stacked.max(dim=0).values.clamp(0.0, 1.0), stacked.sum(dim=0).clamp(0.0, 1.0)


def public_distance_bins(fake_features: torch.Tensor, num_bins: int = 20, k: int = 1) -> torch.Tensor:
    """Public bin edges ``[0, ..., e_B]`` for distance histograms, from synthetic features only.

    Evenly spaced from 0 to twice the largest k-NN distance among synthetic samples, so the
    typical real-to-synthetic distance falls well inside the range.
    """
    top = 2.0 * float(manifold_radii(fake_features, k).max())
    return torch.linspace(0.0, top, num_bins + 1, dtype=torch.float64)


def dp_nearest_fake_histogram(
    real_features: torch.Tensor | Mapping[str, torch.Tensor],
    fake_features: torch.Tensor,
    bin_edges: torch.Tensor,
    *,
    epsilon: float,
    delta: float,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], Mechanism]:
    """Noised histogram of each real sample's distance to its nearest synthetic sample.

    ``bin_edges`` (public, increasing, starting at 0) define bins ``[e_i, e_{i+1})`` plus an
    overflow bin ``[e_B, inf)``: ``len(bin_edges)`` counts per group. ``real_features`` may be a
    mapping of disjoint groups, e.g. ``{"train": ..., "holdout": ...}``: each image falls in one
    bin of one group, so all groups together have L2 sensitivity 1 (one mechanism). If training
    images sit much closer to the synthetic set than held-out images do, the generator copies
    (the data-copying test of Meehan et al. 2020). ``histogram_quantiles`` reads quantiles.
    """
    groups = real_features if isinstance(real_features, Mapping) else {"real": real_features}
    edges = torch.as_tensor(bin_edges, dtype=torch.float64)
    if edges[0] != 0 or not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError(f"bin_edges must start at 0 and increase, got {edges.tolist()}")
    histograms = []
    for features in groups.values():
        nearest = pairwise_distances(features, fake_features).min(dim=1).values
        bins = torch.bucketize(nearest, edges, right=True) - 1  # edges[i] <= d < edges[i+1] -> bin i
        histograms.append(torch.bincount(bins, minlength=len(edges)).double())
    # Groups are disjoint sets of images, so the concatenation of all histograms moves by 1 in one
    # cell: one part with sensitivity 1, no split of the budget.
    parts = {"histograms": torch.stack(histograms)}
    released, mechanism = _gaussian_release(
        parts, {"histograms": 1.0}, {"histograms": 1.0}, epsilon=epsilon, delta=delta,
        query="nearest_fake_histogram", generator=generator,
    )
    return dict(zip(groups, released["histograms"], strict=True)), mechanism


def _nearest_histogram(features: torch.Tensor, fake_features: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    nearest = pairwise_distances(features, fake_features).min(dim=1).values
    bins = torch.bucketize(nearest, edges, right=True) - 1  # edges[i] <= d < edges[i+1] -> bin i
    return torch.bincount(bins, minlength=len(edges)).double()


def dp_memorization_histograms(
    train_features: torch.Tensor,
    holdout_features: torch.Tensor,
    fake_features: torch.Tensor,
    bin_edges: torch.Tensor,
    *,
    max_train: int,
    epsilon: float,
    delta: float,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], Mechanism]:
    """Noised histograms of each real image's distance to its nearest synthetic sample, for
    the hospital's TRAINING images and, as the baseline, its HELD-OUT images (the data-copying
    test of Meehan et al. 2020: a generator that copies brings training images closer to the
    release than real images it never saw).

    ``train_features`` (N, d) are the images the generator was trained on; at most
    ``max_train`` of them, the first of a uniformly random permutation (drawn from
    ``generator``: the hospital's secret randomness), are measured. ``holdout_features``
    (H, d) are disjoint from them. ``bin_edges`` (public, increasing, from 0) as in
    ``dp_nearest_fake_histogram``: ``len(bin_edges)`` counts per histogram, the last one the
    overflow. Returns ``{"train": ..., "holdout": ...}`` and one Mechanism.

    Sensitivity (add/remove one image). The synthetic features are public, so each measured
    image falls in exactly one bin whatever the other real images are: one real image that is
    the nearest neighbour of many synthetic images still adds one count (counting synthetic
    images instead, "how many synthetic images lie within r of some training image", would
    move by up to the whole synthetic set). A held-out image changes the held-out histogram by
    1 in one cell and nothing else. A training image z: couple the permutations of D and
    D + {z} by putting z at a uniform position j and moving the image w that held j to the
    end (a uniform permutation of D + {z}). If N >= max_train, either j is beyond the cap
    (nothing measured changes) or z replaces w (one count moves: L2 sqrt 2); if N < max_train,
    z is added and w stays measured (L2 1). So the training histogram has L2 sensitivity
    sqrt 2, the held-out one 1, and no image moves both: one Gaussian mechanism on two
    disjoint groups of parts, each group weighted to sensitivity 1 (``_gaussian_release``
    with ``disjoint_groups=2``), ``(noise_multiplier, 1, 1)`` in the ledger.

    Not released, and why: the real-real nearest-neighbour distances (how close real images
    are to each other). One image can be the nearest neighbour of as many others as the
    kissing number of the feature space allows (4320 in 16 dimensions, astronomically more in
    2048), so that histogram has no useful sensitivity bound; the distances of random
    disjoint pairs of real images do (sqrt 3 under the coupling above), but their 1st
    percentile is a pairwise, not a nearest-neighbour, distance (on PneumoniaMNIST, in
    TinyFeatureNet features, 68-75 % of real images have one of 400 other real images within
    it, copying or not), and it
    rests on ~1 % of a few hundred pairs, below the noise. The held-out histogram is the
    private baseline instead.
    """
    edges = torch.as_tensor(bin_edges, dtype=torch.float64)
    if edges[0] != 0 or not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError(f"bin_edges must start at 0 and increase, got {edges.tolist()}")
    if max_train < 1:
        raise ValueError(f"max_train must be >= 1, got {max_train}")
    generator = _make_generator(generator)
    order = torch.randperm(train_features.shape[0], generator=generator)[:max_train]
    parts = {"train": _nearest_histogram(train_features[order], fake_features, edges),
             "holdout": _nearest_histogram(holdout_features, fake_features, edges)}
    released, mechanism = _gaussian_release(
        parts, {"train": math.sqrt(2.0), "holdout": 1.0}, {"train": 1.0, "holdout": 1.0},
        epsilon=epsilon, delta=delta, query="memorization_histograms", generator=generator,
        disjoint_groups=2,
    )
    return released, mechanism


def closer_probability(histogram_a: torch.Tensor, histogram_b: torch.Tensor) -> float:
    """P(distance of an a-image < distance of a b-image) from two (noised) histograms over
    the same bins; a tie inside a bin counts 1/2 (the Mann-Whitney U / ROC AUC). 0.5 when
    a and b are equally close. Negative noisy counts are set to 0; clipped to [0, 1]."""
    a = torch.as_tensor(histogram_a, dtype=torch.float64).clamp_min(0.0)
    b = torch.as_tensor(histogram_b, dtype=torch.float64).clamp_min(0.0)
    b_above = b.sum() - torch.cumsum(b, 0)                # b-images in later (farther) bins
    wins = (a * (b_above + b / 2)).sum()
    return float((wins / (a.sum().clamp_min(1.0) * b.sum().clamp_min(1.0))).clamp(0.0, 1.0))


def histogram_quantiles(counts: torch.Tensor, bin_edges: torch.Tensor, quantiles: Sequence[float]) -> list[float]:
    """Quantiles of a (noised, pooled) histogram from ``dp_nearest_fake_histogram``.

    Negative noisy counts are set to 0; quantiles are interpolated linearly inside a bin; a
    quantile in the overflow bin is reported as its lower edge (a lower bound).
    """
    counts = torch.as_tensor(counts, dtype=torch.float64).clamp_min(0.0)
    edges = torch.as_tensor(bin_edges, dtype=torch.float64)
    cumulative = torch.cumsum(counts, 0)
    total = float(cumulative[-1])
    results = []
    for q in quantiles:
        target = q * total
        index = int(torch.searchsorted(cumulative, torch.tensor(target, dtype=torch.float64)))
        index = min(index, len(counts) - 1)
        if index == len(counts) - 1:
            results.append(float(edges[-1]))
            continue
        below = float(cumulative[index - 1]) if index > 0 else 0.0
        fraction = (target - below) / float(counts[index]) if counts[index] > 0 else 0.0
        results.append(float(edges[index] + fraction * (edges[index + 1] - edges[index])))
    return results


# --------------------------------------------------------------------------------------------
# Downstream utility: classifier accuracy and ROC AUC on a hospital's real test images
# --------------------------------------------------------------------------------------------


@dataclass
class ClassificationCounts:
    """Confusion matrix ``(K, K)`` [true, predicted] and score histograms for ROC AUC.

    ``score_histograms[c]`` is ``(2, B)``: row 0 for samples of another class, row 1 for class c,
    over ``B`` equal bins of the predicted probability of class c. Binary problems keep only the
    positive class's histogram. Counts may be noised; they pool by addition.
    """

    confusion: torch.Tensor
    score_histograms: torch.Tensor

    def merge(self, other: ClassificationCounts) -> ClassificationCounts:
        return ClassificationCounts(self.confusion + other.confusion, self.score_histograms + other.score_histograms)

    def count(self) -> float:
        return float(self.confusion.sum().clamp_min(0.0))

    def accuracy(self) -> float:
        """Trace over total, clipped to [0, 1]. Noisy cells are not clamped at 0 one by one:
        that would bias the estimate towards the empty cells; the linear estimate is unbiased
        in its numerator."""
        return float((self.confusion.trace() / self.confusion.sum().clamp_min(1.0)).clamp(0.0, 1.0))

    def auc(self) -> float:
        """ROC AUC from the histograms (ties inside a bin count 1/2); macro mean of one-vs-rest.

        Same unclamped linear estimate as ``accuracy``, clipped to [0, 1] at the end.
        """
        aucs = []
        for histogram in self.score_histograms:
            negatives, positives = histogram[0], histogram[1]
            negatives_below = torch.cumsum(negatives, 0) - negatives
            wins = (positives * (negatives_below + negatives / 2)).sum()
            aucs.append(wins / (positives.sum().clamp_min(1.0) * negatives.sum().clamp_min(1.0)))
        return float(torch.stack(aucs).mean().clamp(0.0, 1.0))


def public_score_edges(probabilities: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Score-histogram edges ``(num_bins + 1,)`` from 0 to 1 that follow where a classifier's
    scores lie, from its probabilities ``(N, K)`` on PUBLIC images (synthetic ones): nine
    tenths of each inner edge is the score quantile, one tenth the uniform edge, so the edges
    strictly increase whatever the scores. A classifier trained with DP-SGD at a small
    epsilon puts nearly all its scores in one or two of ten uniform bins; there the AUC
    would be measured on noise alone."""
    probabilities = torch.as_tensor(probabilities, dtype=torch.float64)
    scores = probabilities[:, 1] if probabilities.shape[1] == 2 else probabilities.flatten()
    uniform = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)
    quantiles = torch.quantile(scores, uniform[1:-1]) if len(scores) else uniform[1:-1]
    inner = 0.9 * quantiles.clamp(0.0, 1.0) + 0.1 * uniform[1:-1]
    return torch.cat([uniform[:1], inner, uniform[-1:]])


def classification_counts(probabilities: torch.Tensor, labels: torch.Tensor, num_bins: int = 100,
                          edges: torch.Tensor | None = None) -> ClassificationCounts:
    """Exact ``ClassificationCounts`` from probabilities ``(N, K)`` and integer labels ``(N,)``.

    Score bins: ``num_bins`` equal ones on [0, 1], or the public ``edges`` (from 0 to 1,
    increasing: ``public_score_edges``)."""
    probabilities = torch.as_tensor(probabilities, dtype=torch.float64)
    labels = torch.as_tensor(labels).reshape(-1).long()
    num_classes = probabilities.shape[1]
    predicted = probabilities.argmax(dim=1)
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    score_classes = [1] if num_classes == 2 else list(range(num_classes))
    if edges is not None:
        edges = torch.as_tensor(edges, dtype=torch.float64)
        num_bins = len(edges) - 1
    histograms = []
    for c in score_classes:
        if edges is None:
            bins = (probabilities[:, c] * num_bins).long().clamp(0, num_bins - 1)
        else:
            bins = torch.bucketize(probabilities[:, c], edges[1:-1], right=True)
        is_class = (labels == c).long()
        histograms.append(torch.bincount(is_class * num_bins + bins, minlength=2 * num_bins).reshape(2, num_bins))
    return ClassificationCounts(confusion.reshape(num_classes, num_classes).double(), torch.stack(histograms).double())


def dp_classification_counts(
    probabilities: torch.Tensor,
    labels: torch.Tensor,
    *,
    epsilon: float,
    delta: float,
    num_bins: int = 10,
    generator: torch.Generator | None = None,
    edges: torch.Tensor | None = None,
) -> tuple[ClassificationCounts, Mechanism]:
    """Noised ``ClassificationCounts`` of a classifier on a hospital's real labelled images.

    Each image adds 1 to one confusion cell and 1 to one cell of each score histogram (1 for
    binary, K for K classes), so the parts have sensitivity 1 each and the budget is split
    evenly over them. ``probabilities`` must come from a model that does not depend on these
    images (e.g. trained on synthetic data). Fewer bins: less noise in total, coarser AUC; on
    PneumoniaMNIST's 624 test images at epsilon 1, 10 bins gave AUC error -0.01 +- 0.026 (40 draws).
    ``edges``: public score bins (``public_score_edges``; they must not depend on these images).
    """
    exact = classification_counts(probabilities, labels, num_bins, edges)
    parts = {"confusion": exact.confusion}
    parts.update({f"scores{c}": h for c, h in enumerate(exact.score_histograms)})
    released, mechanism = _gaussian_release(
        parts, dict.fromkeys(parts, 1.0), dict.fromkeys(parts, 1.0 / len(parts)), epsilon=epsilon, delta=delta,
        query="classification_counts", generator=generator,
    )
    histograms = torch.stack([released[f"scores{c}"] for c in range(len(exact.score_histograms))])
    return ClassificationCounts(released["confusion"], histograms), mechanism
