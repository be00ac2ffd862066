"""Writing checkpoints: whole (``AtomicCheckpointIO``), and when and under what name (``ModelCheckpoint``,
``LastCheckpoint``; configs name them as ``image_finetune.callbacks.<Name>``, their checkpoint state is keyed by class
name)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from image_finetune.checkpoints import LAST
from image_finetune.core.atomic import atomic_path
from image_finetune.core.errors import UserError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file beside the target, fsync it, then ``os.replace`` it into place.

    A run killed mid-save (``kill -9``, a preempted node) leaves the previous checkpoint whole; the temporary file it
    leaves is removed when the next run starts in that dir (``rundir.clean_run_dir``). Lightning's default writes its
    temp file in ``$TMPDIR`` and moves it, which across filesystems is a copy that can be interrupted half-way
    (Lightning #20270). A full disk is a one-line error that says where; the previous checkpoint stays as it was.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        try:
            with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as e:
            full = _disk_full(e)
            if full is None:
                raise
            raise UserError(_disk_full_message(Path(path), full)) from e


def _disk_full(error: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT error behind ``error``: torch.save reports a failed write as a RuntimeError whose context
    is the OSError."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


def _disk_full_message(path: Path, error: OSError) -> str:
    try:
        free = f", {shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = ""
    kept = f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written"
    reason = "no space left on device" if error.errno == errno.ENOSPC else "disk quota exceeded"
    return (
        f"{reason} while saving checkpoint {path}{free}; {kept}. Free some space (or point hydra.run.dir at a larger "
        "disk), then resume with ckpt_path=last"
    )


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with ``{epoch}`` in file names counted from 1, as the console counts epochs.

    Only the name changes: which epochs are saved, and the checkpoint's own ``epoch`` field (0-based, Lightning's
    loop counter), do not. Same class name, so its state in older checkpoints still loads.
    """

    def format_checkpoint_name(
        self,
        metrics: dict[str, torch.Tensor],
        filename: str | None = None,
        ver: int | None = None,
        prefix: str | None = None,
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
