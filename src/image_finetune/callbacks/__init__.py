"""Callbacks that make runs reproducible, self-describing, safe under DDP, and visible (TensorBoard, console)."""

from image_finetune.callbacks.ddp import CheckWeightsInSync
from image_finetune.callbacks.ema import EMAWeights
from image_finetune.callbacks.progress import (
    CompactModelSummary,
    ModelCheckpoint,
    RunSummary,
    TrainingProgressBar,
    add_test,
    flat_metrics,
    run_results,
    scalar_metrics,
    silence_lightning_noise,
    summarize_run,
)
from image_finetune.callbacks.reproducibility import LastCheckpoint, ReseedEveryBatch, StoreRunConfig
from image_finetune.callbacks.visuals import (
    ConfusionMatrixImage,
    FinetunePhaseMarker,
    MisclassifiedGrid,
    PerClassAccuracy,
    TrainImageGrid,
)

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
    "add_test",
    "flat_metrics",
    "run_results",
    "scalar_metrics",
    "silence_lightning_noise",
    "summarize_run",
]
