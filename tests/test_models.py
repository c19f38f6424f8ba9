"""The cGAN: shapes and ranges as documented, and a discriminator Opacus can train per sample."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from shared import models
from shared.config import RunConfig, validate


def _cfg(image_size: int) -> RunConfig:
    return RunConfig.from_flat(validate({"image-size": image_size, "g-width": 8, "d-width": 8,
                                         "latent-dim": 16, "class-names": "a,b,c"}))


@pytest.fixture(params=[28, 64], ids=lambda s: f"{s}px")
def cfg(request) -> RunConfig:
    return _cfg(request.param)


def test_discriminator_passes_opacus_strict_validation(cfg):
    d = models.build(cfg)["discriminator"]
    ModuleValidator.validate(d, strict=True)  # raises on BatchNorm and other cross-sample layers
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in d.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in d.modules())


def test_generator_makes_images_in_range_for_every_class(cfg):
    g = models.build(cfg)["generator"].eval()
    z = torch.randn(6, cfg.latent_dim)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        images = g(z, labels)
    assert images.shape == (6, 1, cfg.image_size, cfg.image_size)
    assert images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    # the label changes the image: the class embedding is wired in
    with torch.no_grad():
        other = g(z, (labels + 1) % 3)
    assert not torch.allclose(images, other)


def test_discriminator_gives_one_logit_per_image(cfg):
    d = models.build(cfg)["discriminator"]
    images = torch.rand(5, 1, cfg.image_size, cfg.image_size) * 2 - 1
    logits = d(images, torch.tensor([0, 1, 2, 1, 0]))
    assert logits.shape == (5,)
    assert torch.isfinite(logits).all()


def test_discriminator_treats_samples_independently(cfg):
    # DP-SGD's per-sample clipping is only meaningful if no sample affects another's logit
    d = models.build(cfg)["discriminator"]
    images = torch.rand(4, 1, cfg.image_size, cfg.image_size) * 2 - 1
    labels = torch.tensor([0, 1, 2, 0])
    together = d(images, labels)
    alone = torch.cat([d(images[i:i + 1], labels[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone)


def test_build_is_seeded():
    a, b = models.build(_cfg(28)), models.build(_cfg(28))
    for name in ("generator", "discriminator"):
        for (k, x), (_, y) in zip(a[name].state_dict().items(), b[name].state_dict().items()):
            assert torch.equal(x, y), f"{name}.{k}"
    other = RunConfig.from_flat({**_cfg(28).to_flat(), "seed": 1})
    c = models.build(other)
    assert not torch.equal(a["generator"].embed.weight, c["generator"].embed.weight)
