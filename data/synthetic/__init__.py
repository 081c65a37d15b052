"""Synthetic chest CT studies with known truth: phantom volumes written as DICOM, patient
histories with planted facts, spoken indications, and reference reports written from the truth.

Entry point: :func:`data.synthetic.writer.write_dataset` (CLI: ``medreport make-dataset``).
"""
