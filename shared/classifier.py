"""Downstream utility: a small CNN classifier for train-on-synthetic / test-on-real (TSTR).

The classifier is trained on synthetic images (public) and evaluated on a hospital's real test
images. ``evaluate_classifier`` is exact and depends on those real images: it is for central
benchmarks and for use inside the hospital. What leaves a hospital is
``shared.dp_stats.dp_classification_counts(predict_proba(model, images), labels, ...)``.

Images: float ``(N, 1, H, W)`` in ``[-1, 1]``, any ``H, W >= 8`` (28 and 64 in fedsynth);
labels: integers ``(N,)`` or ``(N, 1)`` (the MedMNIST layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import binary_auroc, multiclass_accuracy, multiclass_auroc

from shared.augment import RandomAugment

# Traditional augmentation for `augment=True`: rotation +-10 degrees, zoom +-10 %, horizontal
# flip, intensity x[0.9, 1.1]; one independent draw per image (shared.augment.RandomAugment).
AUGMENTATION = RandomAugment(rotate_deg=10.0, zoom=0.1, flip=True, intensity=0.1)


class SmallCNN(nn.Module):
    """Three conv blocks (16, 32, 64 channels) with GroupNorm, global average pool, linear head.

    GroupNorm, not BatchNorm: the same network is trained with DP-SGD on the hospitals' real
    images for the utility table's real-data rows (client/utility.py), where every layer must
    treat samples independently; the synthetic-only row trains the same network, so the rows
    compare training sets, not architectures."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.ReLU())

        self.features = nn.Sequential(
            block(1, 16), nn.MaxPool2d(2), block(16, 32), nn.MaxPool2d(2), block(32, 64), nn.AdaptiveAvgPool2d(1)
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)``."""
        return self.head(self.features(images).flatten(1))


def _check(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.as_tensor(images).float()
    labels = torch.as_tensor(labels).reshape(-1).long()
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected images of shape (N, 1, H, W) in [-1, 1], got {tuple(images.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    augment: bool,
    seed: int,
    num_classes: int | None = None,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
) -> nn.Module:
    """Train ``SmallCNN`` with Adam and cross-entropy; returns the model in eval mode.

    ``num_classes`` defaults to ``max(label) + 1``; pass it when a class may be absent from the
    training set (synthetic sets). The same ``seed`` gives the same model (initialisation, batch
    order and augmentation draw from generators seeded by it; the global RNG is left untouched).
    """
    images, labels = _check(images, labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(num_classes)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for batch in order.split(batch_size):
            x = images[batch]
            if augment:
                x = AUGMENTATION(x, generator=generator)
            loss = F.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Class probabilities ``(N, K)`` (softmax of the logits), float32."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(batch).softmax(dim=1) for batch in torch.as_tensor(images).float().split(batch_size)])


def evaluate_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float | int]:
    """Exact ``{"accuracy": float, "auc": float, "count": int}`` on labelled images (Python scalars only).

    AUC is ROC AUC: binary on the positive class's probability, else the macro mean of
    one-vs-rest AUCs (torchmetrics). Not DP: see the module docstring.
    """
    images, labels = _check(images, labels)
    probabilities = predict_proba(model, images)
    num_classes = probabilities.shape[1]
    accuracy = multiclass_accuracy(probabilities, labels, num_classes=num_classes, average="micro")
    if num_classes == 2:
        auc = binary_auroc(probabilities[:, 1], labels)
    else:
        auc = multiclass_auroc(probabilities, labels, num_classes=num_classes, average="macro")
    return {"accuracy": float(accuracy), "auc": float(auc), "count": int(labels.shape[0])}
