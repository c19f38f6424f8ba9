"""Family "stylegan": a StyleGAN2-style class-conditional generator (32 or 64 px) and a
residual discriminator that treats every image on its own.

Generator (Karras et al. 2020, scaled down), never sees a real image:

    z (latent_dim), label y -> mapping network: pixel-norm(z) ++ embed(y), 4 x (Linear,
                               LeakyReLU) -> style w (latent_dim)
    learned constant (C, 4, 4)
    per resolution 4, 8, ..., S: [upsample x2 (from 8 on)] -> modulated 3x3 conv (weights
                               scaled per input channel by an affine map of w, then
                               demodulated to unit output norm) -> + per-pixel noise x
                               learned per-channel strength -> LeakyReLU, twice per
                               resolution (once at 4), and a modulated 1x1 "toRGB" whose
                               outputs are upsampled and summed (skip architecture)
    tanh -> image (N, 1, S, S) in [-1, 1]

Noise inputs: fresh Gaussian noise in training mode; in eval mode fixed noise maps made at
construction (from the seeded build, not saved with the weights), so a released generator
regenerates exactly the same images from the same z.

Discriminator (StyleGAN2's residual one), trained with per-sample DP-SGD like the cGAN's:

    fromRGB 1x1 -> residual blocks (two 3x3 convs, 2x average-pool; 1x1 skip) down to 4x4
    -> per-image feature spread -> 3x3 conv -> Linear -> logit, class by projection

StyleGAN's minibatch standard deviation layer (the std of each feature over the *batch*,
appended as a channel) is left out: it makes every image's logit depend on the other images
in the batch, so one image's gradient would no longer be its own and per-sample clipping
would not bound its influence. In its place is a per-image statistic with the same purpose
(telling the discriminator about feature variety): the standard deviation of the image's
own 4x4 feature map over channels, averaged over positions, appended as one constant
channel. No normalisation layer is used (none is needed at these sizes), so nothing mixes
images; `ModuleValidator` accepts it and a test checks that one image's logit does not
move when the rest of the batch changes.

R1 (the gradient penalty on real images) is left out too: it would have to be computed per
image inside the clipped gradient (a double backward per sample through Opacus' hooks),
and clipping already bounds the discriminator's per-image gradient, which is what R1
regularises.

The generator never reads a patient image, so it trains as the cGAN's does
(client/train.py): through the private discriminator, as post-processing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shared.config import RunConfig
from shared.models import Family

MAPPING_LAYERS = 4
SIZES = (32, 64)


def _channels(width: int, resolution: int) -> int:
    """Feature width at a resolution: 4x wide at 4x4 and 8x8, narrowing as the maps grow."""
    return max(width, width * 8 // max(2, resolution // 4))


class MappingNetwork(nn.Module):
    def __init__(self, latent_dim: int, num_classes: int, layers: int = MAPPING_LAYERS):
        super().__init__()
        self.embed = nn.Embedding(num_classes, latent_dim)
        blocks: list[nn.Module] = []
        dim = 2 * latent_dim
        for _ in range(layers):
            blocks += [nn.Linear(dim, latent_dim), nn.LeakyReLU(0.2)]
            dim = latent_dim
        self.net = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """z (N, latent_dim), labels (N,) -> w (N, latent_dim)."""
        z = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)
        y = self.embed(labels)
        y = y * torch.rsqrt(y.pow(2).mean(dim=1, keepdim=True) + 1e-8)
        return self.net(torch.cat([z, y], dim=1))


class ModulatedConv(nn.Module):
    """Conv whose weights are scaled per input channel by a style, per image."""

    def __init__(self, c_in: int, c_out: int, kernel: int, w_dim: int, demodulate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.affine = nn.Linear(w_dim, c_in)
        nn.init.ones_(self.affine.bias)
        self.scale = 1.0 / math.sqrt(c_in * kernel * kernel)
        self.demodulate, self.padding = demodulate, kernel // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x (N, C_in, H, W), w (N, w_dim) -> (N, C_out, H, W).

        conv(x, W * s) = conv(x * s, W): the style scales the input channels, then one
        ordinary convolution with the shared weight, then demodulation scales each output
        channel by 1 / ||W * s|| (StyleGAN2's non-fused form; a grouped convolution with
        per-image weights computes the same and is ~20x slower on a CPU).
        """
        style = self.affine(w)                                          # (N, C_in)
        weight = self.scale * self.weight
        out = F.conv2d(x * style[:, :, None, None], weight, padding=self.padding)
        if self.demodulate:
            # ||W_o * s||^2 = sum_i s_i^2 sum_k W_oik^2
            norm2 = style.pow(2) @ weight.pow(2).sum(dim=(2, 3)).t()    # (N, C_out)
            out = out * torch.rsqrt(norm2 + 1e-8)[:, :, None, None]
        return out + self.bias.view(1, -1, 1, 1)


