"""What the server releases: synthetic images, the generator, and the privacy guarantee.

    <output-dir>/release/
        images/<class>/00000.png ...   samples-per-class synthetic images per class
        synthetic.npz                  the same images in MedMNIST layout
                                       (train_images uint8 (N, S, S), train_labels (N, 1))
        grid.png                       one row per class
        generator.pt                   final aggregated generator (state dict)
        generator-ema.pt               the server's EMA of it (used for the images)
        discriminator.pt               with release-candidates > 1 only: the final
                                       aggregated discriminator that chose among them
        ledger/<hospital>.jsonl        the signed ledger entries each hospital returned
        keys/<hospital>.pub.pem        the ledger keys the hospitals sent (an auditor should
                                       use keys obtained from the hospitals themselves)
        updates.json                   digest of every update the server received
        release.json                   rounds, hospitals, per-hospital (epsilon, delta) as
                                       claimed and as recomputed by shared/audit.py (RDP,
                                       PRV), the guarantee (max over hospitals, with delta),
                                       config, seeds, and (when the
                                       run evaluates) `evaluation`: the DP scores with their
                                       privacy cost (server/evaluation.py)

A translator family (`cyclegan`) has no images from noise: instead of images/, synthetic.npz
it writes its own (`Family.write_images`: translator-a-to-b.pt, translator-b-to-a.pt,
examples.npz) and its grid shows example inputs, translations and reconstructions
(shared/cyclegan.py); generator*.pt then hold both translators.

Everything here is post-processing of the hospitals' DP outputs: it costs no privacy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from server.checkpoint import ServerState
from shared import models
from shared.audit import audit_release
from shared.config import RunConfig

SAMPLE_SEED_OFFSET = 1_000_003  # release samples use seed + this: distinct from training


class BestOf(nn.Module):
    """Discriminator rejection sampling in its best-of-r form (after Azadi et al. 2019):
    each image is, of `candidates` draws of its class, the one the critic scores most real.

    The critic is the final aggregated discriminator: FedAvg of DP updates, so choosing with
    it is post-processing (no privacy cost, nothing goes back to a hospital). It drops the
    draws a DP generator gets worst (near-black or washed-out frames) at the price of some
    diversity: the release states r, and its evaluation scores these same images.
    """

    def __init__(self, generator: nn.Module, critic: nn.Module, candidates: int):
        super().__init__()
        self.generator, self.critic, self.candidates = generator, critic, candidates

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """z: (N * candidates, latent_dim), labels: (N,) -> the N chosen images."""
        n, r = len(labels), self.candidates
        y = labels.repeat_interleave(r)
        x = self.generator(z, y)
        best = self.critic(x, y).view(n, r).argmax(dim=1)
        return x.view(n, r, *x.shape[1:])[torch.arange(n), best]


def sampler_weights(global_weights: dict[str, np.ndarray],
                    ema_weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the release samples from: the EMA generator and the final discriminator."""
    return {**{k: v for k, v in global_weights.items() if k.startswith("discriminator.")},
            **ema_weights}


def generator_from(cfg: RunConfig, arrays: dict[str, np.ndarray]) -> nn.Module:
    """The generator in `arrays` ("generator."-prefixed keys), in eval mode; with
    release-candidates > 1 wrapped in BestOf with the discriminator in `arrays`
    (`sampler_weights`)."""
    nets = models.build(cfg)
    g = nets["generator"]
    state = {k.split(".", 1)[1]: torch.from_numpy(v.copy())
             for k, v in arrays.items() if k.startswith("generator.")}
    g.load_state_dict(state, strict=False)
    if cfg.release_candidates == 1:
        return g.eval()
    critic = {k.split(".", 1)[1]: torch.from_numpy(v.copy())
              for k, v in arrays.items() if k.startswith("discriminator.")}
    if not critic:
        raise ValueError(f"release-candidates = {cfg.release_candidates} needs the "
                         f"discriminator's weights next to the generator's (sampler_weights)")
    nets["discriminator"].load_state_dict(critic)
    return BestOf(g, nets["discriminator"], cfg.release_candidates).eval()


