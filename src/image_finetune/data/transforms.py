"""Training augmentation, in one place: what a crop and a flip are and how every data path draws them. Edit it here.

A preset (``Augmentation``, ``configs/augment/*.yaml``: ``augment=none|light|standard|strong|randaugment``) meets the
data (``data.crop_scale``; ``data.hflip=false`` vetoes every flip) and the backbone's ``Preprocessing`` (size, eval
crop ratio, interpolation) in ``Augmentation.geometry``, giving the ``Geometry`` that every path reads. Its draws are
written once: ``Geometry.box`` (``RandomResizedCrop``'s ten tries of an area and a log-uniform aspect ratio, then the
central fallback) and ``Geometry.flip`` (the coin). They draw from ``EpochSampler``'s per-sample seed, so augmentation
is a function of ``(seed, epoch, index)`` and a resumed run sees exactly the batches of an uninterrupted one; which
stream a path draws from, and in what order, is part of that promise (tests/test_geometry.py pins the boxes).
Each path keeps only how it executes the geometry:

- image folders, in the workers: ``Geometry.transform()``, v2 on the uint8 image, drawing from torch's generator
  (``TorchDraws``; ``seeded_rngs`` seeds it per sample), the preset's ``ops`` after on the same stream;
- ``DatasetDataModule``: the same ``transform()`` at each image's own size (the dataset's transform sized it);
- ``data.decode=gpu``: ``device_decode.DeviceCrops`` cuts on the device the boxes drawn from ``SeedDraws(seed)``;
- CIFAR-10: ``cifar10.random_crop_flip``, ``Geometry.pad``'s crop and the flip read from each seed's digits, batched.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from image_finetune.core.errors import ConfigError
from image_finetune.data.preprocessing import Preprocessing, eval_transform

Box = tuple[int, int, int, int]  # top, left, height, width
Op = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Augmentation:
    """A training augmentation preset as configured; ``geometry`` resolves it for a data module.

    It names how strongly to augment; the data says what its images allow: ``data.crop_scale`` is the default crop
    scale and ``data.hflip=false`` (digits: a mirrored 2 is not a 2) vetoes every preset's flip.
    """

    name: str = "standard"
    random_crop: bool = True  # False: the eval crop (resize + centre crop): training sees whole, unmoved images
    crop_scale: Sequence[float] | None = None  # area range of the random resized crop; None: data.crop_scale
    hflip: bool = True  # random horizontal flip, where the data allows it (data.hflip)
    ops: Sequence[Op] = ()  # v2 transforms on the uint8 crop after crop and flip (TrivialAugmentWide, RandomErasing...)

    def __post_init__(self) -> None:
        if self.crop_scale is not None:
            lo, hi = (float(s) for s in self.crop_scale)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"data.augment.crop_scale={[lo, hi]} must be [min, max] with 0 < min <= max <= 1")

    def geometry(
        self,
        preprocessing: Preprocessing | None,
        crop_scale: Sequence[float] = (0.08, 1.0),
        hflip: bool = True,
        pad: int = 0,
    ) -> Geometry:
        """This preset on data cropped at ``crop_scale`` by default and mirrorable if ``hflip``, at the backbone's
        ``preprocessing`` (None: images keep the size a dataset gave them); ``pad`` > 0: CIFAR's pad-crop instead."""
        scale, p = self.crop_scale or crop_scale, preprocessing or Preprocessing(crop_ratio=1.0)
        return Geometry(
            preprocessing.size if preprocessing else None,
            (float(scale[0]), float(scale[1])) if self.random_crop and not pad else None,
            crop_ratio=p.crop_ratio,
            interpolation=p.interpolation,
            hflip=self.hflip and hflip,
            pad=pad if self.random_crop else 0,
            ops=tuple(self.ops),
        )


class TorchDraws:
    """Torch's CPU generator, drawn in float32 as torchvision draws (the workers: ``seeded_rngs`` seeds it)."""

    def uniform(self, low: float, high: float) -> float:
        return torch.empty(1).uniform_(low, high).item()

    def log_uniform(self, low: float, high: float) -> float:
        return torch.exp(torch.empty(1).uniform_(*torch.log(torch.tensor((low, high))).tolist())).item()

    def randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, size=(1,)))

    def coin(self) -> bool:
        return bool(torch.rand(1) < 0.5)


