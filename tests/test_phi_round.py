"""End to end: DICOM files full of PHI train a real round; none of it leaves, or stays behind.

The hospital's folder holds CT and MR slices (pydicom's CT_small.dcm, MR_small.dcm) with a
marker string in 20+ identifying attributes, a private block and nested sequence items,
distinctive dates and UIDs, and file names that are themselves a marker; plus a text file
named .dcm that holds the marker. One round runs through `client.app.train_reply`, as the
ClientApp does. Nothing of the PHI or the file names may appear in the reply (every record,
serialised as Flower sends it), in the node's log or stdout, in the preprocessing cache or
in the ledger (the whole state directory is searched).
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import pydicom
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from client.app import STATUS_OK, train_reply
from shared import models, weights
from shared.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
MARKER = "QZXPHI"            # inside every identifying text value
FILE_MARKER = "ZZFILENAME"   # inside every file name
DATES = ["19310417", "20310102", "20310103", "20310104", "20310105"]
UID_ROOT = "1.2.826.0.1.3680043.10.9999"
SECRETS = [MARKER, FILE_MARKER, UID_ROOT, *DATES]

PHI_TEXT = {  # keyword -> value; every one holds the marker (SH values fit 16 characters)
    "PatientName": f"{MARKER}^JANE^Q", "PatientID": f"{MARKER}-MRN-1",
    "OtherPatientIDs": f"{MARKER}-ALT", "OtherPatientNames": f"{MARKER}^JANEY",
    "PatientAddress": f"42 {MARKER} Way", "PatientTelephoneNumbers": f"{MARKER}-555",
    "PatientComments": f"{MARKER} allergic to penicillin",
    "MedicalRecordLocator": f"{MARKER}-LOC", "InstitutionName": f"St {MARKER} Hospital",
    "InstitutionAddress": f"1 {MARKER} Road", "InstitutionalDepartmentName": f"{MARKER} West",
    "ReferringPhysicianName": f"{MARKER}^REF", "PerformingPhysicianName": f"{MARKER}^PERF",
    "OperatorsName": f"{MARKER}^OP", "NameOfPhysiciansReadingStudy": f"{MARKER}^READ",
    "AccessionNumber": f"{MARKER}ACC1", "StudyID": f"{MARKER}ST1",
    "StationName": f"{MARKER}STN", "DeviceSerialNumber": f"{MARKER}-SN",
    "StudyDescription": f"CT HEAD {MARKER}", "SeriesDescription": f"{MARKER} series",
    "ImageComments": f"pt {MARKER} follow-up",
}
PHI_DATES = {"PatientBirthDate": DATES[0], "StudyDate": DATES[1], "SeriesDate": DATES[2],
             "AcquisitionDate": DATES[3], "ContentDate": DATES[4]}


def _phi_file(source: str, k: int) -> Dataset:
    ds = pydicom.dcmread(get_testdata_file(source))
    for keyword, value in {**PHI_TEXT, **PHI_DATES}.items():
        setattr(ds, keyword, value)
    block = ds.private_block(0x0009, "ACME PHI", create=True)
    block.add_new(0x01, "LO", f"PRIVATE {MARKER} COPY")
    request = Dataset()
    request.RequestedProcedureID = f"{MARKER}-REQ"
    request.ScheduledProcedureStepStartDate = DATES[1]
    ds.RequestAttributesSequence = Sequence([request])
    series = 1 if source.startswith("CT") else 2
    ds.StudyInstanceUID = f"{UID_ROOT}.1"
    ds.SeriesInstanceUID = f"{UID_ROOT}.1.{series}"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}.1.{series}.{k}"
    return ds


@pytest.fixture
def phi_folder(tmp_path: Path) -> Path:
    root = tmp_path / "hospital-scans"
    for label, source in (("CT", "CT_small.dcm"), ("MR", "MR_small.dcm")):
        (root / label).mkdir(parents=True)
        for k in range(4):
            _phi_file(source, k).save_as(root / label / f"{FILE_MARKER}-{label}{k}.dcm")
    (root / "CT" / f"{FILE_MARKER}-notes.dcm").write_text(f"patient {MARKER}^JANE {DATES[0]}\n")
    return root


def _run_config(tmp_path: Path) -> dict:
    values = tomllib.loads((REPO / "configs" / "smoke.toml").read_text())
    values.update({"batch-size": 2, "local-d-steps": 2, "class-names": "CT,MR",
                   "output-dir": str(tmp_path / "server")})
    return RunConfig.from_flat(values).to_flat()


def _leaks(blob: bytes) -> list[str]:
    lower = blob.lower()
    return [s for s in SECRETS if s.lower().encode() in lower]


def test_a_round_on_phi_dicom_leaks_nothing(phi_folder, tmp_path, caplog, capsys):
    raw = b"".join(p.read_bytes() for p in phi_folder.rglob("*.dcm"))
    assert _leaks(raw) == [MARKER, UID_ROOT, *DATES]  # the fixture really holds it all
    assert len(PHI_TEXT) + len(PHI_DATES) + 2 >= 20

    run_config = _run_config(tmp_path)
    cfg = RunConfig.from_flat(run_config)
    state = tmp_path / "node-state"
    node_config = {"hospital-id": "h1", "data-path": str(phi_folder), "state-dir": str(state),
                   "epsilon": 50.0}
    content = RecordDict({"weights": weights.pack(models.build(cfg)),
                          "config": ConfigRecord({"run-id": "t", "round": 1})})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    caplog.set_level(logging.DEBUG)
    try:
        reply = train_reply(content, run_config, node_config)
    finally:
        torch.set_num_threads(threads)

    # it trained, on the 8 slices (the text file was skipped)
    assert reply["status"]["status"] == STATUS_OK
    assert reply["metrics"]["num-examples"] == 8

    # every record of the reply, and the reply as Flower serialises it
    assert set(reply.keys()) == {"weights", "metrics", "status", "ledger"}
    for name, record in reply.items():
        assert isinstance(record, (ArrayRecord, MetricRecord, ConfigRecord)), name
        if isinstance(record, ArrayRecord):
            assert all(key.startswith(("generator.", "discriminator.")) for key in record)
            blob = b"".join(a.data for a in record.values())
        elif isinstance(record, MetricRecord):
            assert all(isinstance(v, (int, float)) for v in record.values())
            blob = repr(dict(record)).encode()
        else:
            blob = repr(dict(record)).encode()
        assert _leaks(blob + name.encode()) == [], name
    assert _leaks(recorddict_to_proto(reply).SerializeToString()) == []

    # the node's log and output: not even the loaded files' names
    captured = capsys.readouterr()
    text = caplog.text + captured.out + captured.err
    assert "trained" in caplog.text  # the log did run
    assert [s for s in SECRETS if s != FILE_MARKER and s.lower() in text.lower()] == []
    assert f"{FILE_MARKER}-CT0" not in text and f"{FILE_MARKER}-MR3" not in text

    # everything the node keeps: ledger, keys, preprocessing cache
    kept = sorted(p for p in state.rglob("*") if p.is_file())
    assert {p.parent.name for p in kept} >= {"cache", "node-state"}
    assert any(p.name == "ledger.jsonl" for p in kept)
    for path in kept:
        assert _leaks(path.read_bytes()) == [], path.relative_to(state)


def test_a_federated_run_on_phi_dicom_leaves_none_in_the_servers_output(phi_folder, tmp_path,
                                                                         caplog, capsys):
    """The server's side: a whole run (round loop, checkpoint, sample grid, release) on the
    PHI folder; nothing of it in any file under the output directory or in any log line."""
    from fake_grid import FakeGrid, run_config
    from server import federation

    rc = run_config(tmp_path / "server", num_rounds=1, num_hospitals=1,
                    class_names="CT,MR", batch_size=4)
    nodes = {7: {"hospital-id": "h1", "data-path": str(phi_folder),
                 "state-dir": str(tmp_path / "node-state"), "epsilon": 50.0}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    caplog.set_level(logging.DEBUG)
    try:
        with FakeGrid(rc, nodes) as grid:
            release = federation.run(grid, RunConfig.from_flat(rc))
    finally:
        torch.set_num_threads(threads)

    assert (release / "release.json").is_file()
    written = sorted(p for p in (tmp_path / "server").rglob("*") if p.is_file())
    assert {p.suffix for p in written} >= {".json", ".npz", ".png", ".jsonl", ".pt"}
    for path in written:
        assert _leaks(path.read_bytes()) == [], path.relative_to(tmp_path)
        assert FILE_MARKER not in path.name
    # logs: no PHI anywhere; file names only in the node's own debug log of skipped files
    captured = capsys.readouterr()
    assert _leaks((caplog.text + captured.out + captured.err).encode()) in ([], [FILE_MARKER])
    assert "round 1/1" in captured.out  # the server's progress lines, on stdout
    server_side = captured.out + "".join(r.getMessage() for r in caplog.records
                                         if not r.name.startswith(("client", "fedsynth.client")))
    assert _leaks(server_side.encode()) == []
