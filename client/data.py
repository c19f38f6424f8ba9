"""Load one hospital's images and labels, preprocessed for training.

Preprocessing is one MONAI `Compose` built from the run config (`preprocess`), used by
training and by `fedsynth client check-data` alike:

    images in [0, 1], any size  --Resize(S, S)-->  --ScaleIntensityRange-->  [-1, 1]

Random augmentation is not part of it: it is applied per sample to each Poisson batch
(`shared/augment.py`), so every round sees fresh draws.

Sources: a MedMNIST `.npz` (`train_images`, `train_labels`, ...; uint8 (N, H, W)), which
in simulation is split across hospitals with `shared/partition.py`.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, EnsureType, Resize, ScaleIntensityRange

from client.node import Hospital
from shared import partition
from shared.config import RunConfig


class DataError(ValueError):
    """The hospital's data cannot be used; the message names the file and the problem."""


@dataclass
class HospitalData:
    images: torch.Tensor            # (N, 1, S, S) float32 in [-1, 1]
    labels: torch.Tensor            # (N,) int64 in [0, num_classes)
    skipped: list = field(default_factory=list)   # files left out, with reasons (local only)

    def __len__(self) -> int:
        return len(self.labels)


def preprocess(cfg: RunConfig) -> Compose:
    """(C, H, W) float in [0, 1] -> (C, S, S) float32 tensor in [-1, 1]; C images at once."""
    size = (cfg.image_size, cfg.image_size)
    return Compose([
        Resize(size, mode="area"),
        ScaleIntensityRange(a_min=0.0, a_max=1.0, b_min=-1.0, b_max=1.0, clip=True),
        EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
    ])


def read_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """MedMNIST .npz -> images uint8 (N, H, W), labels int64 (N,)."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        with np.load(path) as npz:
            keys = set(npz.files)
            for key in (f"{split}_images", f"{split}_labels"):
                if key not in keys:
                    raise DataError(f"{path}: no '{key}' array (MedMNIST layout expected)")
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{path}: {split}_images must be uint8 (N, H, W), got "
                        f"{images.dtype} {images.shape}")
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def load_hospital(hospital: Hospital, cfg: RunConfig, split: str = "train") -> HospitalData:
    """This hospital's share of the data, preprocessed; raises DataError on bad input."""
    path = hospital.data_path
    if path.suffix != ".npz":
        raise DataError(f"{path}: unsupported data source (expected a MedMNIST .npz file)")
    images, labels = read_npz(path, split)
    if hospital.partition_id is not None:
        try:
            parts = partition.split(labels, hospital.num_partitions or 1, cfg.partition,
                                    cfg.dirichlet_alpha, cfg.seed)
        except partition.PartitionError as e:
            raise DataError(f"{path}: {e}") from None
        idx = parts[hospital.partition_id]
        images, labels = images[idx], labels[idx]
    bad = labels[(labels < 0) | (labels >= cfg.num_classes)]
    if len(bad):
        raise DataError(f"{path}: label {int(bad[0])} outside class-names "
                        f"({cfg.num_classes} classes: {', '.join(cfg.class_names)})")
    if len(labels) == 0:
        raise DataError(f"{path}: no images for {hospital.hospital_id}")
    tensor = preprocess(cfg)(images.astype(np.float32) / 255.0)
    return HospitalData(images=tensor.unsqueeze(1).contiguous(),
                        labels=torch.from_numpy(labels))
