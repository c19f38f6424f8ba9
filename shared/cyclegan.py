"""Family "cyclegan": unpaired translation between two domains (Zhu et al. 2017), trained
with per-sample DP on BOTH the discriminators and the generators.

Domains are the run's two classes: domain A = class-names[0], B = class-names[1] (e.g.
normal <-> pneumonia chest X-rays). Networks (image (N, 1, S, S) in [-1, 1], S = 28/32/64):

    generator      = Translators: ab (A -> B) and ba (B -> A), each a small ResNet
                     translator (7x7 conv, one stride-2 down, 2 residual blocks, one 2x up,
                     7x7 conv) added to the input's logit, tanh: the identity at start. Normalisation is GroupNorm with one group per channel
                     (instance normalisation, per image): the generators read patient
                     images under per-sample DP, so no BatchNorm.
    discriminator  = Discriminators: a and b, PatchGAN-style (three convs, GroupNorm),
                     the mean of the patch logits -> one logit per image.

Losses, per real image x (DP-SGD clips each image's gradient of its own term):

    x in A:  D-term  l_D(x) = L_real(D_A(aug(x))) + L_fake(D_B(aug(G_AB(x))))
             G-term  l_G(x) = L_adv(D_B(aug(G_AB(x))))
                              + cycle-weight * |G_BA(G_AB(x)) - x|_1
                              + identity-weight * |G_BA(x) - x|_1
    x in B:  the same with A and B swapped.
    (L_real, L_fake, L_adv: the `loss` knob, shared/losses.py; aug: `diffaugment`.)

Privacy argument (unit: one image, add/remove; Opacus' RDP accountant):

1. Unlike the cGAN, every image the discriminators see is a real scan or a translation of
   one: G_AB(x) is a function of x, so it is not "free" generated data. It belongs to x's
   own term: l_D(x) reads x and nothing of any other image (every layer is per image;
   GroupNorm normalises within the image), so sample x's gradient is its own.
2. The generators read real images too (translation, cycle, identity), so their update is
   a private mechanism of its own, not post-processing. l_G(x) likewise reads x only (plus
   the current discriminators and generators, outputs of earlier DP steps).
3. Each of the two is DP-SGD: an independent Poisson batch at rate q (Opacus'
   `DPDataLoader`, one sampler per mechanism), the per-image gradient of the image's
   term over the combined parameters of the two discriminators (resp. the two generators),
   clipped to C, summed, Gaussian noise sigma*C added, divided by B = q*n (public):
   Opacus' `DPOptimizer` does clip, noise and scale. Per-sample gradients come from
   `torch.func` (vmap over the gradient of one image's loss): the generators are used two
   or three times per image, which Opacus' per-layer hooks do not attribute reliably;
   vmap computes each image's gradient exactly.
4. So a round is d = local-d-steps steps of one subsampled Gaussian mechanism and
   g = local-d-steps // d-steps-per-g-step steps of another, composed adaptively. The
   accountant sees both, (sigma, q, d) and (sigma, q, g), and the ledger gets one signed
   entry per mechanism ("train-discriminator", "train-generator"). With the same sigma
   and q, RDP of the pair is exactly that of d + g steps, which is how sigma is calibrated
   to target-epsilon (client/train.py `calibrate_noise`).
5. Nothing computed from a real image leaves but the weights: every loss here involves a
   patient image, so the node sends no loss at all (client/app.py).
6. Augmentation (`augment-*`, `diffaugment`) draws each image's parameters independently
   from the node's secret-seeded generator: part of that image's term.

The release (server/release.py, `write_images`): the two translators' weights, and an
example grid (per domain: input, translation, reconstruction) drawn from the `val` split
of `data-path` -- images the coordinator holds and may publish (in simulation public
MedMNIST images no hospital trains on), never a hospital's. `fedsynth translate` applies a
released translator to a folder of PNG images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

from shared import losses
from shared.augment import RandomAugment
from shared.config import RunConfig
from shared.diffaugment import AugmentParams, DiffAugment
from shared.models import Family

ADAM_BETAS = (0.5, 0.999)
DIRECTIONS = ("a-to-b", "b-to-a")
EXAMPLES_PER_DOMAIN = 8


def _instance_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(channels, channels)  # one group per channel: per image, per channel


class ResidualBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), _instance_norm(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1), _instance_norm(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Translator(nn.Module):
    """One direction: image (N, 1, S, S) in [-1, 1] -> image of the other domain, same shape.

    Residual in the logit of the image: tanh(atanh(x) + f(x)), with f's last layer zero at
    initialisation, so a fresh translator is the identity. A scan's anatomy is what a
    translation must keep; the networks learn only the change of domain, and the few DP
    steps a hospital's budget allows are not spent on relearning the input.
    """

    def __init__(self, width: int, blocks: int = 2):
        super().__init__()
        w2 = 2 * width
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 7, padding=3), _instance_norm(width), nn.ReLU(),
            nn.Conv2d(width, w2, 3, stride=2, padding=1), _instance_norm(w2), nn.ReLU(),
            *[ResidualBlock(w2) for _ in range(blocks)],
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(w2, width, 3, padding=1), _instance_norm(width), nn.ReLU(),
            nn.Conv2d(width, 1, 7, padding=3))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.atanh(x.clamp(-0.995, 0.995)) + self.net(x))


class Translators(nn.Module):
    """The family's "generator": both directions in one module, so one DP mechanism
    clips each image's gradient over all generator parameters together."""

    def __init__(self, width: int):
        super().__init__()
        self.ab, self.ba = Translator(width), Translator(width)

    def forward(self, x: torch.Tensor, direction: str = "a-to-b") -> torch.Tensor:
        return (self.ab if direction == "a-to-b" else self.ba)(x)


