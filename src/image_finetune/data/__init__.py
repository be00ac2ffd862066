"""The data engine: image folders (the product), CIFAR-10, the offline digits demo and Hugging Face datasets, with the
scan, decode, cache, split and seeded sampling behind them. A new data source goes in ``recipe/datasets.py`` (any
map-style dataset in one line); what the engine reads of any data module is ``contract.ClassificationData``."""

from image_finetune.data.base import ClassificationDataModule, EpochSampler, seeded_rngs
from image_finetune.data.cifar10 import CIFAR10DataModule
from image_finetune.data.digits import DigitsDataModule
from image_finetune.data.hfdata import HFDataModule
from image_finetune.data.imagefolder import ImageFolderDataModule

__all__ = [
    "CIFAR10DataModule",
    "ClassificationDataModule",
    "DigitsDataModule",
    "EpochSampler",
    "HFDataModule",
    "ImageFolderDataModule",
    "seeded_rngs",
]
