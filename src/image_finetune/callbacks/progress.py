"""The progress bar (or, when stdout is not a terminal, one plain line per epoch) and the one-line model summary.

Epochs are counted from 1 in everything a person reads: the bar, the plain lines, checkpoint file names, the summary
and ``metrics.json`` (Lightning counts from 0 internally; ``trainer.current_epoch`` is 0 in the first epoch).
"""

from __future__ import annotations

import datetime
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar

from image_finetune.callbacks.visuals import phase_name
from image_finetune.core.results import scalar_metrics

log = logging.getLogger(__name__)


def epoch_label(epoch: int, max_epochs: int | None) -> str:
    """``3/10``: the 1-based number of 0-based ``epoch`` out of ``max_epochs`` (just ``3`` when there is no limit)."""
    return f"{epoch + 1}/{max_epochs}" if max_epochs and max_epochs > 0 else str(epoch + 1)


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _rate(images_per_second: float) -> str:
    """``1,234``, ``12``, ``0.42``: whole numbers, but never a "0" for a slow run (big images on a CPU)."""
    return f"{images_per_second:,.0f}" if images_per_second >= 10 else f"{images_per_second:.2g}"


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if isinstance(first, torch.Tensor) else len(first)


class TrainingProgressBar(RichProgressBar):
    """Lightning's rich bar (epoch, batches, elapsed and remaining time of the epoch) plus the global step, the
    throughput in images/s and the metrics named in ``metrics`` (None: everything logged with ``prog_bar=True``).

    When stdout is not a terminal (SLURM, nohup, CI, ``| tee``; or ``plain=true``) a redrawn bar is useless, so it
    prints one plain line per epoch instead: epoch/total, phase, train and val loss/acc, img/s, and the elapsed time
    and ETA of the whole run. The ETA multiplies the mean duration of this phase's epochs (validation included) by the
    epochs left, because unfrozen epochs cost several times what frozen ones do. An epoch resumed part-way counts only
    the batches this process trained, for img/s and (scaled to the whole epoch) for the ETA.

    Throughput is measured on rank 0 alone, over the last ``window`` batches (data loading included), and multiplied
    by the number of ranks, which all process batches of the same size: no collective, so nothing can hang.
    """

    def __init__(
        self,
        metrics: Sequence[str] | None = None,
        window: int = 50,
        refresh_rate: int = 10,
        leave: bool = False,
        plain: bool | None = None,
        console_kwargs: dict[str, Any] | None = None,
        stop_epoch: int | None = None,
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave, console_kwargs=console_kwargs)
        self.metrics = list(metrics) if metrics is not None else None
        self.plain = not sys.stdout.isatty() if plain is None else plain
        self.stop_epoch = stop_epoch  # a fit that stops before max_epochs (lr_find's frozen phase): the ETA's end
        if self.plain:
            self.disable()  # the rich hooks all check this; the plain-line hooks below do the talking
        self._ticks: deque[tuple[float, int]] = deque(maxlen=window + 1)
        self._run_start: float | None = None  # across the fits of one run (frozen, then unfrozen)
        self._epoch_start = 0.0
        self._epoch_images = 0
        self._epoch_train_end = 0.0
        self._epoch_batches = 0  # trained in this process (a resumed epoch's first ones were trained before)
        self._batches_before = 0  # of this epoch, trained before this process resumed it
        self._pending: tuple[int, str] | None = None  # (epoch, phase) whose line waits for its train metrics
        self._phase_durations: dict[str, list[float]] = {}

    # ---- rich bar ------------------------------------------------------------------------------------------------
    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {epoch_label(current_epoch, self.trainer.max_epochs)}"
        return f"{description:{len(self.validation_description)}}"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._run_start is None:
            self._run_start = time.perf_counter()
        # A fit resumed mid-epoch gets no on_train_epoch_start for that epoch: its clock starts here, and its line
        # counts only the batches trained in this process.
        self._start_epoch_clock(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        super().on_train_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_pending(trainer)
        self._start_epoch_clock(0)
        super().on_train_epoch_start(trainer, pl_module)

    def _start_epoch_clock(self, batches_before: int) -> None:
        now = time.perf_counter()
        self._ticks.clear()
        self._ticks.append((now, 0))
        self._epoch_start, self._epoch_images, self._epoch_train_end = now, 0, now
        self._epoch_batches, self._batches_before = 0, batches_before

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now, size = time.perf_counter(), _batch_size(batch)
        self._ticks.append((now, size))
        self._epoch_images += size
        self._epoch_batches += 1
        self._epoch_train_end = now
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The module logs its epoch train metrics after the callbacks' on_train_epoch_end, so the line waits for the
        # next epoch's start or the end of the fit (no time passes between them).
        self._pending = (trainer.current_epoch, phase_name(pl_module))
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_pending(trainer)
        super().on_train_end(trainer, pl_module)

    def images_per_second(self, world_size: int = 1) -> float | None:
        """Images/s over the recent batches, for all ranks together; None before the first batch ends."""
        if len(self._ticks) < 2:
            return None
        elapsed = self._ticks[-1][0] - self._ticks[0][0]
        images = sum(n for _, n in list(self._ticks)[1:])
        return images * world_size / elapsed if elapsed > 0 else None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the version is "" (one TensorBoard dir per run dir): nothing to show
        if self.metrics is not None:
            items = {key: items[key] for key in self.metrics if key in items}
        # strings, so the bar's float format (".3f") does not turn 12 into "12.000"
        shown: dict[str, Any] = {"step": str(trainer.global_step)}
        rate = self.images_per_second(trainer.world_size)
        if rate is not None:
            shown["img/s"] = _rate(rate)
        return {**shown, **items}

    # ---- plain lines ---------------------------------------------------------------------------------------------
    def epoch_line(self, trainer: L.Trainer, epoch: int, phase: str) -> str:
        """``epoch 2/10  unfrozen  train loss 0.4123 acc 0.8712  val loss 0.3012 acc 0.9011  312 img/s  elapsed
        0:01:12  eta 0:04:48`` for the epoch that just ended (0-based ``epoch``)."""
        now = time.perf_counter()
        durations = self._phase_durations.setdefault(phase, [])
        duration = self._full_epoch_duration(trainer, now)
        if duration is not None:
            durations.append(duration)
        metrics = scalar_metrics(trainer.callback_metrics, ("train/", "val/"))
        parts = [f"epoch {epoch_label(epoch, trainer.max_epochs)}"] + ([phase] if phase else [])
        for split in ("train", "val"):
            keys = [(name, f"{split}/{name}") for name in ("loss", "acc")]
            values = [f"{name} {metrics[key]:.4f}" for name, key in keys if key in metrics]
            if values:
                parts.append(f"{split} " + " ".join(values))
        train_time = self._epoch_train_end - self._epoch_start
        if self._epoch_images and train_time > 0:
            parts.append(f"{_rate(self._epoch_images * trainer.world_size / train_time)} img/s")
        parts.append(f"elapsed {_duration(now - (self._run_start or self._epoch_start))}")
        if trainer.max_epochs and trainer.max_epochs > 0:
            left = max(0, (self.stop_epoch or trainer.max_epochs) - (epoch + 1))
            if left and not durations:
                parts.append("eta unknown (nothing timed yet)")
            else:
                mean = sum(durations) / len(durations) if durations else 0.0
                parts.append(f"eta {_duration(left * mean)}")
        return "  ".join(parts)

    def _full_epoch_duration(self, trainer: L.Trainer, now: float) -> float | None:
        """What this epoch took, validation included; an epoch resumed part-way is scaled up from the batches trained
        in this process to the whole epoch (None when it trained none: nothing was measured)."""
        elapsed = now - self._epoch_start
        if not self._batches_before:
            return elapsed
        total = trainer.num_training_batches
        if not self._epoch_batches or not math.isfinite(total):
            return None
        train_time = self._epoch_train_end - self._epoch_start
        return elapsed + train_time * (total - self._epoch_batches) / self._epoch_batches

    def _print_pending(self, trainer: L.Trainer) -> None:
        if self._pending is None:
            return
        epoch, phase = self._pending
        self._pending = None
        line = self.epoch_line(trainer, epoch, phase)
        if self.plain and trainer.is_global_zero and not trainer.sanity_checking:
            print(line, flush=True)


class CompactModelSummary(ModelSummary):
    """One line per fit instead of Lightning's table: the network's size and how much of it trains in this phase.

    Lightning prints its table (with "Total FLOPs: 0", as nothing gives it an example input) at each fit, so a
    fine-tuning run showed it twice; what changes between the two fits, the trainable part, is what this line says.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        total = sum(p.numel() for p in pl_module.parameters())
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        phase = phase_name(pl_module)
        net = getattr(pl_module, "net", None)
        name = type(getattr(net, "backbone", net) or pl_module).__name__
        log.info(
            "model: %s, %s parameters, %s trainable%s",
            name, f"{total:,}", f"{trainable:,}", f" (backbone {phase})" if phase else "",
        )  # fmt: skip
