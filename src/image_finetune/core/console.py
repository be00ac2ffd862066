"""What a run prints: Lightning's log lines once each, without its noise (``silence_lightning_noise``), and the summary
panel at the end (``summarize_run``). The progress bar and the one-line model summary are ``callbacks.progress``."""

from __future__ import annotations

import logging
import shlex
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from image_finetune.core.results import RunSummary, config_value, hparam_columns, log_final_hparams
from image_finetune.ops.loggers import tensorboard_logger

# ---- noise --------------------------------------------------------------------------------------------------------------
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
    # an epoch shorter than trainer.log_every_n_steps: fewer per-step points; epoch metrics are logged regardless
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # a mid-epoch (SIGTERM/Ctrl-C) last.ckpt: our loader is resumable after all, since the data module's state (the
    # EpochSampler's epoch and batches done) travels in the checkpoint and the rest of the epoch is drawn exactly
    r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable",
)
#: Given a handler of their own by ``import lightning``: ``lightning`` always, the others if the root had none yet.
_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


def _noise_filter(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOISE_LOG_PREFIXES)


def silence_lightning_noise() -> None:
    """Drop the lines in ``_NOISE_LOG_PREFIXES`` / ``_NOISE_WARNINGS``; all else Lightning says stays. Idempotent.
    Once Hydra has set up the root logger, Lightning's own stream handlers go: each line is printed once, in the run's
    format, and reaches the run's log file."""
    if logging.getLogger().handlers:
        for name in _LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)
            logger.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _noise_filter not in logger.filters:
            logger.addFilter(_noise_filter)
    for pattern in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def run_name(config: Mapping[str, Any]) -> str:
    """A readable TensorBoard run name: backbone, data and the run dir's name, e.g. ``resnet18-digits-2026-...``."""
    data = config.get("data") or {}
    root = data.get("root")
    module = str(data.get("_target_", "data")).rsplit(".", 1)[-1]
    dataset = Path(root).name if root else module.removesuffix("DataModule").lower()
    output_dir = (config.get("paths") or {}).get("output_dir") or ""
    parts = [config_value(config, "model.backbone.name"), dataset, Path(output_dir).name]
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
