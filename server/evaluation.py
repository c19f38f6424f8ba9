"""Federated evaluation of the release (and, with eval-every, of every K-th round): the EMA
generator's samples against the hospitals' real images, which never leave the hospitals.

    synthetic images: eval-samples per class from the EMA generator, drawn with the release's
        seed (with eval-samples = samples-per-class they are the released images)
    public inputs, made from synthetic images and public randomness only:
        their features (eval-features: the FID InceptionV3), the FID transform (centre at
        the synthetic mean, a fixed random eval-fid-dims-dimensional projection, clip
        eval-clip-norm), a classifier trained on them alone (train on synthetic, test on real),
        public distance bins for the memorization check
    one EVALUATE message per hospital (shared/evaluation.py); each hospital checks its budget,
        releases DP statistics of its held-out images (at release also of its training
        images: the memorization check) and charges its ledger
    check every reply: status, one signed entry per release whose digest is the record's
    pool by addition: FID statistics per class, recall counts, classifier counts,
        memorization histograms
    scores: FID and per-class FID, recall, TSTR accuracy and ROC AUC, the downstream-utility
        table, the memorization check (training vs held-out images' distance to the nearest
        synthetic image, flagged when training images are closer), each with its (noised)
        sample sizes and privacy cost; public synthetic-only scores beside them: diversity
        SSIM per class and the classifier score (Inception Score formula, TSTR classifier)

Everything computed here is post-processing of the hospitals' DP releases and of public
synthetic images. What is not released, and why:

* exact FID, and FID in the standard 2048-d space: in 2048 dimensions the noise on a
  2048 x 2048 covariance swamps hospitals of a few hundred images (errors in the thousands
  even at eval-epsilon 10; benchmarks/RESULTS.md, "Evaluation"). The DP FID is measured in
  one fixed random eval-fid-dims-dimensional subspace (16 by default; the same for every
  generator and run: `shared.evaluation.FID_BASIS_SEED`), scaled so that norms and the clip
  (eval-clip-norm, 18) are in the units of the full features, around the synthetic mean.
  It ranks generators, mode collapse included, and tracks a run; it is not comparable
  with published FIDs. (The synthetic features' own principal directions carry more signal,
  but give each generator its own subspace, in which a collapsed generator scores best.)
  eval-fid-dims = 0 gives the standard space.
* precision (Kynkäänniemi et al.): its sensitivity to one real image is the whole synthetic
  set (shared/dp_stats.py); recall is released instead, with sensitivity 1.
* KID: the real/real kernel term has sensitivity ~ n R; at a few hundred held-out images per
  hospital its DP error exceeds typical KID values (-0.07 +- 0.08 against 0.0012 at epsilon
  1, benchmarks/RESULTS.md), and that term is generator-independent, so releasing it once and
  caching it does not make it any less noisy. Without it only "KID minus a constant" is left
  (the cross and synthetic terms): it ranks generators like FID does, is not KID, and would
  take budget from FID. Not requested.
* the Inception Score proper: the offline FID InceptionV3 has no ImageNet head
  (shared/features.py); the classifier score is the IS formula on the TSTR classifier.
* the real-real nearest-neighbour distance of the memorization check (no useful sensitivity
  bound; shared/dp_stats.py dp_memorization_histograms): held-out images are the baseline.
* diversity SSIM of real images: the mean of clipped pairwise SSIM over k held-out images of
  a class moves by up to 2/k with one image, so its noise is about 2z/k: +-0.26 for z = 12.8
  (a 10 % share of eval-epsilon 1) and k = 100; not worth the budget, not requested.
* the real-data rows of the utility table (real only, real + augmentation, real +
  synthetic) without utility-epsilon: a classifier trained on real images needs its own
  DP-SGD federation (server/utility.py), which costs each hospital utility-epsilon per row.

Budget: training is calibrated to reach target-epsilon, so a hospital can afford an
evaluation only with headroom: its epsilon must cover target-epsilon and eval-epsilon for
every evaluation composed (RDP composes them to less than the sum, so target-epsilon +
evaluations x eval-epsilon is enough; evaluations = 1 + the eval-every rounds before the
last). Simulated hospitals get exactly that when sim-hospital-epsilon = 0 (client/node.py
`simulated_budget`); a real hospital sets its node config's epsilon. A hospital without the
headroom refuses and is listed; the scores pool the others.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from server import release
from server.checkpoint import ServerState
from server.replies import ledger_chain, status as reply_status
from shared import evaluation as protocol
from shared import weights
from shared.classifier import train_classifier
from shared.config import ConfigError, RunConfig
from shared.dp_stats import (FeatureStats, FeatureTransform, closer_probability, fid_from_stats,
                             histogram_quantiles, rdp_epsilon, recall_from_counts)
from shared.features import extract_features, feature_network, uint8_to_unit_range
from shared.metrics import diversity_ssim, inception_score, pairwise_distances

EVALUATIONS = ("fid-stats", "recall", "classifier")      # every evaluation (eval-every)
RELEASE_EVALUATIONS = EVALUATIONS + ("memorization",)  # the release's evaluation
MEMORIZATION_Z = 3.0     # the flag: training images closer than held-out ones by 3 standard errors
TSTR_EPOCHS = 20
EVAL_TIMEOUT_S = 3600.0


@dataclass
class Synthetic:
    """The public side of an evaluation: synthetic images and what is derived from them."""

    images: torch.Tensor            # (M, 1, S, S) in [-1, 1]
    labels: torch.Tensor            # (M,)
    features: torch.Tensor          # (M, d) float64
    transform: FeatureTransform
    classifier: torch.nn.Module
    generator: torch.nn.Module
    seed: int
    released_features: torch.Tensor  # (R, d) features of exactly the released images
    distance_bins: torch.Tensor     # (B + 1,) public bins of nearest-released-image distances


@dataclass
class Pooled:
    """The hospitals' releases, added up; and who took part."""

    fid: dict[int, FeatureStats] = field(default_factory=dict)
    recall: list[torch.Tensor] = field(default_factory=list)
    classification: Any = None
    utility: dict[str, Any] = field(default_factory=dict)   # utility release -> counts
    memorization: dict[str, torch.Tensor] = field(default_factory=dict)   # train, holdout
    memorization_noise_var: dict[str, float] = field(default_factory=dict)  # per cell, pooled
    hospitals: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    entries: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    chains: dict[str, list[dict[str, Any]]] = field(default_factory=dict)   # whole ledgers
    public_keys: dict[str, str] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)


