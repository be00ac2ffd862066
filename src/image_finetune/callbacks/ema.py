"""Weight EMA through Lightning's own ``EMAWeightAveraging``, fitted to runs made of several fits and a test.

Lightning's callback assumes one ``fit``. Our fine-tuning runs one fit per phase with the boundary going through a
checkpoint, then tests the best checkpoint with the same trainer (``finetune.py``). Read against Lightning 2.6's
``weight_averaging.py``, three things go wrong there, and this subclass changes exactly those:

1. ``on_train_end`` *copies* the average into the model, so the boundary checkpoint saved after the frozen fit would
   hold the averaged weights twice and the unfrozen phase would continue from the average instead of the raw weights.
   Here the two are *swapped*: the model holds the average (what is tested and checkpointed), the averaged model the
   raw weights, and checkpoints saved after the fit keep them apart (``state_dict`` = average, ``current_model_state``
   = raw) exactly as checkpoints saved during it do.
2. ``on_load_checkpoint`` outside ``fit`` (``trainer.test(ckpt_path=best)`` after training) loads the checkpoint's raw
   weights over the averaged ones it has just loaded; evaluating must use the average, so outside ``fit`` it does
   nothing.
3. The averaged model is created in ``setup``, before Lightning moves the module to its device, so on a GPU it would
   stay in host memory and every step would copy the weights across; ``on_fit_start`` moves it to the module's device.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn


class EMAWeights(EMAWeightAveraging):
    """``EMAWeightAveraging`` across fine-tuning phases: validate, checkpoint and test the average; train the raw."""

    _swapped = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            self._swapped = False
        with warnings.catch_warnings():
            # Our configure_model only sizes the head from the data (no sharding), which the averaged copy must include.
            warnings.filterwarnings(
                "ignore", message=".*WeightAveraging callback with a model that overrides the configure_model"
            )
            super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._device is None and self._average_model is not None:
            self._average_model.to(pl_module.device)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self._average_model is not None
        self._swap_models(pl_module)
        self._swapped = True

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if (
            self._swapped and "current_model_state" in checkpoint
        ):  # the module holds the average, the copy the raw weights
            checkpoint["state_dict"], checkpoint["current_model_state"] = (
                checkpoint["current_model_state"],
                checkpoint["state_dict"],
            )

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
