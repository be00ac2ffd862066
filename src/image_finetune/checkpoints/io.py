"""Checkpoints that are never half-written."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from image_finetune.atomic import atomic_path
from image_finetune.errors import UserError


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
