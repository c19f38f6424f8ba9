"""Item 1: one discriminator training step, non-private vs private, four ways.

    non-DP            plain Adam step: one forward/backward of B real + B generated images
    fedsynth (ghost)  client/train.py's step: Poisson real batch through Opacus ghost
                      clipping (client/ghost_clipping.py's Conv2d norms), the B generated
                      images' gradient unclipped per sample (clipped as a whole to B*C)
    fedsynth (hooks)  the same split with Opacus' per-sample hooks for the real term
                      (bit-identical to the implementation before ghost clipping);
                      "= train.py" marks the one train_round uses at that image size
    Opacus (hooks)    the stock way: real and generated images together through Opacus'
                      per-sample clipping (2B per-sample gradients), make_private defaults
    Opacus (ghost)    the stock way with grad_sample_mode="ghost" and its criterion wrapper,
                      Opacus as shipped (Conv2d and GroupNorm have no ghost norm there, so
                      their per-sample gradients are materialised, plus a second backward)

Every variant sees the same kind of batch: augmented real images (Poisson for the private
ones, exactly B for non-DP, B = q*n the expected batch) and B generated images with uniform
labels. Two tables: "with generation" counts the generator's forward pass for the B images
(as every step of client/train.py does); "discriminator only" feeds pre-generated images,
so the ratio is the discriminator's own DP overhead.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
    GradSampleHooksFastGradientClipping,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.timing import TIME_HEADER, interleaved, table
from benchmarks.workload import demo_config, describe, hospital_data
from client import train
from client.data import HospitalData
from shared.augment import RandomAugment
from shared.config import RunConfig
from shared.cgan import Discriminator, Generator

NOISE_MULTIPLIER = 1.0  # any sigma costs the same


@contextlib.contextmanager
def opacus_as_shipped():
    """Without client/ghost_clipping.py's Conv2d norm sampler (registered process-wide)."""
    samplers = GradSampleHooksFastGradientClipping.NORM_SAMPLERS
    ours = samplers.pop(nn.Conv2d, None)
    try:
        yield
    finally:
        if ours is not None:
            samplers[nn.Conv2d] = ours


def _augment(cfg: RunConfig) -> RandomAugment:
    return RandomAugment(cfg.augment_rotate, cfg.augment_zoom, cfg.augment_flip,
                         cfg.augment_intensity)


