"""DiffAugment (Zhao et al. 2020): differentiable augmentation of real AND generated images
in front of the discriminator, against discriminator overfitting and the mode collapse that
follows it on small data sets (a hospital's few thousand images).

    color        brightness + U(-0.5, 0.5), contrast x U(0.5, 1.5) around the image's own mean
    translation  shift by up to 1/8 of the side in x and y (integer pixels), zero padding
    cutout       one square of half the side at a random position set to 0

Input and output: (N, C, S, S) float, images in [-1, 1] (0 is mid-gray, the fill value).

Every image gets its own random parameters, drawn from the given generator and from nothing
else, and its output depends only on its own pixels and parameters: the augmentation is
part of that image's per-sample loss, so DP-SGD's per-sample clipping still bounds each
image's influence. The operations are plain tensor arithmetic and `grid_sample`, so the
generator's gradient flows through them (that is the point for generated images) and they
run under `torch.func.vmap` (the CycleGAN's per-sample gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPERATIONS = ("color", "translation", "cutout")


def parse_policy(text: str) -> tuple[str, ...]:
    """"color,translation" -> ("color", "translation"); "" or "off" -> ()."""
    if text.strip() in ("", "off"):
        return ()
    return tuple(p.strip() for p in text.split(","))


def valid_policy(text: str) -> bool:
    ops = parse_policy(text)
    return all(op in OPERATIONS for op in ops) and len(set(ops)) == len(ops)


@dataclass
class AugmentParams:
    """Per-image random parameters, each of shape (N,); unit-free, in [0, 1) unless noted."""

    brightness: torch.Tensor   # added, in [-0.5, 0.5)
    contrast: torch.Tensor     # factor, in [0.5, 1.5)
    shift_x: torch.Tensor      # pixels (integers stored as float)
    shift_y: torch.Tensor
    cut_x: torch.Tensor        # cutout centre, pixels
    cut_y: torch.Tensor

    def stacked(self) -> torch.Tensor:
        """(N, 6): one row per image (what `torch.func.vmap` can map over)."""
        return torch.stack([getattr(self, f) for f in self.__dataclass_fields__], dim=1)

    @classmethod
    def of(cls, rows: torch.Tensor) -> "AugmentParams":
        """Inverse of `stacked`: rows (N, 6)."""
        return cls(*rows.unbind(dim=1))


class DiffAugment:
    def __init__(self, policy: str):
        self.ops = parse_policy(policy)

    @property
    def active(self) -> bool:
        return bool(self.ops)

    def draw(self, n: int, side: int, generator: torch.Generator) -> AugmentParams:
        """Independent parameters for n images of side `side`."""
        u = torch.rand(6, n, generator=generator)
        reach = side // 8
        return AugmentParams(
            brightness=u[0] - 0.5, contrast=u[1] + 0.5,
            shift_x=torch.floor(u[2] * (2 * reach + 1)) - reach,
            shift_y=torch.floor(u[3] * (2 * reach + 1)) - reach,
            cut_x=torch.floor(u[4] * side), cut_y=torch.floor(u[5] * side))

    def __call__(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Augment x (N, C, S, S) with params drawn for these N images."""
        if not self.ops:
            return x
        n, side = x.shape[0], x.shape[-1]
        if "color" in self.ops:
            x = x + params.brightness.view(n, 1, 1, 1)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * params.contrast.view(n, 1, 1, 1) + mean
        coords = torch.arange(side, dtype=x.dtype)
        if "translation" in self.ops:
            # output pixel p reads input pixel p - shift; outside the image reads 0
            step = 2.0 / side
            gx = (coords.view(1, side) - params.shift_x.view(n, 1) + 0.5) * step - 1
            gy = (coords.view(1, side) - params.shift_y.view(n, 1) + 0.5) * step - 1
            grid = torch.stack([gx.view(n, 1, side).expand(n, side, side),
                                gy.view(n, side, 1).expand(n, side, side)], dim=-1)
            x = F.grid_sample(x, grid.to(x.dtype), mode="nearest", padding_mode="zeros",
                              align_corners=False)
        if "cutout" in self.ops:
            half = side // 4
            inside_x = (coords.view(1, side) - params.cut_x.view(n, 1)).abs() < half
            inside_y = (coords.view(1, side) - params.cut_y.view(n, 1)).abs() < half
            keep = ~(inside_y.view(n, side, 1) & inside_x.view(n, 1, side))
            x = x * keep.view(n, 1, side, side).to(x.dtype)
        return x
