"""``train(cfg)``: instantiate what the config names, run the fine-tuning schedule, test the best checkpoint."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from image_finetune import finetune
from image_finetune.callbacks import (
    StoreRunConfig,
    add_test,
    flat_metrics,
    run_results,
    scalar_metrics,
    silence_lightning_noise,
    summarize_run,
)
from image_finetune.checkpoints import LAST, resolve_ckpt_path
from image_finetune.cli import instantiate_group, record_hydra_config, save_json, to_plain
from image_finetune.config_checks import check_config
from image_finetune.errors import ConfigError, RunInterrupted
from image_finetune.models import ImageClassifier
from image_finetune.resume_guard import ResumeCheck, check_resume, describe, record_resume, resume_changes
from image_finetune.rundir import clean_run_dir, drop_checkpoints_after_last, run_dir_lock
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
    """Seed, then instantiate model, data, callbacks, loggers and trainer, and read the schedule, from the config.

    The model comes first because its backbone owns the preprocessing (input size, crop, mean/std, interpolation)
    that the data module applies (``data.image_size`` may still override the size).
    """
    L.seed_everything(cfg.seed, workers=True)
    plain = to_plain(cfg)
    schedule = FinetuneSchedule.from_config(plain["finetune"])
    model: ImageClassifier = instantiate(cfg.model)
    datamodule: L.LightningDataModule = instantiate(cfg.data, _partial_=True)(
        preprocessing=model.backbone.preprocessing
    )
    callbacks = [*instantiate_group(cfg.get("callbacks")), StoreRunConfig(plain)]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.get("logger")) or False
    )
    for logger in trainer.loggers:
        logger.log_hyperparams(plain)
    return Run(datamodule, model, trainer, plain, schedule)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (the fine-tuning schedule's phases) and test the best checkpoint on the test split, if the data has one.

    ``metrics.json`` gets the labelled record (``best``, ``last``, ``test``; see ``callbacks.run_results``), the summary
    prints it, and the return value is the same flattened (``callbacks.flat_metrics``). The run dir is locked for the
    whole run (a second run there stops at once), and what a killed run of this dir left half-written is cleaned up
    first; see ``rundir``. A resume is checked against the config its checkpoint was trained with first
    (``resume_guard``): on every rank, before anything is built or written, so a refused one changes nothing.
    """
    check_config(cfg)
    silence_lightning_noise()
    output_dir = Path(cfg.paths.output_dir)
    changes: list[dict[str, Any]] = []  # the settings resumes of this run changed by resume.allow_changes
    with run_dir_lock(output_dir) as lock:
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
        resume = check_resume(cfg, ckpt_path) if ckpt_path is not None else None
        if lock is not None:  # rank 0 of the run: nobody else writes here
            record_hydra_config(cfg, output_dir)
            clean_run_dir(output_dir)
            if resume is not None:
                _log_resume(resume, record_resume(output_dir, resume))
                changes = resume_changes(output_dir)
            if ckpt_path is not None and Path(ckpt_path) == output_dir / "checkpoints" / LAST:
                drop_checkpoints_after_last(output_dir / "checkpoints")
        return _train(cfg, ckpt_path, changes)


def _train(cfg: DictConfig, ckpt_path: str | None, resume_changes: list[dict[str, Any]]) -> dict[str, Any]:
    run = build(cfg)
    trainer = run.trainer
    try:
        finetune.fit(trainer, run.model, run.datamodule, run.schedule, ckpt_path=ckpt_path)
    except SIGTERMException:
        raise _interrupted(cfg, signal.SIGTERM) from None
    results = run_results(trainer)  # before trainer.test, which resets the trainer's metrics

    test: dict[str, float] | None = None
    note = None
    if not cfg.get("test"):
        note = "not run (test=false)"
    elif trainer.interrupted:
        note = "not run (the run was interrupted)"
    elif not _has_test_split(run.datamodule):
        # Never test on val under the name "test": val chose the best checkpoint, so its numbers flatter the model.
        note = "no test split (the data holds none out; validation metrics only)"
        log.warning("%s: no test metrics. Add a test/ folder or set data.test_fraction to hold one out.", note)
    else:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("No best checkpoint (checkpointing off or no validation): testing the current weights.")
        # verbose=False: the summary below prints these numbers once, labelled, next to the val metrics.
        trainer.test(run.model, datamodule=run.datamodule, ckpt_path=best or None, weights_only=True, verbose=False)
        test = scalar_metrics(trainer.callback_metrics, ("test/",))
    results = add_test(results, test, note)
    if resume_changes:
        results["resume_changes"] = resume_changes
    if trainer.is_global_zero:
        save_json(results, Path(cfg.paths.output_dir) / "metrics.json")
    summarize_run(trainer, run.config, results)
    return flat_metrics(results)


def _log_resume(resume: ResumeCheck, history: Path) -> None:
    if resume.allowed:
        log.warning(
            "Resuming %s with changes allowed by resume.allow_changes (recorded in %s and metrics.json): %s",
            resume.ckpt_path, history, describe(resume.allowed),
        )  # fmt: skip
    benign = describe(resume.benign)
    if benign:
        log.info("Resuming %s with changes that leave the result as it was: %s", resume.ckpt_path, benign)


def _has_test_split(datamodule: L.LightningDataModule) -> bool:
    has_split = getattr(datamodule, "has_split", None)
    return has_split("test") if has_split is not None else True


def optimized_value(metrics: dict[str, Any], name: str | None) -> float | None:
    """The metric a sweeper optimises (``optimized_metric``, default ``val/acc``, the best checkpoint's); None when none is named."""
    if name is None:
        return None
    if name not in metrics:
        available = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, float)))
        raise ConfigError(f"optimized_metric={name!r} is not among this run's metrics ({available})")
    return float(metrics[name])


def _interrupted(cfg: DictConfig, signum: signal.Signals) -> RunInterrupted:
    """SIGTERM (a scheduler's preemption or time limit, ``kill``) during training.

    Lightning's signal connector notes the signal and raises ``SIGTERMException`` after the current batch; the
    ``last_checkpoint`` callback (``save_on_exception``) has then saved ``checkpoints/last.ckpt`` with the state at
    that batch. Lightning would let the process exit 0; we exit 128 + 15 instead, so a scheduler sees the job did not
    finish. A requeued job resumes with the same command plus ``hydra.run.dir=<this run dir> ckpt_path=last``.
    """
    last = Path(cfg.paths.output_dir) / "checkpoints" / LAST
    where = (
        f"resume with hydra.run.dir={cfg.paths.output_dir} ckpt_path=last"
        if last.is_file()
        else "no checkpoint was saved"
    )
    return RunInterrupted(f"received {signum.name} during training; {where}", exit_code=128 + signum.value)
