"""One hospital's local round: DP-SGD on the discriminator, the generator through it.

Per discriminator step (Opacus; Poisson sampling with rate q = B / n, RDP accounting):

    real batch S ~ Poisson(q) over the hospital's n images   (|S| is never sent anywhere)
    fake batch of exactly B generated images                  (B fixed in advance: public)
    g = ( sum_{i in S} clip_C(grad l_real(x_i))  +  N(0, sigma^2 C^2 I)
          + clip_{B C}( sum_{j <= B} grad l_fake(G(z_j)) ) ) / B
    Adam step on g

Only the real-image term touches patient data, so only it is clipped and noised. The
fake-image term is a function of the generator and the current discriminator -- both
outputs of earlier DP steps -- and of fresh noise z; its size B does not depend on the
data set. By adaptive composition the step is the subsampled Gaussian mechanism applied
to the real images, followed by post-processing, so the accountant sees exactly
(sigma, q, 1) per step, as for plain DP-SGD. (It is also faster: no per-sample
gradients are materialised for generated images.) The generated-image sum is clipped as
a whole to norm B*C, so its mean has at most the norm a clipped real gradient can have:
without that, the unclipped fake term would outweigh the clipped real one and the
discriminator would learn "everything is fake".

Every `d-steps-per-g-step` discriminator steps, the generator takes one non-saturating
step through the discriminator on B generated images (labels uniform over the public
label set; the hospital's label frequencies are private), plus a mode-seeking term
(`g-diversity`; Mao et al. 2019) against mode collapse: pairs of latents with the same
label should not map to the same image. During that
pass the discriminator's per-sample hooks are off and its parameters frozen, so no
per-sample gradient is left behind in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.data import HospitalData
from shared.augment import RandomAugment
from shared.config import RunConfig

ADAM_BETAS = (0.5, 0.999)  # the seed paper's choice for both networks


@dataclass(frozen=True)
class DPPlan:
    """The mechanism one round spends: what the ledger records and the accountant sees."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    dataset_size: int


def sample_rate(cfg: RunConfig, dataset_size: int) -> float:
    """Poisson rate q, defined as Opacus accounts it: 1 / (batches per pass over the data)."""
    return 1.0 / math.ceil(dataset_size / cfg.batch_size)


def expected_batch(plan: "DPPlan") -> int:
    """B = q * n, a public number (n is the size the hospital declares)."""
    return max(1, int(plan.dataset_size * plan.sample_rate))


def calibrate_noise(cfg: RunConfig, dataset_size: int, target_epsilon: float,
                    delta: float) -> float:
    """Sigma such that all rounds' steps together reach target_epsilon (never above it)."""
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    return get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate(cfg, dataset_size),
        steps=cfg.num_rounds * cfg.local_d_steps,
        accountant="rdp",
        epsilon_tolerance=0.005,
    )


@dataclass
class RoundStats:
    d_loss_fake: float   # discriminator loss on generated images (no real data in it)
    g_loss: float        # generator loss (generated images only)
    d_steps: int
    g_steps: int


def _bce(logits: torch.Tensor, target: float, reduction: str) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(
        logits, torch.full_like(logits, target), reduction=reduction
    )


def _mode_seeking(fake: torch.Tensor, z: torch.Tensor, half: int) -> torch.Tensor:
    """Mode-seeking regulariser (Mao et al. 2019): penalise pairs of latents with the
    same label that map to near-identical images. Generated images only: no privacy cost."""
    images = (fake[:half] - fake[half:]).abs().flatten(1).mean(1)
    latents = (z[:half] - z[half:]).abs().mean(1)
    return 1.0 / ((images / latents).mean() + 1e-5)


