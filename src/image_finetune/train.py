"""``train(cfg)``: instantiate what the config names, run the fine-tuning schedule, test the best checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from image_finetune import finetune
from image_finetune.callbacks import StoreRunConfig, summarize_run
from image_finetune.checkpoints import resolve_ckpt_path
from image_finetune.cli import instantiate_group, save_json, scalar_metrics, to_plain
from image_finetune.models import ImageClassifier
from image_finetune.schedule import FinetuneSchedule

log = logging.getLogger(__name__)


@dataclass
class Run:
    """The objects a config describes, and the resolved config as plain data."""

    datamodule: L.LightningDataModule
    model: ImageClassifier
    trainer: L.Trainer
    config: dict[str, Any]
    schedule: FinetuneSchedule


def build(cfg: DictConfig) -> Run:
    """Seed, then instantiate data, model, callbacks, loggers and trainer, and read the schedule, from the config."""
    L.seed_everything(cfg.seed, workers=True)
    plain = to_plain(cfg)
    schedule = FinetuneSchedule.from_config(plain["finetune"])
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    model: ImageClassifier = instantiate(cfg.model)
    callbacks = [*instantiate_group(cfg.get("callbacks")), StoreRunConfig(plain)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.get("logger")) or False)
    for logger in trainer.loggers:
        logger.log_hyperparams(plain)
    return Run(datamodule, model, trainer, plain, schedule)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (the fine-tuning schedule's phases) and test; returns the final metrics, also saved as ``metrics.json``."""
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
    run = build(cfg)
    trainer = run.trainer
    finetune.fit(trainer, run.model, run.datamodule, run.schedule, ckpt_path=ckpt_path)
    metrics: dict[str, Any] = scalar_metrics(trainer.callback_metrics)

    if cfg.get("test") and not trainer.interrupted:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("No best checkpoint (checkpointing off or no validation): testing the current weights.")
        trainer.test(run.model, datamodule=run.datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update(scalar_metrics(trainer.callback_metrics, ("test/",)))
        metrics["best_checkpoint"] = best
    if trainer.is_global_zero:
        save_json(metrics, Path(cfg.paths.output_dir) / "metrics.json")
    summarize_run(trainer, run.config, metrics)
    return metrics
