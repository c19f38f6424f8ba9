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

How the real term is clipped does not change the mechanism, only its cost
(`grad_sample_mode`): at 64x64, Opacus' ghost clipping computes each real image's gradient
norm without keeping per-sample gradients (client/ghost_clipping.py adds the Conv2d norms
Opacus lacks), then backpropagates sum_i min(1, C/||g_i||) l_i to get the clipped sum; at
28x28, Opacus' per-sample hooks. The optimizer adds the same noise and steps the same
accountant either way; tests/test_fast_dp_step.py checks both against per-sample autograd.

Every `d-steps-per-g-step` discriminator steps, the generator takes one non-saturating
step through the discriminator on B generated images (labels uniform over the public
label set; the hospital's label frequencies are private), plus a mode-seeking term
(`g-diversity`; Mao et al. 2019) against mode collapse: pairs of latents with the same
label should not map to the same image. During that
pass the discriminator's per-sample hooks are off and its parameters frozen, so no
per-sample gradient is left behind in it.

The same trainer serves every family whose generator draws from noise (cgan, stylegan:
`shared/models.py`); a family whose generator reads patient images brings its own
(`Family.train_round`, e.g. shared/cyclegan.py). Against mode collapse and small data:
`loss` (non-saturating or hinge, shared/losses.py) and `diffaugment` (shared/diffaugment.py:
the same kind of per-image random, differentiable augmentation on the real batch, on the
generated batch of the discriminator step and on the generator step's images; each real
image's augmentation depends on its own draw only, so it is part of that image's clipped
term). Labels of generated images are drawn uniformly over the public label set (class
balance without touching the hospital's private label frequencies).
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

from client import ghost_clipping  # noqa: F401  (registers Conv2d ghost norms with Opacus)
from client.data import HospitalData
from shared import losses, models
from shared.augment import RandomAugment
from shared.config import RunConfig
from shared.diffaugment import DiffAugment

ADAM_BETAS = (0.5, 0.999)  # the seed paper's choice for both networks
PURPOSE_DISCRIMINATOR = "train-discriminator"   # ledger purposes, one per mechanism
PURPOSE_GENERATOR = "train-generator"


def grad_sample_mode(cfg: RunConfig) -> str:
    """How Opacus clips the real images, chosen by measurement (benchmarks/RESULTS.md):
    ghost clipping with client/ghost_clipping.py's Conv2d norms takes a third off the DP
    step at 64x64; at 28x28 the layers are so small that per-sample hooks are a few percent
    faster. Both compute the same clipped sum (tests/test_fast_dp_step.py)."""
    return "hooks" if cfg.image_size <= 28 else "ghost"


@dataclass(frozen=True)
class DPPlan:
    """The mechanism one round spends: what the ledger records and the accountant sees."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    dataset_size: int
    # generator mechanism's steps (families whose generator reads patient images: its own
    # per-sample clipped, noised gradient with the same sigma and q); 0 = none
    g_steps: int = 0

    def mechanisms(self) -> list[tuple[str, float, float, int]]:
        """(ledger purpose, sigma, q, steps) of every private mechanism this round runs."""
        out = [(PURPOSE_DISCRIMINATOR, self.noise_multiplier, self.sample_rate, self.steps)]
        if self.g_steps:
            out.append((PURPOSE_GENERATOR, self.noise_multiplier, self.sample_rate,
                        self.g_steps))
        return out

    def history(self) -> list[tuple[float, float, int]]:
        """What the accountant adds for this round: one (sigma, q, steps) per mechanism."""
        return [m[1:] for m in self.mechanisms()]


def sample_rate(cfg: RunConfig, dataset_size: int) -> float:
    """Poisson rate q, defined as Opacus accounts it: 1 / (batches per pass over the data)."""
    return 1.0 / math.ceil(dataset_size / cfg.batch_size)


def expected_batch(plan: "DPPlan") -> int:
    """B = q * n, a public number (n is the size the hospital declares)."""
    return max(1, int(plan.dataset_size * plan.sample_rate))


def generator_private_steps(cfg: RunConfig) -> int:
    """Steps per round of the generator's own DP mechanism (0 unless its family's generator
    reads patient images): one per `d-steps-per-g-step` discriminator steps."""
    if not models.family(cfg).generator_mechanism:
        return 0
    return cfg.local_d_steps // cfg.d_steps_per_g_step


def calibrate_noise(cfg: RunConfig, dataset_size: int, target_epsilon: float,
                    delta: float) -> float:
    """Sigma such that all rounds' steps together reach target_epsilon (never above it).

    With a generator mechanism (same sigma, same q) the run composes
    rounds x (d steps + g steps) subsampled-Gaussian steps: RDP adds up per step, so that
    total is exactly the composition of the two mechanisms.
    """
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    return get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate(cfg, dataset_size),
        steps=cfg.num_rounds * (cfg.local_d_steps + generator_private_steps(cfg)),
        accountant="rdp",
        epsilon_tolerance=0.005,
    )


@dataclass
class RoundStats:
    # losses on generated images only (no real data in them); None where every loss the
    # family computes involves patient images (CycleGAN): then none is sent
    d_loss_fake: float | None
    g_loss: float | None
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


def make_private(engine: PrivacyEngine, discriminator: nn.Module,
                 optimizer: torch.optim.Optimizer, loader: DataLoader, plan: DPPlan,
                 noise_rng: torch.Generator, mode: str, loss: str = "non-saturating"):
    """Opacus' make_private for the discriminator: Poisson sampling at the plan's rate,
    clip C, noise sigma*C, summed losses. Returns (module, optimizer, real_loss, loader);
    real_loss is Opacus' ghost-clipping criterion, or None in "hooks" mode."""
    if mode not in ("ghost", "hooks"):
        raise ValueError(f"grad_sample_mode {mode!r}: expected ghost or hooks")
    common = dict(module=discriminator, optimizer=optimizer, data_loader=loader,
                  noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                  poisson_sampling=True, loss_reduction="sum", noise_generator=noise_rng,
                  grad_sample_mode=mode)
    if mode == "hooks":
        private_d, optimizer, loader = engine.make_private(**common)
        return private_d, optimizer, None, loader
    criterion = (nn.BCEWithLogitsLoss(reduction="sum") if loss == "non-saturating"
                 else losses.RealImageCriterion(loss, reduction="sum"))
    return engine.make_private(**common, criterion=criterion)


def discriminator_gradient(private_d: nn.Module, opt_d, real_loss, real: torch.Tensor,
                           labels: torch.Tensor, fake: torch.Tensor, y_fake: torch.Tensor,
                           B: int, max_grad_norm: float,
                           loss: str = "non-saturating") -> tuple[float, bool]:
    """Leave the step's gradient g (module docstring) in the discriminator's `.grad`.

    real: the (augmented) Poisson batch, (|S|, 1, S, S), labels (|S|,); fake: exactly B
    generated images (B, 1, S, S), labels y_fake (B,). Opacus clips, noises and accounts
    for the real term in `opt_d.pre_step()`. Returns the generated images' summed loss and
    whether pre_step produced a gradient (the caller then steps opt_d.original_optimizer).
    """
    d_params = [p for p in private_d.parameters() if p.requires_grad]

    # 1. Generated-image gradient: no patient data, no per-sample clipping, no noise.
    opt_d.zero_grad(set_to_none=True)
    private_d.disable_hooks()
    if loss == "non-saturating":
        loss_fake = _bce(private_d(fake, y_fake), 0.0, "sum")
    else:
        loss_fake = losses.d_fake(private_d(fake, y_fake), loss).sum()
    loss_fake.backward()
    fake_grads = [p.grad.detach().clone() for p in d_params]
    norm = torch.sqrt(sum((g * g).sum() for g in fake_grads))
    scale = min(1.0, B * max_grad_norm / (norm.item() + 1e-12))
    for g in fake_grads:
        g.mul_(scale)
    for p in d_params:
        p.grad = None
    private_d.enable_hooks()

    # 2. Real-image gradient: per-sample clip, then (pre_step) Gaussian noise, accountant.
    if real_loss is None and loss == "non-saturating":   # Opacus' per-sample hooks
        _bce(private_d(real, labels), 1.0, "sum").backward()
    elif real_loss is None:
        losses.d_real(private_d(real, labels), loss).sum().backward()
    elif len(real) > 0:                  # ghost clipping: both of its backward passes
        real_loss(private_d(real, labels), torch.ones(len(real))).backward()
    else:                                # empty Poisson batch (Opacus' ghost norms reject
        for p in d_params:               # it): the clipped sum is zero, the noise is not
            p.grad = torch.zeros_like(p)
    if not opt_d.pre_step():
        return loss_fake.item(), False
    for p, g in zip(d_params, fake_grads):
        p.grad.add_(g).div_(B)
    return loss_fake.item(), True


def poisson_batches(loader: DataLoader, steps: int):
    """``steps`` Poisson batches from Opacus' loader, a new pass started when one ends."""
    batches = iter(loader)
    for _ in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        yield batch


def train_family_round(nets: dict[str, nn.Module], data: HospitalData, cfg: RunConfig,
                       plan: DPPlan, seed: int,
                       accountant_history: list[tuple[float, float, int]] | None = None,
                       ) -> tuple[RoundStats, list[tuple[float, float, int]]]:
    """One local round of the configured family, in place on `nets`: the family's own
    trainer if it has one, else `train_round` below. Same returns as `train_round`."""
    own = models.family(cfg).train_round
    if own is not None:
        return own(nets, data, cfg, plan, seed, accountant_history)
    return train_round(nets["generator"], nets["discriminator"], data, cfg, plan, seed=seed,
                       accountant_history=accountant_history)


def train_round(
    generator: nn.Module,
    discriminator: nn.Module,
    data: HospitalData,
    cfg: RunConfig,
    plan: DPPlan,
    seed: int,
    accountant_history: list[tuple[float, float, int]] | None = None,
    mode: str | None = None,
) -> tuple[RoundStats, list[tuple[float, float, int]]]:
    """Train both networks in place for plan.steps DP discriminator steps.

    Returns the round's statistics (generated-image losses only) and the accountant's
    history after this round (previous history + this round's steps).
    `mode`: how Opacus clips the real images ("ghost" or "hooks"; default
    `grad_sample_mode(cfg)`).
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
    private_d, opt_d, real_loss, loader = make_private(
        engine, discriminator, opt_d, loader, plan, noise_rng, mode or grad_sample_mode(cfg),
        cfg.loss)
    if len(data) != plan.dataset_size or abs(1 / len(loader) - plan.sample_rate) > 1e-12:
        raise RuntimeError(f"DP plan {plan} does not match the data actually sampled")
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr_g, betas=ADAM_BETAS)
    d_params = [p for p in private_d.parameters() if p.requires_grad]

    def generated(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, cfg.latent_dim)
        y = torch.randint(0, cfg.num_classes, (n,))
        return generator(z, y), y

    diff_augment = DiffAugment(cfg.diffaugment)
    # its own stream (secret-seeded like the others); never drawn from when off, so a run
    # without it draws exactly what it always drew
    diff_rng = torch.Generator().manual_seed(seed + 3)

    def diff_augmented(x: torch.Tensor) -> torch.Tensor:
        if not diff_augment.active:
            return x
        return diff_augment(x, diff_augment.draw(len(x), x.shape[-1], diff_rng))

    d_fake_sum, g_sum, g_steps = 0.0, 0.0, 0
    generator.train()
    private_d.train()
    for step, (real, labels) in enumerate(poisson_batches(loader, plan.steps)):

        with torch.no_grad():
            fake, y_fake = generated(B)
        loss_fake, stepped = discriminator_gradient(
            private_d, opt_d, real_loss, diff_augmented(augment(real, sampling_rng)), labels,
            diff_augmented(fake), y_fake, B, plan.max_grad_norm, cfg.loss)
        if stepped:
            opt_d.original_optimizer.step()
        opt_d.zero_grad(set_to_none=True)
        d_fake_sum += loss_fake / B

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
            if cfg.loss == "non-saturating" and not diff_augment.active:
                loss_g = _bce(private_d(fake, y_fake), 1.0, "mean")
            else:
                loss_g = losses.g_adversarial(private_d(diff_augmented(fake), y_fake),
                                              cfg.loss).mean()
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
