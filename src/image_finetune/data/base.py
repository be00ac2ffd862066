"""What every classification data module shares: reproducible sampling, loaders, and uint8 -> float on the device."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from image_finetune.data.contract import ImageName
from image_finetune.data.preprocessing import Preprocessing

log = logging.getLogger(__name__)


class EpochSampler(DistributedSampler):
    """Yields ``(index, sample_seed)`` pairs drawn from ``(seed, epoch)`` alone.

    The dataset seeds its augmentation with ``sample_seed``, so what a sample looks like in an epoch depends on
    neither the number of workers, nor whether workers persist, nor whether the run was resumed: a resumed run sees
    exactly the batches an uninterrupted one would (Lightning checkpoints hold no RNG state). It subclasses
    ``DistributedSampler`` so Lightning neither replaces nor re-wraps it; it shards across ranks itself.
    ``weights`` switches to sampling with replacement in proportion to the weights (``data.balance=true``).
    ``skip`` leaves out the first ``skip`` samples of this rank's share of epoch ``epoch``, once: a run resumed from a
    checkpoint saved mid-epoch (SIGTERM) goes on with the batches the interrupted run had not trained yet.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int,
        epoch: int = 0,
        weights: torch.Tensor | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        skip: int = 0,
    ) -> None:
        self.num_samples_total, self.seed, self.epoch, self.weights = num_samples, seed, epoch, weights
        self._skip = (epoch, skip) if skip > 0 else None
        self.num_replicas, self.rank, self.drop_last, self.shuffle = num_replicas, rank, drop_last, True
        per_rank = num_samples / num_replicas
        self.num_samples = math.floor(per_rank) if drop_last else math.ceil(per_rank)
        self.total_size = self.num_samples * num_replicas

    def __len__(self) -> int:
        return self.num_samples

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's sample indices and per-sample seeds for the current epoch, as int64 tensors (CPU)."""
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch)) & 0x7FFF_FFFF_FFFF_FFFF)
        n = self.num_samples_total
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator)
        else:
            order = torch.randperm(n, generator=generator)
            order = order.repeat(math.ceil(self.total_size / n))[: self.total_size]
        seeds = torch.randint(0, 2**62, (self.total_size,), generator=generator)
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start, self._skip = self._skip[1], None
        shard = slice(self.rank + start * self.num_replicas, self.total_size, self.num_replicas)
        return order[shard], seeds[shard]

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        order, seeds = self.draw()
        return zip(order.tolist(), seeds.tolist())


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, ``random`` and numpy for one sample's transforms; restore the caller's states after.

    This is how the ``sample_seed`` of ``EpochSampler`` reaches any transform, so the caller's own random stream
    (dropout, shuffling in the main process) is not disturbed.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        # torch.manual_seed would also queue seeds for CUDA/XPU/MTIA, recording a stack trace for each: ~0.5 ms a
        # sample. Transforms in a DataLoader only draw from the CPU generator, so seed just that one.
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def resume_position(trainer: L.Trainer) -> tuple[int, int]:
    """``(epoch, training batches of it already done)`` by the trainer's live loop counters: where a fit would go on.

    Read when a checkpoint is saved (``state_dict``) and for a fit that restores nothing. At an epoch's end the epoch
    counts as processed, so the position is the next epoch; mid-epoch (a SIGTERM checkpoint) the epoch has started
    without being processed, and the batch counter says how many of its batches were done.
    """
    epochs = trainer.fit_loop.epoch_progress.current
    mid_epoch = epochs.started > epochs.processed
    return epochs.processed, trainer.fit_loop.epoch_loop.batch_progress.current.processed if mid_epoch else 0


