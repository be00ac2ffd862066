"""The callbacks that decide when a checkpoint is written and what it is called (``ModelCheckpoint``, ``LastCheckpoint``).

Configs name them as ``image_finetune.callbacks.<Name>`` (the callbacks package lists every callback); their state in
a checkpoint is keyed by class name, so moving them between modules never breaks a resume.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from image_finetune.checkpoints import LAST


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with ``{epoch}`` in file names counted from 1, as the console counts epochs.

    Only the name changes: which epochs are saved, and the checkpoint's own ``epoch`` field (0-based, Lightning's
    loop counter), do not. Same class name, so its state in older checkpoints still loads.
    """

    def format_checkpoint_name(
        self, metrics: dict[str, Tensor], filename: str | None = None, ver: int | None = None, prefix: str | None = None
    ) -> str:
        if "epoch" in metrics:
            metrics = {**metrics, "epoch": metrics["epoch"] + 1}
        return super().format_checkpoint_name(metrics, filename, ver, prefix)


class LastCheckpoint(LightningModelCheckpoint):
    """``checkpoints/last.ckpt``: the state at the end of every epoch, and at an interruption (SIGTERM, Ctrl-C).

    Lightning >= 2.6's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only in a step that also saved a
    top-k checkpoint, so with ``save_top_k=1`` it is a copy of the best epoch, not the latest (openclimatefix/pvnet#544
    fixed it the same way: a second, monitor-less ``ModelCheckpoint`` that owns ``last.ckpt``). Monitor-less with
    ``save_top_k=1`` it rewrites one file every epoch; no version counter, so never ``last-v1.ckpt``.

    On SIGTERM (and on Ctrl-C, which ``finetune.fit`` hands to the SIGTERM handling) Lightning finishes the current
    batch and raises ``SIGTERMException``; this then saves the state at that batch, which resumes exactly
    (``EpochSampler`` skips the batches already trained, ``ReseedEveryBatch`` reseeds per batch). Only those are saved:
    a ``KeyboardInterrupt`` (a second Ctrl-C) lands anywhere, half an optimizer step included, and would replace a
    good ``last.ckpt`` with a state no resume can continue exactly; after a crash on one DDP rank, the other ranks
    would wait in the save's barrier forever, and the crash's state is rarely one to resume from.
    """

    def __init__(self, dirpath: str | None = None, filename: str = LAST.removesuffix(".ckpt"), **kwargs: Any) -> None:
        kwargs = {
            "monitor": None,
            "save_top_k": 1,
            "enable_version_counter": False,
            "save_on_exception": True,
            **kwargs,
        }
        super().__init__(dirpath=dirpath, filename=filename, **kwargs)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and (trainer.training or trainer.validating):
            super().on_exception(trainer, pl_module, exception)
