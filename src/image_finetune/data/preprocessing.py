"""``Preprocessing``: how a file becomes the network's input, as the backbone's pretrained weights expect it.

The backbone reports it (input size, crop ratio, mean/std, interpolation: torchvision from its weights' transforms,
timm from ``resolve_data_config``); the data module may override the size (``data.image_size``, e.g. digits at
32 px) and the crop ratio; the checkpoint stores the result as plain values (``as_dict``), and the export JSON holds
the same dict. ``eval.py``, ``predict.py``, ``inference.Classifier`` and the exports read it back from there, so
they never depend on config key names or on the code that trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from image_finetune.core.errors import ConfigError
from image_finetune.data.decode import decode_rgb, to_rgb, to_uint8_tensor

#: Resize kernels a backbone's preprocessing may name (torchvision's weights and timm's configs use the first two).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_DESCRIPTION = "float32 RGB in [0, 1], NCHW; mean/std are applied inside the model"


@dataclass(frozen=True)
class Preprocessing:
    """Decode, resize the short side to ``resize`` (``size / crop_ratio``), centre-crop ``size``: the eval transform.

    ``mean``/``std`` are recorded for exports' JSON and for serving code only: the network normalises its input itself.
    """

    size: int = 224
    crop_ratio: float = 0.875
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        # Plain Python values (not numpy/torch scalars, not lists): hparams must load with weights_only=True.
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "crop_ratio", float(self.crop_ratio))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "interpolation", str(self.interpolation).split(",")[0].strip().lower())
        if self.size < 1:
            raise ConfigError(f"image_size={self.size} must be a positive number of pixels")
        if not 0 < self.crop_ratio <= 1:
            raise ConfigError(
                f"crop_ratio={self.crop_ratio} must be in (0, 1]: the centre crop is that fraction of the resized image"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation={self.interpolation!r}: choose one of {list(INTERPOLATIONS)}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"mean={self.mean} and std={self.std} need one value per RGB channel")

    def override(self, *, size: int | None = None, crop_ratio: float | None = None) -> Preprocessing:
        """This preprocessing with the data's own size and/or crop ratio (None keeps the backbone's)."""
        changes: dict[str, Any] = {}
        if size is not None:
            changes["size"] = size
        if crop_ratio is not None:
            changes["crop_ratio"] = crop_ratio
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def resize(self) -> int:
        """Short side before the crop, computed exactly as ``eval_transform`` does."""
        return round(self.size / self.crop_ratio)

    def as_dict(self) -> dict[str, Any]:
        """Plain values for checkpoint hparams and the export JSON (``resize``/``crop`` spell out what to do)."""
        return {
            "resize": self.resize,
            "crop": self.size,
            "crop_ratio": self.crop_ratio,
            "interpolation": self.interpolation,
            "antialias": True,
            "mean": list(self.mean),
            "std": list(self.std),
            "input": INPUT_DESCRIPTION,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        """Inverse of ``as_dict``; also reads JSONs written before ``crop_ratio`` and ``interpolation`` were stored."""
        crop = int(d["crop"])
        ratio = d.get("crop_ratio") or crop / d["resize"]
        return cls(crop, ratio, tuple(d["mean"]), tuple(d["std"]), d.get("interpolation") or "bilinear")

    @classmethod
    def coerce(cls, value: Preprocessing | Mapping[str, Any] | None) -> Preprocessing | None:
        """A ``Preprocessing``, or its ``as_dict`` form (e.g. from a config or hparams), or None."""
        if value is None or isinstance(value, Preprocessing):
            return value
        return cls.from_dict(value)

    @cached_property
    def transform(self) -> torch.nn.Module:
        return eval_transform(self.size, self.crop_ratio, self.interpolation)

    def load(self, image: str | bytes | Image.Image | Any) -> torch.Tensor:
        """uint8 CHW, resized and cropped; raises the decoder's exception for an unreadable file (or bytes).

        Files decode as in training (JPEGs at reduced scale, EXIF orientation, transparency on white); a PIL image is
        converted the same way, on a copy, so the caller's image is left as it was.
        """
        if isinstance(image, Image.Image):
            rgb = to_rgb(image.copy())
        elif isinstance(image, bytes):  # a file's content (an HTTP upload): decoded exactly as the file would be
            rgb = decode_rgb("<bytes>", min_size=self.resize, data=image)
        else:
            rgb = decode_rgb(image, min_size=self.resize)
        # channels_last as in ImageFileDataset: eval and predict then run the very same (and the faster) resize kernel.
        return self.transform(to_uint8_tensor(rgb, channels_last=True)).contiguous()

    def __call__(self, image: str | Image.Image | Any) -> torch.Tensor:
        """float32 CHW in [0, 1]: what the network takes."""
        return self.load(image).float().div_(255)


def eval_transform(size: int, crop_ratio: float = 0.875, interpolation: str = "bilinear") -> v2.Compose:
    """Resize the short side to ``size / crop_ratio``, centre-crop ``size``: how the pretrained weights were scored."""
    mode = v2.InterpolationMode(interpolation)
    return v2.Compose([v2.Resize(round(size / crop_ratio), interpolation=mode, antialias=True), v2.CenterCrop(size)])
