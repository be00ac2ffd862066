"""Backbones (torchvision, timm, or yours: any builder returning a ``Backbone``) and the module fine-tuning them.

(timm's builder is ``image_finetune.models.timm_backbone.timm_backbone``; it is not re-exported here, where its name
would hide the module of the same name from Hydra's ``_target_`` lookup.)
"""

from image_finetune.models.backbones import Backbone, build_backbone, torchvision_backbone
from image_finetune.models.classifier import ClassifierNet, ImageClassifier

__all__ = ["Backbone", "ClassifierNet", "ImageClassifier", "build_backbone", "torchvision_backbone"]
