"""Report exports: plain text, JSON, FHIR R4 ``DiagnosticReport`` and DICOM Comprehensive SR.

Every export takes a ``Report`` whose ``final_sections`` may hold a clinician's edits
(``Report.with_edits``); the machine-generated original is always kept beside them:

* JSON: ``generated_sections`` (decoder output) and ``final_sections`` (what is signed off), plus
  ``edited``.
* FHIR: ``presentedForm[0]`` is the current report text (title "Preliminary report" or
  "Preliminary report (edited by a clinician)"); when edited, ``presentedForm[1]`` holds the
  unedited machine-generated text (title "Machine-generated draft (unedited)"). Plain
  attachments, no custom extension, so any R4 consumer shows both.
* DICOM SR: the section TEXT items carry the current text; when edited, a TEXT item
  "Comment" (DCM 121106) under the root holds the unedited generated report, prefixed
  "Machine-generated draft (unedited):".

Identity: outputs carry no patient name, ID, birth date or accession number. FHIR's
``subject`` is optional in R4 and is omitted; the SR's patient module is "ANONYMOUS" with
empty type-2 attributes. The source study is referenced by its Study Instance UID (FHIR:
``imagingStudy`` reference by ``identifier`` ``urn:dicom:uid`` / ``urn:oid:<uid>``; SR: the SR
belongs to the source study, and key slices are IMAGE items referencing their SOP instances).

FHIR resources come from ``fhir.resources`` (R4B package: R4's 4.3 maintenance release, with
the same DiagnosticReport), validated by its pydantic models on construction. The SR is
built with ``highdicom.sr.ComprehensiveSR`` (TID 2000-like: root "Diagnostic Imaging Report",
one TEXT item per section) and written with pydicom.
"""
from __future__ import annotations

import base64
import datetime as _dt
import json
import uuid
from io import BytesIO
from pathlib import Path

from app.report import BANNER, Report, atomic_write_bytes, atomic_write_text
from data.report_format import SECTION_HEADINGS, SECTION_KEYS

FORMATS = ("txt", "json", "fhir", "sr")
FILENAMES = {"txt": "report.txt", "json": "report.json", "fhir": "report.fhir.json", "sr": "report.sr.dcm"}
LOINC_IMAGING_REPORT = ("18748-4", "Diagnostic imaging study")
ANONYMOUS = "ANONYMOUS"


# ---------------------------------------------------------------------------- txt / json
def to_txt(report: Report) -> str:
    return report.to_text()


def to_json(report: Report) -> str:
    return report.to_json()


# ---------------------------------------------------------------------------- FHIR
def to_fhir(report: Report):
    """A validated ``fhir.resources.R4B.diagnosticreport.DiagnosticReport``."""
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    def attachment(text: str, title: str) -> dict:
        return {"contentType": "text/plain; charset=utf-8", "language": "en", "title": title,
                "data": base64.b64encode(text.encode("utf-8")).decode("ascii")}

    edited = report.edited
    forms = [attachment(f"{BANNER}\n\n{report.report_text}",
                        "Preliminary report (edited by a clinician)" if edited else "Preliminary report")]
    if edited:
        forms.append(attachment(f"{BANNER}\n\n{report.generated_text}", "Machine-generated draft (unedited)"))
    src = report.source
    desc = src.get("study_description") or f"{src.get('modality') or ''} study".strip()
    res: dict = {
        "resourceType": "DiagnosticReport",
        "id": str(uuid.uuid4()),
        "status": "preliminary",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": LOINC_IMAGING_REPORT[0],
                             "display": LOINC_IMAGING_REPORT[1]}], "text": desc},
        "issued": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "conclusion": report.impression or None,
        "presentedForm": forms,
    }
    if src.get("study_instance_uid"):
        res["imagingStudy"] = [{"type": "ImagingStudy", "identifier": {
            "system": "urn:dicom:uid", "value": f"urn:oid:{src['study_instance_uid']}"}}]
    if res["conclusion"] is None:
        del res["conclusion"]
    return DiagnosticReport.model_validate(res)


def fhir_json(report: Report) -> str:
    dr = to_fhir(report)
    return json.dumps(json.loads(dr.model_dump_json(exclude_none=True)), indent=2, ensure_ascii=False)


