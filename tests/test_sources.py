"""client.sources: every bundled DICOM test file, corrupt inputs, PNG/NIfTI, labels, numbers.

Run as a module from the repository root to print the outcome table for all of pydicom's and
pydicom-data's files: ``python -m tests.test_sources``.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.pixels import apply_modality_lut, apply_windowing

from client.data import preprocess_images
from client.sources import (
    NoUsableScans,
    SkippedFile,
    SourceSettings,
    read_scans,
    require_usable,
)
from shared.config import RunConfig

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _bundled_files() -> dict[str, Path]:
    """Every bundled test file, keyed ``pydicom/<path>`` or ``pydicom-data/<name>``."""
    files = {}
    for name in get_testdata_files():
        path = Path(name)
        if not path.is_file():
            continue  # get_testdata_files also lists folders
        if PYDICOM_FILES in path.parents:
            files[f"pydicom/{path.relative_to(PYDICOM_FILES).as_posix()}"] = path
        else:
            files[f"pydicom-data/{path.name}"] = path
    return dict(sorted(files.items()))


BUNDLED = _bundled_files()
HAVE_LIBJPEG = importlib.util.find_spec("libjpeg") is not None

# Expected reasons for the bundled files that give no image; every other file must load.
EXPECTED_SKIPS = {
    # encapsulated pixel data cut short: pydicom reaches the end before its delimiter
    "pydicom-data/emri_small_jpeg_2k_lossless_too_short.dcm": "truncated file",
    "pydicom-data/liver.dcm": "non-image object (SEG)",
    "pydicom-data/liver_expb.dcm": "non-image object (SEG)",
    "pydicom/ExplVR_BigEndNoMeta.dcm": "non-image object (RTPLAN)",
    "pydicom/ExplVR_LitEndNoMeta.dcm": "non-image object (RTPLAN)",
    # a bad JPEG codestream; JPGExtended.dcm is its fixed version (pydicom's own reference)
    "pydicom/JPEG-lossy.dcm": "undecodable pixel data (JPEG Extended (Process 2 and 4))",
    "pydicom/JPEG2000-embedded-sequence-delimiter.dcm":
        "undecodable pixel data (JPEG 2000 Image Compression)",
    "pydicom/JPEGLSNearLossless_08.dcm": "below minimum size (45x10 < 16)",
    "pydicom/JPEGLSNearLossless_16.dcm": "below minimum size (50x10 < 16)",
    "pydicom/MR_truncated.dcm": "truncated file",
    "pydicom/README.txt": "unreadable",
    "pydicom/SC_rgb_small_odd.dcm": "below minimum size (3x3 < 16)",
    "pydicom/SC_rgb_small_odd_big_endian.dcm": "below minimum size (3x3 < 16)",
    "pydicom/SC_rgb_small_odd_jpeg.dcm": "below minimum size (3x3 < 16)",
    "pydicom/UN_sequence.dcm": "no pixel data",
    "pydicom/badVR.dcm": "non-image object (RTDOSE)",
    "pydicom/crayons.icc": "unreadable",
    "pydicom/dicomdirtests/DICOMDIR": "non-image object (DICOMDIR)",
    "pydicom/dicomdirtests/DICOMDIR-bigEnd": "non-image object (DICOMDIR)",
    "pydicom/dicomdirtests/DICOMDIR-empty.dcm": "non-image object (DICOMDIR)",
    "pydicom/dicomdirtests/DICOMDIR-implicit": "non-image object (DICOMDIR)",
    "pydicom/dicomdirtests/DICOMDIR-nooffset": "non-image object (DICOMDIR)",
    "pydicom/dicomdirtests/DICOMDIR-nopatient": "non-image object (DICOMDIR)",
    "pydicom/dicomdirtests/DICOMDIR-reordered": "non-image object (DICOMDIR)",
    "pydicom/dicomdirtests/README.txt": "unreadable",
    "pydicom/dicomdirtests/TINY_ALPHA/DICOMDIR": "non-image object (DICOMDIR)",
    "pydicom/dicomdirtests/TINY_ALPHA/README": "unreadable",
    "pydicom/empty_charset_LEI.dcm": "no pixel data",
    "pydicom/liver_1frame.dcm": "non-image object (SEG)",
    "pydicom/liver_expb_1frame.dcm": "non-image object (SEG)",
    "pydicom/meta_missing_tsyntax.dcm": "incomplete pixel description "
        "(no Rows, Columns, BitsAllocated, SamplesPerPixel, PhotometricInterpretation)",
    "pydicom/nested_priv_SQ.dcm": "incomplete pixel description "
        "(no Rows, Columns, BitsAllocated, SamplesPerPixel, PhotometricInterpretation)",
    "pydicom/no_meta.dcm": "unreadable",
    "pydicom/no_meta_group_length.dcm": "no pixel data",
    "pydicom/priv_SQ.dcm": "no pixel data",
    "pydicom/reportsi.dcm": "non-image object (SR)",
    "pydicom/reportsi_with_empty_number_tags.dcm": "non-image object (SR)",
    "pydicom/rtdose.dcm": "non-image object (RTDOSE)",
    "pydicom/rtdose_1frame.dcm": "non-image object (RTDOSE)",
    "pydicom/rtdose_expb.dcm": "non-image object (RTDOSE)",
    "pydicom/rtdose_expb_1frame.dcm": "non-image object (RTDOSE)",
    "pydicom/rtdose_rle.dcm": "non-image object (RTDOSE)",
    "pydicom/rtdose_rle_1frame.dcm": "non-image object (RTDOSE)",
    "pydicom/rtplan.dcm": "non-image object (RTPLAN)",
    "pydicom/rtplan.dump": "unreadable",
    "pydicom/rtplan_truncated.dcm": "truncated file",
    "pydicom/rtstruct.dcm": "non-image object (RTSTRUCT)",
    "pydicom/rtstruct.dump": "unreadable",
    "pydicom/test-SR.dcm": "non-image object (SR)",
    "pydicom/test1.json": "unreadable",
    "pydicom/test_PN.json": "unreadable",
    "pydicom/waveform_ecg.dcm": "non-image object (ECG)",
    "pydicom/zipMR.gz": "unreadable",
}
# The 50 images of the DICOMDIR example are headers only.
TINY_ALPHA_IMAGES = re.compile(r"pydicom/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM")
if not HAVE_LIBJPEG:  # pylibjpeg-libjpeg is the only decoder here for 12-bit JPEG Extended
    EXPECTED_SKIPS["pydicom/JPGExtended.dcm"] = (
        "undecodable pixel data (JPEG Extended (Process 2 and 4))"
    )
# Files that take seconds to decode on a small machine (multi-frame colour, 2k x 2k).
SLOW = {"pydicom-data/color3d_jpeg_baseline.dcm"}


def _expected_skip(key: str) -> str | None:
    if TINY_ALPHA_IMAGES.match(key):
        return "no pixel data"
    return EXPECTED_SKIPS.get(key)


def _one_file_root(tmp_path: Path, source: Path, name: str) -> Path:
    root = tmp_path / "scans"
    root.mkdir()
    os.symlink(source, root / name)
    return root


@pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")  # the oracle's own read
@pytest.mark.parametrize(
    "key",
    [pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k for k in BUNDLED],
)
def test_every_bundled_file_loads_or_is_skipped_with_its_reason(key, tmp_path):
    source = BUNDLED[key]
    name = source.name
    scans = read_scans(SourceSettings(_one_file_root(tmp_path, source, name), format="dicom",
                                      label_from="none"))
    expected = _expected_skip(key)
    if expected is not None:
        assert scans.images == []
        assert scans.skipped == [SkippedFile(name, expected)]
        return
    assert scans.skipped == []
    header = pydicom.dcmread(source, stop_before_pixels=True, force=True)
    assert len(scans.images) == int(header.get("NumberOfFrames") or 1)
    for image in scans.images:
        assert image.dtype == np.float32
        assert image.shape == (header.Rows, header.Columns)
        assert np.all(np.isfinite(image))
        assert image.min() >= 0.0 and image.max() <= 1.0
    assert scans.labels == [0] * len(scans.images)
    assert scans.modalities == [str(header.get("Modality") or "OT")] * len(scans.images)
    # and through training's preprocessing, at each model size
    for size in (28, 64):
        tensor = preprocess_images(scans.images, RunConfig.from_flat({"image-size": size}))
        assert tensor.dtype == torch.float32
        assert tuple(tensor.shape) == (len(scans.images), 1, size, size)
        assert bool(torch.isfinite(tensor).all())
        assert tensor.min() >= -1.0 and tensor.max() <= 1.0


def test_every_expected_skip_names_a_bundled_file():
    assert set(EXPECTED_SKIPS) <= set(BUNDLED)


# --------------------------------------------------------------------------- numbers

def _copy(source: str, root: Path, rel: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(get_testdata_file(source), path)
    return path


def test_ct_window_from_settings_matches_pydicoms_windowing(tmp_path):
    _copy("CT_small.dcm", tmp_path, "ct.dcm")
    scans = read_scans(SourceSettings(tmp_path, label_from="none",
                                      window_center=40.0, window_width=400.0))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40.0, 400.0
    hu = apply_modality_lut(ds.pixel_array, ds)
    assert ds.RescaleIntercept == -1024 and hu.min() < 40 - 200 < 40 + 200 < hu.max()
    # pydicom maps the window onto the range of the modality LUT's output type; rescale it
    windowed = apply_windowing(hu, ds)
    expected = (windowed - windowed.min()) / (windowed.max() - windowed.min())
    np.testing.assert_allclose(scans.images[0], expected, atol=1e-6)


def test_file_window_is_used_and_settings_window_only_for_ct(tmp_path):
    _copy("MR_small.dcm", tmp_path, "mr.dcm")  # MR, window 600/1600 in the file
    with_settings = read_scans(SourceSettings(tmp_path, label_from="none",
                                              window_center=40.0, window_width=400.0))
    without = read_scans(SourceSettings(tmp_path, label_from="none"))
    np.testing.assert_array_equal(with_settings.images[0], without.images[0])
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    x = ds.pixel_array.astype(np.float64)  # no rescale in this file
    expected = np.clip((x - 599.5) / 1599.0 + 0.5, 0.0, 1.0)  # PS3.3 C.11.2.1.2.1, c=600, w=1600
    np.testing.assert_allclose(without.images[0], expected, atol=1e-6)


def test_monochrome1_is_inverted(tmp_path):
    # the same pixels, once declared MONOCHROME2 and once MONOCHROME1
    ds = pydicom.dcmread(_copy("CT_small.dcm", tmp_path, "a/mono2.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "a" / "mono1.dcm")
    scans = read_scans(SourceSettings(tmp_path, label_from="none"))
    by_source = dict(zip(scans.sources, scans.images))
    np.testing.assert_allclose(by_source["a/mono1.dcm"], 1.0 - by_source["a/mono2.dcm"], atol=1e-6)


def test_rgb_becomes_luma_like_pillows_gray(tmp_path):
    _copy("SC_rgb.dcm", tmp_path, "rgb.dcm")
    scans = read_scans(SourceSettings(tmp_path, label_from="none"))
    rgb = pydicom.dcmread(get_testdata_file("SC_rgb.dcm")).pixel_array
    pillow_gray = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float64) / 255
    np.testing.assert_allclose(scans.images[0], pillow_gray, atol=1 / 255)


def test_multi_frame_is_split_into_numbered_frames(tmp_path):
    _copy("emri_small.dcm", tmp_path, "mr/emri.dcm")
    scans = read_scans(SourceSettings(tmp_path, label_from="subfolder"))
    assert scans.sources == [f"mr/emri.dcm#frame {k}" for k in range(1, 11)]
    assert scans.labels == ["mr"] * 10 and scans.modalities == ["MR"] * 10
    frames = pydicom.dcmread(get_testdata_file("emri_small.dcm")).pixel_array
    assert not np.array_equal(scans.images[0], scans.images[5])
    assert np.argmax(frames.sum(axis=(1, 2))) == np.argmax([i.sum() for i in scans.images])


# --------------------------------------------------------------------------- corrupt inputs

def _nifti(path: Path, volume: np.ndarray) -> None:
    nib.Nifti1Image(volume.astype(np.float32), np.eye(4)).to_filename(str(path))


def test_corrupt_inputs_are_skipped_with_their_reason_and_the_rest_loads(tmp_path):
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    _copy("CT_small.dcm", tmp_path, "good/ct.dcm")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "header_cut.dcm").write_bytes(ct[:1000])
    (tmp_path / "bad" / "pixels_cut.dcm").write_bytes(ct[:-6000])
    (tmp_path / "bad" / "empty.dcm").write_bytes(b"")
    (tmp_path / "bad" / "notes.dcm").write_text("not an image, just notes\n")
    (tmp_path / "bad" / "README.txt").write_text("scans exported 2024\n")
    rng = np.random.default_rng(0)
    _nifti(tmp_path / "good" / "volume.nii.gz", rng.normal(size=(20, 24, 3)))
    _nifti(tmp_path / "bad" / "series_4d.nii.gz", rng.normal(size=(20, 20, 4, 3)))
    _nifti(tmp_path / "bad" / "flat_2d.nii", rng.normal(size=(20, 20)))
    (tmp_path / "bad" / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "bad" / "tiny.png")
    Image.fromarray(np.arange(32 * 40, dtype=np.uint8).reshape(32, 40)).save(tmp_path / "good" / "ok.png")

    scans = read_scans(SourceSettings(tmp_path, label_from="none"))

    assert sorted(scans.skipped, key=lambda s: s.path) == [
        SkippedFile("bad/README.txt", "not an image file"),
        SkippedFile("bad/broken.nii.gz", "unreadable"),
        SkippedFile("bad/empty.dcm", "unreadable"),
        SkippedFile("bad/flat_2d.nii", "wrong dimensionality (2-D volume (20, 20), expected 3-D)"),
        SkippedFile("bad/header_cut.dcm", "truncated file"),
        SkippedFile("bad/notes.dcm", "unreadable"),
        SkippedFile("bad/pixels_cut.dcm", "truncated file"),
        SkippedFile("bad/series_4d.nii.gz",
                    "wrong dimensionality (4-D volume (20, 20, 4, 3), expected 3-D)"),
        SkippedFile("bad/tiny.png", "below minimum size (8x8 < 16)"),
    ]
    assert scans.sources == ["good/ct.dcm", "good/ok.png", "good/volume.nii.gz#slice 0",
                             "good/volume.nii.gz#slice 1", "good/volume.nii.gz#slice 2"]
    assert scans.modalities == ["CT", "PNG", "NIfTI", "NIfTI", "NIfTI"]


def test_pixel_data_shorter_than_rows_times_columns_is_truncated_pixel_data(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = ds.PixelData[:-512]  # a complete element, but too short for 128 x 128
    ds.save_as(tmp_path / "short.dcm")
    scans = read_scans(SourceSettings(tmp_path, label_from="none"))
    assert scans.skipped == [SkippedFile("short.dcm", "truncated pixel data")]


def test_nifti_slices_along_the_chosen_axis_scaled_per_volume(tmp_path):
    volume = np.arange(20 * 24 * 18, dtype=np.float64).reshape(20, 24, 18) - 100.0
    _nifti(tmp_path / "v.nii.gz", volume)
    unit = (volume - volume.min()) / (volume.max() - volume.min())
    along_2 = read_scans(SourceSettings(tmp_path, label_from="none", format="nifti"))
    assert len(along_2.images) == 18
    for k in (0, 7, 17):
        np.testing.assert_allclose(along_2.images[k], unit[:, :, k], atol=1e-6)
    along_0 = read_scans(SourceSettings(tmp_path, label_from="none", nifti_axis=0))
    assert [i.shape for i in along_0.images] == [(24, 18)] * 20
    np.testing.assert_allclose(along_0.images[3], unit[3], atol=1e-6)


def test_thin_volume_sliced_on_the_wrong_axis_is_below_minimum_size(tmp_path):
    _nifti(tmp_path / "thin.nii.gz", np.random.default_rng(1).normal(size=(64, 64, 4)))
    right = read_scans(SourceSettings(tmp_path, label_from="none", nifti_axis=2))
    wrong = read_scans(SourceSettings(tmp_path, label_from="none", nifti_axis=0))
    assert len(right.images) == 4 and right.skipped == []
    assert wrong.images == [] and wrong.skipped == [
        SkippedFile("thin.nii.gz", "below minimum size (64x4 < 16)")]


def test_a_dicom_of_8x8_pixels_is_below_minimum_size(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    corner = ds.pixel_array[:8, :8].copy()
    ds.Rows = ds.Columns = 8
    ds.PixelData = corner.tobytes()
    ds.save_as(tmp_path / "small.dcm")
    scans = read_scans(SourceSettings(tmp_path, label_from="none"))
    assert scans.skipped == [SkippedFile("small.dcm", "below minimum size (8x8 < 16)")]


def test_pydicoms_own_log_records_stay_out_of_the_nodes_log(tmp_path, caplog):
    # every decoder plugin fails on this file, and pydicom's decoders log each failure
    # (with a traceback) through child loggers of "pydicom"
    _copy("JPEG-lossy.dcm", tmp_path, "a.dcm")
    caplog.set_level(logging.DEBUG)
    level = logging.getLogger("pydicom").level
    scans = read_scans(SourceSettings(tmp_path, label_from="none"))
    assert [s.reason for s in scans.skipped] == [
        "undecodable pixel data (JPEG Extended (Process 2 and 4))"]
    assert [r.name for r in caplog.records if r.name.startswith("pydicom")] == []
    assert logging.getLogger("pydicom").level == level  # restored afterwards


def test_no_usable_images_gives_one_clear_line(tmp_path):
    (tmp_path / "a.dcm").write_text("nope")
    (tmp_path / "b.dcm").write_bytes(b"")
    _copy("rtdose.dcm", tmp_path, "dose.dcm")
    scans = read_scans(SourceSettings(tmp_path, label_from="none"))
    with pytest.raises(NoUsableScans) as error:
        require_usable(scans, tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path}: no usable images: 3 files skipped")
    assert "2 unreadable" in message and "1 non-image object (RTDOSE)" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoUsableScans, match=f"^{re.escape(str(empty))}: .* holds no files$"):
        require_usable(read_scans(SourceSettings(empty, label_from="none")), empty)


def test_require_usable_passes_when_there_are_images(tmp_path):
    _copy("CT_small.dcm", tmp_path, "ct.dcm")
    require_usable(read_scans(SourceSettings(tmp_path, label_from="none")), tmp_path)


# --------------------------------------------------------------------------- PNG and labels

def test_png_folders_give_labels_16_bit_and_colour(tmp_path):
    for folder in ("normal", "pneumonia"):
        (tmp_path / folder).mkdir()
    deep = np.tile(np.array([0, 1000, 65535], dtype=np.uint16), (20, 7))  # 20 x 21, 16-bit
    Image.fromarray(deep).save(tmp_path / "normal" / "deep.png")
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "pneumonia" / "red.png")
    Image.fromarray(rgb).save(tmp_path / "pneumonia" / "red.jpg", quality=100)
    Image.fromarray(rgb).save(tmp_path / "unlabelled.png")

    scans = read_scans(SourceSettings(tmp_path, format="png"))

    assert scans.sources == ["normal/deep.png", "pneumonia/red.jpg", "pneumonia/red.png"]
    assert scans.labels == ["normal", "pneumonia", "pneumonia"]
    assert scans.modalities == ["PNG", "JPEG", "PNG"]
    assert scans.skipped == [SkippedFile("unlabelled.png", "no label")]
    np.testing.assert_allclose(scans.images[0], deep / 65535.0, atol=1e-7)
    np.testing.assert_allclose(scans.images[2], np.full((20, 20), 0.299 * 200 / 255), atol=1e-6)
    np.testing.assert_allclose(scans.images[1], scans.images[2], atol=3 / 255)


def test_csv_manifest_labels_by_path_and_by_sop_instance_uid(tmp_path):
    _copy("CT_small.dcm", tmp_path, "scans/ct.dcm")
    _copy("MR_small.dcm", tmp_path, "scans/mr.dcm")
    _copy("emri_small.dcm", tmp_path, "scans/unlisted.dcm")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "scans" / "x.png")
    by_path = tmp_path / "scans" / "labels.csv"  # inside the root: not read as a scan
    by_path.write_text("file,label\nct.dcm,1\nx.png,tumour\n")
    mr_uid = pydicom.dcmread(get_testdata_file("MR_small.dcm")).SOPInstanceUID
    by_uid = tmp_path / "by_uid.csv"
    with by_uid.open("w", newline="") as f:
        csv.writer(f).writerows([["SOPInstanceUID", "label"], [mr_uid, "0"]])

    scans = read_scans(SourceSettings(tmp_path / "scans", label_from="csv", label_manifest=by_path))
    assert dict(zip(scans.sources, scans.labels)) == {"ct.dcm": 1, "x.png": "tumour"}
    assert sorted(s.path for s in scans.skipped) == ["mr.dcm", "unlisted.dcm"]
    assert {s.reason for s in scans.skipped} == {"no label"}

    scans = read_scans(SourceSettings(tmp_path / "scans", label_from="csv", label_manifest=by_uid))
    assert dict(zip(scans.sources, scans.labels)) == {"mr.dcm": 0}


def test_labels_from_a_dicom_attribute_and_unknown_labels(tmp_path):
    _copy("CT_small.dcm", tmp_path, "ct.dcm")
    _copy("MR_small.dcm", tmp_path, "mr.dcm")
    scans = read_scans(SourceSettings(tmp_path, label_from="dicom-attribute",
                                      label_attribute="Modality", class_names=("CT", "CR")))
    assert dict(zip(scans.sources, scans.labels)) == {"ct.dcm": "CT"}
    assert scans.skipped == [SkippedFile("mr.dcm", "unknown label 'MR'")]


def test_identifying_label_attribute_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'PatientName' identifies patients"):
        read_scans(SourceSettings(tmp_path, label_from="dicom-attribute",
                                  label_attribute="PatientName"))


def test_bad_manifest_names_the_file_and_the_fix(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("name,class\na.dcm,1\n")
    with pytest.raises(ValueError, match=r"m\.csv: label manifest needs a header row 'file,label'"):
        read_scans(SourceSettings(tmp_path, label_from="csv", label_manifest=manifest))


def _print_outcome_table(image_size: int = 28) -> None:
    """Markdown table of what training's loader makes of every bundled file, one at a time:
    loaded (a finite (N, 1, S, S) tensor in [-1, 1]), skipped with its reason, or crashed."""
    import tempfile
    from collections import Counter

    from client.data import NoUsableData, load_hospital
    from client.node import Hospital

    cfg = RunConfig.from_flat({"image-size": image_size})
    rows, counts = [], Counter()
    for key, path in BUNDLED.items():
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "scans"
            root.mkdir()
            os.symlink(path, root / path.name)
            hospital = Hospital("table", root, Path(tmp) / "state", float("inf"), 1e-5,
                                source=SourceSettings(root, format="dicom", label_from="none"),
                                preprocess_cache=False)
            try:
                data = load_hospital(hospital, cfg)
            except NoUsableData as e:
                reason = e.skipped[0].reason
                rows.append((key, "skipped", reason))
                counts[f"skipped: {reason}"] += 1
                continue
            except Exception as e:  # noqa: BLE001 -- what the table is for
                rows.append((key, "CRASHED", type(e).__name__))
                counts["crashed"] += 1
                continue
        images = data.images
        good = (tuple(images.shape[1:]) == (1, image_size, image_size)
                and bool(torch.isfinite(images).all())
                and images.min() >= -1.0 and images.max() <= 1.0)
        (h, w), n = data.sizes[0], len(data)
        rows.append((key, "loaded" if good else "BAD TENSOR",
                     f"{n} image{'s' * (n > 1)} {h}x{w} {data.modalities[0]} -> "
                     f"({n}, 1, {image_size}, {image_size})"))
        counts["loaded" if good else "bad tensor"] += 1
    print(f"What `client.data.load_hospital` (image-size {image_size}, data-format dicom) makes "
          f"of each of the {len(BUNDLED)} files of pydicom {pydicom.__version__}'s bundled test "
          "files and the pydicom-data package, one file at a time "
          "(`python -m tests.test_sources > tests/bundled-dicom-files.md`).\n")
    for outcome, n in sorted(counts.items(), key=lambda c: (not c[0].startswith("loaded"), c[0])):
        print(f"- {outcome}: {n}")
    print("\n| file | outcome | images or reason |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    _print_outcome_table()