def _discriminator(cfg: RunConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(cfg.seed)
    d = Discriminator(cfg.image_size, cfg.num_classes, cfg.d_width)
    return d, torch.optim.Adam(d.parameters(), lr=cfg.lr_d, betas=train.ADAM_BETAS)


def _plan(cfg: RunConfig, n: int) -> train.DPPlan:
    return train.DPPlan(noise_multiplier=NOISE_MULTIPLIER, sample_rate=train.sample_rate(cfg, n),
                        steps=1, max_grad_norm=cfg.max_grad_norm, dataset_size=n)


def _poisson_batches(loader: DataLoader):
    while True:
        yield from loader


def non_dp(cfg, data, fakes, B) -> Callable[[], None]:
    d, opt = _discriminator(cfg)
    augment, rng = _augment(cfg), torch.Generator().manual_seed(1)
    target = torch.cat([torch.ones(B), torch.zeros(B)])

    def step():
        idx = torch.randint(0, len(data), (B,), generator=rng)
        real = augment(data.images[idx], rng)
        fake, y_fake = fakes()
        logits = d(torch.cat([real, fake]), torch.cat([data.labels[idx], y_fake]))
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / B
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _private_setup(cfg, data):
    """Discriminator + Adam, augmentation, its generator, the loader both DP variants wrap."""
    d, opt = _discriminator(cfg)
    augment, rng = _augment(cfg), torch.Generator().manual_seed(1)
    loader = DataLoader(TensorDataset(data.images, data.labels), batch_size=cfg.batch_size,
                        generator=rng)
    return d, opt, augment, rng, loader


def fedsynth(cfg, data, fakes, B, mode: str) -> Callable[[], None]:
    """The loop body of client.train.train_round, with its own functions."""
    d, opt, augment, rng, loader = _private_setup(cfg, data)
    plan = _plan(cfg, len(data))
    private_d, opt_d, real_loss, loader = train.make_private(
        PrivacyEngine(accountant="rdp"), d, opt, loader, plan,
        torch.Generator().manual_seed(2), mode)
    batches = _poisson_batches(loader)

    def step():
        real, labels = next(batches)
        fake, y_fake = fakes()
        _, stepped = train.discriminator_gradient(private_d, opt_d, real_loss,
                                                  augment(real, rng), labels, fake, y_fake,
                                                  B, plan.max_grad_norm)
        if stepped:
            opt_d.original_optimizer.step()
        opt_d.zero_grad(set_to_none=True)
    return step


def opacus_stock(cfg, data, fakes, B, mode: str) -> Callable[[], None]:
    """Real and generated images in one batch, every sample clipped by Opacus."""
    d, opt, augment, rng, loader = _private_setup(cfg, data)
    kwargs = dict(module=d, optimizer=opt, data_loader=loader,
                  noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=cfg.max_grad_norm,
                  poisson_sampling=True, loss_reduction="sum",
                  noise_generator=torch.Generator().manual_seed(2), grad_sample_mode=mode)
    if mode == "ghost":
        private_d, opt_d, criterion, loader = PrivacyEngine(accountant="rdp").make_private(
            **kwargs, criterion=nn.BCEWithLogitsLoss(reduction="sum"))
    else:
        private_d, opt_d, loader = PrivacyEngine(accountant="rdp").make_private(**kwargs)
        criterion = nn.BCEWithLogitsLoss(reduction="sum")
    batches = _poisson_batches(loader)

    def step():
        real, labels = next(batches)
        fake, y_fake = fakes()
        logits = private_d(torch.cat([augment(real, rng), fake]), torch.cat([labels, y_fake]))
        target = torch.cat([torch.ones(len(real)), torch.zeros(B)])
        opt_d.zero_grad(set_to_none=True)
        with opacus_as_shipped():
            criterion(logits, target).backward()
        opt_d.step()
    return step


def _fake_source(cfg: RunConfig, B: int, with_generator: bool):
    torch.manual_seed(cfg.seed)
    g = Generator(cfg.image_size, cfg.num_classes, cfg.latent_dim, cfg.g_width).train()

    def generated():
        with torch.no_grad():
            y = torch.randint(0, cfg.num_classes, (B,))
            return g(torch.randn(B, cfg.latent_dim), y), y
    if with_generator:
        return generated
    fixed = generated()
    return lambda: fixed


def variants(cfg: RunConfig, data: HospitalData, with_generator: bool) -> dict[str, Callable]:
    B = train.expected_batch(_plan(cfg, len(data)))
    fakes = _fake_source(cfg, B, with_generator)
    used = train.grad_sample_mode(cfg)
    out = {"non-DP": non_dp(cfg, data, fakes, B)}
    for mode in ("ghost", "hooks"):
        name = f"fedsynth ({mode})" + (" = train.py" if mode == used else "")
        out[name] = fedsynth(cfg, data, fakes, B, mode)
    out["Opacus (hooks)"] = opacus_stock(cfg, data, fakes, B, "hooks")
    try:
        ghost = opacus_stock(cfg, data, fakes, B, "ghost")
        ghost()
        out["Opacus (ghost)"] = ghost
    except Exception as e:  # noqa: BLE001 -- reported in the output, not hidden
        out["Opacus (ghost)"] = f"not supported: {type(e).__name__}: {e}"
    return out


def run(sizes_batches: list[tuple[int, int]], repeats: int, calls: int,
        generation: tuple[bool, ...] = (True, False)) -> str:
    """Markdown: one table per (image size, batch, with/without generation)."""
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        data_by_size: dict[int, HospitalData] = {}
        for size, batch in sizes_batches:
            cfg = demo_config(Path(tmp), image_size=size, batch_size=batch)
            if size not in data_by_size:
                data_by_size[size] = hospital_data(cfg)
            data = data_by_size[size]
            plan = _plan(cfg, len(data))
            n_params = sum(p.numel() for p in Discriminator(
                size, cfg.num_classes, cfg.d_width).parameters())
            for with_generator in generation:
                vs = variants(cfg, data, with_generator)
                unsupported = {k: v for k, v in vs.items() if isinstance(v, str)}
                timed = interleaved({k: v for k, v in vs.items() if callable(v)}, "non-DP",
                                    repeats, calls)
                rows = [t.row() for t in timed]
                rows += [[k, v, "", "", ""] for k, v in unsupported.items()]
                what = "with generation of the B images" if with_generator else \
                    "discriminator only (pre-generated images)"
                parts.append(
                    f"**{size}x{size}, batch-size {batch}** (n = {len(data)} images, "
                    f"q = {plan.sample_rate:.4f}, B = {train.expected_batch(plan)}; D "
                    f"{n_params:,} parameters; {describe(cfg)}), {what}; {repeats} repeats "
                    f"x {calls} steps\n\n" + table(TIME_HEADER, rows))
    return "\n\n".join(parts)
