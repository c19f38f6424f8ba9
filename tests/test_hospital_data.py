"""A hospital's folder of scans into training: node config, labels, the cache, the commands."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

import client.data as data_mod
from client.app import hospital_data
from client.data import DataError, NoUsableData, load_hospital, preprocess_images
from client.node import Hospital
from server.dicom_export import PRIVATE_CREATOR, PRIVATE_GROUP
from shared.cli import app as cli
from shared.config import ConfigError, RunConfig

CT, MR = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")


@pytest.fixture
def scans(tmp_path: Path) -> Path:
    """CT/ (2 CT_small), MR/ (2 MR_small + a wide PNG), US/ (an unknown class), bad files."""
    root = tmp_path / "scans"
    for folder in ("CT", "MR", "US"):
        (root / folder).mkdir(parents=True)
    for k in range(2):
        shutil.copy(CT, root / "CT" / f"ct{k}.dcm")
        shutil.copy(MR, root / "MR" / f"mr{k}.dcm")
    wide = np.zeros((20, 40), np.uint8)
    wide[:, 20:] = 255
    Image.fromarray(wide).save(root / "MR" / "wide.png")
    shutil.copy(MR, root / "US" / "us0.dcm")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "CT" / "tiny.png")
    (root / "CT" / "notes.dcm").write_text("not a DICOM file\n")
    (root / "CT" / "empty.dcm").write_bytes(b"")
    return root


def _cfg(**overrides) -> RunConfig:
    values = {"class-names": "CT,MR", "image-size": 28}
    values.update(overrides)
    return RunConfig.from_flat(values)


def _hospital(root: Path, state: Path, cfg: RunConfig, **node) -> Hospital:
    config = {"data-path": str(root), "state-dir": str(state), "epsilon": 10.0, **node}
    return Hospital.from_node_config(config, cfg)


def test_folder_loads_with_labels_from_class_names_and_reports_skips(scans, tmp_path):
    cfg = _cfg()
    data = load_hospital(_hospital(scans, tmp_path / "state", cfg), cfg)
    assert data.images.shape == (5, 1, 28, 28) and data.images.dtype == torch.float32
    assert data.images.min() >= -1 and data.images.max() <= 1
    assert data.labels.tolist() == [0, 0, 1, 1, 1]
    assert data.modalities == ["CT", "CT", "MR", "MR", "PNG"]
    assert data.sizes == [(128, 128)] * 2 + [(64, 64)] * 2 + [(20, 40)]
    assert {s.path: s.reason for s in data.skipped} == {
        "CT/empty.dcm": "unreadable",
        "CT/notes.dcm": "unreadable",
        "CT/tiny.png": "below minimum size (8x8 < 16)",
        "US/us0.dcm": "unknown label 'US'",
    }
    # the 20x40 picture keeps its aspect ratio: 14x28 in the middle, black bands around
    wide = data.images[4, 0]
    assert torch.all(wide[:7] == -1) and torch.all(wide[21:] == -1)
    assert torch.all(wide[7:21, :14] == -1) and torch.all(wide[7:21, 14:] == 1)


def test_preprocessing_of_square_images_is_a_plain_area_resize():
    image = np.random.default_rng(0).uniform(size=(56, 56)).astype(np.float32)
    expected = image.reshape(28, 2, 28, 2).mean(axis=(1, 3)) * 2 - 1
    out = preprocess_images([image], _cfg())
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-6)


def test_node_config_chooses_labels_and_window(scans, tmp_path):
    manifest = scans / "labels.csv"
    manifest.write_text("file,label\nCT/ct0.dcm,MR\nMR/mr1.dcm,1\n")
    cfg = _cfg()
    by_csv = load_hospital(_hospital(scans, tmp_path / "s1", cfg, **{
        "label-from": "csv", "label-manifest": "labels.csv"}), cfg)
    assert by_csv.labels.tolist() == [1, 1]  # the manifest is read, not turned into a file
    assert {s.reason for s in by_csv.skipped} >= {"no label"}

    by_attribute = load_hospital(_hospital(scans, tmp_path / "s2", cfg, **{
        "label-from": "dicom-attribute", "label-attribute": "Modality",
        "window-center": 40, "window-width": 80}), cfg)
    assert by_attribute.labels.tolist() == [0, 0, 1, 1, 1]  # US/us0.dcm is an MR file
    plain = load_hospital(_hospital(scans, tmp_path / "s3", cfg), cfg)
    assert not torch.equal(by_attribute.images[0], plain.images[0])  # the CT window applied
    assert torch.equal(by_attribute.images[2], plain.images[2])      # MR: no CT window


@pytest.mark.parametrize("node, message", [
    ({"data-format": "jpeg2000"}, "data-format = 'jpeg2000'"),
    ({"label-from": "csv"}, "needs label-manifest"),
    ({"window-center": 40}, "set together"),
    ({"nifti-axis": 3}, "nifti-axis = 3"),
    ({"min-size": "big"}, "min-size = 'big': expected int"),
    ({"label-attribute": "PatientName"}, "identifies patients"),
    ({"label-attribute": "NoSuchKeyword"}, "not a DICOM keyword"),
    ({"preprocess-cache": "maybe"}, "expected true or false"),
])
def test_bad_node_config_is_one_line_naming_the_key(scans, tmp_path, node, message):
    with pytest.raises(ConfigError, match=message):
        _hospital(scans, tmp_path, _cfg(), **node)


def test_no_usable_image_raises_with_every_reason(scans, tmp_path):
    cfg = _cfg(**{"class-names": "XR"})
    with pytest.raises(NoUsableData, match="no usable images: 9 files skipped") as raised:
        load_hospital(_hospital(scans, tmp_path / "state", cfg), cfg)
    assert len(raised.value.skipped) == 9
    assert isinstance(raised.value, DataError)


def test_cache_is_hit_then_invalidated_by_a_touched_file_or_a_new_image_size(
        scans, tmp_path, monkeypatch):
    cfg = _cfg()
    hospital = _hospital(scans, tmp_path / "state", cfg)
    first = load_hospital(hospital, cfg)
    assert first.cache == "written"
    cache_files = list((tmp_path / "state" / "cache").glob("scans-*.pt"))
    assert len(cache_files) == 1
    assert oct(cache_files[0].stat().st_mode & 0o777) == oct(0o600)

    reads = []
    real = data_mod.read_scans
    monkeypatch.setattr(data_mod, "read_scans", lambda s: reads.append(1) or real(s))
    second = load_hospital(hospital, cfg)
    assert second.cache == "hit" and reads == []
    assert torch.equal(second.images, first.images) and torch.equal(second.labels, first.labels)
    assert second.skipped == first.skipped and second.sizes == first.sizes
    assert second.modalities == first.modalities

    stat = (scans / "CT" / "ct1.dcm").stat()
    os.utime(scans / "CT" / "ct1.dcm", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert load_hospital(hospital, cfg).cache == "written" and reads == [1]
    assert load_hospital(hospital, cfg).cache == "hit" and reads == [1]

    bigger = _cfg(**{"image-size": 64})
    data64 = load_hospital(hospital, bigger)
    assert data64.cache == "written" and data64.images.shape[-1] == 64 and reads == [1, 1]
    (scans / "MR" / "mr1.dcm").unlink()
    assert len(load_hospital(hospital, cfg)) == 4 and reads == [1, 1, 1]

    # the cache holds no file name (skips are kept by position in the file list)
    for cache_file in (tmp_path / "state" / "cache").glob("*"):
        raw = cache_file.read_bytes()
        assert not any(name.encode() in raw for name in ("ct1", "notes", "tiny", "us0", "wide"))


def test_cache_can_be_turned_off(scans, tmp_path):
    cfg = _cfg()
    data = load_hospital(_hospital(scans, tmp_path / "state", cfg, **{"preprocess-cache": False}), cfg)
    assert data.cache == "off" and not (tmp_path / "state" / "cache").exists()


def test_training_sees_a_data_error_without_its_local_detail(scans, tmp_path, caplog):
    cfg = _cfg(**{"class-names": "XR"})
    hospital = _hospital(scans, tmp_path / "state", cfg, **{"hospital-id": "h7"})
    with caplog.at_level(logging.ERROR), pytest.raises(DataError) as raised:
        hospital_data(hospital, cfg)
    assert str(raised.value).startswith("h7: the node's data cannot be used")
    assert "scans" not in str(raised.value) and "unknown label" not in str(raised.value)
    assert "unknown label" in caplog.text  # the detail stays in the node's own log


# --------------------------------------------------------------------------- commands

def test_check_data_prints_counts_skips_and_a_preview_and_warms_the_training_cache(scans, tmp_path):
    state = tmp_path / "state"
    node = f"data-path='{scans}' state-dir='{state}' epsilon=3.0"
    result = CliRunner().invoke(cli, ["client", "check-data", "--node-config", node,
                                      "--class-names", "CT,MR", "--image-size", "28"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "usable images: 5 (preprocessing cache: written)" in out
    lines = [line.split() for line in out.splitlines()]
    assert ["class", "CT", "MR", "PNG", "total"] in lines
    assert ["CT", "2", "0", "0", "2"] in lines and ["MR", "0", "2", "1", "3"] in lines
    assert "128x128 (2), 64x64 (2), 20x40 (1)" in out
    assert "  US/us0.dcm: unknown label 'US'" in out
    assert "  CT/tiny.png: below minimum size (8x8 < 16)" in out
    preview = state / "check-data-preview.png"
    assert f"preview: {preview}" in out
    with Image.open(preview) as image:  # 2 rows of 8 images of 28 px, 2 px gaps, x3
        assert image.size == (3 * (8 * 30 + 2), 3 * (2 * 30 + 2))

    # training reads the same thing, through the same loader: straight from that cache
    cfg = _cfg()
    trained = hospital_data(Hospital.from_node_config(
        {"data-path": str(scans), "state-dir": str(state), "epsilon": 3.0}, cfg), cfg)
    assert trained.cache == "hit" and len(trained) == 5


def test_check_data_options_override_the_node_config(scans, tmp_path):
    node = f"data-path='{tmp_path / 'elsewhere'}' state-dir='{tmp_path / 'state'}'"
    result = CliRunner().invoke(cli, [
        "client", "check-data", "--node-config", node, "--data-path", str(scans),
        "--label-from", "dicom-attribute", "--class-names", "CT,MR"])
    assert result.exit_code == 0, result.output
    assert "labels from dicom-attribute" in result.output
    assert "usable images: 5" in result.output


def test_check_data_exits_1_listing_every_skip_when_nothing_is_usable(scans, tmp_path):
    result = CliRunner().invoke(cli, [
        "client", "check-data", "--data-path", str(scans), "--state-dir", str(tmp_path / "s"),
        "--class-names", "XR"])
    assert result.exit_code == 1
    assert "skipped 9 files" in result.output
    assert "  CT/ct0.dcm: unknown label 'CT'" in result.output
    assert "no usable images" in result.output
    bad = CliRunner().invoke(cli, ["client", "check-data", "--data-path", str(scans),
                                   "--state-dir", str(tmp_path), "--label-from", "filename"])
    assert bad.exit_code == 2 and "label-from = 'filename'" in bad.output


def test_deidentify_command_writes_a_clean_copy_and_a_summary(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    ds = pydicom.dcmread(CT)
    ds.PatientName, ds.PatientID = "QZX^MARKER", "QZX-ID-77"
    ds.save_as(src / "a.dcm")
    (src / "readme.txt").write_text("hello")
    salt = tmp_path / "salt"
    result = CliRunner().invoke(cli, ["client", "deidentify", str(src), str(dst),
                                      "--salt-file", str(salt)])
    assert result.exit_code == 0, result.output
    assert f"de-identified 1 files into {dst}" in result.output
    assert "not copied: 1 not DICOM" in result.output
    assert b"QZX" not in (dst / "a.dcm").read_bytes()
    out = pydicom.dcmread(dst / "a.dcm")
    assert out.PatientIdentityRemoved == "YES"
    assert len(salt.read_bytes()) == 32 and oct(salt.stat().st_mode & 0o777) == oct(0o600)
    again = CliRunner().invoke(cli, ["client", "deidentify", str(src), str(dst)])
    assert again.exit_code == 2 and "not an empty folder" in again.output


def _fake_release(root: Path) -> Path:
    """What server/release.py writes, for 2 classes x 3 images of 28 px."""
    release = root / "release"
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(2), 3)
    for c, name in enumerate(("normal", "pneumonia")):
        (release / "images" / name).mkdir(parents=True)
        for i, image in enumerate(images[labels == c]):
            Image.fromarray(image).save(release / "images" / name / f"{i:05d}.png")
    np.savez_compressed(release / "synthetic.npz", train_images=images,
                        train_labels=labels.astype(np.uint8).reshape(-1, 1))
    torch.save({"w": torch.zeros(3)}, release / "generator-ema.pt")
    (release / "release.json").write_text(json.dumps({
        "run_id": "0f" * 16,
        "images": {"classes": ["normal", "pneumonia"], "per_class": 3, "size": 28,
                   "generator": "generator-ema.pt"},
        "privacy": {"max_epsilon": 4.25, "max_delta": 1e-5, "per_hospital": {}},
    }))
    return release


def test_release_dicom_writes_the_released_pngs_as_synthetic_dicom(tmp_path):
    import hashlib

    release = _fake_release(tmp_path / "run")
    out = tmp_path / "dicom"
    result = CliRunner().invoke(cli, ["release-dicom", str(tmp_path / "run"), str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 6 synthetic DICOM files" in result.output and "normal 3, pneumonia 3" in result.output
    sha = hashlib.sha256((release / "generator-ema.pt").read_bytes()).hexdigest()
    files = sorted(out.glob("*.dcm"))
    pngs = sorted((release / "images").glob("*/*.png"))  # normal/..., pneumonia/...: npz order
    assert len(files) == len(pngs) == 6
    for path, png in zip(files, pngs):
        ds = pydicom.dcmread(path)
        np.testing.assert_array_equal(ds.pixel_array, np.asarray(Image.open(png)))
        assert ds.SeriesDescription == png.parent.name
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        assert block[0x02].value == sha and block[0x03].value == 4.25
        assert block[0x01].value == "0f" * 16
        assert "Synthetic image" in ds.ImageComments and list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    again = CliRunner().invoke(cli, ["release-dicom", str(release), str(out)])
    assert again.exit_code == 2 and "not an empty folder" in again.output
    missing = CliRunner().invoke(cli, ["release-dicom", str(tmp_path), str(tmp_path / "x")])
    assert missing.exit_code == 2 and "release.json: not found" in missing.output
