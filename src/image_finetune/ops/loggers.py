"""Experiment trackers beyond TensorBoard: W&B and MLflow, continuing their run when a run dir is resumed, and one
``log_image`` that sends a picture to every logger that can show one.

The trackers are optional dependencies. Their factories check the package first and fail with one line that names the
extra to install (``pip install -e '.[wandb]'``), instead of Lightning's ``ModuleNotFoundError`` wrapped in Hydra's
``InstantiationException``.

A run dir is the identity of a run: a requeued SLURM job or ``ckpt_path=last`` trains on in the same dir, so its
trackers must append to the same run instead of forking a new one. TensorBoard does this by itself (same event dir);
W&B gets a run id derived from the run dir (``resume="allow"``); MLflow, whose run ids are chosen by the server, finds
its run by a tag holding the run dir.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

from image_finetune.core.errors import UserError

log = logging.getLogger(__name__)

RUN_DIR_TAG = "image_finetune.run_dir"


def require(package: str, extra: str, what: str) -> None:
    """Stop with one line naming the extra to install when an optional package is missing."""
    if importlib.util.find_spec(package) is None:
        raise UserError(f"{what} needs the {package} package: pip install -e '.[{extra}]' (or pip install {package})")


def run_dir_id(run_dir: str | Path) -> str:
    """A stable id for a run dir: the same dir (requeue, resume) gives the same tracker run."""
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


class _WandbLogger(WandbLogger):
    """Lightning's ``WandbLogger``, whose W&B run starts with one line instead of wandb's ``UsageError`` traceback
    when there are no credentials (no ``wandb login``, no ``WANDB_API_KEY``) and the run is not offline."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        from wandb.errors import UsageError

        try:
            return super().experiment
        except UsageError as error:
            if "API key" not in str(error):  # another setting wandb refuses: its own words
                raise UserError(f"logger=wandb: {error}") from None
            raise UserError(
                "logger=wandb: no W&B API key here; run `wandb login` (or set WANDB_API_KEY), or log offline with "
                "WANDB_MODE=offline (or logger.wandb.offline=true) and upload later with `wandb sync`"
            ) from None


def wandb_logger(run_dir: str | Path, id: str | None = None, resume: str = "allow", **kwargs: Any) -> WandbLogger:
    """Lightning's ``WandbLogger`` whose run id comes from the run dir, so a resumed run continues its W&B run.

    Offline (no network, nothing uploaded until ``wandb sync``): ``WANDB_MODE=offline`` or
    ``logger.wandb.offline=true``.
    """
    require("wandb", "wandb", "logger=wandb")
    Path(kwargs.get("save_dir") or ".").mkdir(parents=True, exist_ok=True)
    return _WandbLogger(id=id or run_dir_id(run_dir), resume=resume, **kwargs)


def finish_wandb_run() -> None:
    """End this process's W&B run, if any. Lightning's ``WandbLogger`` reuses a run already open in the process, so
    without this every job of an in-process multirun (seeds, sweep trials) would log into the first job's run.
    Called at the end of each job (``multirun.FinishTrackers``), not in ``finalize``: that runs after each
    fine-tuning phase's fit, and the next phase still logs."""
    import sys

    wandb = sys.modules.get("wandb")  # never imported: nothing to finish
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


class ResumableMLFlowLogger(MLFlowLogger):
    """Lightning's ``MLFlowLogger`` that continues the MLflow run of its run dir instead of starting a new one.

    The run is tagged with the run dir; when a run with that tag exists in the experiment, it is reused. Parameters
    already on a continued run are not logged again (MLflow refuses to change a logged parameter, and a resumed
    run's config differs at least in ``ckpt_path``).
    """

    def __init__(self, run_dir: str | Path, tags: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.run_dir = str(Path(run_dir).resolve())
        self._continued = False
        super().__init__(tags={RUN_DIR_TAG: self.run_dir, **(tags or {})}, **kwargs)

    def _find_run(self) -> str | None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self._tracking_uri)
        experiment = client.get_experiment_by_name(self._experiment_name)
        if experiment is None:
            return None
        query = f"tags.`{RUN_DIR_TAG}` = '{self.run_dir}'"
        runs = client.search_runs([experiment.experiment_id], filter_string=query, max_results=1)
        return runs[0].info.run_id if runs else None

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if not self._initialized and self._run_id is None:
            self._run_id = self._find_run()
            self._continued = self._run_id is not None
            if self._continued:
                log.info("MLflow: continuing run %s of %s", self._run_id, self.run_dir)
        return super().experiment

    def log_hyperparams(self, params: Any) -> None:
        _ = self.experiment  # resolves whether this run continues an earlier one
        if self._continued:
            from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

            logged = self.experiment.get_run(self.run_id).data.params
            flat = _flatten_dict(_convert_params(params))
            params = {k: v for k, v in flat.items() if k not in logged}
            if not params:
                return
        super().log_hyperparams(params)


def mlflow_logger(run_dir: str | Path, **kwargs: Any) -> ResumableMLFlowLogger:
    """``ResumableMLFlowLogger``, after checking that MLflow is installed."""
    require("mlflow", "mlflow", "logger=mlflow")
    return ResumableMLFlowLogger(run_dir, **kwargs)


# ---- images to every logger that can show them ------------------------------------------------------------------
def _tensorboard_image(logger: TensorBoardLogger, tag: str, image: np.ndarray, step: int) -> None:
    logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")


def _wandb_image(logger: WandbLogger, tag: str, image: np.ndarray, step: int) -> None:
    logger.log_image(key=tag, images=[image], step=step)


def _mlflow_image(logger: MLFlowLogger, tag: str, image: np.ndarray, step: int) -> None:
    logger.experiment.log_image(logger.run_id, image, key=tag, step=step)


IMAGE_WRITERS: dict[type[Logger], Callable[[Any, str, np.ndarray, int], None]] = {
    TensorBoardLogger: _tensorboard_image,
    WandbLogger: _wandb_image,
    MLFlowLogger: _mlflow_image,
}


def _image_writer(logger: Logger) -> Callable[[Any, str, np.ndarray, int], None] | None:
    return next((write for kind, write in IMAGE_WRITERS.items() if isinstance(logger, kind)), None)


def image_loggers(trainer: L.Trainer) -> list[Logger]:
    """The run's loggers that can show images (TensorBoard, W&B, MLflow). The same list on every rank."""
    return [lg for lg in trainer.loggers if _image_writer(lg) is not None]


def log_image(trainer: L.Trainer, tag: str, image: np.ndarray, step: int) -> None:
    """Send an HWC uint8 image to every logger that can show it; rank 0 only."""
    if not trainer.is_global_zero:
        return
    for logger in image_loggers(trainer):
        _image_writer(logger)(logger, tag, image, step)  # type: ignore[misc]


def tensorboard_logger(trainer: L.Trainer) -> TensorBoardLogger | None:
    """The run's first TensorBoard logger. Every rank has the same loggers, so every rank gets the same answer."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def log_step(trainer: L.Trainer) -> int:
    """The step Lightning itself logs at, so our points line up with ``val/acc`` & co. in TensorBoard.

    Validation runs before the epoch's last optimizer step is counted, so this is ``global_step - 1`` there.
    """
    # private: no public API gives the loggers' step (Lightning-AI/pytorch-lightning#13752)
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))