class StyleLayer(nn.Module):
    """Modulated 3x3 conv + per-pixel noise (learned per-channel strength) + LeakyReLU."""

    def __init__(self, c_in: int, c_out: int, w_dim: int, resolution: int):
        super().__init__()
        self.conv = ModulatedConv(c_in, c_out, 3, w_dim)
        self.noise_strength = nn.Parameter(torch.zeros(1, c_out, 1, 1))
        # eval-mode noise: fixed, drawn at construction (seeded build), not part of the weights
        self.register_buffer("fixed_noise", torch.randn(1, 1, resolution, resolution),
                             persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = self.conv(x, w)
        if self.training:
            noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], dtype=x.dtype)
        else:
            noise = self.fixed_noise
        return F.leaky_relu(x + self.noise_strength * noise, 0.2)


class Generator(nn.Module):
    def __init__(self, image_size: int, num_classes: int, latent_dim: int, width: int):
        super().__init__()
        if image_size not in SIZES:
            raise ValueError(f"stylegan image size {image_size}: expected one of {SIZES}")
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.mapping = MappingNetwork(latent_dim, num_classes)
        c4 = _channels(width, 4)
        self.const = nn.Parameter(torch.randn(1, c4, 4, 4))
        self.layers = nn.ModuleList([StyleLayer(c4, c4, latent_dim, 4)])
        self.to_image = nn.ModuleList([ModulatedConv(c4, 1, 1, latent_dim, demodulate=False)])
        resolution, c_in = 8, c4
        while resolution <= image_size:
            c_out = _channels(width, resolution)
            self.layers.append(StyleLayer(c_in, c_out, latent_dim, resolution))
            self.layers.append(StyleLayer(c_out, c_out, latent_dim, resolution))
            self.to_image.append(ModulatedConv(c_out, 1, 1, latent_dim, demodulate=False))
            resolution, c_in = resolution * 2, c_out

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """z: (N, latent_dim), labels: (N,) int64 -> images (N, 1, S, S) in [-1, 1]."""
        w = self.mapping(z, labels)
        x = self.layers[0](self.const.expand(len(z), -1, -1, -1), w)
        image = self.to_image[0](x, w)
        for i, to_image in enumerate(self.to_image[1:]):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = self.layers[2 * i + 2](self.layers[2 * i + 1](x, w), w)
            image = F.interpolate(image, scale_factor=2, mode="bilinear",
                                  align_corners=False) + to_image(x, w)
        return torch.tanh(image)


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_in, 3, padding=1)
        self.conv2 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = F.leaky_relu(self.conv1(x), 0.2)
        main = F.avg_pool2d(F.leaky_relu(self.conv2(main), 0.2), 2)
        return (main + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2)


def per_image_spread(h: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C + 1, H, W): appends, per image, the std of its own features
    over channels, averaged over positions. Unlike the minibatch std, no other image enters."""
    spread = h.std(dim=1, unbiased=False).mean(dim=(1, 2))          # (N,)
    return torch.cat([h, spread.view(-1, 1, 1, 1).expand(-1, 1, *h.shape[2:])], dim=1)


class Discriminator(nn.Module):
    def __init__(self, image_size: int, num_classes: int, width: int):
        super().__init__()
        c = _channels(width, image_size)
        self.from_image = nn.Conv2d(1, c, 1)
        blocks: list[nn.Module] = []
        resolution = image_size
        while resolution > 4:
            c_out = _channels(width, resolution // 2)
            blocks.append(ResidualBlock(c, c_out))
            resolution, c = resolution // 2, c_out
        self.blocks = nn.Sequential(*blocks)
        self.final_conv = nn.Conv2d(c + 1, c, 3, padding=1)
        self.final_linear = nn.Linear(c * 16, c)
        self.linear = nn.Linear(c, 1)
        self.embed = nn.Embedding(num_classes, c)
        nn.init.normal_(self.embed.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """images: (N, 1, S, S) in [-1, 1], labels: (N,) int64 -> logits (N,)."""
        h = self.blocks(F.leaky_relu(self.from_image(images), 0.2))
        h = F.leaky_relu(self.final_conv(per_image_spread(h)), 0.2)
        h = F.leaky_relu(self.final_linear(h.flatten(1)), 0.2)
        return self.linear(h).squeeze(1) + (self.embed(labels) * h).sum(dim=1)


def build(cfg: RunConfig) -> dict[str, nn.Module]:
    return {
        "generator": Generator(cfg.image_size, cfg.num_classes, cfg.latent_dim, cfg.g_width),
        "discriminator": Discriminator(cfg.image_size, cfg.num_classes, cfg.d_width),
    }


def config_problem(flat: dict) -> str | None:
    if flat["init"] != "dcgan":
        return f"init = {flat['init']!r} is a cgan knob; model = 'stylegan' has its own initialisation"
    size = int(flat["image-size"])
    if size & (size - 1):
        return (f"model = 'stylegan' needs image-size a power of two (its generator doubles "
                f"a 4x4 map), got {size}: use 32 or 64")
    return None


FAMILY = Family(name="stylegan", build=build, config_problem=config_problem)