def synthetic_side(cfg: RunConfig, sampler: dict[str, np.ndarray]) -> Synthetic:
    """Synthetic images, their features, the FID transform and the TSTR classifier.
    ``sampler``: the EMA generator's weights, and the discriminator's when the release picks
    among candidates (`release.sampler_weights`)."""
    seed = cfg.seed + release.SAMPLE_SEED_OFFSET + 1   # the release's own samples
    labels = np.repeat(np.arange(cfg.num_classes), cfg.eval_samples)
    generator = release.generator_from(cfg, sampler)
    images = uint8_to_unit_range(release.generate(generator, labels, cfg.latent_dim, seed))
    features = extract_features(feature_network(cfg.eval_features), images).double()
    if cfg.eval_fid_dims > features.shape[1]:
        raise ConfigError(f"run config: eval-fid-dims = {cfg.eval_fid_dims} exceeds the "
                          f"{features.shape[1]} features of eval-features = {cfg.eval_features}")
    if cfg.eval_fid_dims:
        transform = FeatureTransform.random_projection(
            features.mean(dim=0), cfg.eval_fid_dims, clip_norm=cfg.eval_clip_norm, seed=protocol.FID_BASIS_SEED)
    else:
        transform = FeatureTransform(cfg.eval_clip_norm, features.mean(dim=0), None)
    classifier = train_classifier(images, torch.as_tensor(labels), epochs=TSTR_EPOCHS, augment=False,
                                  seed=cfg.seed, num_classes=cfg.num_classes)
    if cfg.samples_per_class == cfg.eval_samples:
        released = features
    else:   # the memorization check is about the images the release publishes
        released_labels = np.repeat(np.arange(cfg.num_classes), cfg.samples_per_class)
        released_images = uint8_to_unit_range(release.generate(generator, released_labels, cfg.latent_dim, seed))
        released = extract_features(feature_network(cfg.eval_features), released_images).double()
    return Synthetic(images, torch.as_tensor(labels), features, transform, classifier, generator, seed,
                     released, memorization_bins(released, cfg.eval_clip_norm))


