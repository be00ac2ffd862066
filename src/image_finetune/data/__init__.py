"""Data modules: image folders (the product), labels in a CSV file, CIFAR-10, the offline digits demo, and any
dataset wrapped in one line."""

from image_finetune.data.base import ClassificationDataModule, EpochSampler, seeded_rngs
from image_finetune.data.cifar10 import CIFAR10DataModule
from image_finetune.data.csvfile import CsvDataModule
from image_finetune.data.datasets import DatasetDataModule, SeededDataset
from image_finetune.data.digits import DigitsDataModule
from image_finetune.data.imagefolder import ImageFolderDataModule

__all__ = [
    "CIFAR10DataModule",
    "ClassificationDataModule",
    "CsvDataModule",
    "DatasetDataModule",
    "DigitsDataModule",
    "EpochSampler",
    "ImageFolderDataModule",
    "SeededDataset",
    "seeded_rngs",
]
