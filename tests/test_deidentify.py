"""No patient identity leaves client.sources or client.deidentify: a CT full of PHI goes in."""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

import client.sources as sources
from client.deidentify import BASIC_PROFILE, deidentify_tree, pseudonymous_uid
from client.sources import SourceSettings, read_scans

# Every value below identifies the (made-up) patient, staff or site; none may survive.
PHI = {
    "PatientName": "DOE^JANE^QUINN",
    "PatientID": "MRN8675309",
    "PatientBirthDate": "19750423",
    "OtherPatientIDs": "ALT55501",
    "OtherPatientNames": "SMITH^JANEY",
    "PatientAddress": "42 Wallaby Way Sydney",
    "PatientTelephoneNumbers": "555-0199-777",
    "PatientComments": "allergic to penicillin, daughter Molly",
    "MedicalRecordLocator": "LOC-3321-ZZ",
    "InstitutionName": "St Elsewhere General Hospital",
    "InstitutionAddress": "1 Hospital Road Springfield",
    "InstitutionalDepartmentName": "Radiology West Wing",
    "ReferringPhysicianName": "HIBBERT^JULIUS",
    "PerformingPhysicianName": "RIVIERA^NICK",
    "OperatorsName": "TECH^TERRY",
    "NameOfPhysiciansReadingStudy": "CASEY^BENJAMIN",
    "AccessionNumber": "ACC20240001",
    "StudyID": "STUDY7781",
    "StudyDate": "20240315",
    "SeriesDate": "20240316",
    "AcquisitionDate": "20240317",
    "ContentDate": "20240318",
    "DeviceSerialNumber": "SN4242XYZ",
    "StationName": "CTSCANNER07",
    "StudyDescription": "CT HEAD FOR JANE DOE",
    "ImageComments": "pt Jane Doe MRN8675309 follow-up",
}
PRIVATE_PHI = ["PRIVATE COPY MRN8675309", "PRIVATE DOE JANE QUINN"]
NESTED_PHI = ["REQ-99812-NESTED", "NESTEDPRIVATE-4471", "CONSULT^CARLA"]
ALL_PHI = list(PHI.values()) + PRIVATE_PHI + NESTED_PHI
STUDY_UID, SERIES_UID, FRAME_UID = "1.2.3.4.5.100", "1.2.3.4.5.100.1", "1.2.3.4.5.100.9"


