"""CIFAR-10 kept in memory as uint8 and augmented on the device, so the loader is never what a GPU waits for.

Images stay 32x32 all the way to the network; a backbone that wants them larger gets them from
``model.upsample_to`` (an upsampling layer inside the network), never from the data module, so that eval, predict
and exported models see exactly what training saw.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10

from image_finetune.core.config_checks import check_folds
from image_finetune.core.errors import ConfigError
from image_finetune.data.base import ClassificationDataModule, EpochSampler
from image_finetune.data.contract import ImageName
from image_finetune.data.folds import fold_indices
from image_finetune.data.preprocessing import Preprocessing
from image_finetune.data.transforms import Augmentation

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


def random_crop_flip(images: torch.Tensor, seeds: torch.Tensor, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """``Geometry.pad``'s crop (reflect-pad, random crop back to size) and flip, batched on the device (CIFAR-10).

    Each sample's crop offset and flip come from its own seed (``EpochSampler``'s per-sample seeds), not from a global
    RNG: an epoch's batches are a function of ``(seed, epoch)`` alone, so a resumed run sees exactly the batches of an
    uninterrupted one. ``padding=0`` only flips, ``flip=False`` only crops. The padding never materialises: reflected source rows/columns are computed and the whole
    augmentation is one gather, on any dtype (uint8 here, 4x less memory traffic than float).
    """
    n, _, h, w = images.shape
    device = images.device
    span = 2 * padding + 1
    seeds = seeds.to(device)
    dy = (seeds % span - padding).view(n, 1, 1)
    dx = ((seeds // span) % span - padding).view(n, 1, 1)
    mirror = ((seeds // span**2) % 2).bool().view(n, 1, 1) & flip
    out_cols = torch.arange(w, device=device).view(1, 1, w)
    rows = _reflect(torch.arange(h, device=device).view(1, h, 1) + dy, h)
    cols = _reflect(torch.where(mirror, w - 1 - out_cols, out_cols) + dx, w)
    batch = torch.arange(n, device=device).view(n, 1, 1)
    return images[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Source index of ``index`` in a reflect-padded axis of ``size`` (as ``F.pad(mode="reflect")``; padding < size)."""
    return (size - 1) - ((size - 1) - index.abs()).abs()


class ResidentBatches:
    """Batches of a uint8 tensor dataset that lives on the training device: no ``__getitem__``, collation or workers.

    CIFAR-10's training set is 150 MB of uint8, so it is copied to the device once and each batch is one index
    gather (+ ``augment``, drawn from per-sample seeds) there. A training loader takes its order and seeds from an
    ``EpochSampler``; Lightning calls ``set_epoch`` on ``.sampler`` as it does for a ``DataLoader``'s, so the batches
    of an epoch are those of ``(seed, epoch)`` whatever happened before (exact resume). Without a sampler (val/test)
    the samples come in order, ``rank::world_size`` of them on each rank. No per-batch host sync: the epoch's order
    crosses to the device once.
    """

    batch_sampler = None  # Lightning inspects loaders as if they were DataLoaders: the order is ``sampler``'s alone

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        sampler: EpochSampler | None = None,
        augment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.sampler, self.augment, self.drop_last = sampler, augment, drop_last
        self.rank, self.world_size = rank, world_size

    def _num_samples(self) -> int:
        if self.sampler is not None:
            return len(self.sampler)
        return len(range(self.rank, len(self.labels), self.world_size))

    def __len__(self) -> int:
        n = self._num_samples()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.images.device
        seeds: torch.Tensor | None = None
        if self.sampler is not None:
            order, seeds = (t.to(device) for t in self.sampler.draw())
        else:
            order = torch.arange(self.rank, len(self.labels), self.world_size, device=device)
        for b in range(len(self)):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            index = order[batch]
            images = self.images.index_select(0, index)
            if self.augment is not None and seeds is not None:
                images = self.augment(images, seeds[batch])
            yield images, self.labels.index_select(0, index)