def memorization_bins(features: torch.Tensor, fallback: float) -> torch.Tensor:
    """Public bins for the memorization histograms: MEMORIZATION_BINS equal bins from 0 to 3x
    the median distance between a released image and its nearest other released image
    (the scale at which a real image "has a synthetic twin"), plus the overflow bin. A
    mode-collapsed set (median 0) or a single image falls back to ``fallback``
    (eval-clip-norm)."""
    distances = pairwise_distances(features, features)
    distances.fill_diagonal_(math.inf)
    top = 3.0 * float(distances.min(dim=1).values.median())
    if not top > 0 or not math.isfinite(top):
        top = fallback
    return torch.linspace(0.0, top, protocol.MEMORIZATION_BINS + 1, dtype=torch.float64)


def evaluate_content(synthetic: Synthetic, run_id: str, rnd: int,
                     names: Iterable[str] = EVALUATIONS) -> RecordDict:
    """What one EVALUATE message carries: the instruction and the public inputs it needs."""
    names = list(names)
    content = RecordDict({"config": ConfigRecord({"run-id": run_id, "round": rnd,
                                                  "evaluations": ",".join(names)})})
    if "fid-stats" in names:
        content["fid-transform"] = protocol.transform_record(synthetic.transform)
    if "recall" in names:
        content["synthetic-features"] = protocol.features_record(synthetic.features)
    if "memorization" in names:
        content["released-features"] = protocol.features_record(synthetic.released_features)
        content["distance-bins"] = protocol.distance_bins_record(synthetic.distance_bins)
    if "classifier" in names:
        content["classifier"] = protocol.classifier_record(synthetic.classifier)
    return content


def evaluate_messages(nodes: Iterable[int], synthetic: Synthetic, run_id: str, rnd: int,
                      names: Iterable[str] = EVALUATIONS) -> list[Message]:
    content = evaluate_content(synthetic, run_id, rnd, names)
    return [Message(content=content, dst_node_id=node, message_type=MessageType.EVALUATE)
            for node in nodes]


def check_reply(reply: Message, cfg: RunConfig, names: list[str], synthetic: Synthetic,
                run_id: str) -> tuple[str, dict[str, Any]]:
    """("error"|"budget"|"ok", details) for one reply; never raises on a bad reply.

    An accepted reply has exactly one signed ledger entry per release, in order, each naming
    this run, the release's purpose, the Gaussian mechanism and the digest of the record sent.
    """
    kind, info = reply_status(reply, reply.metadata.src_node_id)
    if kind != "ok":
        return kind, info
    node, hospital, metrics, content = info["node"], info["hospital"], info["metrics"], reply.content
    try:
        entries = json.loads(content["ledger"]["entries"])
        if len(entries) != len(names):
            raise protocol.ProtocolError(f"{len(entries)} ledger entries for {len(names)} releases")
        dim = synthetic.transform(synthetic.features[:1]).shape[1]
        released: dict[str, Any] = {}
        for name, entry in zip(names, entries, strict=True):
            arrays = protocol.record_arrays(content[protocol.record_name(name)])
            if (entry.get("purpose") != protocol.purpose(name) or entry.get("mechanism") != "gaussian"
                    or entry.get("run_id") != run_id or entry.get("hospital_id") != hospital):
                raise protocol.ProtocolError(f"the ledger entry for {name} names another release")
            if entry.get("weights_sha256") != weights.digest(arrays):
                raise protocol.ProtocolError(f"{name} does not match the digest in its ledger entry")
            if name == "fid-stats":
                released[name] = protocol.fid_stats_from_arrays(arrays, synthetic.transform,
                                                                range(cfg.num_classes), dim)
            elif name == "recall":
                released[name] = protocol.recall_from_arrays(arrays)
            elif name == "memorization":
                released[name] = (protocol.memorization_from_arrays(arrays, len(synthetic.distance_bins)),
                                  float(entry["noise_multiplier"]))
            else:
                released[name] = protocol.classification_from_arrays(arrays, cfg.num_classes)
    except (KeyError, ValueError, TypeError) as e:   # ProtocolError and JSON errors are ValueErrors
        return "error", {"node": node, "hospital": hospital, "reason": f"rejected evaluation: {e}"}
    try:
        chain = ledger_chain(content, entries)
    except ValueError as e:
        return "error", {"node": node, "hospital": hospital, "reason": f"rejected ledger: {e}"}
    return "ok", {"node": node, "hospital": hospital, "metrics": metrics, "entries": entries,
                  "chain": chain,
                  "released": released, "public_key": str(content["ledger"]["public-key"])}


