"""Per-sample random augmentation of image batches: rotation, zoom, flip, intensity.

Each image gets its own independently drawn transform, so one patient's image never
influences another's: the augmentation is applied before per-sample clipping and
keeps DP-SGD's per-example sensitivity intact. It runs batched (one affine_grid /
grid_sample call per batch) because a per-image MONAI RandAffine costs ~0.9 ms per
28x28 image on a CPU core, which would dominate a DP step.

Input and output: (N, 1, S, S) float in [-1, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class RandomAugment:
    def __init__(self, rotate_deg: float = 0.0, zoom: float = 0.0, flip: bool = False,
                 intensity: float = 0.0):
        self.rotate = math.radians(rotate_deg)
        self.zoom, self.flip, self.intensity = zoom, flip, intensity

    @property
    def active(self) -> bool:
        return bool(self.rotate or self.zoom or self.flip or self.intensity)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.active or x.shape[0] == 0:
            return x
        n = x.shape[0]

        def uniform(half_width: float) -> torch.Tensor:
            return (torch.rand(n, generator=generator) * 2 - 1) * half_width

        angle = uniform(self.rotate)
        scale = 1.0 + uniform(self.zoom)
        mirror = torch.ones(n)
        if self.flip:
            mirror = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [torch.stack([cos * mirror, -sin, torch.zeros(n)], 1),
             torch.stack([sin * mirror, cos, torch.zeros(n)], 1)], 1
        ).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.intensity:
            factor = (1.0 + uniform(self.intensity)).to(x.dtype).view(n, 1, 1, 1)
            out = ((out + 1) * factor - 1).clamp(-1, 1)
        return out
