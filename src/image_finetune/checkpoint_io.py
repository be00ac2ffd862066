"""Checkpoints that are never half-written."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from image_finetune.atomic import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file beside the target, fsync it, then ``os.replace`` it into place.

    A run killed mid-save (``kill -9``, a preempted node) leaves the previous checkpoint whole and no stray temp file
    that matters. Lightning's default writes its temp file in ``$TMPDIR`` and moves it, which across filesystems is a
    copy that can be interrupted half-way (Lightning #20270).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
