"""What a run looks like, in TensorBoard: augmented inputs, the confusion matrix, the worst mistakes, per-class accuracy.

Each visual is its own callback, so each can be switched off in config (``callbacks.<key>=null``). They are built to
cost nothing a training epoch would notice and to be safe under DDP:

* Work per batch is a few tensor ops on the device (a ``bincount``, a ``topk``), with no host sync; drawing happens
  once per validation epoch, from a bounded number of samples, on rank 0 only.
* Anything that needs the other ranks (summing a confusion matrix, gathering mistakes) runs in
  ``on_validation_epoch_end`` on **every** rank, before rank 0 draws. A collective called from rank-0-only code (the
  progress bar, a ``rank_zero_only`` function) waits forever for ranks that never call it (Lightning #21264).
* Images go to every logger that can show them (TensorBoard, W&B, MLflow: ``image_finetune.ops.loggers``); without one
  (``logger=csv``) the image callbacks do nothing and ``PerClassAccuracy`` still logs its scalars to every logger.
* Nothing is logged during the sanity check: its numbers come from an untrained head and two batches.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import numpy as np
import torch

from image_finetune.core.plots import WRONG_COLOUR, confusion_matrix_figure, image_grid, message_image, render_figure
from image_finetune.data.contract import ClassificationData
from image_finetune.ops.loggers import image_loggers, log_image, log_step, tensorboard_logger

log = logging.getLogger(__name__)

TRAIN_IMAGES_TAG = "train/augmented_batch"
CONFUSION_MATRIX_TAG = "val/confusion_matrix"
MISCLASSIFIED_TAG = "val/misclassified"
PER_CLASS_ACCURACY_PREFIX = "val/acc_per_class/"


# ---- helpers shared by the callbacks ----------------------------------------------------------------------------
def class_names(trainer: L.Trainer, pl_module: L.LightningModule, num_classes: int | None = None) -> list[str]:
    """The model's class names, else the data module's (through the data contract), else the label indices."""
    datamodule = trainer.datamodule if isinstance(trainer.datamodule, ClassificationData) else None
    names = list(getattr(pl_module, "class_names", None) or (datamodule.class_names if datamodule else None) or [])
    if num_classes is not None and len(names) != num_classes:
        names = [str(i) for i in range(num_classes)]
    return names


def phase_name(pl_module: L.LightningModule) -> str:
    """``frozen``, ``unfrozen`` or ``last 2/5 stages``: how much of the backbone the schedule trains in this fit
    (the model's ``trainable_stages``: 0 frozen, None all; "" for a module without one)."""
    if not hasattr(pl_module, "trainable_stages"):
        return ""
    n, stages = pl_module.trainable_stages, len(getattr(pl_module, "stages", ()) or ())
    if n is None or (stages and n >= stages):
        return "unfrozen"
    return "frozen" if n == 0 else f"last {n}/{stages} stages"


def _add_image(trainer: L.Trainer, tag: str, image: np.ndarray) -> None:
    """Rank 0 only, to every logger that can show images."""
    log_image(trainer, tag, image, log_step(trainer))


# ---- training images --------------------------------------------------------------------------------------------
class TrainImageGrid(L.Callback):
    """Once, at the first training batch: up to ``max_images`` training images exactly as the model gets them
    (after CPU and on-device augmentation), each with its label underneath. Shows at a glance whether crops, flips
    and labels make sense. Rank 0 only: nothing to reduce.
    """

    def __init__(self, max_images: int = 32, columns: int = 8, cell: int = 128) -> None:
        self.max_images, self.columns, self.cell = max_images, columns, cell
        self._done = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._done or self.max_images <= 0 or not trainer.is_global_zero or not image_loggers(trainer):
            return
        self._done = True
        images, targets = batch[0][: self.max_images], batch[1][: self.max_images]
        names = class_names(trainer, pl_module)
        if targets.ndim == 2:  # multi-hot (multi-label data): every label the image holds
            captions = [" ".join(names[i] for i, on in enumerate(row) if on) or "(none)" for row in targets.tolist()]
        else:
            captions = [names[t] if t < len(names) else str(t) for t in targets.tolist()]
        _add_image(trainer, TRAIN_IMAGES_TAG, image_grid(images, captions, columns=self.columns, cell=self.cell))


# ---- validation accumulators ------------------------------------------------------------------------------------
class _ValidationAccumulator(L.Callback):
    """Accumulate per rank on validation batches (on the device, no sync); at epoch end, on every rank, ``_finish``.

    Counts are added with ``scatter_add_`` into fixed-size tensors: ``torch.bincount`` sizes its output from the
    largest index, which on CUDA reads it back to the host every batch (tests/test_device_reads.py finds such reads).

    State is created at every validation epoch start, so every rank holds it (and joins the reductions in
    ``_finish``) even one that saw no batch.
    """

    needs_tensorboard = True
    single_label_only = False
    """True: the picture means nothing for multi-label data (one class per image), which then skips it."""
    _state: dict[str, torch.Tensor] | None = None
    _multilabel = False

    def _active(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking and (not self.needs_tensorboard or bool(image_loggers(trainer)))

    def _num_classes(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        return len(class_names(trainer, pl_module))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._state = None
        self._multilabel = bool(getattr(pl_module, "multilabel", False))
        if self._multilabel and self.single_label_only:
            return
        num_classes = self._num_classes(trainer, pl_module)
        if self._active(trainer) and num_classes >= 2:
            self._state = self._init_state(num_classes, pl_module.device)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._state is None or not isinstance(outputs, dict) or "logits" not in outputs:
            return
        self._update(batch[0], batch[1], outputs["logits"].detach())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._state is None:
            return
        try:
            self._finish(trainer, pl_module)
        finally:
            self._state = None

    def _init_state(self, num_classes: int, device: torch.device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _update(self, images: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor) -> None:
        raise NotImplementedError

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError


class ConfusionMatrixImage(_ValidationAccumulator):
    """Each validation epoch, the confusion matrix (summed over ranks) as an image. Above ``max_classes`` classes
    the picture is unreadable and is skipped (``PerClassAccuracy`` still reports each class). Multi-label data has
    none (the model logs ``val/ap/<label>`` instead)."""

    single_label_only = True

    def __init__(self, max_classes: int = 50) -> None:
        self.max_classes = max_classes
        self._warned = False

    def _num_classes(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        n = super()._num_classes(trainer, pl_module)
        if n <= self.max_classes:
            return n
        if not self._warned:
            log.info(
                "%d classes > callbacks.confusion_matrix.max_classes=%d: no confusion matrix image", n, self.max_classes
            )
            self._warned = True
        return 0

    def _init_state(self, num_classes: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"matrix": torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)}

    def _update(self, images: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor) -> None:
        assert self._state is not None
        matrix = self._state["matrix"]
        n = matrix.shape[0]
        cells = targets.long() * n + logits.argmax(dim=-1)
        matrix.view(-1).scatter_add_(0, cells, torch.ones_like(cells))  # not bincount: see _ValidationAccumulator

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self._state is not None
        matrix = trainer.strategy.reduce(self._state["matrix"], reduce_op="sum")  # every rank
        if not trainer.is_global_zero:
            return
        names = class_names(trainer, pl_module, matrix.shape[0])
        fig = confusion_matrix_figure(matrix, names, title=f"validation, epoch {trainer.current_epoch + 1}")
        _add_image(trainer, CONFUSION_MATRIX_TAG, render_figure(fig))


class PerClassAccuracy(_ValidationAccumulator):
    """Each validation epoch, ``val/acc_per_class/<class>`` (recall of each class), summed over ranks.

    Logged straight to every logger (CSV included), not through ``self.log``: they stay out of ``callback_metrics``,
    the progress bar and ``metrics.json``. Only the first ``max_classes`` classes get a scalar, so a 1000-class run
    does not write 1000 curves. Multi-label data gets ``val/ap/<label>`` from the model instead.
    """

    needs_tensorboard = False
    single_label_only = True

    def __init__(self, max_classes: int = 100) -> None:
        self.max_classes = max_classes
        self._warned = False

    def _init_state(self, num_classes: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"counts": torch.zeros(2, num_classes, dtype=torch.long, device=device)}  # [correct, total] per class

    def _update(self, images: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor) -> None:
        assert self._state is not None
        counts = self._state["counts"]
        targets = targets.long()
        counts[0].scatter_add_(0, targets, (logits.argmax(dim=-1) == targets).long())
        counts[1].scatter_add_(0, targets, torch.ones_like(targets))

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self._state is not None
        counts = trainer.strategy.reduce(self._state["counts"], reduce_op="sum").cpu()  # every rank
        if not trainer.is_global_zero:
            return
        n = counts.shape[1]
        if n > self.max_classes and not self._warned:
            log.info("val/acc_per_class: first %d of %d classes (per_class_accuracy.max_classes)", self.max_classes, n)
            self._warned = True
        names = class_names(trainer, pl_module, n)
        values = {
            PER_CLASS_ACCURACY_PREFIX + names[i].replace("/", "_"): counts[0, i].item() / counts[1, i].item()
            for i in range(min(n, self.max_classes))
            if counts[1, i] > 0
        }
        for logger in trainer.loggers:
            logger.log_metrics(values, step=log_step(trainer))


class MisclassifiedGrid(_ValidationAccumulator):
    """Each validation epoch, the ``max_images`` most confidently wrong validation images, with true label, predicted
    label and confidence. Each rank keeps only its own top ``max_images`` (fixed-size buffers on the device, updated
    with a ``topk`` per batch); at epoch end every rank joins one all-gather and rank 0 draws the overall top.

    Multi-label data: the images with the most confident wrong label (a false positive's probability, or a false
    negative's 1 - probability, at the model's decision threshold), captioned with their false positives and negatives.
    """

    def __init__(self, max_images: int = 16, columns: int = 8, cell: int = 128) -> None:
        self.max_images, self.columns, self.cell = max_images, columns, cell

    def _init_state(self, num_classes: int, device: torch.device) -> dict[str, torch.Tensor]:
        k = self.max_images
        shape = (k, num_classes) if self._multilabel else (k,)  # multi-label: multi-hot targets and predictions
        # score = confidence of a wrong prediction; -1 marks an empty slot. Images arrive with the first batch.
        return {
            "score": torch.full((k,), -1.0, device=device),
            "target": torch.zeros(shape, dtype=torch.long, device=device),
            "pred": torch.zeros(shape, dtype=torch.long, device=device),
        }

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self._threshold = getattr(pl_module, "decision_threshold", 0.5)

    def _update(self, images: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor) -> None:
        state = self._state
        assert state is not None
        k = self.max_images
        if "images" not in state:
            state["images"] = torch.zeros((k, 3, *images.shape[-2:]), dtype=torch.uint8, device=images.device)
        if self._multilabel:
            probs = logits.float().sigmoid()
            preds = (probs >= torch.as_tensor(self._threshold, device=probs.device)).long()
            targets = (targets >= 0.5).long()
            wrong = preds != targets
            confidence = torch.where(preds.bool(), probs, 1 - probs)
            score = torch.where(wrong, confidence, torch.full_like(confidence, -1.0)).max(dim=-1).values
        else:
            confidence, preds = logits.float().softmax(dim=-1).max(dim=-1)
            score = torch.where(preds != targets, confidence, torch.full_like(confidence, -1.0))
        top = score.topk(min(k, len(score))).indices  # select on the device: no boolean indexing, no host sync
        rgb = images[top].expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[top, :3]
        candidates = {
            "score": score[top],
            "target": targets[top],
            "pred": preds[top],
            "images": rgb.clamp(0, 1).mul(255).round().to(torch.uint8),
        }
        keep = torch.cat([state["score"], candidates["score"]]).topk(k).indices
        for key, value in candidates.items():
            state[key] = torch.cat([state[key], value])[keep]

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = self._state
        assert state is not None
        if "images" not in state:  # this epoch had no validation batch, on any rank (batches are equal across ranks)
            return
        if trainer.world_size > 1:  # every rank; buffers have the same shape on all of them
            state = {key: trainer.strategy.all_gather(value).flatten(0, 1) for key, value in state.items()}
        if not trainer.is_global_zero:
            return
        order = state["score"].argsort(descending=True)[: self.max_images]
        order = order[state["score"][order] >= 0].cpu()
        if len(order) == 0:
            message = f"epoch {trainer.current_epoch + 1}: no misclassified validation images"
            _add_image(trainer, MISCLASSIFIED_TAG, message_image(message))
            return
        names = class_names(trainer, pl_module)
        rows = zip(state["target"][order].tolist(), state["pred"][order].tolist(), state["score"][order].tolist())
        if self._multilabel:

            def listed(indices: list[int]) -> str:
                return " ".join(names[i] for i in indices) or "-"

            captions = [
                f"FP: {listed([i for i, (a, b) in enumerate(zip(t, p)) if b and not a])}\n"
                f"FN: {listed([i for i, (a, b) in enumerate(zip(t, p)) if a and not b])} ({s:.0%})"
                for t, p, s in rows
            ]
        else:
            captions = [f"true: {names[t]}\npred: {names[p]} ({s:.0%})" for t, p, s in rows]
        colours = [WRONG_COLOUR] * len(captions)
        grid = image_grid(
            state["images"][order], captions, columns=self.columns, cell=self.cell, caption_colours=colours
        )
        _add_image(trainer, MISCLASSIFIED_TAG, grid)


# ---- the fine-tuning phase ------------------------------------------------------------------------------------------
PHASE_TAG = "finetune/backbone_trainable"
PHASE_TEXT_TAG = "finetune/phase"


class FinetunePhaseMarker(L.Callback):
    """Marks the unfreeze in TensorBoard, so a jump in the curves can be read against it.

    Each training epoch logs ``finetune/backbone_trainable``: the fraction of backbone parameters that train in it (0
    while frozen, up to a few % with ``train_bn``; 1 once unfrozen; in between for a partial unfreeze). Whenever the
    phase changes (and at the first epoch) a text event ``finetune/phase`` in the TEXT tab says which epoch (counted
    from 1) starts which phase. Rank 0 only, to every logger for the scalar; the text needs TensorBoard.
    """

    def __init__(self) -> None:
        self._last: str | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        net = getattr(pl_module, "net", None)
        backbone = getattr(net, "backbone", None)
        if backbone is None:
            return
        sizes = [(p.numel(), p.requires_grad) for p in backbone.parameters()]
        total = sum(n for n, _ in sizes)
        fraction = sum(n for n, trains in sizes if trains) / total if total else 0.0
        step = log_step(trainer)
        for logger in trainer.loggers:
            logger.log_metrics({PHASE_TAG: fraction}, step=step)
        phase = f"backbone {phase_name(pl_module) or ('frozen' if fraction < 0.5 else 'unfrozen')}"
        tb = tensorboard_logger(trainer)
        if phase != self._last and tb is not None:
            text = f"epoch {trainer.current_epoch + 1}: {phase} ({fraction:.1%} of backbone parameters train)"
            tb.experiment.add_text(PHASE_TEXT_TAG, text, global_step=step)
        self._last = phase
