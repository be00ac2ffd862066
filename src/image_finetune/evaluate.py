"""``evaluate(cfg)``: test a checkpoint on the data it was trained with (or on data the command line names)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from image_finetune.callbacks.reproducibility import run_config
from image_finetune.cli import save_json, scalar_metrics
from image_finetune.errors import UserError
from image_finetune.models import ImageClassifier
from image_finetune.train import instantiate_group, resolve_ckpt_path

log = logging.getLogger(__name__)


def data_config(cfg: DictConfig, ckpt_path: str) -> DictConfig:
    """The ``data`` group from the command line if given, else the one stored in the checkpoint."""
    if cfg.get("data") is not None:
        return cfg.data
    stored = run_config(ckpt_path).get("data")
    if not stored:
        raise UserError(f"{ckpt_path} holds no run config: name the data, e.g. data=imagefolder data.root=DIR")
    stored["report_path"] = None  # keep the training run's scan report as it was
    return OmegaConf.create(stored)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Run ``trainer.test`` on the checkpoint and save the metrics as ``metrics.json`` in the run dir."""
    if not cfg.get("ckpt_path"):
        raise UserError("ckpt_path is required: python eval.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt")
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir)
    assert ckpt_path is not None
    model = ImageClassifier.from_checkpoint(ckpt_path)
    datamodule = instantiate(data_config(cfg, ckpt_path))
    datamodule.prepare_data()
    datamodule.setup("test")
    if list(datamodule.class_names) != model.class_names:
        raise UserError(f"the data's classes {datamodule.class_names} differ from the checkpoint's {model.class_names}")
    trainer: L.Trainer = instantiate(cfg.trainer, logger=instantiate_group(cfg.get("logger")) or False)
    trainer.test(model, datamodule=datamodule)
    metrics = scalar_metrics(trainer.callback_metrics, ("test/",))
    if trainer.is_global_zero:
        save_json({**metrics, "checkpoint": ckpt_path}, Path(cfg.paths.output_dir) / "metrics.json")
    return metrics
