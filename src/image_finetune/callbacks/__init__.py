"""Callbacks that make runs reproducible, self-describing, safe under DDP, and visible (TensorBoard, console); every
callback a config names is importable from here, also those that live with their code (``checkpoints.io``, ``results``)."""

from image_finetune.callbacks.ddp import CheckWeightsInSync
from image_finetune.callbacks.ema import EMAWeights
from image_finetune.callbacks.progress import CompactModelSummary, TrainingProgressBar
from image_finetune.callbacks.reproducibility import ReseedEveryBatch, StoreRunConfig
from image_finetune.callbacks.visuals import (
    ConfusionMatrixImage,
    FinetunePhaseMarker,
    MisclassifiedGrid,
    PerClassAccuracy,
    TrainImageGrid,
)
from image_finetune.checkpoints.io import LastCheckpoint, ModelCheckpoint
from image_finetune.core.results import RunSummary

__all__ = [
    "CheckWeightsInSync",
    "CompactModelSummary",
    "ConfusionMatrixImage",
    "EMAWeights",
    "FinetunePhaseMarker",
    "LastCheckpoint",
    "MisclassifiedGrid",
    "ModelCheckpoint",
    "PerClassAccuracy",
    "ReseedEveryBatch",
    "RunSummary",
    "StoreRunConfig",
    "TrainImageGrid",
    "TrainingProgressBar",
]