def pool(replies: Iterable[Message], cfg: RunConfig, names: list[str], synthetic: Synthetic,
         run_id: str) -> Pooled:
    """Check every reply and add up the accepted releases (in hospital order: reproducible)."""
    pooled = Pooled()
    accepted = []
    for reply in replies:
        kind, info = check_reply(reply, cfg, names, synthetic, run_id)
        if kind == "error":
            pooled.failures.append(info)
        elif kind == "budget":
            pooled.refused.append(info["hospital"])
        else:
            accepted.append(info)
    for info in sorted(accepted, key=lambda i: i["hospital"]):
        hospital, released = info["hospital"], info["released"]
        pooled.hospitals.append(hospital)
        pooled.entries[hospital] = info["entries"]
        pooled.chains[hospital] = info["chain"]
        pooled.public_keys[hospital] = info["public_key"]
        pooled.epsilon[hospital] = float(info["metrics"]["epsilon"])
        for label, stats in released.get("fid-stats", {}).items():
            pooled.fid[label] = stats if label not in pooled.fid else pooled.fid[label].merge(stats)
        if "recall" in released:
            pooled.recall.append(released["recall"])
        if "memorization" in released:
            histograms, z = released["memorization"]
            for part, sensitivity in (("train", math.sqrt(2.0)), ("holdout", 1.0)):
                total = pooled.memorization.get(part)
                pooled.memorization[part] = histograms[part] if total is None else total + histograms[part]
                pooled.memorization_noise_var[part] = (pooled.memorization_noise_var.get(part, 0.0)
                                                       + (z * sensitivity) ** 2)
        if "classifier" in released:
            counts = released["classifier"]
            pooled.classification = counts if pooled.classification is None else pooled.classification.merge(counts)
        for name in protocol.UTILITY_RELEASES:
            if name in released:
                counts, total = released[name], pooled.utility.get(name)
                pooled.utility[name] = counts if total is None else total.merge(counts)
    pooled.refused.sort()
    return pooled


FID_ESTIMATOR = "psd_sqrt"   # shared/dp_stats.py fid_from_stats: the least biased under DP


def _fid(real: FeatureStats, fake: torch.Tensor) -> dict[str, Any]:
    """FID of noised pooled statistics; the estimate can dip below 0 when the true FID is
    within the noise, and is reported clipped at 0 beside the raw estimate."""
    try:
        estimate = fid_from_stats(real, fake, denoise=FID_ESTIMATOR)
    except ValueError as e:  # fewer than 2 (noised) real images
        return {"value": None, "reason": str(e), "real_count": round(real.count, 1)}
    return {"value": max(estimate, 0.0), "estimate": estimate, "real_count": round(real.count, 1),
            "synthetic_count": int(fake.shape[0])}


