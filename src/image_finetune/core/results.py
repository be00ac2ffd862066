"""The run's outcome, recorded once (``run_results`` -> ``add_test`` -> ``flat_metrics``, from ``RunSummary``'s
validation history): what ``metrics.json``, the summary, a sweeper and TensorBoard's hparams tab show. With
``default_hp_metric: false`` that tab stays empty until ``log_final_hparams`` logs the compared columns
(``HPARAM_COLUMNS``) with the final metrics, as ``hparams/<metric>`` scalars that add no points to the curves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from image_finetune.checkpoints import read_checkpoint
from image_finetune.core.errors import UserError
from image_finetune.ops.loggers import log_step, tensorboard_logger

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


def scalar_metrics(
    metrics: Mapping[str, Any], prefixes: tuple[str, ...] = ("train/", "val/", "test/")
) -> dict[str, float]:
    """The logged metrics under ``prefixes`` as plain floats (what metrics.json, the summary and sweepers read)."""
    return {k: float(v) for k, v in metrics.items() if k.startswith(prefixes)}


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


def config_value(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
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
        value = config_value(config, key, _ABSENT)
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
        # log_metrics (re)opened the writer (public ``file_writer``); torch's own add_hparams would write into a
        # separate run dir, splitting one run in two in TensorBoard.
        for summary in hparams(dict(params), values):
            tb.experiment.file_writer.add_summary(summary, step)
    tb.finalize("success")  # flush (the writer was closed after fit/test and reopens for this) and save hparams.yaml
    return True
