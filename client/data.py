"""Load one hospital's images and labels, preprocessed for training.

Preprocessing is one MONAI `Compose` built from the run config (`preprocess`), used by
training and by `fedsynth client check-data` alike (both call `load_hospital`):

    gray images in [0, 1], any H x W
      --Resize(longest side S, area)--> --SpatialPad(S x S, black)-->
      --ScaleIntensityRange([0, 1] -> [-1, 1])-->  (1, S, S) float32

Square images are simply resized; others keep their aspect ratio and are padded.
Random augmentation is not part of it: it is applied per sample to each Poisson batch
(`shared/augment.py`), so every round sees fresh draws.

Sources (`data-path` of the node config, or of the run config in simulation):

* a MedMNIST `.npz` (`train_images`, `train_labels`, ...; uint8 (N, H, W)), which in
  simulation is split across hospitals with `shared/partition.py`;
* a folder of scans (DICOM, PNG/JPEG, NIfTI), read by `client.sources.read_scans` with the
  settings of the hospital's node config (`client/node.py`). Labels are matched to the run
  config's `class-names`; files that give no image, or a label outside them, are skipped
  and listed in `HospitalData.skipped` (paths relative to the folder), which stays on the
  node.

Preprocessing cache (folders only): the preprocessed tensors are kept in
`<state-dir>/cache/scans-<key>.pt`, where the key is a SHA-256 over the list of files
(relative path, size, modification time), the label manifest's size and time, the source
settings, the class names, the preprocessing transforms' parameters and the versions of
the decoding libraries. Any change gives a new key, so a stale cache is never read. The
cache holds pixels, label indices, modalities, sizes and skip reasons (by position in the
file list), no file name and nothing read from a DICOM header, and it never leaves the
node (folder mode 0700, files 0600).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, EnsureType, Resize, ScaleIntensityRange, SpatialPad

from client.node import Hospital
from client.sources import NoUsableScans, SkippedFile, read_scans, require_usable, scan_files
from shared import partition
from shared.config import RunConfig

log = logging.getLogger("fedsynth.client.data")

CACHE_FORMAT = 1      # bump when what a cache file holds, or how it is made, changes
CACHE_KEEP = 4        # cache files kept per node (the newest): e.g. two image sizes
NPZ_MODALITY = "MedMNIST"


class DataError(ValueError):
    """The hospital's data cannot be used; the message names the file and the problem."""


class NoUsableData(DataError):
    """A folder of scans gave no usable image; `skipped` says why, file by file (local only)."""

    def __init__(self, message: str, skipped: list[SkippedFile]):
        super().__init__(message)
        self.skipped = skipped


@dataclass
class HospitalData:
    images: torch.Tensor            # (N, 1, S, S) float32 in [-1, 1]
    labels: torch.Tensor            # (N,) int64 in [0, num_classes)
    skipped: list[SkippedFile] = field(default_factory=list)  # files left out (local only)
    modalities: list[str] = field(default_factory=list)       # per image: CT, MR, PNG, ...
    sizes: list[tuple[int, int]] = field(default_factory=list)  # per image: H, W before resize
    cache: str = ""                 # folders: "hit", "written" or "off"

    def __len__(self) -> int:
        return len(self.labels)


def preprocess(cfg: RunConfig) -> Compose:
    """(C, H, W) float in [0, 1] -> (C, S, S) float32 tensor in [-1, 1]; C images at once."""
    size = cfg.image_size
    return Compose([
        Resize(size, size_mode="longest", mode="area"),
        SpatialPad((size, size), mode="constant"),
        ScaleIntensityRange(a_min=0.0, a_max=1.0, b_min=-1.0, b_max=1.0, clip=True),
        EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
    ])


def preprocess_images(images: list[np.ndarray], cfg: RunConfig) -> torch.Tensor:
    """2-D float images in [0, 1] of any sizes -> (N, 1, S, S), in the order given."""
    transform = preprocess(cfg)
    out = torch.empty(len(images), 1, cfg.image_size, cfg.image_size)
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        by_shape[image.shape].append(i)
    for indices in by_shape.values():  # images of one shape go through as channels of one
        out[indices, 0] = transform(np.stack([images[i] for i in indices]).astype(np.float32))
    return out


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
    """This hospital's data, preprocessed; raises DataError on bad input.

    A folder of scans is read whole (``split`` applies to .npz files only); a folder with no
    usable image raises `NoUsableData`, which carries the per-file reasons.
    """
    path = hospital.data_path
    if path.is_dir():
        return load_scans(hospital, cfg)
    if not path.exists():
        raise DataError(f"{path}: not found; set data-path to a folder of scans or a .npz file")
    if path.suffix != ".npz":
        raise DataError(f"{path}: unsupported data source (expected a MedMNIST .npz file "
                        "or a folder of DICOM, PNG/JPEG or NIfTI scans)")
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
                        labels=torch.from_numpy(labels),
                        modalities=[NPZ_MODALITY] * len(labels),
                        sizes=[tuple(images.shape[1:])] * len(labels))


# --------------------------------------------------------------------------- folders of scans

