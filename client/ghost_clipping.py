"""Per-sample gradient norms of nn.Conv2d for Opacus' ghost clipping (`grad_sample_mode="ghost"`).

Opacus 1.6 ships ghost norms for nn.Linear and nn.Embedding only; every other layer falls
back to materialising its per-sample gradients (B copies of the layer's weight) just to
take their norms, and then pays a second backward pass on top. For the discriminator's
convolutions that makes stock ghost clipping slower than plain per-sample hooks. This
module registers a norm sampler for nn.Conv2d, through Opacus' own extension point
(`register_norm_sampler`), that picks per layer the cheaper of two exact formulas (mixed
ghost clipping, Bu et al. 2022):

    A_i: unfolded input of sample i, (p, T)   p = C_in * kh * kw, T = output positions
    G_i: gradient w.r.t. the output, (d, T)   d = C_out
    per-sample weight gradient  W_i = G_i A_i^T                     (d, p)

    ghost norm        ||W_i||^2 = < A_i^T A_i , G_i^T G_i >         cost T^2 (p + d)
    materialised      ||W_i||^2 = sum (G_i A_i^T)^2                 cost T p d
    bias              ||b_i||   = || sum_t G_i[:, t] ||

The ghost formula wins for deep layers (few output positions, many channels: 1.5x faster
steps at 64x64), the materialised one for the first layers (many positions, few channels).
Both give the norm of the same per-sample gradient Opacus' hooks would compute, so the
clipping factors min(1, C / ||g_i||) and hence the mechanism are unchanged
(tests/test_fast_dp_step.py compares them with Opacus' per-sample hooks).

Grouped convolutions and padding modes other than zeros are not needed by fedsynth's
models; for them this falls back to Opacus' own per-sample gradients.

Importing this module registers the sampler (process-wide, ghost mode only).
"""

from __future__ import annotations

import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.utils import register_norm_sampler
from opacus.utils.tensor_utils import unfold2d
from torch import nn


def use_ghost_norm(positions: int, in_features: int, out_features: int) -> bool:
    """True where the Gram-matrix formula costs fewer multiply-adds than materialising."""
    return positions * (in_features + out_features) < in_features * out_features


@register_norm_sampler(nn.Conv2d)
def conv2d_norm_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of `layer`'s weight and bias, each of shape (B,).

    activations: [input of the layer, (B, C_in, H, W)]; backprops: gradient of the summed
    loss w.r.t. the layer's output, (B, C_out, H', W').
    """
    if layer.groups != 1 or layer.padding_mode != "zeros":
        per_sample = compute_conv_grad_sample(layer, activations, backprops)
        return {p: g.reshape(len(g), -1).norm(dim=1) for p, g in per_sample.items()}
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if n == 0:
        return {p: x.new_zeros(0) for p in layer.parameters() if p.requires_grad}
    grads = backprops.reshape(n, backprops.shape[1], -1)                    # (B, d, T)
    norms: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        inputs = unfold2d(x, kernel_size=layer.kernel_size, padding=layer.padding,
                          stride=layer.stride, dilation=layer.dilation)      # (B, p, T)
        p, t, d = inputs.shape[1], inputs.shape[2], grads.shape[1]
        if use_ghost_norm(t, p, d):
            gram_in = torch.bmm(inputs.transpose(1, 2), inputs)               # (B, T, T)
            gram_out = torch.bmm(grads.transpose(1, 2), grads)                # (B, T, T)
            squared = (gram_in * gram_out).sum(dim=(1, 2)).clamp(min=0)
        else:
            squared = torch.bmm(grads, inputs.transpose(1, 2)).pow(2).sum(dim=(1, 2))
        norms[layer.weight] = squared.sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = grads.sum(dim=2).norm(dim=1)
    return norms
