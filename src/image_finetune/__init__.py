"""Fine-tune pretrained image classifiers (torchvision or timm backbones) on folders of images, with Lightning and Hydra."""

__version__ = "0.1.0"
