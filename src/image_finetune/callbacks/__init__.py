"""Callbacks that make runs reproducible, self-describing and safe under DDP."""

from image_finetune.callbacks.ddp import CheckWeightsInSync
from image_finetune.callbacks.reproducibility import ReseedEveryEpoch, StoreRunConfig

__all__ = ["CheckWeightsInSync", "ReseedEveryEpoch", "StoreRunConfig"]