# ---------------------------------------------------------------------------- DICOM SR
def _evidence_dataset(src: dict, sop_uid: str | None, sop_class: str | None):
    """A minimal stand-in for a source instance: its UIDs, and empty patient/study identity
    (highdicom copies the patient module from the first evidence item)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.StudyInstanceUID = src["study_instance_uid"]
    ds.SeriesInstanceUID = src.get("series_instance_uid") or src["study_instance_uid"] + ".1"
    ds.SOPInstanceUID = sop_uid
    ds.SOPClassUID = sop_class
    ds.PatientName = ANONYMOUS + "^"  # family-name component only (a bare single word is ambiguous in DICOM PN)
    ds.PatientID = ANONYMOUS
    ds.PatientBirthDate = None
    ds.PatientSex = None
    ds.AccessionNumber = None
    ds.StudyID = None
    ds.StudyDate = None
    ds.StudyTime = None
    ds.ReferringPhysicianName = None
    ds.Modality = src.get("modality") or "OT"
    return ds


def to_sr(report: Report, series_number: int = 990, instance_number: int = 1):
    """A ``highdicom.sr.ComprehensiveSR`` dataset of the report (PARTIAL, UNVERIFIED, PRELIMINARY)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code
    from pydicom.uid import generate_uid

    src = dict(report.source)
    section_codes = {
        "clinical_information": codes.DCM.History,
        "technique": codes.DCM.CurrentProcedureDescriptions,
        "comparison": codes.DCM.PriorProcedureDescriptions,
        "findings": codes.DCM.Findings,
        "impression": codes.DCM.Impressions,
    }
    refs: list[tuple[str, str]] = []  # (sop_instance_uid, sop_class_uid) of key slices
    sop_class = src.get("sop_class_uid")
    if not src.get("study_instance_uid"):
        # Not DICOM (NIfTI, PNG): the SR starts a new study of its own; nothing to reference.
        src["study_instance_uid"] = generate_uid()
        src["series_instance_uid"] = generate_uid()
        sop_class = None

    root = hd.sr.ContainerContentItem(name=Code("18748-4", "LN", "Diagnostic Imaging Report"), template_id="2000")
    items = [hd.sr.TextContentItem(name=codes.DCM.Comment, value=BANNER, relationship_type="CONTAINS")]
    current = report.current_sections
    for key in SECTION_KEYS:
        text = (current.get(key) or "").strip() or "None."
        items.append(hd.sr.TextContentItem(name=section_codes[key], value=f"{SECTION_HEADINGS[key]}: {text}"
                                           if key != "findings" else text, relationship_type="CONTAINS"))
    for f in report.findings:
        if not (f.present and f.key_slices):
            continue
        finding = hd.sr.TextContentItem(
            name=codes.DCM.Finding, relationship_type="CONTAINS",
            value=f"{f.display} (model probability {f.probability:.2f}; key slices z={', '.join(str(k.z) for k in f.key_slices)})")
        children = []
        for k in f.key_slices:
            if k.sop_instance_uid and sop_class:
                children.append(hd.sr.ImageContentItem(
                    name=codes.DCM.BestIllustrationOfFinding, referenced_sop_class_uid=sop_class,
                    referenced_sop_instance_uid=k.sop_instance_uid, relationship_type="INFERRED FROM"))
                refs.append((k.sop_instance_uid, sop_class))
        if children:
            finding.ContentSequence = hd.sr.ContentSequence(children)
        items.append(finding)
    if report.edited:
        items.append(hd.sr.TextContentItem(name=codes.DCM.Comment, relationship_type="CONTAINS",
                                           value="Machine-generated draft (unedited):\n" + report.generated_text))
    root.ContentSequence = hd.sr.ContentSequence(items)

    seen: dict[str, str] = dict(refs)
    evidence = [_evidence_dataset(src, uid, cls) for uid, cls in seen.items()]
    if not evidence:  # highdicom needs one dataset to take study/patient identity from
        evidence = [_evidence_dataset(src, generate_uid(), sop_class or "1.2.840.10008.5.1.4.1.1.7")]
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=root,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer="medreport",
        is_complete=False,
        is_final=False,
        is_verified=False,
        record_evidence=bool(refs),
        series_description="medreport preliminary report (not for clinical use)",
        specific_character_set="ISO_IR 192",  # UTF-8: generated text is not limited to ASCII
    )
    if not refs and "CurrentRequestedProcedureEvidenceSequence" in sr:
        del sr.CurrentRequestedProcedureEvidenceSequence  # only the identity stand-in was listed: nothing real
    return sr


def sr_bytes(report: Report) -> bytes:
    sr = to_sr(report)
    buf = BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ---------------------------------------------------------------------------- files
def write_report(report: Report, out_dir: str | Path, formats=("txt", "json")) -> dict[str, Path]:
    """Write the requested formats into ``out_dir`` atomically; returns {format: path}.

    ``report.json`` is written last: batch runs treat its presence as "this study is done"."""
    out_dir = Path(out_dir)
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)}; choose from {', '.join(FORMATS)}")
    writers = {"txt": lambda: atomic_write_text(out_dir / FILENAMES["txt"], to_txt(report)),
               "fhir": lambda: atomic_write_text(out_dir / FILENAMES["fhir"], fhir_json(report)),
               "sr": lambda: atomic_write_bytes(out_dir / FILENAMES["sr"], sr_bytes(report)),
               "json": lambda: atomic_write_text(out_dir / FILENAMES["json"], to_json(report))}
    ordered = [f for f in ("txt", "fhir", "sr", "json") if f in formats]
    return {f: writers[f]() for f in ordered}


__all__ = ["FORMATS", "FILENAMES", "to_txt", "to_json", "to_fhir", "fhir_json", "to_sr", "sr_bytes", "write_report"]
