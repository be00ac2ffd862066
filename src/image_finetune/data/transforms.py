"""CPU transforms for image files: torchvision transforms v2 on uint8 tensors (faster than PIL + v1, GUIDE.md s.6)."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision.transforms import v2

#: Resize kernels a backbone's preprocessing may name (torchvision's weights and timm's configs use the first two).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def train_transform(
    size: int, crop_scale: Sequence[float] = (0.08, 1.0), hflip: bool = True, interpolation: str = "bilinear"
) -> v2.Compose:
    """Inception-style random resized crop (+ horizontal flip), the standard ImageNet fine-tuning augmentation."""
    mode = v2.InterpolationMode(interpolation)
    crop = v2.RandomResizedCrop(size, scale=tuple(crop_scale), interpolation=mode, antialias=True)
    steps: list[v2.Transform] = [crop]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def eval_transform(size: int, crop_ratio: float = 0.875, interpolation: str = "bilinear") -> v2.Compose:
    """Resize the short side to ``size / crop_ratio``, centre-crop ``size``: how the pretrained weights were scored."""
    mode = v2.InterpolationMode(interpolation)
    return v2.Compose([v2.Resize(round(size / crop_ratio), interpolation=mode, antialias=True), v2.CenterCrop(size)])
