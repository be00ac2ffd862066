"""Make a resumed run continue exactly where an uninterrupted one would, and make checkpoints self-describing."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch


class ReseedEveryBatch(L.Callback):
    """Reseed the global RNGs from ``(seed, epoch, batch, rank)`` before every training batch is drawn.

    Lightning checkpoints hold no RNG state, so after a resume dropout and on-device augmentation would draw different
    numbers than an uninterrupted run. Seeding per batch makes every batch's draws a function of the seed and its
    position alone, wherever the run was resumed: at an epoch's end or mid-epoch (a SIGTERM checkpoint). Sample order
    and CPU augmentation are already per-epoch deterministic through ``EpochSampler``.

    The seed is set as late as a callback can: at the end of the previous batch (before the next one is fetched and its
    device transform draws), at the start of an epoch, and at the start of a fit for the batch it resumes at. So
    nothing that runs between batches (validation, checkpointing, the sanity check of a resumed fit) can shift the
    stream. Cost: a few microseconds per batch (``reseed_globals``).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def _reseed(self, trainer: L.Trainer, epoch: int, batch: int) -> None:
        reseed_globals(hash((self.seed, epoch, batch, trainer.global_rank)) % 2**31)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A fit resumed mid-epoch starts at the batch after the last one done (its epoch-start hook is not called).
        self._reseed(trainer, trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reseed(trainer, trainer.current_epoch, 0)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._reseed(trainer, trainer.current_epoch, batch_idx + 1)


def reseed_globals(seed: int) -> None:
    """Seed what ``L.seed_everything(seed, workers=True)`` seeds, at a fraction of its cost per call.

    ``torch.manual_seed`` queues a lazy seed, with a formatted stack trace, for every accelerator type that is not
    initialised (CUDA on a CPU run; XPU and MTIA on a GPU run): 0.3-1.8 ms of host time per call measured here, paid
    once per training batch. An accelerator a run uses is initialised before its first batch, so only those are seeded,
    directly; the draws are the same as after ``seed_everything``.
    """
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    os.environ["PL_SEED_WORKERS"] = "1"
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(seed)
    if torch.xpu.is_available() and torch.xpu.is_initialized():
        torch.xpu.manual_seed_all(seed)


class StoreRunConfig(L.Callback):
    """Put the run's resolved config (plain containers only) into every checkpoint.

    ``eval.py`` rebuilds the data module from it, and because it is plain data the checkpoint still loads with
    ``torch.load(weights_only=True)``.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["run_config"] = self.config
