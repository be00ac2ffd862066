"""Catch the silent DDP failure of fine-tuning: ranks whose weights drift apart after unfreezing (Lightning #20340)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn


def weights_fingerprint(module: nn.Module) -> torch.Tensor:
    """Per-tensor sum and sum of squares in float64: equal on every rank iff (for all practical purposes) the weights are."""
    tensors = [t.detach().double() for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    return torch.stack([torch.stack([t.sum(), t.square().sum()]) for t in tensors]).flatten()


class CheckWeightsInSync(L.Callback):
    """After every training epoch, compare a fingerprint of the weights across ranks and stop with an error if they differ.

    Costs one small all-gather per epoch; does nothing in single-process runs.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2:
            return
        local = weights_fingerprint(pl_module).to(pl_module.device)
        gathered = pl_module.all_gather(local)
        if not torch.equal(gathered.min(dim=0).values, gathered.max(dim=0).values):
            raise RuntimeError(
                f"epoch {trainer.current_epoch + 1}: model weights differ across the {trainer.world_size} ranks"
            )
        if trainer.is_global_zero:
            pl_module.print(f"epoch {trainer.current_epoch + 1}: weights identical on all {trainer.world_size} ranks")