def scores(cfg: RunConfig, synthetic: Synthetic, pooled: Pooled, names: list[str],
           epsilons: dict[str, float]) -> dict[str, Any]:
    """The release's ``evaluation`` section: every score with sample sizes and privacy cost."""
    def cost(name: str) -> dict[str, Any]:
        return {"mechanism": "gaussian", "ledger_purpose": protocol.purpose(name),
                "epsilon_per_hospital": epsilons[name],
                "note": f"one of {len(names)} releases that together cost eval-epsilon = "
                        f"{cfg.eval_epsilon:g} per hospital (RDP)"}

    public = {"mechanism": "none", "note": "computed from synthetic images only: no privacy cost"}
    out: dict[str, Any] = {}
    if "fid-stats" in names and pooled.fid:
        space = (f"a fixed random {cfg.eval_fid_dims}-dimensional subspace of the features "
                 f"(seed {protocol.FID_BASIS_SEED}), in full-feature units, centred on the synthetic mean"
                 if cfg.eval_fid_dims else "all features (standard FID space), centred on the synthetic mean")
        overall = None
        for stats in pooled.fid.values():
            overall = stats if overall is None else overall.merge(stats)
        out["fid"] = {**_fid(overall, synthetic.features), "feature_space": space,
                      "features": cfg.eval_features, "clip_norm": cfg.eval_clip_norm,
                      "privacy": cost("fid-stats")}
        out["fid_per_class"] = {
            name: {**_fid(pooled.fid[c], synthetic.features[synthetic.labels == c]),
                   "privacy": "the fid release: one mechanism covers every class"}
            for c, name in enumerate(cfg.class_names)}
    if "recall" in names and pooled.recall:
        total = torch.stack(pooled.recall).sum(dim=0)
        out["recall"] = {"value": recall_from_counts(pooled.recall), "k": protocol.RECALL_K,
                         "real_count": round(float(total.sum()), 1),
                         "synthetic_count": int(synthetic.features.shape[0]),
                         "privacy": cost("recall")}
    if "classifier" in names and pooled.classification is not None:
        counts = pooled.classification
        out["train_on_synthetic"] = {
            "accuracy": counts.accuracy(), "auc": counts.auc(), "real_count": round(counts.count(), 1),
            "synthetic_train_count": int(synthetic.labels.shape[0]), "epochs": TSTR_EPOCHS,
            "auc_bins": protocol.SCORE_BINS, "privacy": cost("classifier")}
    out["utility"] = utility_table(out.get("train_on_synthetic"))
    if "memorization" in names and pooled.memorization:
        out["memorization"] = {**memorization_scores(synthetic.distance_bins, pooled,
                                                     int(synthetic.released_features.shape[0]),
                                                     seed=synthetic.seed, cap=cfg.eval_memorization_train),
                               "privacy": cost("memorization")}
    out["diversity_ssim"] = {
        "per_class": {name: diversity_ssim(synthetic.images[synthetic.labels == c], seed=cfg.seed)
                      for c, name in enumerate(cfg.class_names)},
        "note": "mean SSIM of random pairs of synthetic images (1 = identical: mode collapse)",
        "privacy": public}
    fresh = uint8_to_unit_range(release.generate(synthetic.generator, synthetic.labels.numpy(),
                                                 cfg.latent_dim, synthetic.seed + 1))
    with torch.inference_mode():
        logits = synthetic.classifier(fresh)
    score, _ = inception_score(logits)
    out["classifier_score"] = {
        "value": score, "max": cfg.num_classes, "synthetic_count": int(fresh.shape[0]),
        "note": "Inception Score formula on the train-on-synthetic classifier's logits of a "
                "fresh synthetic batch (the offline FID InceptionV3 has no ImageNet head): "
                "1 = classes indistinguishable, num-classes = every image clearly one class; "
                "not comparable with published Inception Scores",
        "privacy": public}
    return out


UTILITY_NOT_RUN = (
    "needs a classifier trained on the hospitals' real images, which may leave a hospital only "
    "through DP (DP-SGD at the hospitals, then DP counts: shared/utility.py), at a cost of "
    "utility-epsilon per row on top of the GAN's; this run has utility-epsilon = 0")
TRAINING_SETS = ("real only", "real + traditional augmentation", "synthetic only", "real + synthetic")


