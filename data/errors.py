"""One exception family for everything a user can get wrong.

Every message says what was wrong and what to do about it. Messages never carry
patient-identifying data (names, IDs, dates of birth, UIDs): they name files by their
path relative to what the user gave us, and series by short labels ("series 2 (CT, 120 images)").

    MedreportError
    ├── StudyError                      a study could not be loaded
    │   ├── EmptyStudyError             nothing image-like was found
    │   ├── NotDicomError               a file is neither DICOM nor a known image format
    │   ├── NoPixelDataError            DICOM without pixel data (SR, dose report, DICOMDIR, ...)
    │   ├── UnsupportedTransferSyntaxError  compressed pixel data no installed plugin can decode
    │   ├── PixelDecodeError            pixel data present but corrupt / truncated
    │   ├── InconsistentSlicesError     slices of one series differ in size or orientation
    │   ├── NoUsableSeriesError         only localizers, reports, secondary captures, ...
    │   ├── MultipleStudiesError        DICOM of several StudyInstanceUIDs in one upload
    │   ├── StudyTooLargeError          volume / archive above the configured limits
    │   ├── UnsafeArchiveError          zip with path traversal, too many entries, zip bomb
    │   └── UnsupportedFormatError      a file type we do not read
    ├── AudioError                      dictation audio unreadable or too long
    └── HistoryError                    patient-history file unreadable
"""
from __future__ import annotations


class MedreportError(Exception):
    """Base of all user-facing errors; the CLI prints the message without a traceback."""


class StudyError(MedreportError):
    """A study could not be loaded."""


class EmptyStudyError(StudyError):
    """No image files were found where a study was expected."""


class NotDicomError(StudyError):
    """A file that should be DICOM is not (no 'DICM' preamble and no parseable dataset)."""


class NoPixelDataError(StudyError):
    """A DICOM object without pixel data (structured report, dose report, DICOMDIR, ...)."""


class UnsupportedTransferSyntaxError(StudyError):
    """Compressed pixel data for which no installed decoder is available."""


class PixelDecodeError(StudyError):
    """Pixel data could not be decoded (truncated file, corrupt codestream, bad header)."""


class InconsistentSlicesError(StudyError):
    """Slices of the chosen series do not form one volume (different sizes/orientations)."""


class NoUsableSeriesError(StudyError):
    """No series is suitable for reporting; the message lists what was found."""


class MultipleStudiesError(StudyError):
    """DICOM files of more than one StudyInstanceUID were given as one study."""


class StudyTooLargeError(StudyError):
    """The study (or archive) exceeds a configured size limit."""


class UnsafeArchiveError(StudyError):
    """A zip archive was refused for safety (traversal, too many entries, compression bomb)."""


class UnsupportedFormatError(StudyError):
    """A file format we do not read."""


class AudioError(MedreportError):
    """A dictation audio file could not be used."""


class HistoryError(MedreportError):
    """A patient-history file could not be read."""