def _phi_ct(sop_instance_uid: str) -> Dataset:
    """CT_small.dcm with PHI in 30 attributes, a private block and nested sequences."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.BodyPartExamined = "HEAD"
    block = ds.private_block(0x0009, "ACME PHI", create=True)
    block.add_new(0x01, "LO", PRIVATE_PHI[0])
    block.add_new(0x02, "LO", PRIVATE_PHI[1])
    request = Dataset()
    request.RequestedProcedureID = NESTED_PHI[0]
    ds.RequestAttributesSequence = Sequence([request])
    code = Dataset()  # a sequence the profile keeps: its items are cleaned, not dropped
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-A0100", "SRT", "Brain"
    code.private_block(0x0011, "ACME NESTED", create=True).add_new(0x01, "LO", NESTED_PHI[1])
    code.add_new(0x00081062, "SQ", Sequence())  # removed by the profile, even nested
    code.add_new(0x0008009C, "PN", NESTED_PHI[2])  # ConsultingPhysicianName: not in the table
    ds.AnatomicRegionSequence = Sequence([code])
    reference = Dataset()
    reference.SeriesInstanceUID = SERIES_UID
    ds.ReferencedSeriesSequence = Sequence([reference])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, SERIES_UID
    ds.FrameOfReferenceUID = FRAME_UID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    return ds


@pytest.fixture
def phi_tree(tmp_path: Path) -> Path:
    """head/a.dcm, head/b.dcm (two slices of one series), a SEG, a cut file, a note, burned-in."""
    root = tmp_path / "hospital"
    (root / "head").mkdir(parents=True)
    _phi_ct("1.2.3.4.5.100.1.1").save_as(root / "head" / "a.dcm")
    _phi_ct("1.2.3.4.5.100.1.2").save_as(root / "head" / "b.dcm")
    seg = _phi_ct("1.2.3.4.5.100.1.3")
    seg.SOPClassUID = seg.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    seg.save_as(root / "head" / "seg.dcm")
    whole = (root / "head" / "a.dcm").read_bytes()
    (root / "head" / "cut.dcm").write_bytes(whole[: len(whole) - 4000])
    (root / "head" / "notes.txt").write_text(f"patient {PHI['PatientName']} {PHI['PatientID']}\n")
    burned = _phi_ct("1.2.3.4.5.100.1.4")
    burned.BurnedInAnnotation = "YES"
    burned.save_as(root / "head" / "burned.dcm")
    return root


def _assert_no_phi(text: str) -> None:
    leaked = [value for value in ALL_PHI if value.lower() in text.lower()]
    assert leaked == []


def test_the_fixture_really_holds_phi_everywhere(phi_tree):
    raw = (phi_tree / "head" / "a.dcm").read_bytes()
    assert all(value.encode() in raw for value in ALL_PHI)
    assert len(PHI) + len(PRIVATE_PHI) + len(NESTED_PHI) >= 20


def test_read_scans_reports_and_logs_carry_no_phi(phi_tree, caplog, monkeypatch):
    decoded_from: list[Dataset] = []
    real_pixel_array = sources.pixel_array

    def spy(ds, **kwargs):  # what the decoder sees must already be free of identities
        decoded_from.append(ds)
        return real_pixel_array(ds, **kwargs)

    monkeypatch.setattr(sources, "pixel_array", spy)
    caplog.set_level(logging.DEBUG)

    by_folder = read_scans(SourceSettings(phi_tree))
    by_attribute = read_scans(SourceSettings(phi_tree, label_from="dicom-attribute",
                                             label_attribute="BodyPartExamined"))

    for scans in (by_folder, by_attribute):
        assert scans.sources == ["head/a.dcm", "head/b.dcm"]
        assert {s.path: s.reason for s in scans.skipped} == {
            "head/burned.dcm": "burned-in annotation",
            "head/cut.dcm": "truncated file",
            "head/notes.txt": "not an image file",
            "head/seg.dcm": "non-image object (SEG)",
        }
        _assert_no_phi(repr(scans.sources) + repr(scans.skipped) + repr(scans.labels)
                       + repr(scans.modalities))
    assert by_folder.labels == ["head", "head"] and by_attribute.labels == ["HEAD", "HEAD"]
    _assert_no_phi(caplog.text)
    assert caplog.records, "read_scans logs at least its summary"
    assert len(decoded_from) == 4  # a and b, twice
    for ds in decoded_from:
        _assert_no_phi(repr(list(ds.iterall())) + repr(ds.file_meta))
        assert "SOPInstanceUID" not in ds and "StudyInstanceUID" not in ds


def test_deidentified_tree_holds_no_phi_and_remaps_uids_consistently(phi_tree, tmp_path):
    out = tmp_path / "deid"
    report = deidentify_tree(phi_tree, out, salt=b"test salt")

    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "head/a.dcm", "head/b.dcm", "head/seg.dcm"]
    assert report.files_written == 3
    assert dict(report.skipped) == {"not DICOM": 1, "truncated": 1, "burned-in annotation": 1}
    assert report.private_elements_removed >= 3 * 3  # creator + 2 values (+ nested) per file

    a, b = (pydicom.dcmread(out / "head" / name) for name in ("a.dcm", "b.dcm"))
    for path in out.rglob("*.dcm"):
        raw = path.read_bytes()
        assert [v for v in ALL_PHI if v.encode() in raw] == []
        ds = pydicom.dcmread(path)
        _assert_no_phi(repr(list(ds.iterall())) + repr(ds.file_meta))
        assert not any(elem.tag.is_private for elem in ds.iterall())
        assert ds.PatientIdentityRemoved == "YES"
        code = ds.DeidentificationMethodCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator) == ("113100", "DCM")
        assert ds.PatientName == "" and ds.StudyDate == "" and "InstitutionName" not in ds
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID

    # one study, one series, one frame of reference, all remapped, the same in both files
    for keyword, original in (("StudyInstanceUID", STUDY_UID), ("SeriesInstanceUID", SERIES_UID),
                              ("FrameOfReferenceUID", FRAME_UID)):
        assert a[keyword].value == b[keyword].value == pseudonymous_uid(original, b"test salt")
        assert a[keyword].value != original
    assert a.ReferencedSeriesSequence[0].SeriesInstanceUID == a.SeriesInstanceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID
    for uid in (a.SOPInstanceUID, a.StudyInstanceUID):
        assert uid.startswith("2.25.") and UID(uid).is_valid and len(uid) <= 64
        assert uuid.UUID(int=int(uid[5:])).version == 8
    assert a.PatientID == b.PatientID != PHI["PatientID"]  # one pseudonym per patient
    # three SOP instances; study, series, frame of reference; CT_small's Instance Creator UID
    assert report.uids_remapped == 3 + 3 + 1
    # the profile leaves the pixels alone; kept sequences are cleaned, not dropped
    original = pydicom.dcmread(phi_tree / "head" / "a.dcm")
    np.testing.assert_array_equal(a.pixel_array, original.pixel_array)
    assert a.AnatomicRegionSequence[0].CodeMeaning == "Brain"
    assert a.AnatomicRegionSequence[0].ConsultingPhysicianName == ""


def test_uids_depend_on_the_salt_and_a_fresh_salt_is_drawn_by_default(phi_tree, tmp_path):
    runs = [deidentify_tree(phi_tree, tmp_path / f"run{k}", salt=salt)
            for k, salt in enumerate((b"one", b"one", b"two", None))]
    assert all(r.files_written == 3 for r in runs)
    study = [pydicom.dcmread(tmp_path / f"run{k}" / "head" / "a.dcm").StudyInstanceUID
             for k in range(4)]
    assert study[0] == study[1] != study[2] != study[3] != study[0]


def test_the_output_folder_may_not_be_inside_the_input(phi_tree):
    with pytest.raises(ValueError, match="output folder is inside the input folder"):
        deidentify_tree(phi_tree, phi_tree / "deid")


def test_profile_table_covers_the_common_identifying_attributes():
    keywords = {keyword for keyword, _ in BASIC_PROFILE.values()}
    assert len(BASIC_PROFILE) >= 60
    assert set(PHI) <= keywords
    assert {action for _, action in BASIC_PROFILE.values()} == {"D", "Z", "X", "U"}
    # every tag in the table is the one the DICOM dictionary gives its keyword
    for tag, (keyword, _) in BASIC_PROFILE.items():
        assert pydicom.datadict.tag_for_keyword(keyword) in (tag, None), keyword


def test_bundled_files_survive_deidentification_or_are_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "rtplan.dcm", "README.txt"):
        shutil.copyfile(get_testdata_file(name), src / name)
    report = deidentify_tree(src, tmp_path / "out")
    assert report.files_written == 4 and dict(report.skipped) == {"not DICOM": 1}
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm"):
        before = pydicom.dcmread(src / name).pixel_array
        np.testing.assert_array_equal(pydicom.dcmread(tmp_path / "out" / name).pixel_array, before)


def test_pydicoms_warnings_quoting_values_stay_out_of_deidentify_output(tmp_path, caplog,
                                                                         recwarn, capfd):
    # values pydicom finds invalid are quoted in its warnings and log records
    src = tmp_path / "src"
    src.mkdir()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    bad_uid = "1.2.0999.8675309.1"            # a leading zero: not a valid UID
    with pytest.warns(UserWarning):
        ds.StudyInstanceUID = bad_uid
        ds.PatientID = "MRN8675309\\ALT"      # LO holds one value
    ds.save_as(src / "a.dcm")
    recwarn.clear()
    capfd.readouterr()
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    level = logging.getLogger("pydicom").level

    report = deidentify_tree(src, tmp_path / "out")

    assert report.files_written == 1
    said = (caplog.text + "".join(str(w.message) for w in recwarn.list)
            + "".join(capfd.readouterr()))
    for value in (bad_uid, "8675309"):
        assert value not in said
    assert logging.getLogger("pydicom").level == level  # restored afterwards