def load_scans(hospital: Hospital, cfg: RunConfig) -> HospitalData:
    """A folder of scans through `client.sources.read_scans`, preprocessed, cached on the node."""
    settings = dataclasses.replace(hospital.source, root=hospital.data_path,
                                   class_names=tuple(cfg.class_names))
    files = scan_files(settings)
    rel = [p.relative_to(hospital.data_path).as_posix() for p in files]
    cache_file = None
    if hospital.preprocess_cache:
        key = cache_key(_folder_stamp(files, rel, settings.label_manifest), settings, cfg)
        cache_file = Path(hospital.state_dir) / "cache" / f"scans-{key[:32]}.pt"
        data = _read_cache(cache_file, rel, cfg)
        if data is not None:
            log.info("%s: %d images from the preprocessing cache", hospital.hospital_id, len(data))
            return data
    try:
        scans = read_scans(settings)
    except ValueError as e:  # bad settings or label manifest: one line naming it
        raise DataError(str(e)) from None
    try:
        require_usable(scans, hospital.data_path)
    except NoUsableScans as e:
        raise NoUsableData(str(e), scans.skipped) from None
    index = {name: i for i, name in enumerate(cfg.class_names)}
    labels = [label if isinstance(label, int) else index[label] for label in scans.labels]
    data = HospitalData(
        images=preprocess_images(scans.images, cfg),
        labels=torch.tensor(labels, dtype=torch.int64),
        skipped=list(scans.skipped),
        modalities=list(scans.modalities),
        sizes=[tuple(int(n) for n in image.shape) for image in scans.images],
        cache="off",
    )
    if cache_file is not None and _write_cache(cache_file, data, rel):
        data.cache = "written"
    return data


def data_stamp(hospital: Hospital) -> tuple:
    """(relative path, size, mtime in ns) of every file the loader reads; changes when any does.

    For a folder: the files `read_scans` visits, then the label manifest (if any); for a file:
    the file itself. A missing file has size and time -1.
    """
    path = Path(hospital.data_path)
    if not path.is_dir():
        return (_stat_row(path, path.name),)
    settings = dataclasses.replace(hospital.source, root=path)
    files = scan_files(settings)
    rel = [p.relative_to(path).as_posix() for p in files]
    return _folder_stamp(files, rel, settings.label_manifest)


def _folder_stamp(files: list[Path], rel: list[str], manifest: Path | None) -> tuple:
    rows = tuple(_stat_row(p, name) for p, name in zip(files, rel, strict=True))
    return rows + ((_stat_row(Path(manifest), str(manifest)),) if manifest else ())


def _stat_row(path: Path, name: str) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return (name, -1, -1)
    return (name, st.st_size, st.st_mtime_ns)


def cache_key(stamp: tuple, settings, cfg: RunConfig) -> str:
    """SHA-256 (hex) over everything the cached tensors depend on."""
    import monai
    import pydicom

    source = {f.name: str(getattr(settings, f.name)) for f in dataclasses.fields(settings)
              if f.name != "root"}  # the folder may move; what is in it may not change
    material = {
        "format": CACHE_FORMAT,
        "files": stamp,
        "source": source,
        "image-size": cfg.image_size,
        "preprocess": [
            [type(t).__name__, {k: str(v) for k, v in sorted(vars(t).items())
                                if isinstance(v, (int, float, str, bool, tuple, type(None)))}]
            for t in preprocess(cfg).transforms
        ],
        "libraries": [pydicom.__version__, monai.__version__, np.__version__],
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _write_cache(path: Path, data: HospitalData, rel: list[str]) -> bool:
    position = {name: i for i, name in enumerate(rel)}
    payload = {
        "format": CACHE_FORMAT,
        "images": data.images,
        "labels": data.labels,
        "modalities": list(data.modalities),
        "sizes": [list(s) for s in data.sizes],
        # by position in the file list, so the cache holds no file name
        "skipped": [[position.get(s.path, -1), s.reason] for s in data.skipped],
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
        stale = sorted(path.parent.glob("scans-*.pt"), key=lambda p: p.stat().st_mtime_ns)
        for old in stale[:-CACHE_KEEP]:
            old.unlink(missing_ok=True)
    except OSError as e:  # a read-only state-dir costs speed, not the round
        log.warning("preprocessing cache not written (%s)", type(e).__name__)
        return False
    return True


def _read_cache(path: Path, rel: list[str], cfg: RunConfig) -> HospitalData | None:
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
        images, labels = payload["images"], payload["labels"]
        n = len(labels)
        if (payload["format"] != CACHE_FORMAT
                or tuple(images.shape) != (n, 1, cfg.image_size, cfg.image_size)
                or len(payload["modalities"]) != n or len(payload["sizes"]) != n):
            raise ValueError("inconsistent cache")
        skipped = [SkippedFile(rel[i] if 0 <= i < len(rel) else "?", reason)
                   for i, reason in payload["skipped"]]
    except Exception as e:  # noqa: BLE001 -- a broken cache is rebuilt, never trusted
        log.warning("preprocessing cache unreadable (%s); reading the scans again",
                    type(e).__name__)
        return None
    os.utime(path)  # most recently used: kept when old entries are pruned
    return HospitalData(images=images, labels=labels, skipped=skipped,
                        modalities=list(payload["modalities"]),
                        sizes=[tuple(s) for s in payload["sizes"]], cache="hit")
