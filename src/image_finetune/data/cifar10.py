"""CIFAR-10 kept in memory as uint8 and augmented on the device, so the loader is never what a GPU waits for.

Images stay 32x32 all the way to the network; a backbone that wants them larger gets them from
``model.upsample_to`` (an upsampling layer inside the network), never from the data module, so that eval, predict
and exported models see exactly what training saw.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10

from image_finetune.data.base import ClassificationDataModule
from image_finetune.errors import ConfigError

CIFAR_SIZE = 32


class TensorImageDataset(Dataset):
    """uint8 NCHW images in memory; accepts the ``(index, seed)`` keys of ``EpochSampler`` (no CPU augmentation here)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = key[0] if isinstance(key, tuple) else key
        return self.images[index], self.labels[index]


def random_crop_flip(images: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """The classic CIFAR augmentation (reflect-pad, random crop back to size, horizontal flip), batched on the device."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=images.device)
    rows = (torch.arange(h, device=images.device).view(1, h, 1) + dy).expand(n, h, w)
    cols = (torch.arange(w, device=images.device).view(1, 1, w) + dx).expand(n, h, w)
    batch = torch.arange(n, device=images.device).view(n, 1, 1).expand(n, h, w)
    cropped = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(n, 1, 1, 1, device=images.device) < 0.5
    return torch.where(flip, cropped.flip(-1), cropped).contiguous()


class CIFAR10DataModule(ClassificationDataModule):
    """45k/5k train/val split of the CIFAR-10 training set (seeded), plus the 10k test set."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        image_size: int = CIFAR_SIZE,
        batch_size: int = 256,
        num_workers: int | None = None,
        val_size: int = 5000,
        seed: int = 42,
        download: bool = True,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, pin_memory, persistent_workers)
        if image_size != CIFAR_SIZE:
            raise ConfigError(
                f"data.image_size={image_size}: CIFAR-10 images are {CIFAR_SIZE}x{CIFAR_SIZE} and are served as they are. To "
                f"show the backbone {image_size}x{image_size} images, set model.upsample_to={image_size} (the network upsamples, "
                f"so eval, predict and exports do the same) and leave data.image_size at {CIFAR_SIZE}"
            )
        self.save_hyperparameters({"data_dir": str(data_dir), "image_size": image_size, "val_size": val_size, "seed": seed})
        self.data_dir = Path(data_dir).expanduser()
        self.image_size, self.val_size, self.download = image_size, val_size, download

    def prepare_data(self) -> None:
        for train in (True, False):
            CIFAR10(self.data_dir, train=train, download=self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        train_set, test_set = (CIFAR10(self.data_dir, train=train) for train in (True, False))
        self.class_names = list(train_set.classes)
        images, labels = _as_tensors(train_set)
        if not 0 < self.val_size < len(labels):
            raise ConfigError(
                f"data.val_size={self.val_size}: the CIFAR-10 training set in {self.data_dir} has {len(labels)} images, and "
                f"validation needs at least 1 and must leave some for training. Choose a data.val_size below {len(labels)}"
            )
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        val, train = order[: self.val_size], order[self.val_size :]
        self.datasets = {
            "train": TensorImageDataset(images[train], labels[train]),
            "val": TensorImageDataset(images[val], labels[val]),
            "test": TensorImageDataset(*_as_tensors(test_set)),
        }

    def device_transform(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        return random_crop_flip(images) if train else images


def _as_tensors(dataset: CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(dataset.targets, dtype=torch.long)
