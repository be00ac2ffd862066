"""Freeze-then-unfreeze fine-tuning, built so that the known Lightning pitfalls cannot happen.

The design, and why
-------------------
1. **Every parameter group exists in the optimizer from the first step** (``head``, ``backbone`` and their
   ``/no_decay`` twins; see ``ImageClassifier.param_groups``). Frozen weights only have ``requires_grad=False``, so
   autograd computes no gradient for them and the optimizer skips them. Because the groups never change, resuming
   never meets a "different number of parameter groups" error (Lightning #6891, #8502), every LR scheduler knows every
   group (no ``ReduceLROnPlateau``/``OneCycleLR`` crash at unfreeze, #12141, lightning-flash#1321), and
   ``LearningRateMonitor`` shows the groups by name in every phase.
2. **Each phase is its own ``Trainer.fit``**. DDP only reduces the gradients of parameters that required grad when it
   wrapped the model (Lightning #20340), and ``torch.compile`` may reuse a graph traced under the old
   ``requires_grad`` (pytorch#139476). A new ``fit`` re-runs ``setup`` (fresh compiled graph) and wraps the model in a
   fresh DDP that sees the unfrozen backbone. The frozen phase ends by ``should_stop`` rather than ``max_epochs``, so
   ``trainer.max_epochs`` (and the LR schedule's horizon) always covers the whole run.
3. **The phase boundary goes through a checkpoint.** At the end of the last frozen epoch we save
   ``checkpoints/unfreeze.ckpt`` and the unfrozen phase starts by resuming from it (weights, optimizer and scheduler
   state, loop counters). An uninterrupted run and a run resumed at the boundary therefore take the same code path, and
   resuming from any checkpoint picks its phase from the epoch the checkpoint resumes at.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from image_finetune.errors import ConfigError

if TYPE_CHECKING:
    from image_finetune.models.classifier import ImageClassifier

log = logging.getLogger(__name__)

BOUNDARY_CHECKPOINT = "unfreeze.ckpt"


@dataclass(frozen=True)
class FinetuneSchedule:
    """``freeze_epochs`` epochs with a frozen backbone, then the whole network at ``lr * backbone_lr_ratio``.

    ``freeze_epochs=0`` trains everything from the start (``finetune=full``); ``freeze_epochs=null`` never unfreezes
    (``finetune=linear_probe``). ``train_bn=True`` (the default, as in fastai) lets BatchNorm layers adapt their
    statistics and affine weights to the new data while the rest is frozen: with a new domain this recovers most of the
    gap a frozen ImageNet BatchNorm leaves, for almost no compute.
    """

    freeze_epochs: int | None = 1
    backbone_lr_ratio: float = 0.1
    train_bn: bool = True

    def __post_init__(self) -> None:
        if self.freeze_epochs is not None and self.freeze_epochs < 0:
            raise ConfigError(f"finetune.freeze_epochs must be >= 0 or null, got {self.freeze_epochs}")
        if self.backbone_lr_ratio < 0:
            raise ConfigError(f"finetune.backbone_lr_ratio must be >= 0, got {self.backbone_lr_ratio}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def frozen_at(self, epoch: int) -> bool:
        return self.freeze_epochs is None or epoch < self.freeze_epochs


class _EndFrozenPhase(L.Callback):
    """Stops the frozen fit after its last epoch (``fit`` then saves the checkpoint the unfrozen fit resumes from)."""

    def __init__(self, schedule: FinetuneSchedule) -> None:
        self.schedule, self.reached = schedule, False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.schedule.frozen_at(trainer.current_epoch + 1):
            self.reached = True
            trainer.should_stop = True


def resume_epoch(ckpt_path: str | Path) -> int:
    """The epoch Lightning's fit loop resumes a checkpoint at, and so the phase it belongs to.

    Lightning sets ``current_epoch`` to the checkpoint's processed-epoch count on resume (``_FitLoop.on_run_start``):
    an end-of-epoch checkpoint resumes at the next epoch, a mid-epoch one re-enters its own epoch.
    """
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except KeyError:
        return int(checkpoint.get("epoch", 0))


def fit(
    trainer: L.Trainer, model: ImageClassifier, datamodule: L.LightningDataModule, ckpt_path: str | Path | None = None
) -> None:
    """Run the fine-tuning schedule: a frozen fit (if the run is still in that phase), then an unfrozen fit.

    ``fast_dev_run`` runs one batch of the first phase only (Lightning's step budget is spent by then); use
    ``debug=limit`` to run the whole schedule in seconds.
    """
    schedule = model.finetune
    if schedule.frozen_at(resume_epoch(ckpt_path) if ckpt_path else 0):
        stopper = _EndFrozenPhase(schedule)
        model.backbone_frozen = True
        trainer.callbacks.append(stopper)
        try:
            with warnings.catch_warnings():
                # Frozen layers are in eval mode on purpose (their BatchNorm statistics must not drift).
                warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
                trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        finally:
            trainer.callbacks.remove(stopper)
        # Linear probe, early stop, interruption, fast_dev_run, or max_epochs reached first: no unfrozen phase.
        if not stopper.reached or trainer.interrupted or trainer.fast_dev_run:
            return
        # Saved after the fit has finished, so every callback (ModelCheckpoint's best and last included) has recorded
        # the last frozen epoch first; a callback's own save would come before ModelCheckpoint, which runs last.
        ckpt_path = Path(trainer.default_root_dir) / "checkpoints" / BOUNDARY_CHECKPOINT
        trainer.save_checkpoint(ckpt_path, weights_only=False)
        log.info("Unfreezing the backbone after epoch %d (backbone lr = lr x %s)", schedule.freeze_epochs, schedule.backbone_lr_ratio)
        trainer.should_stop = False
    model.backbone_frozen = False
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