class CIFAR10DataModule(ClassificationDataModule):
    """45k/5k train/val split of the CIFAR-10 training set (seeded), plus the 10k test set.

    ``folds``/``fold``: validate on fold ``fold`` of ``folds`` of the training set (stratified) instead of ``val_size``
    random images; the test set stays the test set."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        image_size: int = CIFAR_SIZE,
        batch_size: int = 256,
        num_workers: int | None = None,
        val_size: int = 5000,
        seed: int = 42,
        download: bool = True,
        augment: Augmentation | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        preprocessing: Preprocessing | Mapping[str, Any] | None = None,
        min_steps_per_epoch: int = 4,
        folds: int | None = None,
        fold: int | None = None,
    ) -> None:
        check_folds(folds, fold)
        super().__init__(batch_size, num_workers, seed, pin_memory, persistent_workers, min_steps_per_epoch)
        # Whole 32x32 images (resized, never cropped) with the backbone's mean/std: what eval, predict, exports repeat.
        backbone_preprocessing = Preprocessing.coerce(preprocessing) or Preprocessing()
        self.preprocessing = backbone_preprocessing.override(size=CIFAR_SIZE, crop_ratio=1.0)
        if image_size != CIFAR_SIZE:
            raise ConfigError(
                f"data.image_size={image_size}: CIFAR-10 images are {CIFAR_SIZE}x{CIFAR_SIZE} and are served as they are. To "
                f"show the backbone {image_size}x{image_size} images, set model.upsample_to={image_size} (the network upsamples, "
                f"so eval, predict and exports do the same) and leave data.image_size at {CIFAR_SIZE}"
            )
        self.save_hyperparameters(
            {
                "data_dir": str(data_dir),
                "image_size": image_size,
                "val_size": val_size,
                "seed": seed,
                "folds": folds,
                "fold": fold,
            }
        )
        self.folds, self.fold = folds, fold
        self.data_dir = Path(data_dir).expanduser()
        self.image_size, self.val_size, self.download = image_size, val_size, download
        self._on_device: dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.origins: dict[str, tuple[str, torch.Tensor]] = {}
        augment = augment or Augmentation()
        if augment.ops or augment.crop_scale is not None:
            raise ConfigError(
                f"augment={augment.name}: CIFAR-10 is augmented on the device with a padded random crop and a flip, "
                "not with the image-folder presets. Use augment=standard (crop + flip) or augment=none"
            )
        self.geometry = augment.geometry(self.preprocessing, pad=4)  # the classic: reflect-pad 4 px, crop, flip

    def prepare_data(self) -> None:
        for train in (True, False):
            CIFAR10(self.data_dir, train=train, download=self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        train_set, test_set = (CIFAR10(self.data_dir, train=train) for train in (True, False))
        self.class_names = list(train_set.classes)
        images, labels = _as_tensors(train_set)
        if self.folds is not None and self.fold is not None:
            train_index, val_index = fold_indices(labels.tolist(), self.folds, self.fold, self.seed, self.class_names)
            train, val = torch.tensor(train_index), torch.tensor(val_index)
        elif not 0 < self.val_size < len(labels):
            raise ConfigError(
                f"data.val_size={self.val_size}: the CIFAR-10 training set in {self.data_dir} has {len(labels)} images, and "
                f"validation needs at least 1 and must leave some for training. Choose a data.val_size below {len(labels)}"
            )
        else:
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
            val, train = order[: self.val_size], order[self.val_size :]
        self.datasets = {
            "train": TensorImageDataset(images[train], labels[train]),
            "val": TensorImageDataset(images[val], labels[val]),
            "test": TensorImageDataset(*_as_tensors(test_set)),
        }
        # where each split's images are in CIFAR-10's own sets: what image_names calls them (train/<i>, test/<i>)
        self.origins = {"train": ("train", train), "val": ("train", val), "test": ("test", torch.arange(len(test_set)))}

    # ---- every image, named (eval.py split=all, find_issues.py) ---------------------------------------------------
    def eval_views(self) -> dict[str, Dataset]:
        """The splits as they are: CIFAR-10's images are served whole at 32 px (training only augments on the device)."""
        return {split: self.datasets[split] for split in self.origins}

    def image_names(self) -> list[ImageName]:
        """``<set>/<index>`` in CIFAR-10's own training or test set (``torchvision.datasets.CIFAR10(train=...)[index]``),
        whichever split of this run the image is in."""
        return [
            ImageName(split, f"{kind}/{i}", label, False)
            for split, (kind, index) in self.origins.items()
            for i, label in zip(index.tolist(), self.datasets[split].labels.tolist())  # type: ignore[attr-defined]
        ]

    # ---- resident loaders: the splits live on the training device (see ``ResidentBatches``) ----------------------
    def train_labels(self) -> list[int]:
        return self.datasets["train"].labels.tolist()  # type: ignore[attr-defined]

    def _resident(self, split: str, batch_size: int | None = None, **kwargs: Any) -> ResidentBatches | None:
        """``split`` as ``ResidentBatches`` on the trainer's device; None if it is not our in-memory tensor dataset
        (``evaluate`` may put a relabelled view in ``datasets["test"]``: that goes through the ``DataLoader``)."""
        dataset = self.datasets.get(split)
        if not isinstance(dataset, TensorImageDataset):
            return None
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        key = (split, id(dataset), str(device))
        if key not in self._on_device:
            self._on_device = {k: v for k, v in self._on_device.items() if k[0] != split}  # one device copy per split
            self._on_device[key] = (dataset.images.to(device), dataset.labels.to(device))
        images, labels = self._on_device[key]
        world = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        batch = batch_size or self.batch_size
        return ResidentBatches(images, labels, batch, world_size=world[0], rank=world[1], **kwargs)

    def train_dataloader(self) -> Any:
        batch_size, drop_last = self.train_batching()
        g = self.geometry
        augment = functools.partial(random_crop_flip, padding=g.pad, flip=g.hflip) if g.pad or g.hflip else None
        resident = self._resident(
            "train", sampler=self.train_sampler(), augment=augment, drop_last=drop_last, batch_size=batch_size
        )
        return resident if resident is not None else super().train_dataloader()

    def val_dataloader(self) -> Any:
        resident = self._resident("val")
        return resident if resident is not None else super().val_dataloader()

    def test_dataloader(self) -> Any:
        resident = self._resident("test")
        return resident if resident is not None else super().test_dataloader()


def _as_tensors(dataset: CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(dataset.targets, dtype=torch.long)