def train_round(
    generator: nn.Module,
    discriminator: nn.Module,
    data: HospitalData,
    cfg: RunConfig,
    plan: DPPlan,
    seed: int,
    accountant_history: list[tuple[float, float, int]] | None = None,
) -> tuple[RoundStats, list[tuple[float, float, int]]]:
    """Train both networks in place for plan.steps DP discriminator steps.

    Returns the round's statistics (generated-image losses only) and the accountant's
    history after this round (previous history + this round's steps).
    """
    torch.manual_seed(seed)
    sampling_rng = torch.Generator().manual_seed(seed + 1)
    noise_rng = torch.Generator().manual_seed(seed + 2)
    augment = RandomAugment(cfg.augment_rotate, cfg.augment_zoom, cfg.augment_flip,
                            cfg.augment_intensity)
    B = expected_batch(plan)  # expected real batch = generated batch = normaliser; public

    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = list(accountant_history or [])
    loader = DataLoader(TensorDataset(data.images, data.labels),
                        batch_size=cfg.batch_size,
                        generator=sampling_rng)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr_d, betas=ADAM_BETAS)
    private_d, opt_d, loader = engine.make_private(
        module=discriminator, optimizer=opt_d, data_loader=loader,
        noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
        poisson_sampling=True, loss_reduction="sum", noise_generator=noise_rng,
    )
    if len(data) != plan.dataset_size or abs(1 / len(loader) - plan.sample_rate) > 1e-12:
        raise RuntimeError(f"DP plan {plan} does not match the data actually sampled")
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr_g, betas=ADAM_BETAS)
    d_params = [p for p in private_d.parameters() if p.requires_grad]

    def generated(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, cfg.latent_dim)
        y = torch.randint(0, cfg.num_classes, (n,))
        return generator(z, y), y

    d_fake_sum, g_sum, g_steps = 0.0, 0.0, 0
    batches = iter(loader)
    generator.train()
    private_d.train()
    for step in range(plan.steps):
        try:
            real, labels = next(batches)
        except StopIteration:
            batches = iter(loader)
            real, labels = next(batches)

        # 1. Generated-image gradient: no patient data, no clipping, no noise.
        opt_d.zero_grad(set_to_none=True)
        private_d.disable_hooks()
        with torch.no_grad():
            fake, y_fake = generated(B)
        loss_fake = _bce(private_d(fake, y_fake), 0.0, "sum")
        loss_fake.backward()
        fake_grads = [p.grad.detach().clone() for p in d_params]
        norm = torch.sqrt(sum((g * g).sum() for g in fake_grads))
        scale = min(1.0, B * plan.max_grad_norm / (norm.item() + 1e-12))
        for g in fake_grads:
            g.mul_(scale)
        for p in d_params:
            p.grad = None
        private_d.enable_hooks()

        # 2. Real-image gradient: per-sample clip, Gaussian noise, accountant step.
        loss_real = _bce(private_d(augment(real, sampling_rng), labels), 1.0, "sum")
        loss_real.backward()
        if opt_d.pre_step():
            for p, g in zip(d_params, fake_grads):
                p.grad.add_(g).div_(B)
            opt_d.original_optimizer.step()
        opt_d.zero_grad(set_to_none=True)
        d_fake_sum += loss_fake.item() / B

        # 3. Generator step through the frozen, hook-free discriminator.
        if (step + 1) % cfg.d_steps_per_g_step == 0:
            private_d.disable_hooks()
            for p in d_params:
                p.requires_grad_(False)
            opt_g.zero_grad(set_to_none=True)
            half = max(1, B // 2)
            y_fake = torch.randint(0, cfg.num_classes, (half,)).repeat(2)
            z = torch.randn(2 * half, cfg.latent_dim)
            fake = generator(z, y_fake)
            loss_g = _bce(private_d(fake, y_fake), 1.0, "mean")
            if cfg.g_diversity > 0:
                loss_g_total = loss_g + cfg.g_diversity * _mode_seeking(fake, z, half)
            else:
                loss_g_total = loss_g
            loss_g_total.backward()
            opt_g.step()
            for p in d_params:
                p.requires_grad_(True)
            private_d.enable_hooks()
            g_sum += loss_g.item()
            g_steps += 1

    history = list(engine.accountant.history)
    private_d._close()  # remove Opacus' hooks from the (shared) discriminator module
    stats = RoundStats(d_loss_fake=d_fake_sum / max(1, plan.steps),
                       g_loss=g_sum / max(1, g_steps), d_steps=plan.steps, g_steps=g_steps)
    return stats, history
