"""Callbacks that make runs reproducible, self-describing, safe under DDP, and visible (TensorBoard, console)."""

from image_finetune.callbacks.ddp import CheckWeightsInSync
from image_finetune.callbacks.progress import RunSummary, TrainingProgressBar, summarize_run
from image_finetune.callbacks.reproducibility import ReseedEveryEpoch, StoreRunConfig
from image_finetune.callbacks.visuals import ConfusionMatrixImage, MisclassifiedGrid, PerClassAccuracy, TrainImageGrid

__all__ = [
    "CheckWeightsInSync",
    "ConfusionMatrixImage",
    "MisclassifiedGrid",
    "PerClassAccuracy",
    "ReseedEveryEpoch",
    "RunSummary",
    "StoreRunConfig",
    "TrainImageGrid",
    "TrainingProgressBar",
    "summarize_run",
]
