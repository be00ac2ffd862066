"""Make a resumed run continue exactly where an uninterrupted one would, and make checkpoints self-describing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L


class ReseedEveryEpoch(L.Callback):
    """Reseed the global RNGs from ``(seed, epoch, rank)`` at the start of every training epoch.

    Lightning checkpoints hold no RNG state, so after a resume dropout and on-device augmentation would draw different
    numbers than an uninterrupted run. Seeding per epoch makes each epoch a function of the seed alone. (Sample order
    and CPU augmentation are already per-epoch deterministic through ``EpochSampler``.)
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        L.seed_everything(hash((self.seed, trainer.current_epoch, trainer.global_rank)) % 2**31, workers=True, verbose=False)


class StoreRunConfig(L.Callback):
    """Put the run's resolved config (plain containers only) into every checkpoint.

    ``eval.py`` rebuilds the data module from it, and because it is plain data the checkpoint still loads with
    ``torch.load(weights_only=True)``.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["run_config"] = self.config
