"""The LightningModule's metrics and loading, on tensors (no training)."""

from __future__ import annotations

import torch

from image_finetune.models.classifier import _metrics


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