class PatchDiscriminator(nn.Module):
    """image (N, 1, S, S) -> logit (N,): the mean of a PatchGAN's patch logits."""

    def __init__(self, width: int):
        super().__init__()
        w2 = 2 * width
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, w2, 4, 2, 1), nn.GroupNorm(min(8, w2 // 4), w2), nn.LeakyReLU(0.2),
            nn.Conv2d(w2, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(1, 2, 3))


class Discriminators(nn.Module):
    """D_A and D_B in one module (one DP mechanism over both)."""

    def __init__(self, width: int):
        super().__init__()
        self.a, self.b = PatchDiscriminator(width), PatchDiscriminator(width)

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_a: images shown to D_A, x_b: to D_B (N each, image i of both from one real
        image) -> their logits, (N,) each."""
        return self.a(x_a), self.b(x_b)


def build(cfg: RunConfig) -> dict[str, nn.Module]:
    return {"generator": Translators(cfg.g_width), "discriminator": Discriminators(cfg.d_width)}


# --------------------------------------------------------------------------- checks

def config_problem(flat: dict[str, Any]) -> str | None:
    names = [c.strip() for c in str(flat["class-names"]).split(",")]
    if len(names) != 2:
        return (f"model = 'cyclegan' translates between two domains: class-names needs exactly "
                f"2 names (domain A, domain B), got {len(names)}")
    if flat["init"] != "dcgan":
        return f"init = {flat['init']!r} is a cgan knob; model = 'cyclegan' has its own initialisation"
    if flat["release-candidates"] != 1:
        return ("release-candidates > 1 picks among images generated from noise; "
                "model = 'cyclegan' translates given images: set it to 1")
    if flat["evaluate"]:
        return ("model = 'cyclegan' has no images-from-noise to score: set evaluate = false "
                "(the release's example grid shows its translations)")
    return None


def data_problem(labels: np.ndarray, class_names: tuple[str, ...]) -> str | None:
    present = set(np.unique(labels).tolist())
    missing = [name for i, name in enumerate(class_names) if i not in present]
    if missing:
        return (f"cyclegan needs images of both domains at every hospital; this one has none "
                f"of domain {missing[0]!r} (only {', '.join(repr(class_names[i]) for i in sorted(present))})")
    return None


# --------------------------------------------------------------------------- DP training

def _term(logits: torch.Tensor, is_real: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.where(is_real, losses.d_real(logits, kind), losses.d_fake(logits, kind)).sum()


def _translate_by_domain(generators: Translators, x: torch.Tensor,
                         domain: torch.Tensor) -> torch.Tensor:
    """Each image into the other domain: A images through ab, B images through ba."""
    out = torch.empty_like(x)
    for d, net in ((0, generators.ab), (1, generators.ba)):
        idx = (domain == d).nonzero(as_tuple=True)[0]
        if len(idx):
            out[idx] = net(x[idx])
    return out


class CycleTrainer:
    """Per-image losses and per-image gradients of the two mechanisms (module docstring)."""

    def __init__(self, nets: dict[str, nn.Module], cfg: RunConfig, diff: DiffAugment):
        self.generators: Translators = nets["generator"]
        self.discriminators: Discriminators = nets["discriminator"]
        self.cfg, self.diff = cfg, diff

    def _aug(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return self.diff(x, AugmentParams.of(params)) if self.diff.active else x

    def discriminator_grad_samples(self, real: torch.Tensor, domain: torch.Tensor,
                                   rng: torch.Generator) -> dict[str, torch.Tensor]:
        """{parameter name: per-image gradients (k, *shape)} of l_D over both discriminators."""
        with torch.no_grad():
            translated = _translate_by_domain(self.generators, real, domain)
        is_a = domain == 0
        shape = (-1, 1, 1, 1)
        x_a = torch.where(is_a.view(shape), real, translated)   # D_A: real A, or B -> A
        x_b = torch.where(is_a.view(shape), translated, real)   # D_B: A -> B, or real B
        side = real.shape[-1]
        pa, pb = (self.diff.draw(len(real), side, rng).stacked() for _ in range(2))
        params = {k: p.detach() for k, p in self.discriminators.named_parameters()}
        kind = self.cfg.loss

        def one_image(p, xa, xb, real_a, aug_a, aug_b):
            la, lb = functional_call(self.discriminators, p,
                                     (self._aug(xa[None], aug_a[None]),
                                      self._aug(xb[None], aug_b[None])))
            return _term(la, real_a[None], kind) + _term(lb, ~real_a[None], kind)

        return vmap(grad(one_image), in_dims=(None, 0, 0, 0, 0, 0))(
            params, x_a, x_b, is_a, pa, pb)

    def generator_grad_samples(self, real: torch.Tensor, domain: torch.Tensor,
                               rng: torch.Generator) -> dict[str, torch.Tensor]:
        """{parameter name: per-image gradients (k, *shape)} of l_G over both generators."""
        params = {k: p.detach() for k, p in self.generators.named_parameters()}
        cfg, kind = self.cfg, self.cfg.loss
        d = self.discriminators
        parts = []
        for dom, forward, back, judge in ((0, "ab", "ba", d.b), (1, "ba", "ab", d.a)):
            x = real[domain == dom]
            if len(x) == 0:
                continue
            aug = self.diff.draw(len(x), x.shape[-1], rng).stacked()

            def one_image(p, xi, aug_i, forward=forward, back=back, judge=judge):
                xi = xi[None]
                g_f = {k.split(".", 1)[1]: v for k, v in p.items() if k.startswith(forward + ".")}
                g_b = {k.split(".", 1)[1]: v for k, v in p.items() if k.startswith(back + ".")}
                net_f, net_b = getattr(self.generators, forward), getattr(self.generators, back)
                fake = functional_call(net_f, g_f, (xi,))
                loss = losses.g_adversarial(judge(self._aug(fake, aug_i[None])), kind).sum()
                if cfg.cycle_weight:
                    loss = loss + cfg.cycle_weight * (functional_call(net_b, g_b, (fake,))
                                                      - xi).abs().mean()
                if cfg.identity_weight:
                    loss = loss + cfg.identity_weight * (functional_call(net_b, g_b, (xi,))
                                                         - xi).abs().mean()
                return loss

            parts.append(vmap(grad(one_image), in_dims=(None, 0, 0))(params, x, aug))
        if not parts:
            return {k: torch.zeros(0, *p.shape) for k, p in params.items()}
        return {k: torch.cat([part[k] for part in parts]) for k in params}


def _set_grad_samples(module: nn.Module, samples: dict[str, torch.Tensor]) -> None:
    for name, p in module.named_parameters():
        p.grad_sample = samples[name]


def private_optimizer(module: nn.Module, lr: float, plan, noise_rng: torch.Generator,
                      accountant: RDPAccountant) -> DPOptimizer:
    """Adam behind Opacus' DPOptimizer: clip each image's gradient to C, sum, add
    N(0, sigma^2 C^2), divide by B = q n; every step is charged to `accountant` at rate q."""
    B = max(1, int(plan.dataset_size * plan.sample_rate))
    optimizer = DPOptimizer(torch.optim.Adam(module.parameters(), lr=lr, betas=ADAM_BETAS),
                            noise_multiplier=plan.noise_multiplier,
                            max_grad_norm=plan.max_grad_norm, expected_batch_size=B,
                            loss_reduction="mean", generator=noise_rng)
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
    return optimizer


def train_round(nets: dict[str, nn.Module], data, cfg: RunConfig, plan, seed: int,
                accountant_history: list[tuple[float, float, int]] | None = None):
    """plan.steps discriminator steps and plan.g_steps generator steps, both DP-SGD.

    Returns (RoundStats with no losses: all of them read patient images, accountant
    history = previous + [(sigma, q, d steps), (sigma, q, g steps)]).
    """
    from client.train import RoundStats  # the trainer's record type (client imports us)

    torch.manual_seed(seed)
    d_sampling = torch.Generator().manual_seed(seed + 1)
    d_noise = torch.Generator().manual_seed(seed + 2)
    augment_rng = torch.Generator().manual_seed(seed + 3)
    g_sampling = torch.Generator().manual_seed(seed + 4)
    g_noise = torch.Generator().manual_seed(seed + 5)
    dataset = TensorDataset(data.images, data.labels)
    if len(dataset) != plan.dataset_size:
        raise RuntimeError(f"DP plan {plan} does not match the data actually sampled")
    # one Poisson sampler per mechanism: each step of each is a fresh subsample at rate q
    d_loader = DPDataLoader(dataset, sample_rate=plan.sample_rate, generator=d_sampling)
    g_loader = DPDataLoader(dataset, sample_rate=plan.sample_rate, generator=g_sampling)
    d_accountant, g_accountant = RDPAccountant(), RDPAccountant()
    generators, discriminators = nets["generator"], nets["discriminator"]
    opt_d = private_optimizer(discriminators, cfg.lr_d, plan, d_noise, d_accountant)
    opt_g = private_optimizer(generators, cfg.lr_g, plan, g_noise, g_accountant)
    augment = RandomAugment(cfg.augment_rotate, cfg.augment_zoom, cfg.augment_flip,
                            cfg.augment_intensity)
    trainer = CycleTrainer(nets, cfg, DiffAugment(cfg.diffaugment))
    generators.train()
    discriminators.train()

    def batches(loader):
        while True:
            yield from loader

    d_batches, g_batches = batches(d_loader), batches(g_loader)
    g_steps = 0
    for step in range(plan.steps):
        real, domain = next(d_batches)
        real = augment(real, augment_rng)
        _set_grad_samples(discriminators,
                          trainer.discriminator_grad_samples(real, domain, augment_rng)
                          if len(real) else _empty(discriminators))
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)   # grad_sample, summed_grad, grad

        if (step + 1) % cfg.d_steps_per_g_step == 0:
            real, domain = next(g_batches)
            real = augment(real, augment_rng)
            for p in discriminators.parameters():
                p.requires_grad_(False)
            _set_grad_samples(generators, trainer.generator_grad_samples(real, domain,
                                                                         augment_rng))
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            for p in discriminators.parameters():
                p.requires_grad_(True)
            g_steps += 1
    if g_steps != plan.g_steps:
        raise RuntimeError(f"took {g_steps} generator steps, the plan says {plan.g_steps}")
    history = list(accountant_history or []) + d_accountant.history + g_accountant.history
    return RoundStats(d_loss_fake=None, g_loss=None, d_steps=plan.steps,
                      g_steps=g_steps), history


def _empty(module: nn.Module) -> dict[str, torch.Tensor]:
    """An empty Poisson batch: no image, zero clipped sum (the noise is still added)."""
    return {k: torch.zeros(0, *p.shape) for k, p in module.named_parameters()}


# --------------------------------------------------------------------------- release

def example_images(cfg: RunConfig, per_domain: int = EXAMPLES_PER_DOMAIN) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid's inputs: the first `per_domain` images of each domain in the `val` split
    of data-path (the coordinator's own, publishable images), preprocessed: (2k, 1, S, S)."""
    from client.data import preprocess, read_npz

    images, labels = read_npz(Path(cfg.data_path), "val")
    chosen = np.concatenate([np.flatnonzero(labels == d)[:per_domain] for d in (0, 1)])
    x = preprocess(cfg)(images[chosen].astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.as_tensor(labels[chosen])


@torch.no_grad()
def translate(generators: Translators, x: torch.Tensor, direction: str) -> torch.Tensor:
    """(N, 1, S, S) in [-1, 1] -> the other domain, same shape."""
    return generators.eval()(x, direction)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


@torch.no_grad()
def example_rows(generators: Translators, cfg: RunConfig) -> dict[str, np.ndarray]:
    """uint8 (k, S, S) each: per domain its inputs, translations and reconstructions."""
    x, labels = example_images(cfg)
    out = {}
    for d, (there, back) in enumerate((DIRECTIONS, DIRECTIONS[::-1])):
        inputs = x[labels == d]
        translated = translate(generators, inputs, there)
        out[f"{cfg.class_names[d]}-input"] = to_uint8(inputs)
        out[f"{cfg.class_names[d]}-translated"] = to_uint8(translated)
        out[f"{cfg.class_names[d]}-reconstructed"] = to_uint8(translate(generators, translated, back))
    return out


def save_grid(generators: Translators, cfg: RunConfig, path: Path, scale: int = 3) -> None:
    """Six rows: domain A input / A -> B / back to A, then the same for B."""
    from PIL import Image

    from server.release import grid

    rows = example_rows(generators, cfg)
    canvas = grid(np.concatenate(list(rows.values())), rows=len(rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale),
                                   Image.NEAREST).save(path)


def write_images(generators: Translators, cfg: RunConfig, folder: Path) -> dict[str, Any]:
    """translator-a-to-b.pt, translator-b-to-a.pt (state dicts of the EMA translators) and
    examples.npz (the grid's rows); returns release.json's "images" section."""
    names = {"a-to-b": "translator-a-to-b.pt", "b-to-a": "translator-b-to-a.pt"}
    torch.save(generators.ab.state_dict(), folder / names["a-to-b"])
    torch.save(generators.ba.state_dict(), folder / names["b-to-a"])
    np.savez_compressed(folder / "examples.npz", **example_rows(generators, cfg))
    return {"kind": "translator", "domains": {"a": cfg.class_names[0], "b": cfg.class_names[1]},
            "translators": names, "size": cfg.image_size, "grid": "grid.png",
            "examples": "examples.npz: the val split of data-path (coordinator's images)",
            "generator": "generator-ema.pt"}


FAMILY = Family(name="cyclegan", build=build,
                private_networks=("discriminator", "generator"), generator_mechanism=True,
                release="translator", config_problem=config_problem,
                data_problem=data_problem, train_round=train_round,
                save_grid=save_grid, write_images=write_images)
