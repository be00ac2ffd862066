"""The console side of a run: a progress bar (or, when stdout is not a terminal, one plain line per epoch), one
clear summary at the end, and the results that summary, ``metrics.json`` and TensorBoard's hparams tab all read.

Epochs are counted from 1 in everything a person reads: the bar, the plain lines, checkpoint file names, the summary
and ``metrics.json`` (Lightning counts from 0 internally; ``trainer.current_epoch`` is 0 in the first epoch).

The end-of-run summary also fills TensorBoard's hparams tab. ``train.build`` logs the resolved config when the run
starts, but with ``default_hp_metric: false`` Lightning's ``TensorBoardLogger`` writes no hparams summary until it is
given metrics, so the tab stays empty until ``summarize_run`` logs the columns people compare (``HPARAM_COLUMNS``; the
full config stays in the run dir's ``.hydra/``) together with the final metrics (best validation epoch and test), as
``hparams/<metric>`` scalars that do not add points to the training curves.
"""

from __future__ import annotations

import datetime
import logging
import math
import shlex
import sys
import time
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from image_finetune.callbacks.visuals import log_step, phase_name, tensorboard_logger
from image_finetune.checkpoints import read_checkpoint
from image_finetune.errors import UserError

log = logging.getLogger(__name__)

HPARAMS_METRIC_PREFIX = "hparams/"
# TensorBoard's HPARAMS tab: column -> config key (dotted). What people compare across runs; missing keys are left out.
HPARAM_COLUMNS: dict[str, str] = {
    "backbone": "model.backbone.name",
    "weights": "model.backbone.weights",
    "lr": "model.optimizer.lr",
    "backbone_lr_ratio": "finetune.backbone_lr_ratio",
    "batch_size": "data.batch_size",
    "image_size": "data.image_size",
    "augment": "augment",
    "crop_scale": "data.crop_scale",
    "hflip": "data.hflip",
    "freeze_epochs": "finetune.freeze_epochs",
    "unfreeze": "finetune.unfreeze",
    "lr_spread": "finetune.lr_spread",
    "train_bn": "finetune.train_bn",
    "max_epochs": "trainer.max_epochs",
    "precision": "trainer.precision",
    "seed": "seed",
}


# ---- noise ----------------------------------------------------------------------------------------------------------
# Lines Lightning and torch print that tell a person nothing about their run (each was seen in a default run):
_NOISE_LOG_PREFIXES = (
    "💡 Tip:",  # adverts for Lightning's cloud products, at every Trainer construction
    "Trainer already configured with model summary callbacks",  # our compact summary replaces Lightning's
    "Loading `train_dataloader` to estimate number of stepping batches",
    "\nDetected KeyboardInterrupt, attempting graceful shutdown",  # Ctrl-C: the entry point says it in one line
)
_NOISE_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's _pytree against torch >= 2.10
    r"Checkpoint directory .* exists and is not empty",  # the unfrozen fit re-opens the run's own checkpoint dir
)


def scalar_metrics(
    metrics: Mapping[str, Any], prefixes: tuple[str, ...] = ("train/", "val/", "test/")
) -> dict[str, float]:
    """The logged metrics under ``prefixes`` as plain floats (what metrics.json, the summary and sweepers read)."""
    return {k: float(v) for k, v in metrics.items() if k.startswith(prefixes)}


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISE_LOG_PREFIXES)


_noise_filter = _DropNoise()