def utility_table(train_on_synthetic: dict[str, Any] | None,
                  real: dict[str, Any] | None = None) -> dict[str, Any]:
    """The downstream-utility table the seed paper asks for (a small CNN, tested on the
    hospitals' held-out real images). Synthetic only: trained on the public synthetic images
    without noise. The real-data rows: trained with DP-SGD at the hospitals (``real``, from
    server/utility.py), each at its own epsilon, shown in the row."""
    rows = []
    for training_set in TRAINING_SETS:
        if training_set == "synthetic only":
            if train_on_synthetic is None:
                rows.append({"training_set": training_set, "released": False,
                             "reason": "the classifier evaluation was not run"})
                continue
            rows.append({"training_set": training_set, "released": True,
                         "accuracy": train_on_synthetic["accuracy"], "auc": train_on_synthetic["auc"],
                         "real_test_count": train_on_synthetic["real_count"],
                         "synthetic_train_count": train_on_synthetic["synthetic_train_count"],
                         "training": "the synthetic images, no noise (public); the GAN's epsilon "
                                     "covers them"})
        elif real is None:
            rows.append({"training_set": training_set, "released": False, "reason": UTILITY_NOT_RUN})
        elif training_set in real["rows"]:
            rows.append({"training_set": training_set, "released": True, **real["rows"][training_set],
                         "training": "DP-SGD at the hospitals on their training images, federated "
                                     "(shared/utility.py)"})
        else:
            rows.append({"training_set": training_set, "released": False,
                         "reason": "no hospital completed its DP-SGD training and scores (budget or "
                                   "failures: see utility_training)"})
    table = {"rows": rows, "test_set": "the hospitals' held-out real images (DP confusion and score "
                                       "histograms, pooled)", "model": "shared/classifier.py SmallCNN"}
    if real is not None:
        table["utility_training"] = {k: v for k, v in real.items() if k != "rows"}
    return table


def memorization_scores(edges: torch.Tensor, pooled: Pooled, synthetic_count: int, seed: int,
                        cap: int, draws: int = 200) -> dict[str, Any]:
    """The memorization check from the pooled DP histograms (post-processing).

    closer_probability: P(a training image is closer to its nearest synthetic image than a
    held-out image is), 0.5 when the generator treats them alike (Meehan et al.'s data-copying
    test in Mann-Whitney form). Its standard error combines sampling (Hanley & McNeil 1982)
    and the DP noise (the released histograms redrawn with the mechanisms' public noise std).
    flagged: closer_probability - 0.5 > MEMORIZATION_Z standard errors.
    train_fraction_below_holdout_p1: the fraction of training images with a synthetic image
    closer than the 1st percentile of held-out images' nearest-synthetic distance (about 0.01
    without copying): how many training images have a synthetic twin closer than unseen real
    images ever get, in the distance units of ``bin_edges``.
    """
    train, holdout = pooled.memorization["train"], pooled.memorization["holdout"]
    n_train = float(train.clamp_min(0).sum().clamp_min(1.0))
    n_holdout = float(holdout.clamp_min(0).sum().clamp_min(1.0))
    u = closer_probability(train, holdout)
    q1, q2 = u / (2 - u), 2 * u * u / (1 + u)
    sampling = (u * (1 - u) + (n_train - 1) * (q1 - u * u) + (n_holdout - 1) * (q2 - u * u)) / (n_train * n_holdout)
    generator = torch.Generator().manual_seed(seed)
    std = {part: math.sqrt(v) for part, v in pooled.memorization_noise_var.items()}
    redrawn = [closer_probability(train + std["train"] * torch.randn(train.shape, generator=generator, dtype=torch.float64),
                                  holdout + std["holdout"] * torch.randn(holdout.shape, generator=generator, dtype=torch.float64))
               for _ in range(draws)]
    se = math.sqrt(max(sampling, 0.0) + float(np.var(redrawn)))
    holdout_p1 = histogram_quantiles(holdout, edges, [0.01])[0]
    below = torch.bucketize(torch.tensor(holdout_p1, dtype=torch.float64), edges, right=True) - 1
    # whole bins strictly below the held-out 1st percentile, plus its bin's share (linear)
    fraction = float(train.clamp_min(0)[:below].sum())
    if below < len(edges) - 1:
        width = float(edges[below + 1] - edges[below])
        fraction += float(train.clamp_min(0)[below]) * (holdout_p1 - float(edges[below])) / width
    quantiles = (0.01, 0.05, 0.5)
    return {
        "closer_probability": u, "standard_error": se,
        "flagged": bool(u - 0.5 > MEMORIZATION_Z * se),
        "train_fraction_below_holdout_p1": min(fraction / n_train, 1.0),
        "train_quantiles": dict(zip(("p1", "p5", "p50"), histogram_quantiles(train, edges, quantiles))),
        "holdout_quantiles": dict(zip(("p1", "p5", "p50"), histogram_quantiles(holdout, edges, quantiles))),
        "train_count": round(n_train, 1), "holdout_count": round(n_holdout, 1),
        "synthetic_count": synthetic_count,
        "train_cap_per_hospital": cap,
        "bin_edges": edges.tolist(), "train_histogram": train.tolist(), "holdout_histogram": holdout.tolist(),
        "feature_space": "all features of eval-features (Euclidean distance)",
        "note": "training images (at most train_cap_per_hospital per hospital, a random subset) vs "
                "held-out images: distance to the nearest released synthetic image; flagged when "
                f"training images are closer by more than {MEMORIZATION_Z:g} standard errors "
                "(sampling and DP noise). The real-real nearest-neighbour distance is not released "
                "(no useful sensitivity bound: shared/dp_stats.py dp_memorization_histograms).",
    }


