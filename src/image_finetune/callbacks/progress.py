"""The console side of a run: a progress bar that shows images/s, and one clear summary at the end.

The end-of-run summary also fills TensorBoard's hparams tab. ``train.build`` logs the resolved config when the run
starts, but with ``default_hp_metric: false`` Lightning's ``TensorBoardLogger`` writes no hparams summary until it is
given metrics, so the tab stays empty until ``summarize_run`` logs the config again together with the final metrics
(best validation epoch and test), as ``hparams/<metric>`` scalars that do not add points to the training curves.
"""

from __future__ import annotations

import math
import pickle
import shlex
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from image_finetune.callbacks.visuals import log_step, tensorboard_logger
from image_finetune.cli import scalar_metrics

HPARAMS_METRIC_PREFIX = "hparams/"


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if isinstance(first, torch.Tensor) else len(first)


class TrainingProgressBar(RichProgressBar):
    """Lightning's rich bar (epoch, batches, elapsed and remaining time of the epoch) plus the global step, the
    throughput in images/s and the metrics named in ``metrics`` (None: everything logged with ``prog_bar=True``).

    Throughput is measured on rank 0 alone, over the last ``window`` batches (data loading included), and multiplied
    by the number of ranks, which all process batches of the same size: no collective, so nothing can hang.
    """

    def __init__(
        self,
        metrics: Sequence[str] | None = None,
        window: int = 50,
        refresh_rate: int = 10,
        leave: bool = False,
        console_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave, console_kwargs=console_kwargs)
        self.metrics = list(metrics) if metrics is not None else None
        self._ticks: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ticks.clear()
        self._ticks.append((time.perf_counter(), 0))
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.is_enabled:
            self._ticks.append((time.perf_counter(), _batch_size(batch)))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

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
            shown["img/s"] = f"{rate:,.0f}"
        return {**shown, **items}


class RunSummary(L.Callback):
    """Records each validation epoch's metrics, so the end-of-run summary can report all the validation metrics of the
    best checkpoint, not just the one it monitors. Its state travels in checkpoints, so a resumed run still knows.

    The best epoch is the one whose monitored value is the ``ModelCheckpoint``'s ``best_model_score``, so the metrics
    always belong to the checkpoint the summary names. Without a checkpoint callback, ``monitor``/``mode`` decide.
    ``hparams=False`` leaves TensorBoard's hparams tab out of ``summarize_run``.
    """

    def __init__(self, hparams: bool = True, monitor: str = "val/loss", mode: str = "min") -> None:
        self.hparams, self.monitor, self.mode = hparams, monitor, mode
        self.history: list[dict[str, Any]] = []  # {"epoch", "step", "metrics"} per validation epoch

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        values = scalar_metrics(trainer.callback_metrics, ("val/",))
        if values:
            self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "metrics": values})

    def best(self, trainer: L.Trainer) -> dict[str, Any] | None:
        """The history entry of the best checkpoint, else (no checkpoint callback) the best by ``monitor``."""
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.monitor and checkpoint.best_model_score is not None:
            score = float(checkpoint.best_model_score)
            matches = [h for h in self.history if h["metrics"].get(checkpoint.monitor) == score]
            if len(matches) > 1:  # a tie: the checkpoint's own step says which epoch it is
                step = _checkpoint_step(checkpoint.best_model_path)
                matches = [h for h in matches if h["step"] == step] or matches
            return matches[0] if matches else None
        scored = [h for h in self.history if not math.isnan(h["metrics"].get(self.monitor, math.nan))]
        if not scored:
            return None
        pick = max if self.mode == "max" else min
        return pick(scored, key=lambda h: h["metrics"][self.monitor])

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history") or [])


def _checkpoint_step(path: str) -> int | None:
    """A checkpoint's global step, read without loading its tensors (memory-mapped)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError):
        # unreadable or foreign: the caller falls back to the first epoch with the best score
        return None


def log_final_hparams(trainer: L.Trainer, config: Mapping[str, Any], metrics: Mapping[str, float]) -> bool:
    """Write the resolved config + final metrics to TensorBoard's hparams plugin; False when there is nowhere to."""
    tb = tensorboard_logger(trainer)
    if tb is None or not metrics:
        return False
    params = {key: value for key, value in config.items() if key != "hydra"}
    tb.log_hyperparams(params, {HPARAMS_METRIC_PREFIX + key: value for key, value in metrics.items()}, step=log_step(trainer))
    tb.finalize("success")  # flush (the writer was closed after fit/test and reopens for this) and save hparams.yaml
    return True


def _metrics_line(values: Mapping[str, float], split: str) -> str:
    items = sorted((key.removeprefix(f"{split}/"), value) for key, value in values.items() if key.startswith(f"{split}/"))
    return "   ".join(f"{name} {value:.4f}" for name, value in items) or "-"


def summarize_run(trainer: L.Trainer, config: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The end of ``train()``: fill the hparams tab, print one summary (rank 0), return what it says.

    Call it on every rank (it runs no collective): best checkpoint and its validation metrics, test metrics, where the
    TensorBoard logs are and the command that opens them.
    """
    tracker = next((cb for cb in trainer.callbacks if isinstance(cb, RunSummary)), None)
    best = tracker.best(trainer) if tracker is not None else None
    val = dict(best["metrics"]) if best else {key: value for key, value in metrics.items() if key.startswith("val/")}
    test = {key: value for key, value in metrics.items() if key.startswith("test/")}
    checkpoint = trainer.checkpoint_callback
    if not (best_checkpoint := metrics.get("best_checkpoint")) and isinstance(checkpoint, ModelCheckpoint):
        best_checkpoint = checkpoint.best_model_path
    tb = tensorboard_logger(trainer)
    summary: dict[str, Any] = {
        "best_checkpoint": best_checkpoint or None,
        "best_epoch": best["epoch"] if best else None,
        "val": val,
        "test": test,
        "tensorboard_dir": str(tb.log_dir) if tb is not None else None,
        "hparams_logged": False,
    }
    if tracker is not None and tracker.hparams:
        summary["hparams_logged"] = log_final_hparams(trainer, config, {**val, **test})
    if trainer.is_global_zero:
        # In a log file (not a terminal) a wide console keeps paths and the command on one copyable line.
        Console(width=None if sys.stdout.isatty() else 200).print(_render(summary, config, interrupted=trainer.interrupted))
    return summary


def _render(summary: Mapping[str, Any], config: Mapping[str, Any], interrupted: bool) -> Panel:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("best checkpoint", Text(summary["best_checkpoint"] or "none (no checkpoint was saved)"))
    epoch = summary["best_epoch"]
    when = f"epoch {epoch}" if epoch is not None else "last epoch"
    table.add_row(f"best val ({when})", _metrics_line(summary["val"], "val"))
    table.add_row("test", _metrics_line(summary["test"], "test") if summary["test"] else "not run")
    output_dir = (config.get("paths") or {}).get("output_dir")
    if output_dir:
        table.add_row("run dir", Text(f"{output_dir}  (config, metrics.json, checkpoints/)"))
    if summary["tensorboard_dir"]:
        tb_dir = str(summary["tensorboard_dir"])
        table.add_row("TensorBoard", Text(tb_dir))
        table.add_row("", Text(f"tensorboard --logdir {shlex.quote(tb_dir)}", style="cyan"))
    else:
        table.add_row("TensorBoard", "none (this run has no TensorBoard logger; logger=tensorboard adds one)")
    title = "Run summary" + (" - interrupted" if interrupted else "")
    return Panel(table, title=title, title_align="left", expand=False, border_style="red" if interrupted else "green")
