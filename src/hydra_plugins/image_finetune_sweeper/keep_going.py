"""Hydra's basic sweeper (``-m seed=0,1``, ``-m data.batch_size=16,32``), but a failed job does not end the multirun."""

from __future__ import annotations

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class _CompletedOnly(Launcher):
    """Runs the jobs with the real launcher and hands the sweeper only those that completed.

    Hydra's ``BasicSweeper`` re-raises the first failed job's error once its batch ends: the later batches never run
    and no ``on_multirun_end`` callback is called, so there would be no summary. Each failed job is reported by
    ``image_finetune.ops.multirun.MultirunSummary`` instead: its line when it fails, the list and exit code 2 at the end.
    """

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.launcher.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        results = self.launcher.launch(job_overrides, initial_job_idx)
        return [r for r in results if r.status != JobStatus.FAILED]


class KeepGoingSweeper(BasicSweeper):
    """``hydra/sweeper=keep_going`` (configs/hydra/sweeper/keep_going.yaml), the default: every job of a multirun
    runs even when an earlier one failed."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.launcher = _CompletedOnly(self.launcher)