class SeedDraws(random.Random):
    """A sample's own ``random.Random(seed)`` (the device paths draw on the host). Its first draw is the flip coin,
    made whether or not the data may flip, so a box never depends on ``data.hflip``."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.heads = self.random() < 0.5

    def log_uniform(self, low: float, high: float) -> float:
        return math.exp(self.uniform(math.log(low), math.log(high)))

    def coin(self) -> bool:
        return self.heads


@dataclass(frozen=True)
class Geometry:
    """A preset resolved for one data module (``Augmentation.geometry``): all that any path needs to augment."""

    size: int | None = 224  # output side; None: each image keeps its own size
    crop_scale: tuple[float, float] | None = (0.08, 1.0)  # the random resized crop's area range; None: no random crop
    aspect: tuple[float, float] = (3 / 4, 4 / 3)  # its aspect ratio range
    crop_ratio: float = 0.875  # the eval crop: resize the short side to size / crop_ratio, centre-crop size
    interpolation: str = "bilinear"
    hflip: bool = True
    pad: int = 0  # > 0: a same-size crop of the image reflect-padded by this much (CIFAR-10's, on the device)
    ops: tuple[Op, ...] = ()

    def box(self, height: int, width: int, draws: TorchDraws | SeedDraws) -> Box:
        """The random resized crop's box, as ``RandomResizedCrop.get_params`` draws it; else the eval crop's."""
        if self.crop_scale is None:
            return center_box(height, width, self.crop_ratio)
        for _ in range(10):
            target = height * width * draws.uniform(*self.crop_scale)
            aspect = draws.log_uniform(*self.aspect)
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return draws.randint(0, height - h), draws.randint(0, width - w), h, w
        if width / height < min(self.aspect):  # fallback: the central crop of the allowed aspect ratios
            w, h = width, round(width / min(self.aspect))
        elif width / height > max(self.aspect):
            h, w = height, round(height * max(self.aspect))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def flip(self, draws: TorchDraws | SeedDraws) -> bool:
        """Whether to mirror this sample: never where the data forbids it (and no draw then)."""
        return self.hflip and draws.coin()

    def transform(self) -> v2.Compose:
        """The workers' pipeline for a uint8 image: the crop (random, else the eval crop), the flip, the ops."""
        steps: list[Op] = [RandomResizedCrop(self)] if self.crop_scale is not None else []
        if self.crop_scale is None and self.size is not None:
            steps.extend(eval_transform(self.size, self.crop_ratio, self.interpolation).transforms)
        steps += [RandomHorizontalFlip(self)] if self.hflip else []
        return v2.Compose([*steps, *self.ops] or [v2.Identity()])  # Compose refuses an empty list


class RandomResizedCrop(v2.Transform):
    """v2's ``RandomResizedCrop``, drawing ``Geometry.box``; at the geometry's size, or the image's own."""

    def __init__(self, geometry: Geometry) -> None:
        super().__init__()
        self.geometry, self.scale = geometry, geometry.crop_scale

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = TF.get_size(flat_inputs[0])
        top, left, h, w = self.geometry.box(height, width, TorchDraws())
        size = [self.geometry.size] * 2 if self.geometry.size else [height, width]
        return {"top": top, "left": left, "height": h, "width": w, "size": size}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        mode = v2.InterpolationMode(self.geometry.interpolation)
        return TF.resized_crop(inpt, **params, interpolation=mode, antialias=True)


class RandomHorizontalFlip(v2.RandomHorizontalFlip):
    """v2's ``RandomHorizontalFlip``, tossing ``Geometry.flip``'s coin."""

    def __init__(self, geometry: Geometry) -> None:
        super().__init__()
        self.geometry = geometry

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return TF.horizontal_flip(image) if self.geometry.flip(TorchDraws()) else image


def center_box(height: int, width: int, crop_ratio: float = 0.875) -> Box:
    """The region that ``Resize(size / crop_ratio)`` + ``CenterCrop(size)`` keeps, in the original image's pixels."""
    h = w = max(1, round(min(height, width) * crop_ratio))
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(
    size: int, crop_scale: Sequence[float] = (0.08, 1.0), hflip: bool = True, augment: Augmentation | None = None,
    crop_ratio: float = 0.875, interpolation: str = "bilinear",
) -> v2.Compose:  # fmt: skip
    """The workers' training transform of ``augment`` (None: ``Augmentation()``) at ``size``."""
    preprocessing = Preprocessing(size, crop_ratio, interpolation=interpolation)
    return (augment or Augmentation()).geometry(preprocessing, crop_scale, hflip).transform()
