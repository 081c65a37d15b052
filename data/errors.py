"""One exception family for everything a user can get wrong.

Every message says what was wrong and what to do about it. Messages never carry
patient-identifying data (names, IDs, dates of birth, UIDs).
"""
from __future__ import annotations


class MedreportError(Exception):
    """Base of all user-facing errors; the CLI prints the message without a traceback."""


class StudyError(MedreportError):
    """A study could not be loaded."""
