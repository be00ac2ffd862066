"""Data modules: image folders (the product), CIFAR-10, and the offline digits demo."""

from image_finetune.data.base import ClassificationDataModule, EpochSampler
from image_finetune.data.cifar10 import CIFAR10DataModule
from image_finetune.data.digits import DigitsDataModule
from image_finetune.data.imagefolder import ImageFolderDataModule

__all__ = ["CIFAR10DataModule", "ClassificationDataModule", "DigitsDataModule", "EpochSampler", "ImageFolderDataModule"]