def silence_lightning_noise() -> None:
    """Drop the lines in ``_NOISE_LOG_PREFIXES`` / ``_NOISE_WARNINGS``; all else Lightning says stays. Idempotent."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _noise_filter not in logger.filters:
            logger.addFilter(_noise_filter)
    for pattern in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


# ---- epoch numbering ------------------------------------------------------------------------------------------------
class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with ``{epoch}`` in file names counted from 1, as the console counts epochs.

    Only the name changes: which epochs are saved, and the checkpoint's own ``epoch`` field (0-based, Lightning's
    loop counter), do not. Same class name, so its state in older checkpoints still loads.
    """

    def _monitor_candidates(self, trainer: L.Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["epoch"] = candidates["epoch"] + 1
        return candidates


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


class RunSummary(L.Callback):
    """Records each validation epoch's metrics, so the end-of-run summary can report all the validation metrics of the
    best checkpoint, not just the one it monitors. Its state travels in checkpoints, so a resumed run still knows.

    The best epoch is the one whose monitored value is the ``ModelCheckpoint``'s ``best_model_score``, so the metrics
    always belong to the checkpoint the summary names. Without a checkpoint callback, ``monitor``/``mode`` decide.
    ``hparams=False`` leaves TensorBoard's hparams tab out of ``summarize_run``; ``columns`` (column -> dotted config
    key) chooses what the tab lists, ``HPARAM_COLUMNS`` by default.
    """

    def __init__(
        self,
        hparams: bool = True,
        monitor: str = "val/loss",
        mode: str = "min",
        columns: Mapping[str, str] | None = None,
    ) -> None:
        self.hparams, self.monitor, self.mode = hparams, monitor, mode
        self.columns = dict(columns) if columns is not None else HPARAM_COLUMNS
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
        scored_checkpoint = isinstance(checkpoint, LightningModelCheckpoint) and checkpoint.monitor
        if scored_checkpoint and checkpoint.best_model_score is not None:
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
        return int(read_checkpoint(path, mmap=True)["global_step"])
    except (UserError, KeyError, TypeError, ValueError):
        # unreadable or foreign: the caller falls back to the first epoch with the best score
        return None


def run_results(trainer: L.Trainer) -> dict[str, Any]:
    """The one record of a run's outcome that ``metrics.json``, the summary and TensorBoard's hparams tab all show.

    ``best``: the checkpoint kept for its monitored val metric, its epoch and all its val metrics. ``last``: the final
    epoch and its val (and train) metrics. ``test``: None until ``add_test`` fills it. Epochs are counted from 1.
    Call it right after fitting: ``trainer.test`` resets the trainer's metrics.
    """
    tracker = next((cb for cb in trainer.callbacks if isinstance(cb, RunSummary)), None)
    best = tracker.best(trainer) if tracker is not None else None
    last = tracker.history[-1] if tracker is not None and tracker.history else None
    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if isinstance(checkpoint, LightningModelCheckpoint) else ""
    last_path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    current = scalar_metrics(trainer.callback_metrics, ("train/", "val/"))

    def short(values: Mapping[str, float], split: str) -> dict[str, float]:
        prefix = f"{split}/"
        return {key.removeprefix(prefix): value for key, value in sorted(values.items()) if key.startswith(prefix)}

    results: dict[str, Any] = {
        "epochs_counted_from": 1,
        "best": {
            "epoch": best["epoch"] + 1 if best else None,
            "checkpoint": best_path or None,
            "monitor": checkpoint.monitor if isinstance(checkpoint, LightningModelCheckpoint) else None,
            "val": short(best["metrics"], "val") if best else {},
        },
        "last": {
            "epoch": trainer.current_epoch,  # epochs completed = the 1-based number of the last one
            "checkpoint": str(last_path) if last_path.is_file() else None,
            "val": short(last["metrics"], "val") if last else short(current, "val"),
            "train": short(current, "train"),
        },
        "test": None,
        "test_note": "not run",
    }
    if last and last["epoch"] + 1 != trainer.current_epoch:  # validation did not run in the last epoch
        results["last"]["val_epoch"] = last["epoch"] + 1
    return results


def add_test(results: dict[str, Any], test: Mapping[str, float] | None, note: str | None = None) -> dict[str, Any]:
    """``results`` with the best checkpoint's ``test/*`` metrics, or with ``test_note`` saying why there are none
    (no test split, ``test=false``, interrupted)."""
    results = dict(results)
    results.pop("test_note", None)
    if test:
        values = {key.removeprefix("test/"): value for key, value in sorted(test.items()) if key.startswith("test/")}
        results["test"] = {"checkpoint": results["best"]["checkpoint"], **values}
    else:
        results["test"], results["test_note"] = None, note or "not run"
    return results


def flat_metrics(results: Mapping[str, Any]) -> dict[str, Any]:
    """``train()``'s return value: ``val/*`` of the best checkpoint, ``last/val/*``, ``test/*``, ``best_checkpoint``,
    ``best_epoch``, ``last_epoch`` (what a sweep optimises or a script compares; ``metrics.json`` holds the same,
    nested)."""
    best, last, test = results["best"], results["last"], results.get("test") or {}
    flat: dict[str, Any] = {f"val/{key}": value for key, value in best["val"].items()}
    flat.update({f"last/val/{key}": value for key, value in last["val"].items()})
    flat.update({f"test/{key}": value for key, value in test.items() if key != "checkpoint"})
    flat.update(best_checkpoint=best["checkpoint"] or "", best_epoch=best["epoch"], last_epoch=last["epoch"])
    return flat


_ABSENT = object()


def _lookup(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return default
        value = value[part]
    return value


def hparam_columns(config: Mapping[str, Any], columns: Mapping[str, str] = HPARAM_COLUMNS) -> dict[str, Any]:
    """The HPARAMS tab's columns from the resolved config: numbers and strings as they are, anything else as text."""
    params: dict[str, Any] = {}
    for column, key in columns.items():
        value = _lookup(config, key, _ABSENT)
        if value is _ABSENT:  # a key this config does not have (e.g. no augment group): no column
            continue
        if isinstance(value, Mapping):  # a config group (e.g. augment): its target or name says which
            value = value.get("name") or str(value.get("_target_", "")).rsplit(".", 1)[-1] or str(value)
        if isinstance(value, bool) or value is None:  # torch's writer would store a bool as 1/0; None as "None"
            value = "null" if value is None else str(value).lower()
        params[column] = value if isinstance(value, (int, float, str)) else str(value)
    return params


def log_final_hparams(trainer: L.Trainer, params: Mapping[str, Any], metrics: Mapping[str, float]) -> bool:
    """Write the compared columns + final metrics to TensorBoard's hparams plugin; False when there is nowhere to."""
    tb = tensorboard_logger(trainer)
    if tb is None or not metrics:
        return False
    # Lightning's TensorBoardLogger writes every hparam it was ever given (the whole config, logged at the start for
    # hparams.yaml); the plugin summary must hold only the columns, so it is written here directly.
    from torch.utils.tensorboard.summary import hparams

    values = {HPARAMS_METRIC_PREFIX + key: value for key, value in metrics.items()}
    step = log_step(trainer)
    if trainer.is_global_zero:
        tb.log_metrics(values, step=step)
        file_writer = tb.experiment._get_file_writer()
        for summary in hparams(dict(params), values):
            file_writer.add_summary(summary, step)
    tb.finalize("success")  # flush (the writer was closed after fit/test and reopens for this) and save hparams.yaml
    return True


def run_name(config: Mapping[str, Any]) -> str:
    """A readable TensorBoard run name: backbone, data and the run dir's name, e.g. ``resnet18-digits-2026-...``."""
    data = config.get("data") or {}
    root = data.get("root")
    module = str(data.get("_target_", "data")).rsplit(".", 1)[-1]
    dataset = Path(root).name if root else module.removesuffix("DataModule").lower()
    output_dir = (config.get("paths") or {}).get("output_dir") or ""
    parts = [_lookup(config, "model.backbone.name"), dataset, Path(output_dir).name]
    return "-".join(str(part) for part in parts if part).replace(":", "_").replace(",", "_")


def summarize_run(trainer: L.Trainer, config: Mapping[str, Any], results: Mapping[str, Any]) -> dict[str, Any]:
    """The end of ``train()``: fill the hparams tab, print one summary (rank 0), return what it says.

    Call it on every rank (it runs no collective). It shows ``results`` (see ``run_results``, the same record as
    ``metrics.json``) and where the TensorBoard logs are, with the command that opens them under a readable name.
    """
    tracker = next((cb for cb in trainer.callbacks if isinstance(cb, RunSummary)), None)
    tb = tensorboard_logger(trainer)
    summary: dict[str, Any] = {
        **results,
        "tensorboard_dir": str(tb.log_dir) if tb is not None else None,
        "run_name": run_name(config),
        "hparams_logged": False,
    }
    if tracker is not None and tracker.hparams:
        final = {f"val/{k}": v for k, v in results["best"]["val"].items()}
        final.update({f"test/{k}": v for k, v in (results.get("test") or {}).items() if k != "checkpoint"})
        summary["hparams_logged"] = log_final_hparams(trainer, hparam_columns(config, tracker.columns), final)
    if trainer.is_global_zero:
        # In a log file (not a terminal) a wide console keeps paths and the command on one copyable line.
        panel = _render(summary, config, interrupted=trainer.interrupted)
        Console(width=None if sys.stdout.isatty() else 200).print(panel)
    return summary


def _metrics_text(values: Mapping[str, Any]) -> str:
    items = [(key, value) for key, value in sorted(values.items()) if isinstance(value, (int, float))]
    return "   ".join(f"{name} {value:.4f}" for name, value in items) or "-"


def _render(summary: Mapping[str, Any], config: Mapping[str, Any], interrupted: bool) -> Panel:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    best, last = summary["best"], summary["last"]
    table.add_row("best checkpoint", Text(best["checkpoint"] or "none (no checkpoint was saved)"))
    table.add_row(f"best val (epoch {best['epoch']})" if best["epoch"] else "best val", _metrics_text(best["val"]))
    table.add_row(f"last val (epoch {last.get('val_epoch', last['epoch'])})", _metrics_text(last["val"]))
    test = summary.get("test")
    if test:
        table.add_row("test (best checkpoint)", _metrics_text(test))
    else:
        table.add_row("test", summary.get("test_note", "not run"))
    output_dir = (config.get("paths") or {}).get("output_dir")
    if output_dir:
        table.add_row("run dir", Text(f"{output_dir}  (config, metrics.json, checkpoints/)"))
    if summary["tensorboard_dir"]:
        tb_dir = str(summary["tensorboard_dir"])
        table.add_row("TensorBoard", Text(tb_dir))
        spec = shlex.quote(f"{summary['run_name']}:{tb_dir}")
        table.add_row("", Text(f"tensorboard --logdir_spec {spec}", style="cyan"))
    else:
        table.add_row("TensorBoard", "none (this run has no TensorBoard logger; logger=tensorboard adds one)")
    title = "Run summary" + (" - interrupted" if interrupted else "")
    return Panel(table, title=title, title_align="left", expand=False, border_style="red" if interrupted else "green")
