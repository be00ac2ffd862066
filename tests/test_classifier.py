"""The LightningModule's metrics and checkpoint writing, without training."""

from __future__ import annotations

from typing import BinaryIO

import pytest
import torch

from image_finetune.checkpoints.io import AtomicCheckpointIO
from image_finetune.recipe.metrics import classification_metrics as _metrics


def test_top5_is_not_top1_even_when_the_first_batch_is_all_correct():
    """torchmetrics' compute groups would merge top-1 and top-5 after an all-correct first batch."""
    metrics = _metrics(10, "test")
    targets = torch.arange(10)
    all_correct = torch.nn.functional.one_hot(targets, 10).float()
    second_best = all_correct.roll(1, dims=1) * 2 + all_correct  # top-1 wrong, the target is second
    metrics.update(all_correct, targets)
    metrics.update(second_best, targets)
    values = metrics.compute()
    assert values["test/acc"] == 0.5
    assert values["test/top5"] == 1.0


def test_an_interrupted_checkpoint_save_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)

    def killed_half_way(obj: object, f: BinaryIO) -> None:
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_the_trainer_config_uses_atomic_checkpoints(compose_cfg):
    from hydra.utils import instantiate

    trainer = instantiate(compose_cfg("trainer=cpu").trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
