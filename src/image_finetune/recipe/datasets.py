"""A new data source: edit or add a data module here. Any map-style dataset (a torchvision dataset, your own) in one line,
``DatasetDataModule(train=..., val=...)`` (``configs/data/flowers102.yaml`` is the worked example). Image folders,
CIFAR-10 and digits are the engine's own (``data/``); what the engine reads of any data module is
``data.contract.ClassificationData``.

The contract every data module here keeps (see ``ClassificationDataModule``): training datasets are indexed with the
``(index, sample_seed)`` keys that ``EpochSampler`` yields, so augmentation is a function of (seed, epoch, index) alone
and a resumed run sees exactly the batches an uninterrupted one would; images arrive as uint8 CHW tensors of one size.
``SeededDataset`` adapts a dataset that knows nothing of this.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from image_finetune.core.errors import ConfigError, DataError
from image_finetune.data.base import ClassificationDataModule, seeded_rngs
from image_finetune.data.decode import to_uint8_tensor
from image_finetune.data.preprocessing import Preprocessing
from image_finetune.data.transforms import Augmentation


class SeededDataset(Dataset):
    """``dataset[i] -> (image, label)`` made to take ``(index, seed)`` keys: its transforms draw from seeded RNGs.

    The wrapped dataset's own ``transform`` runs inside ``seeded_rngs(seed)`` (torch, random and numpy seeded for that
    sample, the caller's streams restored after), so any torchvision transform is reproducible per sample. Images are
    returned as uint8 CHW tensors: PIL images and HxWxC uint8 arrays are converted; float tensors are an error, since
    batches become float (and are normalised) on the device, inside the network.
    """

    def __init__(self, dataset: Dataset, augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.dataset, self.augment = dataset, augment

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        with seeded_rngs(seed) if seed is not None else contextlib.nullcontext():
            image, label = self.dataset[index]
            image = as_uint8_chw(image, source=type(self.dataset).__name__)
            if self.augment is not None:
                image = self.augment(image)
        return image, int(label)


def as_uint8_chw(image: Any, source: str) -> torch.Tensor:
    """A PIL image, an HxWxC uint8 array or a uint8 CHW tensor -> a contiguous uint8 CHW tensor."""
    if isinstance(image, Image.Image):
        return to_uint8_tensor(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        image = (
            torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
            if image.ndim == 3
            else torch.from_numpy(image)
        )
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8:
        kind = f"{type(image).__name__} of {image.dtype}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise DataError(
            f"{source} returned a {kind} image; return a PIL image or a uint8 tensor (e.g. transform=v2.PILToTensor(), "
            "not ToTensor()): batches become float on the device, and the network normalises them"
        )
    image = image.unsqueeze(0) if image.ndim == 2 else image
    return image.expand(3, *image.shape[-2:]).contiguous() if image.shape[0] == 1 else image.contiguous()


class DatasetDataModule(ClassificationDataModule):
    """Train/val(/test) datasets given as objects (Hydra instantiates them from ``_target_`` configs).

    ``class_names`` defaults to the training dataset's ``classes`` attribute, as torchvision's datasets have it.
    Every image of a split must have one size (give the dataset a resize/crop transform), as a batch needs. The
    ``augment=...`` preset runs on the training images after the dataset's own transform, at their size (a random
    resized crop at ``crop_scale``, the flip unless ``hflip=false``, the preset's ops); ``augment=none`` leaves them as
    the dataset returns them.
    """

    def __init__(
        self,
        train: Dataset,
        val: Dataset,
        test: Dataset | None = None,
        class_names: Sequence[str] | None = None,
        batch_size: int = 64,
        num_workers: int | None = None,
        seed: int = 42,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        min_steps_per_epoch: int = 4,
        augment: Augmentation | None = None,
        crop_scale: Sequence[float] = (0.5, 1.0),
        hflip: bool = True,
        preprocessing: Preprocessing | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, pin_memory, persistent_workers, min_steps_per_epoch)
        # The backbone's (train passes it): what eval/predict/exports apply to files. Your datasets' eval transform
        # should match it (e.g. Resize(256) + CenterCrop(224) for the torchvision weights' 224 / 0.875).
        self.preprocessing = Preprocessing.coerce(preprocessing)
        names = class_names if class_names is not None else getattr(train, "classes", None)
        if not names:
            raise ConfigError(
                f"data.class_names is not set and {type(train).__name__} has no `classes` attribute: list the class names "
                "in the data config (data.class_names=[cat,dog])"
            )
        self.class_names = [str(name) for name in names]
        splits = {"train": train, "val": val, **({"test": test} if test is not None else {})}
        on_train = augment.geometry(None, crop_scale, hflip).transform() if augment is not None else None  # own size
        self.datasets = {
            split: SeededDataset(dataset, on_train if split == "train" else None) for split, dataset in splits.items()
        }
        self.given = splits

    def eval_views(self) -> dict[str, Dataset]:
        """Every split as the dataset itself sizes it, without ``augment`` (``eval.py split=all``, ``find_issues.py``)."""
        return {split: SeededDataset(dataset) for split, dataset in self.given.items()}
