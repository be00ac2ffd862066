"""Backbones by name and the Lightning module that fine-tunes them."""

from image_finetune.models.backbones import Backbone, build_backbone
from image_finetune.models.classifier import ClassifierNet, ImageClassifier

__all__ = ["Backbone", "ClassifierNet", "ImageClassifier", "build_backbone"]
