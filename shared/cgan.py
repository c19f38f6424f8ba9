"""Family "cgan": class-conditional DCGAN for single-channel medical images (28, 32 or 64 px).

Generator: noise z (latent_dim) and a class embedding -> image in [-1, 1], shape (N, 1, S, S).
It never sees a real image, so it may use BatchNorm: it learns only through the private
discriminator's output, which is post-processing of a DP mechanism.

Discriminator: image (N, 1, S, S) and label (N,) -> logit (N,). It is trained with
per-sample DP-SGD, so every layer must treat samples independently: GroupNorm instead of
BatchNorm, no minibatch standard deviation. Class conditioning is by projection
(Miyato & Koyama 2018): logit = w . h(x) + <embed(y), h(x)>.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.config import RunConfig
from shared.models import Family

# Upsampling stages from the generator's first feature map to the image side.
_LAYOUT = {28: (7, 2), 32: (4, 3), 64: (4, 4)}  # image side -> (first map side, doublings)


def _init_dcgan(module: nn.Module) -> None:
    """The seed paper's initialisation (DCGAN): weights N(0, 0.02), norm scales N(1, 0.02).
    With it the generator starts as a near-constant grey image and the first few rounds'
    DP steps go into leaving that; `init = "pytorch"` keeps PyTorch's layer defaults."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    def __init__(self, image_size: int, num_classes: int, latent_dim: int, width: int,
                 init: str = "dcgan"):
        super().__init__()
        side, doublings = _LAYOUT[image_size]
        self.latent_dim, self.num_classes = latent_dim, num_classes
        channels = [width * 2 ** (doublings - 1 - i) for i in range(doublings)] + [width]
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.project = nn.Sequential(
            nn.Linear(2 * latent_dim, channels[0] * side * side, bias=False),
            nn.Unflatten(1, (channels[0], side, side)),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            blocks += [
                nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        blocks += [nn.Conv2d(channels[-1], 1, 3, padding=1), nn.Tanh()]
        self.body = nn.Sequential(*blocks)
        if init == "dcgan":
            self.apply(_init_dcgan)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """z: (N, latent_dim), labels: (N,) int64 -> images (N, 1, S, S) in [-1, 1]."""
        return self.body(self.project(torch.cat([z, self.embed(labels)], dim=1)))


class Discriminator(nn.Module):
    def __init__(self, image_size: int, num_classes: int, width: int, init: str = "dcgan"):
        super().__init__()
        _, doublings = _LAYOUT[image_size]
        stages = doublings + 1  # 28 -> 14 -> 7 -> 4 ; 32 -> 16 -> 8 -> 4 -> 2 ; 64 -> ... -> 4
        layers: list[nn.Module] = []
        c_in = 1
        for i in range(stages):
            c_out = width * 2**i
            layers.append(nn.Conv2d(c_in, c_out, 4 if i < stages - 1 else 3, 2, 1))
            if i > 0:  # per-sample normalisation only: DP-SGD needs independent samples
                layers.append(nn.GroupNorm(min(8, c_out // 4), c_out))
            layers.append(nn.LeakyReLU(0.2))
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            dim = self.features(torch.zeros(1, 1, image_size, image_size)).shape[1]
        self.linear = nn.Linear(dim, 1)
        self.embed = nn.Embedding(num_classes, dim)
        if init == "dcgan":
            self.apply(_init_dcgan)
        # The projection term <embed(y), h(x)> sums over `dim` features: with PyTorch's
        # default N(0, 1) embedding it would start at logits of +-30 and saturate.
        nn.init.normal_(self.embed.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """images: (N, 1, S, S) in [-1, 1], labels: (N,) int64 -> logits (N,)."""
        h = self.features(images)
        return self.linear(h).squeeze(1) + (self.embed(labels) * h).sum(dim=1)


def build(cfg: RunConfig) -> dict[str, nn.Module]:
    """The family's named networks, freshly initialised (the registry seeds torch first)."""
    return {
        "generator": Generator(cfg.image_size, cfg.num_classes, cfg.latent_dim, cfg.g_width,
                               cfg.init),
        "discriminator": Discriminator(cfg.image_size, cfg.num_classes, cfg.d_width, cfg.init),
    }


FAMILY = Family(name="cgan", build=build)
