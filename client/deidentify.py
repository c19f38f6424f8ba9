"""De-identify a hospital's DICOM files: PS3.15 Annex E, Basic Application Level Confidentiality Profile.

The profile, applied to every data set (and, recursively, to every sequence item in it):

1. Every attribute listed in the profile's table (``BASIC_PROFILE`` below, after PS3.15
   Table E.1-1) gets its action:

   * ``X`` remove the attribute;
   * ``Z`` keep it, with an empty value (a sequence becomes empty);
   * ``D`` replace the value with a dummy of the same VR (``"ANONYMOUS"``, ``"19000101"``, ...);
   * ``U`` replace the UID with one derived from it by HMAC-SHA256 under a secret salt.

   Where the standard gives a compound action (``X/Z``, ``X/Z/D``, ...) the table holds the one
   applied here: ``Z`` for attributes that a viewer or PACS needs present (Type 2 in the common
   IODs: patient's name, birth date, sex, study date and time, accession number, study ID,
   referring physician), ``X`` for the rest.
2. Private attributes (odd groups) are removed, as are curves ``(50xx,xxxx)`` and overlay data and
   comments ``(60xx,3000)``, ``(60xx,4000)``.
3. Stricter than the profile: any other person name (VR PN) is emptied and any other date
   (VR DA, DT) is removed, since no option that retains them (Retain Longitudinal Temporal
   Information, Clean Descriptors) is offered here.
4. Patient ID becomes a pseudonym ``ANON-<12 hex>`` (HMAC of the original under the same salt),
   which the profile's ``Z`` allows, so images of one patient can still be kept in one split.
5. The data set records what was done: Patient Identity Removed ``YES``, De-identification Method,
   De-identification Method Code Sequence (``113100``, ``DCM``, "Basic Application
   Confidentiality Profile"), Longitudinal Temporal Information Modified ``REMOVED``.

UIDs: ``2.25.<n>`` where ``n`` is the first 128 bits of HMAC-SHA256(salt, "uid:" + UID), marked as
an RFC 9562 version-8 UUID. The same input UID maps to the same output UID in every file of a run
(so series, studies and references stay linked); without the salt the mapping cannot be reversed
or repeated. The salt is drawn fresh for each run unless the caller passes one, and is never written.

What the profile does not cover, and this module does not do: text burned into the pixels.
Files declaring Burned In Annotation ``YES`` are not copied (counted in the report). Names of files
and folders are copied as they are: they are the hospital's choice, and must not hold identities.
DICOMDIR files are not copied either: they index the original files and hold patient names.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

log = logging.getLogger(__name__)

# (group, element) -> (keyword, action); after PS3.15 (2024) Table E.1-1, Basic Profile column.
BASIC_PROFILE: dict[int, tuple[str, str]] = {
    0x00080050: ("AccessionNumber", "Z"),
    0x00180010: ("ContrastBolusAgent", "Z"),
    0x00184000: ("AcquisitionComments", "X"),
    0x00400555: ("AcquisitionContextSequence", "X"),
    0x00080022: ("AcquisitionDate", "X"),
    0x0008002A: ("AcquisitionDateTime", "X"),
    0x00181400: ("AcquisitionDeviceProcessingDescription", "X"),
    0x00189424: ("AcquisitionProtocolDescription", "X"),
    0x00080032: ("AcquisitionTime", "X"),
    0x00404035: ("ActualHumanPerformersSequence", "X"),
    0x001021B0: ("AdditionalPatientHistory", "X"),
    0x00380010: ("AdmissionID", "X"),
    0x00380020: ("AdmittingDate", "X"),
    0x00081084: ("AdmittingDiagnosesCodeSequence", "X"),
    0x00081080: ("AdmittingDiagnosesDescription", "X"),
    0x00380021: ("AdmittingTime", "X"),
    0x00102110: ("Allergies", "X"),
    0x40000010: ("Arbitrary", "X"),
    0x0040A078: ("AuthorObserverSequence", "X"),
    0x00101081: ("BranchOfService", "X"),
    0x00181007: ("CassetteID", "X"),
    0x00400280: ("CommentsOnThePerformedProcedureStep", "X"),
    0x00209161: ("ConcatenationUID", "U"),
    0x00403001: ("ConfidentialityConstraintOnPatientDataDescription", "X"),
    0x00700084: ("ContentCreatorName", "Z"),
    0x00700086: ("ContentCreatorIdentificationCodeSequence", "X"),
    0x00080023: ("ContentDate", "Z"),
    0x0040A730: ("ContentSequence", "X"),
    0x00080033: ("ContentTime", "Z"),
    0x0008010D: ("ContextGroupExtensionCreatorUID", "U"),
    0x0018A003: ("ContributionDescription", "X"),
    0x00102150: ("CountryOfResidence", "X"),
    0x00089123: ("CreatorVersionUID", "U"),
    0x00380300: ("CurrentPatientLocation", "X"),
    0x00080025: ("CurveDate", "X"),
    0x00080035: ("CurveTime", "X"),
    0x0040A07C: ("CustodialOrganizationSequence", "X"),
    0x00181002: ("DeviceUID", "U"),
    0x00181000: ("DeviceSerialNumber", "X"),
    0x0018700A: ("DetectorID", "X"),
    0x04000100: ("DigitalSignatureUID", "X"),
    0xFFFAFFFA: ("DigitalSignaturesSequence", "X"),
    0x00209164: ("DimensionOrganizationUID", "U"),
    0x00380040: ("DischargeDiagnosisDescription", "X"),
    0x4008011A: ("DistributionAddress", "X"),
    0x40080119: ("DistributionName", "X"),
    0x300A0013: ("DoseReferenceUID", "U"),
    0x00102160: ("EthnicGroup", "X"),
    0x00080058: ("FailedSOPInstanceUIDList", "U"),
    0x0070031A: ("FiducialUID", "U"),
    0x00402017: ("FillerOrderNumberImagingServiceRequest", "Z"),
    0x00209158: ("FrameComments", "X"),
    0x00200052: ("FrameOfReferenceUID", "U"),
    0x00181008: ("GantryID", "X"),
    0x00181005: ("GeneratorID", "X"),
    0x00700001: ("GraphicAnnotationSequence", "D"),
    0x00404037: ("HumanPerformerName", "X"),
    0x00404036: ("HumanPerformerOrganization", "X"),
    0x00880200: ("IconImageSequence", "X"),
    0x00084000: ("IdentifyingComments", "X"),
    0x00204000: ("ImageComments", "X"),
    0x00284000: ("ImagePresentationComments", "X"),
    0x00402400: ("ImagingServiceRequestComments", "X"),
    0x40080300: ("Impressions", "X"),
    0x00080012: ("InstanceCreationDate", "X"),
    0x00080013: ("InstanceCreationTime", "X"),
    0x00080014: ("InstanceCreatorUID", "U"),
    0x00080015: ("InstanceCoercionDateTime", "X"),
    0x00080081: ("InstitutionAddress", "X"),
    0x00080082: ("InstitutionCodeSequence", "X"),
    0x00080080: ("InstitutionName", "X"),
    0x00081040: ("InstitutionalDepartmentName", "X"),
    0x00101050: ("InsurancePlanIdentification", "X"),
    0x00401011: ("IntendedRecipientsOfResultsIdentificationSequence", "X"),
    0x40080111: ("InterpretationApproverSequence", "X"),
    0x4008010C: ("InterpretationAuthor", "X"),
    0x40080115: ("InterpretationDiagnosisDescription", "X"),
    0x40080202: ("InterpretationIDIssuer", "X"),
    0x40080102: ("InterpretationRecorder", "X"),
    0x4008010B: ("InterpretationText", "X"),
    0x4008010A: ("InterpretationTranscriber", "X"),
    0x00083010: ("IrradiationEventUID", "U"),
    0x00380011: ("IssuerOfAdmissionID", "X"),
    0x00100021: ("IssuerOfPatientID", "X"),
    0x00380061: ("IssuerOfServiceEpisodeID", "X"),
    0x00281214: ("LargePaletteColorLookupTableUID", "U"),
    0x001021D0: ("LastMenstrualDate", "X"),
    0x04000404: ("MAC", "X"),
    0x00020003: ("MediaStorageSOPInstanceUID", "U"),
    0x00102000: ("MedicalAlerts", "X"),
    0x00101090: ("MedicalRecordLocator", "X"),
    0x00101080: ("MilitaryRank", "X"),
    0x00203406: ("ModifiedImageDescription", "X"),
    0x00203401: ("ModifyingDeviceID", "X"),
    0x00203404: ("ModifyingDeviceManufacturer", "X"),
    0x00081060: ("NameOfPhysiciansReadingStudy", "X"),
    0x00401010: ("NamesOfIntendedRecipientsOfResults", "X"),
    0x00102180: ("Occupation", "X"),
    0x00081072: ("OperatorIdentificationSequence", "X"),
    0x00081070: ("OperatorsName", "X"),
    0x04000561: ("OriginalAttributesSequence", "X"),
    0x00402010: ("OrderCallbackPhoneNumber", "X"),
    0x00402008: ("OrderEnteredBy", "X"),
    0x00402009: ("OrderEntererLocation", "X"),
    0x00101000: ("OtherPatientIDs", "X"),
    0x00101002: ("OtherPatientIDsSequence", "X"),
    0x00101001: ("OtherPatientNames", "X"),
    0x00080024: ("OverlayDate", "X"),
    0x00080034: ("OverlayTime", "X"),
    0x0040A07A: ("ParticipantSequence", "X"),
    0x00101040: ("PatientAddress", "X"),
    0x00104000: ("PatientComments", "X"),
    0x00102203: ("PatientSexNeutered", "X"),
    0x00380500: ("PatientState", "X"),
    0x00401004: ("PatientTransportArrangements", "X"),
    0x00101010: ("PatientAge", "X"),
    0x00100030: ("PatientBirthDate", "Z"),
    0x00101005: ("PatientBirthName", "X"),
    0x00100032: ("PatientBirthTime", "X"),
    0x00380400: ("PatientInstitutionResidence", "X"),
    0x00100050: ("PatientInsurancePlanCodeSequence", "X"),
    0x00101060: ("PatientMotherBirthName", "X"),
    0x00100010: ("PatientName", "Z"),
    0x00100101: ("PatientPrimaryLanguageCodeSequence", "X"),
    0x00100102: ("PatientPrimaryLanguageModifierCodeSequence", "X"),
    0x001021F0: ("PatientReligiousPreference", "X"),
    0x00100040: ("PatientSex", "Z"),
    0x00101020: ("PatientSize", "X"),
    0x00102154: ("PatientTelephoneNumbers", "X"),
    0x00102155: ("PatientTelecomInformation", "X"),
    0x00101030: ("PatientWeight", "X"),
    0x00100020: ("PatientID", "Z"),
    0x00400243: ("PerformedLocation", "X"),
    0x00400254: ("PerformedProcedureStepDescription", "X"),
    0x00400253: ("PerformedProcedureStepID", "X"),
    0x00400244: ("PerformedProcedureStepStartDate", "X"),
    0x00400245: ("PerformedProcedureStepStartTime", "X"),
    0x00400241: ("PerformedStationAETitle", "X"),
    0x00404030: ("PerformedStationGeographicLocationCodeSequence", "X"),
    0x00400242: ("PerformedStationName", "X"),
    0x00404028: ("PerformedStationNameCodeSequence", "X"),
    0x00081052: ("PerformingPhysicianIdentificationSequence", "X"),
    0x00081050: ("PerformingPhysicianName", "X"),
    0x00401102: ("PersonAddress", "X"),
    0x00401101: ("PersonIdentificationCodeSequence", "D"),
    0x0040A123: ("PersonName", "D"),
    0x00401103: ("PersonTelephoneNumbers", "X"),
    0x40080114: ("PhysicianApprovingInterpretation", "X"),
    0x00081062: ("PhysiciansReadingStudyIdentificationSequence", "X"),
    0x00081048: ("PhysiciansOfRecord", "X"),
    0x00081049: ("PhysiciansOfRecordIdentificationSequence", "X"),
    0x00402016: ("PlacerOrderNumberImagingServiceRequest", "Z"),
    0x00181004: ("PlateID", "X"),
    0x00400012: ("PreMedication", "X"),
    0x001021C0: ("PregnancyStatus", "X"),
    0x00181030: ("ProtocolName", "X"),
    0x00402001: ("ReasonForTheImagingServiceRequest", "X"),
    0x00321030: ("ReasonForStudy", "X"),
    0x04000402: ("ReferencedDigitalSignatureSequence", "X"),
    0x30060024: ("ReferencedFrameOfReferenceUID", "U"),
    0x00404023: ("ReferencedGeneralPurposeScheduledProcedureStepTransactionUID", "U"),
    0x00081140: ("ReferencedImageSequence", "X"),
    0x00380004: ("ReferencedPatientAliasSequence", "X"),
    0x00081120: ("ReferencedPatientSequence", "X"),
    0x00081111: ("ReferencedPerformedProcedureStepSequence", "X"),
    0x04000403: ("ReferencedSOPInstanceMACSequence", "X"),
    0x00081155: ("ReferencedSOPInstanceUID", "U"),
    0x00041511: ("ReferencedSOPInstanceUIDInFile", "U"),
    0x00081110: ("ReferencedStudySequence", "X"),
    0x00080092: ("ReferringPhysicianAddress", "X"),
    0x00080096: ("ReferringPhysicianIdentificationSequence", "X"),
    0x00080090: ("ReferringPhysicianName", "Z"),
    0x00080094: ("ReferringPhysicianTelephoneNumbers", "X"),
    0x00102152: ("RegionOfResidence", "X"),
    0x300600C2: ("RelatedFrameOfReferenceUID", "U"),
    0x00400275: ("RequestAttributesSequence", "X"),
    0x00321070: ("RequestedContrastAgent", "X"),
    0x00401400: ("RequestedProcedureComments", "X"),
    0x00321060: ("RequestedProcedureDescription", "X"),
    0x00401001: ("RequestedProcedureID", "X"),
    0x00401005: ("RequestedProcedureLocation", "X"),
    0x00001001: ("RequestedSOPInstanceUID", "U"),
    0x00321032: ("RequestingPhysician", "X"),
    0x00321033: ("RequestingService", "X"),
    0x00102299: ("ResponsibleOrganization", "X"),
    0x00102297: ("ResponsiblePerson", "X"),
    0x40084000: ("ResultsComments", "X"),
    0x40080118: ("ResultsDistributionListSequence", "X"),
    0x40080042: ("ResultsIDIssuer", "X"),
    0x300E0008: ("ReviewerName", "X"),
    0x00404034: ("ScheduledHumanPerformersSequence", "X"),
    0x0038001E: ("ScheduledPatientInstitutionResidence", "X"),
    0x0040000B: ("ScheduledPerformingPhysicianIdentificationSequence", "X"),
    0x00400006: ("ScheduledPerformingPhysicianName", "X"),
    0x00400004: ("ScheduledProcedureStepEndDate", "X"),
    0x00400005: ("ScheduledProcedureStepEndTime", "X"),
    0x00400007: ("ScheduledProcedureStepDescription", "X"),
    0x00400011: ("ScheduledProcedureStepLocation", "X"),
    0x00400002: ("ScheduledProcedureStepStartDate", "X"),
    0x00400003: ("ScheduledProcedureStepStartTime", "X"),
    0x00400001: ("ScheduledStationAETitle", "X"),
    0x00404027: ("ScheduledStationGeographicLocationCodeSequence", "X"),
    0x00400010: ("ScheduledStationName", "X"),
    0x00404025: ("ScheduledStationNameCodeSequence", "X"),
    0x00321020: ("ScheduledStudyLocation", "X"),
    0x00321021: ("ScheduledStudyLocationAETitle", "X"),
    0x00080021: ("SeriesDate", "X"),
    0x0008103E: ("SeriesDescription", "X"),
    0x0020000E: ("SeriesInstanceUID", "U"),
    0x00080031: ("SeriesTime", "X"),
    0x00380062: ("ServiceEpisodeDescription", "X"),
    0x00380060: ("ServiceEpisodeID", "X"),
    0x001021A0: ("SmokingStatus", "X"),
    0x00080018: ("SOPInstanceUID", "U"),
    0x00082112: ("SourceImageSequence", "X"),
    0x00380050: ("SpecialNeeds", "X"),
    0x00081010: ("StationName", "X"),
    0x00880140: ("StorageMediaFileSetUID", "U"),
    0x00324000: ("StudyComments", "X"),
    0x00080020: ("StudyDate", "Z"),
    0x00081030: ("StudyDescription", "X"),
    0x00200010: ("StudyID", "Z"),
    0x00320012: ("StudyIDIssuer", "X"),
    0x0020000D: ("StudyInstanceUID", "U"),
    0x00080030: ("StudyTime", "Z"),
    0x00200200: ("SynchronizationFrameOfReferenceUID", "U"),
    0x0040DB0D: ("TemplateExtensionCreatorUID", "U"),
    0x0040DB0C: ("TemplateExtensionOrganizationUID", "U"),
    0x40004000: ("TextComments", "X"),
    0x20300020: ("TextString", "X"),
    0x00080201: ("TimezoneOffsetFromUTC", "X"),
    0x00880910: ("TopicAuthor", "X"),
    0x00880912: ("TopicKeywords", "X"),
    0x00880906: ("TopicSubject", "X"),
    0x00880904: ("TopicTitle", "X"),
    0x00081195: ("TransactionUID", "U"),
    0x0040A124: ("UID", "U"),
    0x0040A088: ("VerifyingObserverIdentificationCodeSequence", "Z"),
    0x0040A075: ("VerifyingObserverName", "D"),
    0x0040A073: ("VerifyingObserverSequence", "D"),
    0x0040A027: ("VerifyingOrganization", "X"),
    0x00384000: ("VisitComments", "X"),
    # File meta information: the sending station's AE title and private meta information.
    0x00020016: ("SourceApplicationEntityTitle", "X"),
    0x00020100: ("PrivateInformationCreatorUID", "X"),
    0x00020102: ("PrivateInformation", "X"),
}

IDENTIFYING_KEYWORDS = frozenset(keyword for keyword, _ in BASIC_PROFILE.values())

_DUMMY_BY_VR = {
    "PN": "ANONYMOUS", "LO": "ANONYMIZED", "SH": "ANONYMIZED", "ST": "ANONYMIZED",
    "LT": "ANONYMIZED", "UT": "ANONYMIZED", "UC": "ANONYMIZED", "CS": "ANONYMIZED",
    "AE": "ANONYMOUS", "DA": "19000101", "TM": "000000", "DT": "19000101000000",
    "AS": "000Y", "IS": "0", "DS": "0",
}

BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
DEIDENTIFICATION_METHOD = "PS3.15 E.1 Basic Profile (fedsynth client.deidentify)"  # LO: <= 64

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


@dataclass
class DeidReport:
    """What ``deidentify_tree`` did; counts only, nothing identifying.

    ``skipped`` counts files not copied, by reason: ``"not DICOM"``, ``"truncated"``,
    ``"DICOMDIR"``, ``"burned-in annotation"``, ``"unwritable"``.
    """

    files_written: int = 0
    uids_remapped: int = 0
    elements_removed: int = 0
    elements_replaced: int = 0
    private_elements_removed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


@dataclass
class ProfileCounts:
    """Elements the profile changed in one data set (with its sequence items)."""

    removed: int = 0
    replaced: int = 0
    private_removed: int = 0


@contextmanager
def pydicom_quiet():
    """Silence pydicom's warnings and log records: they may quote values read from the file.

    The level goes on the ``pydicom`` logger itself: its children (the pixel decoders log
    every plugin's failure, with a traceback) inherit it, whereas a filter there would only
    see records logged by ``pydicom`` by name, not those its children pass up.
    """
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_log.setLevel(level)


class TruncatedDicomError(InvalidDicomError):
    """The file ends before the value of its last data element does."""


def deidentify_tree(src: Path, dst: Path, *, salt: bytes | None = None) -> DeidReport:
    """Copy every DICOM file under ``src`` to the same relative path under ``dst``, de-identified.

    ``salt`` is the secret behind UID and Patient ID pseudonyms; ``None`` draws 32 random bytes,
    so pseudonyms cannot be linked to those of another run. Pass the same salt to keep pseudonyms
    stable across runs (and keep that salt as secret as the identities themselves).
    Non-DICOM files, DICOMDIR files and files declaring burned-in annotation are not copied.
    """
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not src.is_dir():
        raise NotADirectoryError(f"{src}: not a folder; pass the folder holding the DICOM files")
    if dst == src or src in dst.parents:
        raise ValueError(f"{dst}: output folder is inside the input folder {src}; choose another")
    run_salt = secrets.token_bytes(32) if salt is None else salt
    originals: set[str] = set()

    def replace_uid(uid: str) -> str:
        originals.add(uid)
        return pseudonymous_uid(uid, run_salt)

    def replace_patient_id(patient_id: str) -> str:
        return pseudonymous_patient_id(patient_id, run_salt)

    report = DeidReport()
    with pydicom_quiet():  # its warnings and log records quote values from the files
        for path in _files_under(src):
            try:
                ds = read_dicom(path)
            except TruncatedDicomError:
                report.skipped["truncated"] += 1
                continue
            except Exception:  # noqa: BLE001 -- anything pydicom cannot parse is not copied
                report.skipped["not DICOM"] += 1
                continue
            if _sop_class(ds) == MEDIA_STORAGE_DIRECTORY:
                report.skipped["DICOMDIR"] += 1
                continue
            if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
                report.skipped["burned-in annotation"] += 1
                continue
            out = dst / path.relative_to(src)
            try:
                tally = apply_basic_profile(ds, replace_uid, replace_patient_id)
                apply_basic_profile(ds.file_meta, replace_uid)
                _match_file_meta(ds)
                mark_deidentified(ds)
                out.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(out, enforce_file_format=True)
            except Exception:  # noqa: BLE001 -- e.g. a value pydicom will not re-encode
                out.unlink(missing_ok=True)
                report.skipped["unwritable"] += 1
                log.debug("%s: could not be written after de-identification",
                          path.relative_to(src))
                continue
            report.files_written += 1
            report.elements_removed += tally.removed
            report.elements_replaced += tally.replaced
            report.private_elements_removed += tally.private_removed
    report.uids_remapped = len(originals)
    log.info(
        "de-identified %d files (%d UIDs remapped); not copied: %s",
        report.files_written, report.uids_remapped, dict(report.skipped) or "none",
    )
    return report


def apply_basic_profile(
    ds: Dataset,
    replace_uid: Callable[[str], str] | None,
    replace_patient_id: Callable[[str], str] | None = None,
) -> ProfileCounts:
    """Apply the profile's actions to ``ds`` and its sequence items, in place.

    ``replace_uid`` maps an original UID to its replacement (``U`` actions); ``None`` removes those
    UIDs instead, for data sets that stay in memory. ``replace_patient_id`` likewise gives Patient
    ID its pseudonym; ``None`` empties it. Returns the counts of what changed.
    """
    tally = ProfileCounts()
    _apply_to_dataset(ds, replace_uid, replace_patient_id, tally)
    return tally


def remove_identifiers(ds: Dataset) -> None:
    """In memory: apply the profile to ``ds`` (and its file meta), removing UIDs rather than
    remapping them. For readers that need only pixels and a few technical attributes."""
    apply_basic_profile(ds, replace_uid=None)
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None:
        apply_basic_profile(file_meta, replace_uid=None)


def mark_deidentified(ds: Dataset) -> None:
    """Record in ``ds`` that the Basic Profile was applied (PS3.15 E.1.1, PS3.3 C.7.1.1)."""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    ds.LongitudinalTemporalInformationModified = "REMOVED"


def _action_for(tag: int, vr: str) -> str | None:
    if tag in BASIC_PROFILE:
        return BASIC_PROFILE[tag][1]
    group, element = tag >> 16, tag & 0xFFFF
    if 0x5000 <= group <= 0x50FF and group % 2 == 0:  # curve data
        return "X"
    if 0x6000 <= group <= 0x60FF and group % 2 == 0 and element in (0x3000, 0x4000):
        return "X"  # overlay data, overlay comments
    if vr == "PN":
        return "Z"
    if vr in ("DA", "DT"):
        return "X"
    return None


def _apply_to_dataset(
    ds: Dataset,
    replace_uid: Callable[[str], str] | None,
    replace_patient_id: Callable[[str], str] | None,
    tally: ProfileCounts,
) -> None:
    for tag in list(ds.keys()):
        if tag.is_private:
            del ds[tag]
            tally.private_removed += 1
            continue
        try:
            elem = ds[tag]
        except Exception:  # noqa: BLE001 -- a value pydicom cannot parse cannot be checked either
            del ds[tag]
            tally.removed += 1
            continue
        if tag == 0x00100020 and replace_patient_id is not None and elem.value:
            elem.value = replace_patient_id(str(elem.value))
            tally.replaced += 1
            continue
        action = _action_for(int(tag), elem.VR)
        if action is None:
            if elem.VR == "SQ":
                for item in elem.value:
                    _apply_to_dataset(item, replace_uid, replace_patient_id, tally)
            continue
        if action == "X" or (action == "U" and replace_uid is None):
            del ds[tag]
            tally.removed += 1
        elif action == "U":
            elem.value = _map_uids(elem.value, replace_uid)
            tally.replaced += 1
        elif elem.VR == "SQ":  # Z or D on a sequence: an empty sequence
            elem.value = Sequence()
            tally.replaced += 1
        elif action == "Z":
            elem.value = None
            tally.replaced += 1
        else:  # D
            elem.value = _DUMMY_BY_VR.get(elem.VR)
            tally.replaced += 1


def _map_uids(value: object, replace_uid: Callable[[str], str]) -> object:
    if value is None or value == "":
        return value
    if isinstance(value, (list, MultiValue)):
        return [replace_uid(str(v)) for v in value]
    return replace_uid(str(value))


def pseudonymous_uid(uid: str, salt: bytes) -> str:
    """Map a UID to ``2.25.<n>``, ``n`` the first 128 bits of HMAC-SHA256(salt, "uid:" + uid).

    The 128 bits are marked as an RFC 9562 version-8 (custom) UUID, as PS3.5 B.2 asks of
    ``2.25`` UIDs. At most 44 characters, well within the 64 a UID may have.
    """
    digest = hmac.new(salt, b"uid:" + uid.encode("ascii", "replace"), hashlib.sha256).digest()
    n = int.from_bytes(digest[:16], "big")
    n = (n & ~(0xF << 76)) | (0x8 << 76)  # version 8
    n = (n & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122/9562 variant
    return f"2.25.{n}"


def pseudonymous_patient_id(patient_id: str, salt: bytes) -> str:
    """``ANON-`` and 12 hex digits of HMAC-SHA256(salt, "patient-id:" + patient_id)."""
    digest = hmac.new(salt, b"patient-id:" + patient_id.encode("utf-8", "replace"), hashlib.sha256)
    return "ANON-" + digest.hexdigest()[:12].upper()


def read_dicom(path: Path) -> Dataset:
    """Read one DICOM file, with or without the 128-byte preamble and ``DICM`` prefix.

    Files without the prefix (ACR-NEMA style, or written without file meta information) are read
    with ``force=True`` and accepted only if they look like a DICOM data set: a SOP Class UID, or
    Pixel Data with Rows and Columns. Raises ``InvalidDicomError`` for anything else, and its
    subclass ``TruncatedDicomError`` for a file cut short inside an element.
    """
    try:
        ds = _dcmread(path)
    except InvalidDicomError:
        ds = _dcmread(path, force=True)
        if not ("SOPClassUID" in ds or ("PixelData" in ds and "Rows" in ds and "Columns" in ds)):
            raise InvalidDicomError(f"{path.name}: not a DICOM file") from None
    if _ends_early(ds, path.stat().st_size):
        raise TruncatedDicomError(f"{path.name}: file ends inside its last element")
    _fill_transfer_syntax(ds)
    return ds


# pydicom's warning when a file ends inside an undefined-length value (encapsulated pixel
# data, a sequence) before its delimiter; it then returns what it read before the value, often
# nothing, so the file would pass for one without pixel data.
_EARLY_END = "End of file reached before delimiter"


def _dcmread(path: Path, force: bool = False) -> Dataset:
    """``dcmread``, raising ``TruncatedDicomError`` where pydicom only warns of an early end."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = dcmread(path, force=force)
    for warning in caught:
        if _EARLY_END in str(warning.message):
            raise TruncatedDicomError(f"{path.name}: file ends before a delimiter")
    for warning in caught:  # the others as pydicom gave them
        warnings.warn_explicit(warning.message, warning.category, warning.filename,
                               warning.lineno)
    return ds


def _ends_early(ds: Dataset, file_size: int) -> bool:
    """True if the file ends inside an element, which pydicom reads without complaint.

    Either the last top-level element holds fewer bytes than its length says, or (for a file
    without pixel data) 1-7 bytes of a next element's header follow it. A file cut exactly
    between two elements cannot be told from a complete one.
    """
    if not len(ds):
        return False
    last = ds.get_item(max(ds.keys()))
    length, value = getattr(last, "length", None), getattr(last, "value", None)
    value_tell = getattr(last, "value_tell", None)
    if length is None or length == 0xFFFFFFFF or not isinstance(value, bytes):
        return False
    if len(value) < length:
        return True
    leftover = file_size - (value_tell + length) if value_tell is not None else 0
    return "PixelData" not in ds and 0 < leftover < 8


def _fill_transfer_syntax(ds: Dataset) -> None:
    """Give a file without a Transfer Syntax UID the one it was read with.

    Only for native (not encapsulated) pixel data: the encoding pydicom read the data set with
    (implicit/explicit VR, little/big endian) is then the transfer syntax. Encapsulated pixel
    data does not say which codec made it, so such a file is left without one.
    """
    file_meta = ds.file_meta if getattr(ds, "file_meta", None) is not None else FileMetaDataset()
    if "TransferSyntaxUID" in file_meta or ds.original_encoding[0] is None:
        return
    if "PixelData" in ds and ds["PixelData"].is_undefined_length:
        return
    implicit_vr, little_endian = ds.original_encoding
    if implicit_vr:
        file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian
    ds.file_meta = file_meta


def _files_under(root: Path) -> list[Path]:
    """Every regular file under ``root``, sorted, skipping hidden files and folders."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found.extend(Path(folder) / n for n in sorted(names) if not n.startswith("."))
    return found


def _match_file_meta(ds: Dataset) -> None:
    """File meta SOP Class/Instance UIDs equal to the (remapped) ones of the data set."""
    if "SOPClassUID" in ds:
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "SOPInstanceUID" in ds:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _sop_class(ds: Dataset) -> str:
    file_meta = getattr(ds, "file_meta", None) or {}
    return str(ds.get("SOPClassUID", "") or file_meta.get("MediaStorageSOPClassUID", ""))
