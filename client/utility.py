"""A hospital's DP-SGD training of the utility table's real-data classifiers (shared/utility.py).

Per variant and utility round (Opacus; the ClientApp's `utility_reply` in client/app.py
checks the budget before and charges the ledger after):

    records: the hospital's n training images (real, real-augmented), or those and the M
             public synthetic images (real-synthetic): N = n or n + M, all public sizes
    q = 1 / ceil(N / batch-size)                    Poisson sampling, as in GAN training
    sigma: utility-rounds x utility-steps steps at q reach TRAIN_SHARE x utility-epsilon
    utility-steps times:
        S ~ Poisson(q) over the records                    (|S| is never sent)
        x_i augmented on its own draw (real-augmented only)
        g = sum_{i in S} clip_C(grad CE(f(x_i), y_i)) + N(0, sigma^2 C^2 I)
        Adam step on g

Adam on the summed (not averaged) gradient: Adam is invariant to the gradient's scale, and a
sum stays defined for an empty Poisson batch, where a mean is not. SmallCNN has GroupNorm,
no BatchNorm (Opacus' ModuleValidator accepts it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.train import poisson_batches, sample_rate
from shared.classifier import AUGMENTATION
from shared.config import RunConfig
from shared.utility import LEARNING_RATE, TRAIN_SHARE


@dataclass(frozen=True)
class VariantPlan:
    """One variant's mechanism for one utility round: what its ledger entry records."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    records: int            # N: training images, plus synthetic ones for real-synthetic

    def history(self) -> list[tuple[float, float, int]]:
        return [(self.noise_multiplier, self.sample_rate, self.steps)]


@functools.lru_cache(maxsize=32)
def _noise(cfg: RunConfig, q: float, delta: float) -> float:
    return float(get_noise_multiplier(
        target_epsilon=TRAIN_SHARE * cfg.utility_epsilon, target_delta=delta, sample_rate=q,
        steps=cfg.utility_rounds * cfg.utility_steps, accountant="rdp", epsilon_tolerance=0.005))


def plan_variant(cfg: RunConfig, records: int, delta: float) -> VariantPlan:
    """The variant's per-round mechanism; sigma is the same in every utility round."""
    q = sample_rate(cfg, records)
    return VariantPlan(noise_multiplier=_noise(cfg, q, delta), sample_rate=q,
                       steps=cfg.utility_steps, max_grad_norm=cfg.max_grad_norm, records=records)


def train_variant(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                  augment: bool, plan: VariantPlan, cfg: RunConfig,
                  seed: int) -> list[tuple[float, float, int]]:
    """plan.steps DP-SGD steps on ``model`` in place; returns the accountant's history."""
    if len(images) != plan.records:
        raise RuntimeError(f"utility plan for {plan.records} records, {len(images)} given")
    sampling_rng = torch.Generator().manual_seed(seed)
    noise_rng = torch.Generator().manual_seed(seed + 1)
    augment_rng = torch.Generator().manual_seed(seed + 2)
    engine = PrivacyEngine(accountant="rdp")
    loader = DataLoader(TensorDataset(images, labels.reshape(-1).long()),
                        batch_size=cfg.batch_size, generator=sampling_rng)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    model.train()
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
        poisson_sampling=True, loss_reduction="sum", noise_generator=noise_rng)
    if abs(1 / len(loader) - plan.sample_rate) > 1e-12:
        raise RuntimeError(f"utility plan {plan} does not match the data actually sampled")
    for x, y in poisson_batches(loader, plan.steps):
        if augment:
            x = AUGMENTATION(x, generator=augment_rng)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(private(x), y, reduction="sum").backward()
        optimizer.step()
    history = list(engine.accountant.history)
    private._close()            # remove Opacus' hooks from the model
    model.eval()
    return history