def train_batching(num_samples: int, batch_size: int, min_steps_per_epoch: int) -> tuple[int, bool]:
    """The training batch size and ``drop_last`` for ``num_samples`` images per process.

    Two rules, measured in benchmarks/README.md (the fine-tuning study): a small dataset gets at least
    ``min_steps_per_epoch`` optimizer steps per epoch (the batch shrinks to ``num_samples // min_steps_per_epoch``, but
    not below 2; 100 images at batch 64 used to give one step per epoch and drop 36 images), and the last partial batch
    is dropped only when it is tiny (under a quarter of a batch, or a single image, which BatchNorm cannot normalise),
    never most of an epoch. Large datasets keep the configured batch size.
    """
    capped = min(batch_size, max(2, num_samples // max(1, min_steps_per_epoch)))
    remainder = num_samples % capped
    drop_last = num_samples > capped and 0 < remainder < max(2, capped // 4)
    return capped, drop_last


def default_num_workers() -> int:
    """Leave one core to the training process; at most 8 workers per process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1))


class ClassificationDataModule(L.LightningDataModule):
    """Base for data modules that yield ``(uint8 NCHW images, int64 labels)`` batches.

    Workers only decode and crop; batches travel to the device as uint8 (4x less than float32) and become float in
    ``[0, 1]`` there, where ``device_transform`` can do batched augmentation. Normalisation belongs to the network
    (``ClassifierNet``), which knows the statistics of its pretrained weights.

    It keeps the contract that train, eval and lr_find rely on (``data.contract.ClassificationData``). For a data module
    of your own (the shortest way: ``data.DatasetDataModule``, which wraps any dataset; ``data/cifar10.py`` is a
    complete example of a subclass):
    - ``setup`` fills ``self.class_names`` (list of str) and ``self.datasets`` (``"train"``, ``"val"``, optionally
      ``"test"``); each item is ``(uint8 CHW tensor, int label)``, one image size per split.
    - The training dataset is indexed with ``(index, sample_seed)`` tuples from ``EpochSampler``; seed its random
      transforms with ``seeded_rngs(sample_seed)`` (``SeededDataset`` does this for any dataset) so that a resumed
      run sees exactly the batches an uninterrupted one would. Val/test datasets get plain indices.
    - Optionally override ``device_transform`` for batched augmentation on the device.
    - Set ``self.preprocessing`` (a ``data.preprocessing.Preprocessing``) if the eval split turns files into the
      network's input: start from the model's (``wiring.build_model_and_data`` passes it to the constructor as
      ``preprocessing=``) and override its size if the data needs to. The model stores it in checkpoints;
      eval/predict/exports repeat it, and eval's test-time augmentation reads its size and crop ratio.
    - Optionally override ``source`` (how messages name the data), and ``eval_views`` (each split at the eval transform:
      ``all_images`` and ``image_names``, i.e. ``eval.py split=all`` and ``find_issues.py``, are built on it).
    """

    task: str = "multiclass"
    """One int label per image; a multi-label module sets ``"multilabel"`` (``data/csvfile.py``)."""

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int | None = None,
        seed: int = 42,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        min_steps_per_epoch: int = 4,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.min_steps_per_epoch = min_steps_per_epoch
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.class_names: list[str] = []
        self.preprocessing: Preprocessing | None = None
        self.datasets: dict[str, Dataset] = {}
        self.sample_weights: torch.Tensor | None = None
        self._resume_position: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint

    # ---- subclasses fill these ------------------------------------------------------------------------------------
    def device_transform(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        """Batched transforms on the device, on float images in [0, 1]. Identity by default."""
        return images

    # ---- loaders --------------------------------------------------------------------------------------------------
    def _loader(
        self,
        split: str,
        sampler: Any = None,
        dataset: Dataset | None = None,
        batch_size: int | None = None,
        drop_last: bool = False,
    ) -> DataLoader:
        """The loader of ``split`` (of ``dataset``, when given, read as that split is)."""
        if dataset is None:
            if split not in self.datasets:
                raise RuntimeError(
                    f"no {split!r} split: call setup() first, or give the data a {split}/ folder or fraction"
                )
            dataset = self.datasets[split]
        on_gpu = self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=on_gpu if self.pin_memory is None else self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            drop_last=drop_last,
            collate_fn=getattr(dataset, "collate_fn", None),  # a dataset whose items need their own batching says so
            # Its own generator: creating an iterator must not consume the global RNG (dropout draws from it), or
            # a resumed run, whose first iterator is made at a different moment, would diverge.
            generator=torch.Generator().manual_seed(self.seed),
        )

    # ---- where training resumes ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The sampler's position (epoch, batches of it done), saved in every checkpoint; see ``train_dataloader``."""
        if self.trainer is None:
            return {}
        epoch, done = resume_position(self.trainer)
        return {"train_position": [epoch, done]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        position = state_dict.get("train_position")
        self._resume_position = (int(position[0]), int(position[1])) if position else None

    def train_sampler(self) -> EpochSampler:
        """This rank's training order, starting at the position the fit resumes at (see ``EpochSampler``).

        Lightning asks for the train loader while ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``,
        before it restores the loop counters of a checkpoint, and with workers the loader starts drawing sample indices
        at once (a resumed run used to re-train epoch 0's order). So the position comes from the checkpoint's data
        module state, which Lightning restores before that; a fresh fit reads the trainer's (live) counters.
        """
        trainer = self.trainer
        resumed, self._resume_position = self._resume_position, None
        epoch, done = resumed or (resume_position(trainer) if trainer is not None else (0, 0))
        return EpochSampler(
            len(self.datasets["train"]),  # type: ignore[arg-type]
            seed=self.seed,
            epoch=epoch,
            weights=self.sample_weights,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            skip=done * self.train_batching()[0],  # batches done x the batch size they had
        )

    def train_batching(self) -> tuple[int, bool]:
        """This process's training batch size and ``drop_last`` (``train_batching``), from its share of the images."""
        world = self.trainer.world_size if self.trainer is not None else 1
        per_rank = math.ceil(len(self.datasets["train"]) / world)  # type: ignore[arg-type]  # as EpochSampler shards
        return train_batching(per_rank, self.batch_size, self.min_steps_per_epoch)

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_sampler()
        # Per process: every rank's sampler yields the same count, so every rank takes the same number of steps.
        batch_size, drop_last = self.train_batching()
        if batch_size < self.batch_size and (self.trainer is None or self.trainer.is_global_zero):
            log.info(
                "data.batch_size=%d would leave %d optimizer step(s) per epoch on %d training images per process; using "
                "batches of %d (data.min_steps_per_epoch=%d)",
                self.batch_size, math.ceil(len(sampler) / self.batch_size), len(sampler), batch_size, self.min_steps_per_epoch,
            )  # fmt: skip
        return self._loader("train", sampler, batch_size=batch_size, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def has_split(self, split: str) -> bool:
        """Whether ``setup`` made ``split``. Without a test split there are no test numbers: the val split chose the
        best checkpoint, so reporting it as "test" would overstate how well the model generalises."""
        return split in self.datasets

    def class_counts(self) -> list[int]:
        """The training split's images per class (the contract's); from ``train_labels``."""
        labels = torch.as_tensor(list(self.train_labels()), dtype=torch.long)
        return torch.bincount(labels, minlength=len(self.class_names)).tolist()

    def train_labels(self) -> Sequence[int]:
        """The training split's labels. This reads every item (decoding it): override it where the labels are known."""
        train = self.datasets["train"]
        return [int(train[(i, 0)][1]) for i in range(len(train))]  # type: ignore[arg-type]

    def eval_views(self) -> dict[str, Dataset] | None:
        """Each split's images at the eval transform (the training split unaugmented), in ``datasets`` order; what
        ``all_images`` and ``image_names`` are built on. None: no eval view of the training split here (the default:
        only the data module knows how its training images look unaugmented)."""
        return None

    def all_images(self) -> Dataset | None:
        """Every image at the eval transform (``eval.py split=all``, ``find_issues.py``): the ``eval_views`` one
        after the other."""
        views = self.eval_views()
        return None if views is None else ConcatDataset(list(views.values()))

    def image_names(self) -> list[ImageName]:
        """Each item of ``all_images``: ``<split>/<index>``, no file. The labels are read from the items (decoding
        each image): override it where they are known."""
        return [
            ImageName(split, f"{split}/{i}", int(view[i][1]), False)
            for split, view in (self.eval_views() or {}).items()
            for i in range(len(view))  # type: ignore[arg-type]
        ]

    def held_out_fold(self) -> Dataset | None:
        """k-fold's held-out images from their files (out-of-fold predictions); None: no k-fold over files here."""
        return None

    @property
    def source(self) -> str:
        """How one-line messages name this data (an image folder names its ``data.root``)."""
        return "the data"

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        images = images.float().div_(255) if images.dtype == torch.uint8 else images
        training = self.trainer is not None and self.trainer.training
        return self.device_transform(images, train=training), labels
