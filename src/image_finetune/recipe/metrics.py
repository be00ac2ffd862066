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
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MultilabelAveragePrecision
from torchmetrics.utilities import dim_zero_cat

TASKS = ("multiclass", "multilabel")
#: The thresholds tried when one is chosen on the validation split (``best_threshold``).
THRESHOLD_GRID = [round(0.01 * i, 2) for i in range(1, 100)]


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


def classification_metrics(num_classes: int, split: str, task: str = "multiclass") -> MetricCollection:
    """Accuracy, macro F1 and (over 5 classes) top-5, logged as ``<split>/acc`` ...: ``model.metrics``'s default.

    The engine calls the configured partial as ``metrics(num_classes, split)`` once per split; any ``MetricCollection``
    of ``(logits, labels)`` metrics works. ``validate_args=False``: the inputs are our own logits and labels, and the
    checks cost a GPU->CPU sync every step; F1 and top-5 are this module's, as torchmetrics' own sync every step.

    ``task="multilabel"`` (the engine passes it for multi-label data): ``map`` (macro average precision, threshold
    free), and at the model's decision threshold (``AtThreshold``) ``f1_micro``, ``f1_macro`` and ``acc``: the share of
    images whose predicted label set is exactly right (so ``val/acc`` stays the default monitor); of
    ``(logits, multi-hot labels)``.
    """
    if task == "multilabel":
        multilabel: dict[str, Any] = {
            "map": MultilabelAveragePrecision(num_classes, average="macro", thresholds=None, validate_args=False),
            "f1_micro": AtThreshold("micro"),
            "f1_macro": AtThreshold("macro"),
            "acc": AtThreshold("exact"),
        }
        return MetricCollection(multilabel, prefix=f"{split}/", compute_groups=False)
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
        "f1": SyncFreeMacroF1(num_classes),
    }
    if num_classes > 5:
        metrics["top5"] = SyncFreeTopKAccuracy(num_classes, top_k=5)
    # compute_groups=False: torchmetrics merges metrics whose states are equal after the first batch, so a first
    # batch that is all correct would make top-5 share top-1's state (and report top-1) for the rest of the epoch.
    return MetricCollection(metrics, prefix=f"{split}/", compute_groups=False)


class AtThreshold(Metric):
    """Multi-label F1 (``micro`` or ``macro`` over the labels with positives), or ``exact``-match accuracy, of
    ``sigmoid(logits) >= threshold``.

    The probabilities are kept (``cat`` states, as average precision keeps them) and thresholded in ``compute``, so
    the threshold the model chooses on the validation split at the end of an epoch applies to that same epoch's
    numbers. ``threshold``: one value or one per label, set by the model before ``compute``.
    """

    full_state_update = False

    def __init__(self, average: str) -> None:
        super().__init__()
        if average not in ("micro", "macro", "exact"):
            raise ValueError(f"average={average!r}: micro, macro or exact")
        self.average = average
        self.threshold: float | Tensor = 0.5
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.probs.append(preds.float().sigmoid())
        self.target.append(target.long())

    def compute(self) -> Tensor:
        return at_threshold(dim_zero_cat(self.probs), dim_zero_cat(self.target), self.threshold, self.average)


def at_threshold(probs: Tensor, target: Tensor, threshold: float | Tensor, average: str) -> Tensor:
    """Micro F1, macro F1 over the labels with positives (``macro_over_present``), or exact-match accuracy, of
    ``probs >= threshold``."""
    threshold = torch.as_tensor(threshold, dtype=probs.dtype, device=probs.device)
    predicted, actual = probs >= threshold, target.bool()
    if average == "exact":
        return (predicted == actual).all(dim=1).to(probs.dtype).mean()
    tp = (predicted & actual).sum(0).to(probs.dtype)
    fp, fn = predicted.sum(0) - tp, actual.sum(0) - tp
    if average == "micro":
        tp, fp, fn = tp.sum(), fp.sum(), fn.sum()
        return 2 * tp / (2 * tp + fp + fn).clamp_min(1)
    return macro_over_present(2 * tp / (2 * tp + fp + fn).clamp_min(1), support=tp + fn)


def best_threshold(probs: Tensor, target: Tensor, per_label: bool = False) -> float | list[float]:
    """The decision threshold chosen on a split: the value of ``THRESHOLD_GRID`` with the highest micro F1 (the
    lowest of ties); ``per_label``: each label's own value with its highest F1 (0.5 for a label without positives)."""
    grid = THRESHOLD_GRID
    actual = target.bool()
    counts = []  # per threshold: (tp, fp, fn) per label; one threshold at a time, so memory stays that of probs
    for value in grid:
        predicted = probs >= value
        tp = (predicted & actual).sum(0).double()
        counts.append(torch.stack([tp, predicted.sum(0) - tp, actual.sum(0) - tp]))
    tp, fp, fn = torch.stack(counts).unbind(1)  # each (thresholds, labels)
    if not per_label:
        tp, fp, fn = tp.sum(1), fp.sum(1), fn.sum(1)
        return grid[int((2 * tp / (2 * tp + fp + fn).clamp_min(1)).argmax())]  # argmax: the lowest of ties
    best = (2 * tp / (2 * tp + fp + fn).clamp_min(1)).argmax(dim=0).tolist()
    present = actual.any(0).tolist()
    return [grid[i] if has else 0.5 for i, has in zip(best, present)]
