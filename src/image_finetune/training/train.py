"""``train(cfg)``: instantiate what the config names, run the fine-tuning schedule, test the best checkpoint."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from image_finetune.callbacks import StoreRunConfig
from image_finetune.checkpoints import LAST, resolve_ckpt_path
from image_finetune.core.cli import instantiate_group, record_hydra_config, save_json, to_plain
from image_finetune.core.config_checks import check_config
from image_finetune.core.console import silence_lightning_noise, summarize_run
from image_finetune.core.errors import ConfigError, RunInterrupted, is_keyboard_interrupt
from image_finetune.core.results import add_test, flat_metrics, run_results, scalar_metrics
from image_finetune.core.rundir import clean_run_dir, drop_checkpoints_after_last, run_dir_lock
from image_finetune.data.contract import ClassificationData
from image_finetune.models.classifier import ImageClassifier
from image_finetune.training import finetune
from image_finetune.training.init_from import init_from_callbacks
from image_finetune.training.out_of_fold import write_oof_predictions
from image_finetune.training.resume_guard import ResumeCheck, check_resume, describe, record_resume, resume_changes
from image_finetune.training.schedule import FinetuneSchedule
from image_finetune.training.wiring import build_data, build_model

log = logging.getLogger(__name__)


@dataclass
class Run:
    """The objects a config describes, and the resolved config as plain data."""

    datamodule: ClassificationData
    model: ImageClassifier
    trainer: L.Trainer
    config: dict[str, Any]
    schedule: FinetuneSchedule


def build(cfg: DictConfig) -> Run:
    """Seed, then instantiate model and data (``wiring.build_model_and_data``), callbacks, loggers and trainer, and
    read the schedule, from the config."""
    L.seed_everything(cfg.seed, workers=True)
    plain = to_plain(cfg)
    schedule = FinetuneSchedule.from_config(plain["finetune"])
    model = build_model(model=cfg.model)
    # read and checked now, so a bad file or another architecture fails before the data; a resume does not read it
    init_from = init_from_callbacks(cfg.model.get("init_from"), model.backbone, resume=bool(cfg.get("ckpt_path")))
    datamodule = build_data(cfg.data, model)
    # init_from first: it must load the weights before any callback copies the model (EMA)
    callbacks = [*init_from, *instantiate_group(cfg.get("callbacks")), StoreRunConfig(plain)]
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


def _train(cfg: DictConfig, ckpt_path: str | None, allowed_changes: list[dict[str, Any]]) -> dict[str, Any]:
    when = "before training started"
    try:
        run = build(cfg)
        trainer = run.trainer
        when = "again while stopping, and stopped at once"  # finetune.fit turns the first Ctrl-C into StoppedBySignal
        finetune.fit(trainer, run.model, run.datamodule, run.schedule, ckpt_path=ckpt_path)
        when = "while testing (training had finished)"
        return _test_and_report(cfg, run, allowed_changes)
    except finetune.StoppedBySignal as stop:
        raise _interrupted(cfg, stop.signum) from None
    except (KeyboardInterrupt, SystemExit) as err:
        if not is_keyboard_interrupt(err):
            raise
        raise _interrupted(cfg, signal.SIGINT, when) from None


def _test_and_report(cfg: DictConfig, run: Run, allowed_changes: list[dict[str, Any]]) -> dict[str, Any]:
    """Test the best checkpoint (when there is a test split), write ``metrics.json`` (with the changes a resume was
    allowed, if any) and print the summary. A k-fold run also writes the best checkpoint's predictions on its held-out
    fold (``out_of_fold``)."""
    trainer = run.trainer
    results = run_results(trainer)  # before trainer.test, which resets the trainer's metrics
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""

    test: dict[str, float] | None = None
    note = None
    if not cfg.get("test"):
        note = "not run (test=false)"
    elif trainer.interrupted:
        note = "not run (the run was interrupted)"
    elif not run.datamodule.has_split("test"):
        # Never test on val under the name "test": val chose the best checkpoint, so its numbers flatter the model.
        note = "no test split (the data holds none out; validation metrics only)"
        log.warning("%s: no test metrics. Add a test/ folder or set data.test_fraction to hold one out.", note)
    else:
        if not best:
            log.warning("No best checkpoint (checkpointing off or no validation): testing the current weights.")
        # verbose=False: the summary below prints these numbers once, labelled, next to the val metrics.
        trainer.test(run.model, datamodule=run.datamodule, ckpt_path=best or None, weights_only=True, verbose=False)
        test = scalar_metrics(trainer.callback_metrics, ("test/",))
    results = add_test(results, test, note)
    if allowed_changes:
        results["resume_changes"] = allowed_changes
    if trainer.is_global_zero and not trainer.interrupted:
        write_oof_predictions(run.datamodule, best or None, run.model, cfg.paths.output_dir)
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


def optimized_value(metrics: dict[str, Any], name: str | None) -> float | None:
    """The metric a sweeper optimises (``optimized_metric``, default ``val/acc``, the best checkpoint's); None when none is named."""
    if name is None:
        return None
    if name not in metrics:
        available = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, float)))
        raise ConfigError(f"optimized_metric={name!r} is not among this run's metrics ({available})")
    return float(metrics[name])


def _interrupted(cfg: DictConfig, signum: signal.Signals, when: str = "during training") -> RunInterrupted:
    """SIGTERM (a scheduler's preemption or time limit, ``kill``) or SIGINT (Ctrl-C) ``when``.

    During training Lightning's signal connector notes the signal (``finetune.fit`` hands it a first SIGINT too) and
    raises ``SIGTERMException`` after the current batch; the ``last_checkpoint`` callback (``save_on_exception``) has
    then saved ``checkpoints/last.ckpt`` with the state at that batch. Lightning would let the process exit 0 (and
    exit 1 on Ctrl-C); we exit 128 + the signal's number instead (143, 130), as a shell reports a process the signal
    ended, so a scheduler or script sees the job did not finish. A requeued job resumes with the same command plus
    ``hydra.run.dir=<this run dir> ckpt_path=last``; a second Ctrl-C stops at once, and ``last.ckpt`` is then the last
    state saved whole.
    """
    last = Path(cfg.paths.output_dir) / "checkpoints" / LAST
    where = (
        f"resume with hydra.run.dir={cfg.paths.output_dir} ckpt_path=last"
        if last.is_file()
        else "no checkpoint was saved"
    )
    return RunInterrupted(f"received {signum.name} {when}; {where}", exit_code=128 + signum.value)
