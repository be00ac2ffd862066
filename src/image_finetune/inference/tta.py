"""Test-time augmentation: average the class probabilities of a few views of each image (``tta=flip|five_crop``).

One definition serves ``eval.py`` (which reports the plain and the TTA score side by side), ``predict.py`` and the
``Classifier`` API. The views are made on the device from a batch; ``five_crop`` needs more of the image than the
plain centre crop, so it asks the loader for a larger square (``input_size``) and crops on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from image_finetune.core.errors import ConfigError

MODES = ("flip", "five_crop")
#: five_crop reads a square this much larger than the crop when the preprocessing itself crops less (0.875 = 224/256).
FIVE_CROP_RATIO = 0.875


@dataclass(frozen=True)
class TTA:
    """``flip``: the image and its mirror (2 views). ``five_crop``: the four corners and the centre of a square
    ``input_size`` wide, each also mirrored (10 views, torchvision's TenCrop)."""

    mode: str
    size: int
    """The square side the network takes (the preprocessing's crop)."""
    input_size: int
    """The square side the loader delivers: ``size`` for flip, larger for five_crop."""

    @classmethod
    def parse(cls, mode: str | None, size: int, crop_ratio: float = 1.0) -> TTA | None:
        """From the ``tta`` setting (None or ``none``: off) and the preprocessing's crop size and ratio."""
        if mode is None or str(mode).lower() in {"none", "null", "false", ""}:
            return None
        if mode not in MODES:
            raise ConfigError(
                f"tta={mode!r}: choose flip (image + mirror), five_crop (5 crops + mirrors) or null (off)"
            )
        input_size = round(size / min(crop_ratio, FIVE_CROP_RATIO)) if mode == "five_crop" else size
        return cls(mode, size, input_size)

    def views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The views of an NCHW batch, each NCHW at ``size``."""
        if self.mode == "flip":
            return [images, images.flip(-1)]
        if images.shape[-2:] != (self.input_size, self.input_size):  # in-memory data (CIFAR): scale up on the device
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", antialias=False)
        s, big = self.size, self.input_size
        centre = (big - s) // 2
        crops = [
            images[..., y : y + s, x : x + s]
            for y, x in ((0, 0), (0, big - s), (big - s, 0), (big - s, big - s), (centre, centre))
        ]
        return [view for crop in crops for view in (crop, crop.flip(-1))]

    def probabilities(
        self, forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, multilabel: bool = False
    ) -> torch.Tensor:
        """Mean softmax over the views (float32), one view at a time so memory stays that of the plain batch;
        ``multilabel``: the mean sigmoid per label."""
        total = None
        views = self.views(images)
        for view in views:
            logits = forward(view.contiguous()).float()
            p = logits.sigmoid() if multilabel else logits.softmax(dim=-1)
            total = p if total is None else total + p
        assert total is not None
        return total / len(views)
