"""The data engine: image folders (the product), labels in a CSV file, Hugging Face datasets, CIFAR-10 and the
offline digits demo, with the scan, decode, cache, split and seeded sampling behind them. A new data source goes in
``recipe/datasets.py`` (any map-style dataset in one line); what the engine reads of any data module is
``contract.ClassificationData``."""

from image_finetune.data.base import ClassificationDataModule, EpochSampler, seeded_rngs
from image_finetune.data.cifar10 import CIFAR10DataModule
from image_finetune.data.csvfile import CsvDataModule
from image_finetune.data.digits import DigitsDataModule
from image_finetune.data.hfdata import HFDataModule
from image_finetune.data.imagefolder import ImageFolderDataModule

__all__ = [
    "CIFAR10DataModule",
    "ClassificationDataModule",
    "CsvDataModule",
    "DigitsDataModule",
    "EpochSampler",
    "HFDataModule",
    "ImageFolderDataModule",
    "seeded_rngs",
]
