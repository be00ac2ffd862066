"""Fine-tune pretrained torchvision image classifiers on folders of images, with Lightning and Hydra."""

__version__ = "0.1.0"
