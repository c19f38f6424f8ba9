"""Read a hospital's own scans (DICOM, PNG/JPEG or NIfTI) into 2-D gray images in [0, 1].

One entry point, ``read_scans(settings)``:

1. Walk ``settings.root`` (sorted, recursively; hidden files and folders and the label manifest
   itself are ignored). With ``format="auto"`` each file is read by its kind: ``.png``/``.jpg``/
   ``.jpeg`` as a picture, ``.nii``/``.nii.gz`` as a NIfTI volume, side files (``.txt``,
   ``.csv``, ``.json``, ...) as "not an image file", anything else (DICOM files often have no
   suffix) as DICOM. With ``format="dicom" | "png" | "nifti"`` only that reader is used.
   MONAI's ``PydicomReader`` is not used for DICOM: it applies neither VOI windows, MONOCHROME1
   inversion, palettes nor per-frame functional groups, and identities must be dropped from the
   data set before decoding, which needs the data set in hand.
2. Turn each file into 2-D images, the reader's steps:

   * DICOM: read with pydicom (without the DICM prefix too); skip non-image objects (SEG,
     RTDOSE, SR, RTSTRUCT, PR, ... by SOP Class UID, then Modality), files declaring burned-in
     annotation (text in the pixels: names, dates, the site) and files without pixel data;
     drop every identifying attribute in memory (``client.deidentify.remove_identifiers``) before
     the pixels are decoded; decode (compressed transfer syntaxes through the pylibjpeg, GDCM
     and Pillow plugins); split frames; then per frame:
     gray: Modality LUT (Rescale Slope/Intercept, or the Modality LUT Sequence; per-frame
     functional groups first) to modality units (HU for CT), then the VOI step to [0, 1]:
     ``settings`` window (CT only) > the file's window (first of several; LINEAR, LINEAR_EXACT or
     SIGMOID) > the file's VOI LUT > min-max over all frames of the file; MONOCHROME1 inverted.
     colour: RGB, YBR_* (converted to RGB by pydicom) and PALETTE COLOR (through its LUT) are
     scaled by their maximum code value and reduced to luma, Y = 0.299 R + 0.587 G + 0.114 B.
   * PNG/JPEG (8- or 16-bit): code value / maximum code value; colour reduced to luma as above.
   * NIfTI (MONAI ``LoadImage`` with ``NibabelReader``): a 3-D volume, min-max scaled over the
     whole volume, sliced along ``settings.nifti_axis``; trailing axes of length 1 are dropped.
3. Skip images smaller than ``settings.min_size`` on either side.
4. Label each file: its first subfolder under the root, a CSV manifest (by relative path, or by
   SOP Instance UID for DICOM), a DICOM attribute, or nothing (``label_from="none"``, label 0).
   A label of decimal digits becomes a class index (``int``), anything else stays a class name.

A file that cannot be used is never an error: it becomes a ``SkippedFile`` with a reason from a
fixed vocabulary (below), and its relative path. Reasons and log records never carry a value read
from a file: patient names, IDs and dates stay out of them, and so do pydicom's own messages.
Per-image ``sources`` name the file relative to the root, plus ``#frame N`` (DICOM multi-frame,
1-based as in DICOM) or ``#slice K`` (NIfTI, 0-based voxel index).

``python -m client.sources ROOT [--format F] [--label-from L]`` prints a per-file table.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import UID

from client.deidentify import (
    IDENTIFYING_KEYWORDS,
    TruncatedDicomError,
    pydicom_quiet,
    read_dicom,
    remove_identifiers,
)

log = logging.getLogger(__name__)

FORMATS = ("auto", "dicom", "png", "nifti")
LABEL_FROM = ("subfolder", "csv", "dicom-attribute", "none")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Side files a data folder often holds; with format="auto" they are reported, not parsed.
DOCUMENT_SUFFIXES = (".txt", ".md", ".csv", ".tsv", ".json", ".xml", ".html", ".pdf", ".log")

# The reasons a file is skipped. Those with a parameter are built by the functions below them.
UNREADABLE = "unreadable"
NO_PIXEL_DATA = "no pixel data"
TRUNCATED_FILE = "truncated file"
TRUNCATED_PIXEL_DATA = "truncated pixel data"
NO_LABEL = "no label"
BURNED_IN_ANNOTATION = "burned-in annotation"
NOT_AN_IMAGE_FILE = "not an image file"


def non_image_object(kind: str) -> str:
    return f"non-image object ({kind})"


def incomplete_pixel_description(missing: list[str]) -> str:
    return f"incomplete pixel description (no {', '.join(missing)})"


def undecodable_pixel_data(transfer_syntax: str) -> str:
    return f"undecodable pixel data ({transfer_syntax})"


def unsupported_photometric_interpretation(value: str) -> str:
    return f"unsupported photometric interpretation {value}"


def wrong_dimensionality(detail: str) -> str:
    return f"wrong dimensionality ({detail})"


def below_minimum_size(height: int, width: int, min_size: int) -> str:
    return f"below minimum size ({height}x{width} < {min_size})"


def unknown_label(label: str | int) -> str:
    return f"unknown label {str(label)[:40]!r}"


def not_a_format_file(fmt: str) -> str:
    return f"not a {fmt} file"



@dataclass(frozen=True)
class SkippedFile:
    """A file that gave no image. ``path`` is relative to the data root."""

    path: str
    reason: str


@dataclass
class SourceScans:
    """A hospital's usable images, one entry per 2-D image in each list.

    ``images[i]``: float32 (H, W) in [0, 1], any H and W; ``labels[i]``: class name or index;
    ``modalities[i]``: DICOM Modality, or ``"PNG"``, ``"JPEG"``, ``"NIfTI"``;
    ``sources[i]``: relative path (``#frame N`` / ``#slice K``), for local reports only.
    """

    images: list[np.ndarray] = field(default_factory=list)
    labels: list[str | int] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    def skipped_by_reason(self) -> Counter[str]:
        return Counter(s.reason for s in self.skipped)


@dataclass(frozen=True)
class SourceSettings:
    """Where a hospital's scans are and how to read them.

    ``label_manifest``: CSV with a header ``file,label`` (path relative to ``root``) or
    ``SOPInstanceUID,label``. ``window_center``/``window_width`` (HU) apply to CT only.
    ``class_names``: if given, labels outside it (names not in it, indices out of range) are
    skipped as unknown rather than becoming new classes.
    """

    root: Path
    format: str = "auto"
    label_from: str = "subfolder"
    label_manifest: Path | None = None
    label_attribute: str = "Modality"
    nifti_axis: int = 2
    window_center: float | None = None
    window_width: float | None = None
    min_size: int = 16
    class_names: tuple[str, ...] | None = None


class NoUsableScans(ValueError):
    """A hospital's data folder gave no usable image."""


class _Skip(Exception):
    """Raised by a reader: the file gives no image, for ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _ScanFile:
    """What a reader got from one file: its 2-D images and what labelling needs."""

    images: list[np.ndarray]
    modality: str
    part: str | None = None  # "frame" or "slice" for files with several images
    part_base: int = 0  # number of the first part
    sop_instance_uid: str | None = None
    label_attribute: str | None = None


def read_scans(settings: SourceSettings) -> SourceScans:
    """Read every usable image under ``settings.root``; see the module docstring for the steps.

    Raises ``ValueError`` for bad settings or a bad label manifest (one line naming the setting
    or file); unusable scans are reported in ``SourceScans.skipped`` instead.
    """
    root = Path(settings.root)
    _check_settings(settings)
    manifest = _read_manifest(Path(settings.label_manifest)) if settings.label_from == "csv" else None
    scans = SourceScans()
    for path in scan_files(settings):
        rel = path.relative_to(root).as_posix()
        try:
            label = _label_from_path(rel, settings, manifest)
            scan = _read_file(path, settings)
            if label is None:
                label = _label_from_contents(scan, settings, manifest)
            _check_size(scan.images[0], settings.min_size)
        except _Skip as skip:
            scans.skipped.append(SkippedFile(rel, skip.reason))
            log.debug("skipped %s: %s", rel, skip.reason)
            continue
        except Exception as error:  # noqa: BLE001 -- one bad file never stops the read
            scans.skipped.append(SkippedFile(rel, UNREADABLE))
            log.debug("skipped %s: %s (%s)", rel, UNREADABLE, type(error).__name__)
            continue
        for k, image in enumerate(scan.images):
            scans.images.append(image)
            scans.labels.append(label)
            scans.modalities.append(scan.modality)
            part = f"#{scan.part} {k + scan.part_base}" if scan.part else ""
            scans.sources.append(rel + part)
    log.info(
        "read %d images from %s; skipped %d files%s",
        len(scans.images), root.name or str(root), len(scans.skipped),
        _reason_summary(scans.skipped_by_reason()),
    )
    return scans


def scan_files(settings: SourceSettings) -> list[Path]:
    """The files ``read_scans`` visits, in its order: every file under the root except hidden
    ones and the label manifest. Empty if the root is not a folder."""
    manifest = Path(settings.label_manifest).resolve() if settings.label_manifest else None
    return [path for path in _files_under(Path(settings.root))
            if manifest is None or path.resolve() != manifest]


def require_usable(scans: SourceScans, root: Path) -> None:
    """Raise ``NoUsableScans`` (one line: the folder, skipped files by reason) if ``scans`` is empty."""
    if scans.images:
        return
    if not scans.skipped:
        raise NoUsableScans(f"{root}: no usable images: the folder holds no files")
    raise NoUsableScans(
        f"{root}: no usable images: {len(scans.skipped)} files skipped"
        f"{_reason_summary(scans.skipped_by_reason())}; check the format and label settings"
    )


# --------------------------------------------------------------------------- walking and labels

def _check_settings(settings: SourceSettings) -> None:
    root = Path(settings.root)
    if not root.is_dir():
        raise ValueError(f"{root}: data root is not a folder; set root to the folder of scans")
    if settings.format not in FORMATS:
        raise ValueError(f"format {settings.format!r} is not one of {', '.join(FORMATS)}")
    if settings.label_from not in LABEL_FROM:
        raise ValueError(f"label_from {settings.label_from!r} is not one of {', '.join(LABEL_FROM)}")
    if settings.label_from == "csv" and settings.label_manifest is None:
        raise ValueError("label_from='csv' needs label_manifest, the CSV of file,label rows")
    if settings.label_from == "dicom-attribute":
        keyword = settings.label_attribute
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"label_attribute {keyword!r} is not a DICOM keyword (e.g. Modality)")
        if keyword in IDENTIFYING_KEYWORDS:
            raise ValueError(
                f"label_attribute {keyword!r} identifies patients (PS3.15 Annex E); "
                "use a technical attribute such as Modality or BodyPartExamined"
            )
    if settings.nifti_axis not in (0, 1, 2):
        raise ValueError(f"nifti_axis {settings.nifti_axis} must be 0, 1 or 2")
    if (settings.window_center is None) != (settings.window_width is None):
        raise ValueError("window_center and window_width must be set together (or neither)")
    if settings.window_width is not None and settings.window_width <= 0:
        raise ValueError(f"window_width {settings.window_width} must be positive")
    if settings.min_size < 1:
        raise ValueError(f"min_size {settings.min_size} must be at least 1")


def _files_under(root: Path) -> Iterator[Path]:
    """Every regular file under ``root``, in sorted order, skipping hidden files and folders."""
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                yield Path(folder) / name


@dataclass(frozen=True)
class _Manifest:
    """A label manifest: ``labels`` keyed by relative path (``key == "file"``) or SOP Instance UID."""

    key: str
    labels: dict[str, str]


def _read_manifest(path: Path) -> _Manifest:
    """CSV rows ``key,label`` with key a relative path (header ``file``) or a SOP Instance UID
    (header ``SOPInstanceUID``)."""
    if not path.is_file():
        raise ValueError(f"{path}: label manifest not found; set label_manifest to the CSV file")
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    keys = [c for c in ("file", "sopinstanceuid") if c in header]
    if len(keys) != 1 or "label" not in header:
        raise ValueError(
            f"{path}: label manifest needs a header row 'file,label' or 'SOPInstanceUID,label'"
        )
    key_col, label_col = header.index(keys[0]), header.index("label")
    labels: dict[str, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(key_col, label_col):
            raise ValueError(f"{path}: line {line} has {len(row)} columns, expected {len(header)}")
        key = row[key_col].strip().replace("\\", "/").removeprefix("./")
        label = row[label_col].strip()
        if labels.get(key, label) != label:
            raise ValueError(f"{path}: line {line} gives {key!r} a second, different label")
        labels[key] = label
    return _Manifest("file" if keys[0] == "file" else "SOPInstanceUID", labels)


def _label_from_path(rel: str, settings: SourceSettings, manifest: _Manifest | None):
    """The label a file's path gives (so unlabelled files are not decoded), or None if only
    its contents can tell (a DICOM attribute, a SOP Instance UID)."""
    if settings.label_from == "none":
        return 0
    if settings.label_from == "subfolder":
        return _parse_label(rel.split("/")[0] if "/" in rel else "", settings.class_names)
    if manifest is not None and manifest.key == "file":
        return _parse_label(manifest.labels.get(rel, ""), settings.class_names)
    return None


def _label_from_contents(scan: _ScanFile, settings: SourceSettings, manifest: _Manifest | None):
    if manifest is not None:
        return _parse_label(manifest.labels.get(scan.sop_instance_uid or "", ""), settings.class_names)
    return _parse_label(scan.label_attribute or "", settings.class_names)


def _parse_label(raw: str, class_names: tuple[str, ...] | None) -> str | int:
    """Decimal digits -> class index; else a class name. Empty -> skip; outside class_names -> skip."""
    raw = raw.strip()
    if not raw:
        raise _Skip(NO_LABEL)
    label: str | int = int(raw) if raw.isdecimal() else raw
    if class_names is not None:
        known = 0 <= label < len(class_names) if isinstance(label, int) else label in class_names
        if not known:
            raise _Skip(unknown_label(label))
    return label


def _check_size(image: np.ndarray, min_size: int) -> None:
    height, width = image.shape
    if height < min_size or width < min_size:
        raise _Skip(below_minimum_size(height, width, min_size))


def _reason_summary(by_reason: Counter[str]) -> str:
    if not by_reason:
        return ""
    return " (" + ", ".join(f"{n} {reason}" for reason, n in by_reason.most_common()) + ")"


def _read_file(path: Path, settings: SourceSettings) -> _ScanFile:
    name = path.name.lower()
    kind = settings.format
    if kind == "auto":
        if name.endswith(PICTURE_SUFFIXES):
            kind = "png"
        elif name.endswith(NIFTI_SUFFIXES):
            kind = "nifti"
        elif name.endswith(DOCUMENT_SUFFIXES):
            raise _Skip(NOT_AN_IMAGE_FILE)
        else:
            kind = "dicom"
    elif kind == "png" and not name.endswith(PICTURE_SUFFIXES):
        raise _Skip(not_a_format_file("PNG/JPEG"))
    elif kind == "nifti" and not name.endswith(NIFTI_SUFFIXES):
        raise _Skip(not_a_format_file("NIfTI"))
    if kind == "png":
        return _read_picture(path)
    if kind == "nifti":
        return _read_nifti(path, settings.nifti_axis)
    return _read_dicom(path, settings)


# --------------------------------------------------------------------------- DICOM

# SOP Class UID prefixes of objects that are not images, and the kind each is reported as.
_NON_IMAGE_SOP_CLASSES = (
    ("1.2.840.10008.1.3.10", "DICOMDIR"),
    ("1.2.840.10008.5.1.4.1.1.66.4", "SEG"),
    ("1.2.840.10008.5.1.4.1.1.66.5", "SEG"),  # surface segmentation
    ("1.2.840.10008.5.1.4.1.1.66.6", "TRACTOGRAPHY"),
    ("1.2.840.10008.5.1.4.1.1.66.1", "REG"),
    ("1.2.840.10008.5.1.4.1.1.66.2", "FID"),
    ("1.2.840.10008.5.1.4.1.1.66.3", "REG"),
    ("1.2.840.10008.5.1.4.1.1.66", "RAW"),
    ("1.2.840.10008.5.1.4.1.1.67", "RWV"),
    ("1.2.840.10008.5.1.4.1.1.68.", "SURFACE"),
    ("1.2.840.10008.5.1.4.1.1.481.2", "RTDOSE"),
    ("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT"),
    ("1.2.840.10008.5.1.4.1.1.481.5", "RTPLAN"),
    ("1.2.840.10008.5.1.4.1.1.481.8", "RTPLAN"),  # ion plan
    ("1.2.840.10008.5.1.4.1.1.481.", "RTRECORD"),  # treatment records and other RT objects
    ("1.2.840.10008.5.1.4.1.1.88.59", "KO"),
    ("1.2.840.10008.5.1.4.1.1.88.", "SR"),
    ("1.2.840.10008.5.1.4.1.1.11.", "PR"),
    ("1.2.840.10008.5.1.4.1.1.9.", "WAVEFORM"),
    ("1.2.840.10008.5.1.4.1.1.104.", "DOC"),  # encapsulated PDF, CDA, STL, ...
    ("1.2.840.10008.5.1.4.1.1.200.", "PROTOCOL"),
)
_RT_IMAGE = "1.2.840.10008.5.1.4.1.1.481.1"  # portal images are images
# Modality values of non-image objects, for files whose SOP Class says nothing.
_NON_IMAGE_MODALITIES = frozenset(
    "SEG RTDOSE RTSTRUCT RTPLAN RTRECORD SR PR KO REG FID RWV DOC ECG HD AU PLAN".split()
)
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class _Window:
    center: float
    width: float
    function: str = "LINEAR"


def _read_dicom(path: Path, settings: SourceSettings) -> _ScanFile:
    with pydicom_quiet():
        try:
            ds = read_dicom(path)
        except TruncatedDicomError:
            raise _Skip(TRUNCATED_FILE) from None
        kind = _non_image_kind(ds)
        if kind is not None:
            raise _Skip(non_image_object(kind))
        if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
            raise _Skip(BURNED_IN_ANNOTATION)
        scan = _ScanFile(images=[], modality=_code_string(ds.get("Modality")) or "OT")
        scan.sop_instance_uid = str(ds.get("SOPInstanceUID", "")) or None
        if settings.label_from == "dicom-attribute":
            scan.label_attribute = _attribute_text(ds, settings.label_attribute)
        remove_identifiers(ds)
        frames = _decode_frames(ds)
        scan.images = _frames_to_unit(frames, ds, scan.modality, settings)
    if len(scan.images) > 1:
        scan.part, scan.part_base = "frame", 1
    return scan


def _non_image_kind(ds: Dataset) -> str | None:
    """The kind of non-image object ``ds`` is (its Modality where that names one), or None."""
    file_meta = getattr(ds, "file_meta", None) or {}
    sop_class = str(ds.get("SOPClassUID", "") or file_meta.get("MediaStorageSOPClassUID", ""))
    modality = _code_string(ds.get("Modality"))
    if sop_class and sop_class != _RT_IMAGE:
        for prefix, kind in _NON_IMAGE_SOP_CLASSES:
            if sop_class == prefix or (prefix.endswith(".") and sop_class.startswith(prefix)):
                return modality if modality in _NON_IMAGE_MODALITIES else kind
    return modality if modality in _NON_IMAGE_MODALITIES else None


def _decode_frames(ds: Dataset) -> np.ndarray:
    """Decoded pixels as (frames, rows, columns) or (frames, rows, columns, 3)."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise _Skip(NO_PIXEL_DATA)
    required = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation")
    missing = [k for k in required if ds.get(k) in (None, "")]
    if missing:
        raise _Skip(incomplete_pixel_description(missing))
    if "TransferSyntaxUID" not in ds.file_meta:
        raise _Skip(incomplete_pixel_description(["TransferSyntaxUID"]))
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric not in _MONOCHROME + _COLOUR:
        shown = photometric if _CODE_STRING.fullmatch(photometric) else "(invalid value)"
        raise _Skip(unsupported_photometric_interpretation(shown))
    samples = int(ds.SamplesPerPixel)
    if samples != (1 if photometric in _MONOCHROME + ("PALETTE COLOR",) else 3):
        raise _Skip(wrong_dimensionality(f"{samples} samples per pixel for {photometric}"))
    frames = int(ds.get("NumberOfFrames") or 1)
    transfer_syntax = UID(ds.file_meta.TransferSyntaxUID)
    if "PixelData" in ds and not transfer_syntax.is_compressed:
        bits = int(ds.BitsAllocated)
        expected = (int(ds.Rows) * int(ds.Columns) * frames * samples * bits + 7) // 8
        if photometric == "YBR_FULL_422":
            expected = expected * 2 // 3
        if len(ds.PixelData) < expected:
            raise _Skip(TRUNCATED_PIXEL_DATA)
    try:
        # YBR_FULL / YBR_FULL_422 come back as RGB; frames beyond Number of Frames are dropped
        array = pixel_array(ds, allow_excess_frames=False)
    except Exception:  # noqa: BLE001 -- every decoder plugin refused or failed
        raise _Skip(undecodable_pixel_data(transfer_syntax.name)) from None
    if photometric == "PALETTE COLOR":
        array = apply_color_lut(array, ds)
    colour = photometric in _COLOUR
    if frames == 1:
        array = array[np.newaxis]
    if array.ndim != (4 if colour else 3) or (colour and array.shape[-1] != 3):
        raise _Skip(wrong_dimensionality(f"decoded shape {tuple(array.shape)}"))
    return array


def _frames_to_unit(frames: np.ndarray, ds: Dataset, modality: str, settings: SourceSettings):
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric in _COLOUR:
        if photometric == "PALETTE COLOR":
            top = float(np.iinfo(frames.dtype).max) if frames.dtype.kind == "u" else 1.0
        else:
            top = float(2 ** int(ds.get("BitsStored") or ds.BitsAllocated) - 1)
        gray = (frames.astype(np.float64) / top) @ _LUMA
        return [_finite_unit(g) for g in gray]
    units = [_modality_units(frame, ds, k) for k, frame in enumerate(frames)]
    finite = np.concatenate([u[np.isfinite(u)] for u in units])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    images = []
    for k, u in enumerate(units):
        window = _window_for(ds, k, modality, settings)
        if window is not None:
            unit = _apply_window(u, window)
        elif "VOILUTSequence" in ds:
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            indices = np.rint(np.nan_to_num(u)).astype(np.int64)
            unit = apply_voi_lut(indices, ds, prefer_lut=True) / float(2**bits - 1)
        else:
            unit = (u - lo) / (hi - lo) if hi > lo else np.zeros_like(u)
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit
        images.append(_finite_unit(unit))
    return images


def _modality_units(frame: np.ndarray, ds: Dataset, index: int) -> np.ndarray:
    """Stored values -> modality units (HU for CT): the Modality LUT step of PS3.4 N.2.1."""
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(frame, ds).astype(np.float64)
    slope = _frame_value(ds, index, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _frame_value(ds, index, "PixelValueTransformationSequence", "RescaleIntercept")
    units = frame.astype(np.float64)
    return units * (1.0 if slope is None else float(slope)) + (0.0 if intercept is None else float(intercept))


def _window_for(ds: Dataset, index: int, modality: str, settings: SourceSettings) -> _Window | None:
    if modality == "CT" and settings.window_center is not None:
        return _Window(float(settings.window_center), float(settings.window_width))
    center = _frame_value(ds, index, "FrameVOILUTSequence", "WindowCenter")
    width = _frame_value(ds, index, "FrameVOILUTSequence", "WindowWidth")
    function = _frame_value(ds, index, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR"
    if center is None or width is None:
        return None
    center, width = _first(center), _first(width)
    function = str(function).strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    minimum_width = 1.0 if function == "LINEAR" else 0.0
    if not (np.isfinite(center) and np.isfinite(width) and width > minimum_width):
        return None
    return _Window(center, width, function)


def _apply_window(units: np.ndarray, window: _Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 VOI window, with output range [0, 1]."""
    c, w = window.center, window.width
    if window.function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (units - c) / w, -700, 700)))
    if window.function == "LINEAR_EXACT":
        return np.clip((units - c) / w + 0.5, 0.0, 1.0)
    return np.clip((units - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)


def _frame_value(ds: Dataset, index: int, group: str, keyword: str):
    """``keyword`` for frame ``index``: per-frame functional group, shared group, or top level."""
    for groups_name, item_index in (("PerFrameFunctionalGroupsSequence", index),
                                    ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_name)
        if groups is not None and len(groups) > item_index:
            macro = groups[item_index].get(group)
            if macro is not None and len(macro) and macro[0].get(keyword) not in (None, ""):
                return macro[0].get(keyword)
    value = ds.get(keyword)
    return None if value in (None, "") else value


def _first(value) -> float:
    """The first of several values (PS3.3: the first window is the default one)."""
    return float(value[0] if isinstance(value, (list, tuple, MultiValue)) else value)


def _attribute_text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _code_string(value) -> str | None:
    """A DICOM CS value if it looks like one (so nothing else reaches reports), else None."""
    text = str(value).strip().upper() if value not in (None, "") else ""
    return text if _CODE_STRING.fullmatch(text) else None


def _finite_unit(image: np.ndarray) -> np.ndarray:
    return np.nan_to_num(np.clip(image, 0.0, 1.0), nan=0.0).astype(np.float32)


# --------------------------------------------------------------------------- PNG / JPEG

def _read_picture(path: Path) -> _ScanFile:
    """8/16-bit gray or colour picture -> [0, 1] by its maximum code value; colour -> luma."""
    with Image.open(path) as picture:
        picture.load()
        fmt = "JPEG" if picture.format == "JPEG" else "PNG"
        if picture.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(picture).astype(np.float64)
            top = 65535.0 if picture.mode != "I" or array.max() > 255 else 255.0
            gray = array / top
        elif picture.mode == "F":
            gray = np.asarray(picture, dtype=np.float64)
            lo, hi = float(np.nanmin(gray)), float(np.nanmax(gray))
            gray = (gray - lo) / (hi - lo) if hi > lo else np.zeros_like(gray)
        elif picture.mode in ("L", "1"):
            gray = np.asarray(picture.convert("L"), dtype=np.float64) / 255.0
        else:
            rgb = np.asarray(picture.convert("RGB"), dtype=np.float64) / 255.0
            gray = rgb @ _LUMA
    if gray.ndim != 2:
        raise _Skip(wrong_dimensionality(f"picture of shape {gray.shape}"))
    return _ScanFile(images=[_finite_unit(gray)], modality=fmt)


# --------------------------------------------------------------------------- NIfTI

def _read_nifti(path: Path, axis: int) -> _ScanFile:
    """3-D volume -> its slices along ``axis``, min-max scaled over the whole volume."""
    # MONAI pulls in torch (seconds to import): load it only when a volume is met.
    from monai.transforms import LoadImage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        volume = np.asarray(LoadImage(reader="NibabelReader", image_only=True)(str(path)))
    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise _Skip(wrong_dimensionality(f"{volume.ndim}-D volume {tuple(volume.shape)}, expected 3-D"))
    volume = volume.astype(np.float64)
    finite = volume[np.isfinite(volume)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    unit = (volume - lo) / (hi - lo) if hi > lo else np.zeros_like(volume)
    slices = [_finite_unit(np.take(unit, k, axis=axis)) for k in range(volume.shape[axis])]
    if not slices:
        raise _Skip(wrong_dimensionality(f"no slices along axis {axis}"))
    return _ScanFile(images=slices, modality="NIfTI", part="slice", part_base=0)


# --------------------------------------------------------------------------- per-file table

def outcome_table(scans: SourceScans) -> list[tuple[str, str, str, str]]:
    """(file, outcome, reason, shape) per file: ``loaded N`` with the first image's H x W, or
    ``skipped`` with its reason. Rows in the order the files were read, skipped ones after."""
    loaded: dict[str, tuple[int, str]] = {}
    for source, image in zip(scans.sources, scans.images, strict=True):
        path = source.split("#")[0]
        count, shape = loaded.get(path, (0, f"{image.shape[0]}x{image.shape[1]}"))
        loaded[path] = (count + 1, shape)
    rows = [(p, f"loaded {n}", "", shape) for p, (n, shape) in loaded.items()]
    rows += [(s.path, "skipped", s.reason, "") for s in scans.skipped]
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="List what read_scans makes of a data folder.")
    parser.add_argument("root", type=Path)
    parser.add_argument("--format", default="auto", choices=FORMATS)
    parser.add_argument("--label-from", default="none", choices=LABEL_FROM)
    parser.add_argument("--label-manifest", type=Path)
    parser.add_argument("--label-attribute", default="Modality")
    args = parser.parse_args(argv)
    scans = read_scans(SourceSettings(
        root=args.root, format=args.format, label_from=args.label_from,
        label_manifest=args.label_manifest, label_attribute=args.label_attribute,
    ))
    print("| file | outcome | reason | shape |\n|---|---|---|---|")
    for row in sorted(outcome_table(scans)):
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
