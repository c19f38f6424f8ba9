"""shared.augment.RandomAugment: each augmentation on/off and its strength, per image."""

from __future__ import annotations

import torch

from shared.augment import RandomAugment


def _images(n: int = 64, size: int = 16) -> torch.Tensor:
    """Asymmetric test images in [-1, 1] (a ramp plus noise), (n, 1, size, size)."""
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1, 1, size).repeat(size, 1)
    return (0.7 * ramp + 0.3 * (torch.rand(n, 1, size, size, generator=g) * 2 - 1)).clamp(-1, 1)


def test_everything_off_leaves_the_images_as_they_are():
    x = _images()
    augment = RandomAugment()
    assert not augment.active
    assert augment(x, torch.Generator().manual_seed(1)) is x


def test_flip_alone_mirrors_some_images_and_leaves_the_others():
    x = _images()
    out = RandomAugment(flip=True)(x, torch.Generator().manual_seed(1))
    same = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x)]
    mirrored = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 16 < sum(mirrored) < 48          # about half of 64


def test_intensity_alone_scales_each_image_by_one_factor_within_its_strength():
    x = _images()
    out = RandomAugment(intensity=0.2)(x, torch.Generator().manual_seed(1))
    inside = (x > -0.9) & (x < 0.3)          # away from the clamp at +-1 for factors <= 1.2
    factors = []
    for o, i, m in zip(out, x, inside):
        ratio = ((o + 1) / (i + 1))[m]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), atol=1e-4)
        factors.append(float(ratio[0]))
    assert min(factors) >= 0.8 - 1e-4 and max(factors) <= 1.2 + 1e-4
    assert max(factors) - min(factors) > 0.2  # drawn per image, not once per batch


def test_rotation_and_zoom_stay_in_range_and_grow_with_their_strength():
    x = _images()
    changes = []
    for rotate, zoom in ((1.0, 0.01), (15.0, 0.2)):
        out = RandomAugment(rotate_deg=rotate, zoom=zoom)(x, torch.Generator().manual_seed(1))
        assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
        changes.append(float((out - x).abs().mean()))
    assert 0 < changes[0] < changes[1] / 3


def test_one_images_augmentation_does_not_depend_on_the_others():
    x = _images()
    augment = RandomAugment(rotate_deg=10.0, zoom=0.1, flip=True, intensity=0.1)
    y = x.clone()
    y[5] = -y[5]                              # another patient's image changes
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(y, torch.Generator().manual_seed(3))
    others = [k for k in range(len(x)) if k != 5]
    assert torch.equal(a[others], b[others]) and not torch.equal(a[5], b[5])
