"""CPU transforms for image files: torchvision transforms v2 on uint8 tensors (faster than PIL + v1, GUIDE.md s.6)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from image_finetune.errors import ConfigError

#: Resize kernels a backbone's preprocessing may name (torchvision's weights and timm's configs use the first two).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Augmentation:
    """A training augmentation preset (``configs/augment/*.yaml``, chosen with ``augment=none|light|standard|strong|randaugment``).

    It names how strongly to augment; the data says what its images allow: ``data.crop_scale`` is the default crop
    scale and ``data.hflip=false`` (digits: a mirrored 2 is not a 2) vetoes every preset's flip. Everything runs in
    the workers, on the uint8 image, seeded per sample by ``EpochSampler``'s ``(index, sample_seed)``.
    """

    name: str = "standard"
    random_crop: bool = True
    """False: the eval crop (resize + centre crop), so training sees whole, unmoved images."""
    crop_scale: tuple[float, float] | None = None
    """Area fraction range of the random resized crop; None: the data config's ``data.crop_scale``."""
    hflip: bool = True
    """Random horizontal flip, where the data allows it (``data.hflip``)."""
    ops: Sequence[Callable[[torch.Tensor], torch.Tensor]] = ()
    """v2 transforms applied to the uint8 crop after crop and flip (TrivialAugmentWide, RandomErasing, ...)."""

    def __post_init__(self) -> None:
        if self.crop_scale is not None:
            lo, hi = (float(s) for s in self.crop_scale)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"data.augment.crop_scale={[lo, hi]} must be [min, max] with 0 < min <= max <= 1")
            object.__setattr__(self, "crop_scale", (lo, hi))
        object.__setattr__(self, "ops", tuple(self.ops))


def train_transform(
    size: int,
    crop_scale: Sequence[float] = (0.08, 1.0),
    hflip: bool = True,
    augment: Augmentation | None = None,
    crop_ratio: float = 0.875,
    interpolation: str = "bilinear",
) -> v2.Compose:
    """The training transform: ``augment``'s preset (None: random resized crop at ``crop_scale`` + flip, the default).

    ``hflip=False`` means the data must never be mirrored, whatever the preset says.
    """
    augment = augment or Augmentation()
    scale, flip = crop_and_flip(augment, crop_scale, hflip)
    if scale is not None:
        steps: list[Callable[[torch.Tensor], torch.Tensor]] = [
            v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode(interpolation), antialias=True)
        ]
    else:
        steps = list(eval_transform(size, crop_ratio, interpolation).transforms)
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps.extend(augment.ops)
    return v2.Compose(steps)


def crop_and_flip(
    augment: Augmentation | None, crop_scale: Sequence[float], hflip: bool
) -> tuple[tuple[float, float] | None, bool]:
    """What a preset does to the geometry on this data: the random resized crop's area range (None: no random crop)
    and whether to flip (``hflip=False``, the data's veto, wins). The CPU transforms and ``data.decode=gpu`` share it."""
    augment = augment or Augmentation()
    scale = augment.crop_scale or crop_scale
    return ((float(scale[0]), float(scale[1])) if augment.random_crop else None), augment.hflip and hflip


class SameSizeAugmentation:
    """A preset on images that already have their final size (a dataset's own transform sized them): a random resized
    crop back to that size, the flip, the preset's ops. ``DatasetDataModule`` applies it to its training split."""

    def __init__(self, augment: Augmentation, crop_scale: Sequence[float] = (0.5, 1.0), hflip: bool = True) -> None:
        self.augment, self.crop_scale, self.hflip = augment, tuple(crop_scale), hflip

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
        scale, flip = crop_and_flip(self.augment, self.crop_scale, self.hflip)
        if scale is not None:
            steps.append(v2.RandomResizedCrop((height, width), scale=scale, antialias=True))
        if flip:
            steps.append(v2.RandomHorizontalFlip())
        for step in (*steps, *self.augment.ops):
            image = step(image)
        return image


def eval_transform(size: int, crop_ratio: float = 0.875, interpolation: str = "bilinear") -> v2.Compose:
    """Resize the short side to ``size / crop_ratio``, centre-crop ``size``: how the pretrained weights were scored."""
    mode = v2.InterpolationMode(interpolation)
    return v2.Compose([v2.Resize(round(size / crop_ratio), interpolation=mode, antialias=True), v2.CenterCrop(size)])
