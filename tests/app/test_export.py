"""Exports: FHIR R4 DiagnosticReport validates and carries no patient identity; the DICOM
Comprehensive SR reads back and references the source study; edited reports keep the original."""
from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _model import EXAMPLES, tiny_model_dir  # noqa: E402

from app import export  # noqa: E402
from app.pipeline import PipelineConfig, ReportPipeline  # noqa: E402

STUDY = EXAMPLES / "studies" / "syn00000"
SOURCE = pydicom.dcmread(STUDY / "IM0001.dcm")  # the real identity the exports must not carry
IDENTITY = [str(SOURCE.PatientName), str(SOURCE.PatientID)]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pipe = ReportPipeline.from_dir(tiny_model_dir(tmp_path_factory),
                                   PipelineConfig(max_new_tokens=12, max_evidence_findings=2, evidence_threshold=0.0))
    r = pipe.run(STUDY)
    # Make sure at least one head decision is "present" with key slices (the SR lists those).
    top = max(r.findings, key=lambda f: f.probability)
    top.present = True
    return r


def _forms(doc: dict) -> list[tuple[str, str]]:
    return [(f["title"], base64.b64decode(f["data"]).decode("utf-8")) for f in doc["presentedForm"]]


def test_fhir_validates_and_is_anonymous(report):
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    text = export.fhir_json(report)
    doc = json.loads(text)
    DiagnosticReport.model_validate(doc)  # round trip through the validator
    assert doc["status"] == "preliminary" and "subject" not in doc
    ident = doc["imagingStudy"][0]["identifier"]
    assert ident == {"system": "urn:dicom:uid", "value": f"urn:oid:{SOURCE.StudyInstanceUID}"}
    forms = _forms(doc)
    assert len(forms) == 1 and report.report_text in forms[0][1] and "not for clinical use" in forms[0][1]
    for s in IDENTITY:
        assert s not in text


def test_fhir_edited_keeps_generated_as_second_form(report):
    edited = report.with_edits({"impression": "Small right pleural effusion."})
    doc = json.loads(export.fhir_json(edited))
    assert doc["conclusion"] == "Small right pleural effusion."
    (t0, final), (t1, generated) = _forms(doc)
    assert "edited" in t0 and "Small right pleural effusion." in final
    assert "unedited" in t1 and report.generated_text in generated


def test_sr_reads_back_and_references_source(report, tmp_path):
    paths = export.write_report(report.with_edits({"impression": "Edited impression."}), tmp_path, export.FORMATS)
    assert set(paths) == set(export.FORMATS) and all(p.is_file() for p in paths.values())
    ds = pydicom.dcmread(paths["sr"])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert ds.Modality == "SR" and ds.StudyInstanceUID == SOURCE.StudyInstanceUID
    assert ds.PatientName.family_name == "ANONYMOUS" and ds.PatientID == "ANONYMOUS" and ds.PreliminaryFlag == "PRELIMINARY" and ds.CompletionFlag == "PARTIAL"
    raw = paths["sr"].read_bytes()
    for s in IDENTITY:
        assert s.encode() not in raw
    ev = ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert ev.StudyInstanceUID == SOURCE.StudyInstanceUID
    assert ev.ReferencedSeriesSequence[0].SeriesInstanceUID == SOURCE.SeriesInstanceUID
    study_sops = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in STUDY.glob("*.dcm")}
    refs = {r.ReferencedSOPInstanceUID for r in ev.ReferencedSeriesSequence[0].ReferencedSOPSequence}
    keyed = {k.sop_instance_uid for f in report.findings if f.present for k in f.key_slices}
    assert refs and refs == keyed and refs <= study_sops
    texts = {it.ConceptNameCodeSequence[0].CodeMeaning: str(it.get("TextValue", "")) for it in ds.ContentSequence}
    assert "Edited impression." in texts["Impressions"]
    comments = [str(it.TextValue) for it in ds.ContentSequence if it.ConceptNameCodeSequence[0].CodeValue == "121106"]
    assert any("Machine-generated draft (unedited)" in c and report.generated_text.strip() in c for c in comments)


def test_sr_without_dicom_source(report):
    import copy

    r = copy.copy(report)
    r.source = {**report.source, "study_instance_uid": None, "series_instance_uid": None, "sop_class_uid": None}
    ds = pydicom.dcmread(__import__("io").BytesIO(export.sr_bytes(r)))
    assert ds.StudyInstanceUID and ds.StudyInstanceUID != SOURCE.StudyInstanceUID
    assert "CurrentRequestedProcedureEvidenceSequence" not in ds and "PertinentOtherEvidenceSequence" not in ds
    assert ds.PatientName.family_name == "ANONYMOUS"


def test_json_keeps_generated_and_final(report, tmp_path):
    edited = report.with_edits({"findings": "Lungs and airways: Clear."})
    export.write_report(edited, tmp_path, ("json", "txt"))
    d = json.loads((tmp_path / "report.json").read_text())
    assert d["edited"] and d["final_sections"]["findings"] == "Lungs and airways: Clear."
    assert d["generated_sections"] == report.sections
    assert "Lungs and airways: Clear." in (tmp_path / "report.txt").read_text()
    with pytest.raises(ValueError):
        export.write_report(report, tmp_path, ("pdf",))
