"""Backbones (torchvision, timm, or yours: any builder returning a ``Backbone``) and the Lightning module that fine-tunes them."""

from image_finetune.models.backbones import Backbone, build_backbone, torchvision_backbone
from image_finetune.models.classifier import ClassifierNet, ImageClassifier
from image_finetune.models.timm_backbone import timm_backbone

__all__ = ["Backbone", "ClassifierNet", "ImageClassifier", "build_backbone", "timm_backbone", "torchvision_backbone"]
