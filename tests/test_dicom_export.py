"""server.dicom_export: synthetic images out as Secondary Capture DICOM, read back exactly."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from server.dicom_export import PRIVATE_CREATOR, PRIVATE_GROUP, to_uint8, write_synthetic_dicom

SHA = "0123456789abcdef" * 4
CLASSES = ["normal", "pneumonia"]


def _release(tmp_path, images, labels=None, **overrides):
    kwargs = dict(generator_sha256=SHA, epsilon=7.5, delta=1e-5, release_id="release-0003")
    kwargs.update(overrides)
    labels = [k % 2 for k in range(len(images))] if labels is None else labels
    return write_synthetic_dicom(images, labels, CLASSES, tmp_path / "release", **kwargs)


def test_to_uint8_maps_minus_one_to_one_onto_0_to_255():
    x = np.array([-1.5, -1.0, -0.5, 0.0, 0.2, 0.999, 1.0, 2.0], dtype=np.float32)
    # by hand: (x + 1) * 127.5 = 0, 0, 63.75, 127.5, 153, 254.87, 255, 382.5
    assert to_uint8(x).tolist() == [0, 0, 64, 128, 153, 255, 255, 255]
    stored = np.arange(256, dtype=np.uint8)
    assert to_uint8(stored) is stored  # already stored values: unchanged
    assert np.array_equal(to_uint8(stored / 127.5 - 1.0), stored)  # and the inverse map round-trips


def test_to_uint8_refuses_nan_and_integer_images():
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="dtype int64"):
        to_uint8(np.array([1, 2]))


def test_round_trip_through_pydicom_and_monai_gives_to_uint8s_pixels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1.2, 1.2, size=(4, 20, 28)).astype(np.float32)
    images[0, 0, :3] = [-1.0, 0.0, 1.0]
    paths = _release(tmp_path, images)

    from monai.transforms import LoadImage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load = LoadImage(reader="PydicomReader", image_only=True)
        for path, image in zip(paths, images):
            expected = to_uint8(image)
            ds = pydicom.dcmread(path)
            assert ds.pixel_array.dtype == np.uint8
            np.testing.assert_array_equal(ds.pixel_array, expected)
            # MONAI's PydicomReader swaps rows and columns (swap_ij=True), as ITK does
            np.testing.assert_array_equal(np.asarray(load(str(path))).T, expected)


def test_files_say_synthetic_and_carry_the_release_provenance(tmp_path):
    images = np.zeros((3, 16, 16), np.float32)
    paths = _release(tmp_path, images, labels=[1, 0, 1])
    datasets = [pydicom.dcmread(p) for p in paths]
    assert [p.name for p in paths] == ["synthetic_000000.dcm", "synthetic_000001.dcm",
                                       "synthetic_000002.dcm"]
    for ds, label in zip(datasets, [1, 0, 1]):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.ConversionType == "SYN" and ds.BurnedInAnnotation == "NO"
        assert ds.PatientName == "SYNTHETIC" and ds.PatientIdentityRemoved == "YES"
        assert ds.PatientID == "SYN-release-0003"
        assert (ds.PhotometricInterpretation, ds.BitsStored, ds.SamplesPerPixel) == ("MONOCHROME2", 8, 1)
        assert CLASSES[label] in ds.ImageComments and SHA in ds.ImageComments
        assert "(epsilon, delta) = (7.5, 1e-05)" in ds.ImageComments
        assert f"generator_sha256={SHA}" in ds.DerivationDescription
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        assert block[0x01].value == "release-0003" and block[0x02].value == SHA
        assert block[0x03].value == 7.5 and block[0x04].value == 1e-5
        assert block[0x05].value == CLASSES[label] and block[0x06].value == label
        assert ds.SeriesDescription == CLASSES[label]
    assert len({ds.SOPInstanceUID for ds in datasets}) == 3
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert datasets[0].SeriesInstanceUID == datasets[2].SeriesInstanceUID != datasets[1].SeriesInstanceUID
    assert [ds.InstanceNumber for ds in datasets] == [1, 1, 2]


def test_uint8_and_channel_first_images_are_accepted(tmp_path):
    stored = np.arange(2 * 1 * 16 * 17, dtype=np.uint32).astype(np.uint8).reshape(2, 1, 16, 17)
    paths = _release(tmp_path, stored)
    np.testing.assert_array_equal(pydicom.dcmread(paths[1]).pixel_array, stored[1, 0])


def test_a_non_private_run_records_infinite_epsilon(tmp_path):
    [path] = _release(tmp_path, np.zeros((1, 16, 16), np.float32), epsilon=math.inf, delta=0.0)
    ds = pydicom.dcmread(path)
    assert math.isinf(ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[0x03].value)
    assert "(inf, 0)" in ds.ImageComments


@pytest.mark.parametrize("overrides, labels, message", [
    ({"generator_sha256": "abc"}, None, "64 lowercase hex"),
    ({"epsilon": 0.0}, None, "epsilon > 0"),
    ({"delta": 1.0}, None, "0 <= delta < 1"),
    ({"release_id": "a\\b"}, None, "no backslash"),
    ({}, [0, 2], "not an index into the 2 class_names"),
    ({}, [0], "1 labels for 2 images"),
])
def test_bad_arguments_are_refused_with_the_fix(tmp_path, overrides, labels, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        _release(tmp_path, np.zeros((2, 16, 16), np.float32), labels=labels, **overrides)


def test_fedsynth_release_format_dicom_is_release_dicom(tmp_path):
    from typer.testing import CliRunner

    from shared.cli import app

    result = CliRunner().invoke(app, ["release", str(tmp_path), str(tmp_path / "out"),
                                      "--format", "png"])
    assert result.exit_code == 2 and "--format 'png'" in result.output
    result = CliRunner().invoke(app, ["release", str(tmp_path), str(tmp_path / "out"),
                                      "--format", "dicom"])
    assert result.exit_code == 2 and "release.json: not found" in result.output