def evaluate_release(grid: Grid, cfg: RunConfig, state: ServerState, sampler: dict[str, np.ndarray],
                     nodes: Iterable[int], names: Iterable[str] = EVALUATIONS,
                     synthetic: Synthetic | None = None) -> dict[str, Any]:
    """Evaluate the EMA generator (``sampler``: `synthetic_side`) with every hospital in ``nodes``; returns release.json's
    ``evaluation`` section. The hospitals' signed evaluation entries join ``state.ledger``, so
    the release's ledgers and privacy summary include what the evaluation spent.
    ``synthetic``: the public side, when the caller already made it (`synthetic_side`)."""
    names = list(names)
    synthetic = synthetic or synthetic_side(cfg, sampler)
    replies = grid.send_and_receive(evaluate_messages(nodes, synthetic, state.run_id, state.round, names),
                                    timeout=EVAL_TIMEOUT_S)
    pooled = pool(replies, cfg, names, synthetic, state.run_id)
    for hospital in pooled.hospitals:
        state.ledger[hospital] = pooled.chains[hospital]
        state.public_keys[hospital] = pooled.public_keys[hospital]
    # Each release's own epsilon, from the entries (hospitals with a smaller delta pay a
    # little more for the same noise): the largest is reported.
    epsilons = {}
    for position, name in enumerate(names):
        values = [_own_epsilon(pooled.entries[h][position]) for h in pooled.hospitals]
        epsilons[name] = max(values) if values else math.nan
    section: dict[str, Any] = {
        "round": state.round, "evaluations": names, "eval_epsilon": cfg.eval_epsilon,
        "hospitals": pooled.hospitals, "refused_budget": pooled.refused,
        "failures": [{k: v for k, v in f.items()} for f in pooled.failures],
        "epsilon_after": pooled.epsilon,
        "synthetic": {"per_class": cfg.eval_samples, "seed": synthetic.seed, "features": cfg.eval_features},
    }
    if not pooled.hospitals:
        section["scores"] = {}
        section["note"] = "no hospital released statistics: nothing real to compare with"
        return section
    section["scores"] = scores(cfg, synthetic, pooled, names, epsilons)
    return section


def _own_epsilon(entry: dict[str, Any]) -> float:
    """Epsilon of one ledger entry's release alone (the entry itself records the running total)."""
    return rdp_epsilon(float(entry["noise_multiplier"]), float(entry["delta"]))


def summary_line(section: dict[str, Any]) -> str:
    """One progress line: the headline scores and who took part."""
    s = section.get("scores", {})
    parts = []
    if s.get("fid", {}).get("value") is not None:
        parts.append(f"FID {s['fid']['value']:.2f}")
    if "recall" in s:
        parts.append(f"recall {s['recall']['value']:.2f}")
    if "memorization" in s:
        parts.append("memorization FLAGGED" if s["memorization"]["flagged"] else "memorization not flagged")
    if "train_on_synthetic" in s:
        parts.append(f"TSTR accuracy {s['train_on_synthetic']['accuracy']:.2f}, "
                     f"AUC {s['train_on_synthetic']['auc']:.2f}")
    return "evaluation: " + (", ".join(parts) or "no scores") + f" ({who_took_part(section)})"


def who_took_part(section: dict[str, Any]) -> str:
    """"3 hospitals; refused (budget): ...; failed: N" of a section with hospitals,
    refused_budget and failures."""
    who = f"{len(section['hospitals'])} hospitals"
    if section["refused_budget"]:
        who += f"; refused (budget): {', '.join(section['refused_budget'])}"
    if section["failures"]:
        who += f"; failed: {len(section['failures'])}"
    return who
