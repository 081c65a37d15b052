"""Multimodal report model: ResNet-50 image and audio encoders, cross-modal attention fusion,
finding heads with calibration, Grad-CAM evidence, and the assembled ``ReportModel``.

Imports ``core`` (decoder) and ``data`` (vocabulary, errors); takes arrays, never files
(except ``ReportModel.save_pretrained`` / ``from_pretrained``).
"""
from multimodal.audio_encoder import AudioEncoder, AudioEncoderConfig
from multimodal.evidence import Evidence
from multimodal.fusion import MODALITIES, Fusion, FusionConfig, HistorySummary
from multimodal.heads import (SIDES, FindingHeads, FindingLabels, HeadsConfig, HeadsOutput, coarse_location,
                              expected_calibration_error, fit_temperature, heads_loss, labels_to_targets, side_index)
from multimodal.image_encoder import ImageEncoder, ImageEncoderConfig
from multimodal.model import (CheckpointError, ModelInputs, ModelOutput, ReportModel, ReportPrediction, StudyInputs,
                              collate, read_config)
from multimodal.presets import PRESETS, ModelConfig

__all__ = [
    "AudioEncoder", "AudioEncoderConfig", "Evidence", "MODALITIES", "Fusion", "FusionConfig", "HistorySummary",
    "SIDES", "FindingHeads", "FindingLabels", "HeadsConfig", "HeadsOutput", "coarse_location",
    "expected_calibration_error", "fit_temperature", "heads_loss", "labels_to_targets", "side_index", "ImageEncoder",
    "ImageEncoderConfig", "CheckpointError", "ModelInputs", "ModelOutput", "ReportModel", "ReportPrediction",
    "StudyInputs", "collate", "read_config", "PRESETS", "ModelConfig",
]