@torch.no_grad()
def generate(generator: nn.Module, labels: np.ndarray, latent_dim: int, seed: int,
             batch: int = 500) -> np.ndarray:
    """uint8 images (N, S, S) for the given labels, reproducible from `seed`
    (a BestOf generator draws its candidates from the same stream)."""
    rng = torch.Generator().manual_seed(seed)
    out = []
    r = getattr(generator, "candidates", 1)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    for start in range(0, len(y_all), batch):
        y = y_all[start:start + batch]
        z = torch.randn(len(y) * r, latent_dim, generator=rng)
        x = generator(z, y)[:, 0]
        out.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out) if out else np.zeros((0, 1, 1), np.uint8)


def grid(images: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
    """Tile (rows*cols, S, S) uint8 images into one array, row-major."""
    cols = len(images) // rows
    s = images.shape[-1]
    canvas = np.full((rows * (s + pad) + pad, cols * (s + pad) + pad), 255, np.uint8)
    for i, img in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        canvas[pad + r * (s + pad): pad + r * (s + pad) + s,
               pad + c * (s + pad): pad + c * (s + pad) + s] = img
    return canvas


def save_grid(generator: nn.Module, cfg: RunConfig, path: Path, columns: int = 10,
              scale: int = 3) -> None:
    """One row per class, the same latent draws every round (so rounds compare).
    A translator family draws its own grid (`Family.save_grid`)."""
    own = models.family(cfg).save_grid
    if own is not None:
        own(generator, cfg, path)
        return
    labels = np.repeat(np.arange(cfg.num_classes), columns)
    images = generate(generator, labels, cfg.latent_dim, cfg.seed + SAMPLE_SEED_OFFSET)
    canvas = grid(images, cfg.num_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale),
                                   Image.NEAREST).save(path)


def privacy_summary(state: ServerState) -> dict[str, Any]:
    """Per-hospital (epsilon, delta) from the last ledger entry each one returned.

    That entry's epsilon is the hospital's whole spend (training and, when the run evaluates,
    the evaluation's releases and the utility classifiers after it); the training mechanism's
    figures come from the last GAN training entry.
    """
    per = {}
    for hospital, entries in sorted(state.ledger.items()):
        if not entries:
            continue
        last = entries[-1]
        training = [e for e in entries if not str(e.get("purpose", "")).startswith(("eval-", "utility-"))]
        last_training = training[-1] if training else last
        per[hospital] = {
            "epsilon": last["epsilon"], "delta": last["delta"],
            "budget_epsilon": last.get("budget_epsilon"),
            "rounds": sorted({e["round"] for e in training if e["run_id"] == state.run_id}),
            "steps": sum(e["steps"] for e in training),
            "noise_multiplier": last_training["noise_multiplier"],
            "sample_rate": last_training["sample_rate"],
            "accountant": last.get("accountant", "rdp"),
        }
        if len(training) < len(entries):
            per[hospital]["epsilon_training"] = last_training["epsilon"]
            per[hospital]["evaluation_releases"] = sum(
                str(e.get("purpose", "")).startswith("eval-") for e in entries)
            utility = sum(str(e.get("purpose", "")).startswith("utility-") for e in entries)
            if utility:
                per[hospital]["utility_releases"] = utility
    eps = [p["epsilon"] for p in per.values()]
    return {
        "unit": "one image, add/remove adjacency",
        "per_hospital": per,
        "max_epsilon": max(eps) if eps else 0.0,
        "max_delta": max(p["delta"] for p in per.values()) if per else 0.0,
        "dropped_budget_exhausted": list(state.dropped),
    }


