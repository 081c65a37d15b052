"""medreport application layer: CLI, pipeline, batch, evaluation, export and the web UI.

The only layer that configures logging, reads files for the model, or talks to users.
"""
__version__ = "0.1.0"
NOT_FOR_CLINICAL_USE = (
    "Demo model trained on synthetic data - not for clinical use. "
    "Every report is preliminary and must be checked by a radiologist."
)
