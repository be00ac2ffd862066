"""The metrics logged per split (``model.metrics``). Edit ``classification_metrics`` to add or drop one.

The engine calls ``model.metrics(num_classes, split)`` once per split and expects a torchmetrics ``MetricCollection``
updated with ``(logits, labels)``; each entry is logged as ``{split}/{name}`` (``val/acc`` is the default monitor).
The classes here are classification metrics that update without a device -> host sync, with torchmetrics' own
states and reductions.

torchmetrics' macro F1 counts a confusion matrix with ``torch.bincount``, which on CUDA reads the largest index back
to the host on every call (it sizes its output), and its top-k accuracy one-hot encodes the targets. A sync per step
stops the CPU from queueing the next step while the GPU works: with ResNet-50 on an H200 that is a large part of
what separated the template from a plain loop (issue 13). These subclasses compute the same true/false
positive/negative counts with comparisons and sums only; states and the DDP reduction are torchmetrics'.

Macro F1 averages over the classes present in the data (support > 0), as sklearn's
``f1_score(labels=present, average="macro")`` does. torchmetrics' own macro average also counts a class with no
samples that was predicted (its F1 is 0), so a folder holding some of the checkpoint's classes was scored against
classes it cannot contain (issue 18). With every class present, as in training's splits, the two are the same.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score


def _classes(num_classes: int, device: torch.device) -> Tensor:
    return torch.arange(num_classes, device=device).view(1, num_classes)


class SyncFreeMacroF1(MulticlassF1Score):
    """``MulticlassF1Score(average="macro")`` whose ``update`` never syncs (per-class counts by comparison), averaged
    over the classes present (``macro_over_present``)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes, average="macro", validate_args=False)

    def update(self, preds: Tensor, target: Tensor) -> None:
        preds = preds.argmax(dim=1) if preds.is_floating_point() else preds
        classes = _classes(self.num_classes, preds.device)
        predicted, actual = (
            preds.view(-1, 1) == classes,
            target.view(-1, 1) == classes,
        )  # (N, C) one-hot, no bounds check
        tp = (predicted & actual).sum(0)
        fp, fn = predicted.sum(0) - tp, actual.sum(0) - tp
        self._update_state(tp, fp, target.numel() - tp - fp - fn, fn)

    def compute(self) -> Tensor:
        tp, fp, _, fn = self._final_state()  # summed over batches (and ranks, after torchmetrics' sync)
        f1 = 2 * tp / (2 * tp + fp + fn).clamp_min(1)  # 0 where undefined, as torchmetrics and sklearn say
        return macro_over_present(f1, support=tp + fn)


def macro_over_present(per_class: Tensor, support: Tensor) -> Tensor:
    """The mean of ``per_class`` over the classes with ``support > 0`` (0 when there are none)."""
    present = (support > 0).to(per_class.dtype)
    return (per_class * present).sum() / present.sum().clamp_min(1)


def macro_f1(preds: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Macro F1 of a whole set of logits or probabilities at once, defined as training's ``SyncFreeMacroF1``."""
    metric = SyncFreeMacroF1(num_classes)
    metric.update(preds, target)
    return metric.compute()


class SyncFreeTopKAccuracy(MulticlassAccuracy):
    """``MulticlassAccuracy(top_k=k, average="micro")`` whose ``update`` never syncs; counts as torchmetrics does
    (a sample is a true positive when its target is among the top k, else its top-1 class is a false positive)."""

    def __init__(self, num_classes: int, top_k: int) -> None:
        super().__init__(num_classes, top_k=top_k, average="micro", validate_args=False)

    def update(self, preds: Tensor, target: Tensor) -> None:
        hits = (preds.topk(self.top_k, dim=1).indices == target.view(-1, 1)).any(dim=1).sum()
        misses = target.numel() - hits
        self._update_state(hits, misses, self.num_classes * target.numel() - hits - 2 * misses, misses)


def classification_metrics(num_classes: int, split: str) -> MetricCollection:
    """Accuracy, macro F1 and (over 5 classes) top-5, logged as ``<split>/acc`` ...: ``model.metrics``'s default.

    The engine calls the configured partial as ``metrics(num_classes, split)`` once per split; any ``MetricCollection``
    of ``(logits, labels)`` metrics works. ``validate_args=False``: the inputs are our own logits and labels, and the
    checks cost a GPU->CPU sync every step; F1 and top-5 are this module's, as torchmetrics' own sync every step.
    """
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
        "f1": SyncFreeMacroF1(num_classes),
    }
    if num_classes > 5:
        metrics["top5"] = SyncFreeTopKAccuracy(num_classes, top_k=5)
    # compute_groups=False: torchmetrics merges metrics whose states are equal after the first batch, so a first
    # batch that is all correct would make top-5 share top-1's state (and report top-1) for the rest of the epoch.
    return MetricCollection(metrics, prefix=f"{split}/", compute_groups=False)