def write_samples(generator: nn.Module, cfg: RunConfig, folder: Path, seed: int) -> None:
    """images/<class>/NNNNN.png and synthetic.npz: samples-per-class images per class."""
    labels = np.repeat(np.arange(cfg.num_classes), cfg.samples_per_class)
    images = generate(generator, labels, cfg.latent_dim, seed)
    for c, name in enumerate(cfg.class_names):
        sub = folder / "images" / name
        sub.mkdir(parents=True)
        for i, img in enumerate(images[labels == c]):
            Image.fromarray(img).save(sub / f"{i:05d}.png")
    np.savez_compressed(folder / "synthetic.npz", train_images=images,
                        train_labels=labels.astype(np.uint8).reshape(-1, 1))


def write_release(output_dir: Path, cfg: RunConfig, state: ServerState,
                  global_weights: dict[str, np.ndarray],
                  ema_weights: dict[str, np.ndarray], stopped: str = "",
                  evaluation: dict[str, Any] | None = None) -> Path:
    out = Path(output_dir) / "release"
    tmp = Path(output_dir) / ".release-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    generator = generator_from(cfg, sampler_weights(global_weights, ema_weights))
    sample_seed = cfg.seed + SAMPLE_SEED_OFFSET + 1
    family = models.family(cfg)
    if family.write_images is not None:       # a translator: its own images and grid
        images_info = family.write_images(generator, cfg, tmp)
    else:
        write_samples(generator, cfg, tmp, sample_seed)
        images_info = {"per_class": cfg.samples_per_class, "classes": list(cfg.class_names),
                       "size": cfg.image_size, "generator": "generator-ema.pt"}
        if isinstance(generator, BestOf):
            images_info["selection"] = {
                "method": "best of candidates by the discriminator (server/release.py BestOf)",
                "candidates": cfg.release_candidates, "critic": "discriminator.pt"}
            torch.save(generator.critic.state_dict(), tmp / "discriminator.pt")
    save_grid(generator, cfg, tmp / "grid.png")
    for name, arrays in (("generator.pt", global_weights), ("generator-ema.pt", ema_weights)):
        torch.save({k.split(".", 1)[1]: torch.from_numpy(v.copy())
                    for k, v in arrays.items() if k.startswith("generator.")}, tmp / name)

    (tmp / "ledger").mkdir()
    (tmp / "keys").mkdir()
    for hospital, entries in state.ledger.items():
        with open(tmp / "ledger" / f"{hospital}.jsonl", "w") as f:
            for e in entries:
                f.write(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n")
    for hospital, pem in state.public_keys.items():
        (tmp / "keys" / f"{hospital}.pub.pem").write_text(pem)
    updates = [{"round": r["round"], "received": r.get("received", {})} for r in state.rounds]
    (tmp / "updates.json").write_text(json.dumps(updates, indent=1, sort_keys=True))

    release = {
        "run_id": state.run_id,
        "model": cfg.model,
        "rounds": state.round,
        "rounds_planned": cfg.num_rounds,
        "stopped_early": stopped,
        "hospitals": sorted(state.ledger),
        "privacy": privacy_summary(state),
        "images": images_info,
        "seeds": {"run": cfg.seed, "release_samples": sample_seed,
                  "grid": cfg.seed + SAMPLE_SEED_OFFSET},
        "config": cfg.to_flat(),
        "metrics": state.rounds[-1].get("clients", {}) if state.rounds else {},
    }
    if evaluation is not None:
        release["evaluation"] = evaluation
    (tmp / "release.json").write_text(json.dumps(release, indent=1, sort_keys=True))
    # The auditor's own checks (shared/audit.py, not the nodes' code) before anything is
    # published: a release whose ledgers do not verify is not written.
    report = audit_release(tmp)
    if not report.ok:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"{out}: not written: its ledgers do not verify "
                         f"({report.all_failures[0]})")
    release["privacy"]["recomputed"] = {
        h.hospital: {"rdp_epsilon": h.rdp_epsilon, "prv_epsilon": h.prv_epsilon}
        for h in report.hospitals}
    release["privacy"]["guarantee"] = report.guarantee()
    (tmp / "release.json").write_text(json.dumps(release, indent=1, sort_keys=True))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
