"""GAN losses, per image: the discriminator's on real and on generated images, the generator's.

Two choices (`loss` knob):

    non-saturating (Goodfellow et al. 2014)   D: softplus(-D(x)) + softplus(D(G(z)))
                                              G: softplus(-D(G(z)))
    hinge (Lim & Ye 2017; Miyato et al. 2018) D: relu(1 - D(x)) + relu(1 + D(G(z)))
                                              G: -D(G(z))

Every function maps logits (N,) to per-image losses (N,): DP-SGD clips each real image's
gradient of its own term, so nothing here mixes images. The non-saturating terms are
computed with `binary_cross_entropy_with_logits` (numerically what the cGAN always used).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("non-saturating", "hinge")


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target),
                                              reduction="none")


def d_real(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The discriminator's loss on real images, per image."""
    return _bce(logits, 1.0) if kind == "non-saturating" else F.relu(1.0 - logits)


def d_fake(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The discriminator's loss on translated or generated images, per image."""
    return _bce(logits, 0.0) if kind == "non-saturating" else F.relu(1.0 + logits)


def g_adversarial(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator's adversarial loss on its own images, per image."""
    return _bce(logits, 1.0) if kind == "non-saturating" else -logits


class RealImageCriterion(nn.Module):
    """`d_real` as a criterion for Opacus' ghost clipping (which sets `reduction` to "none"
    to get per-sample losses, then back). `target` is ignored: every image is real."""

    def __init__(self, kind: str, reduction: str = "sum"):
        super().__init__()
        self.kind, self.reduction = kind, reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        per_image = d_real(logits, self.kind)
        if self.reduction == "none":
            return per_image
        return per_image.sum() if self.reduction == "sum" else per_image.mean()
