"""Hydra only instantiates sweepers that live under ``hydra_plugins``: this adapter hands the work to
``image_finetune.ops.sweep`` (why we drive Optuna ourselves instead of hydra-optuna-sweeper: see there)."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """``hydra/sweeper=optuna`` (configs/hydra/sweeper/optuna.yaml): an Optuna study that survives being killed."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        if importlib.util.find_spec("optuna") is None or importlib.util.find_spec("optuna_integration") is None:
            print(
                "error: hparams_search=optuna needs optuna and optuna-integration: pip install -e '.[sweep]'",
                file=sys.stderr,
            )
            sys.exit(2)
        from image_finetune.core.cli import user_errors
        from image_finetune.ops.sweep import run_study

        assert self.config is not None
        with user_errors():  # the sweep's own mistakes (a foreign optuna.db, nothing to search): one line, exit 2
            return run_study(self.launcher, self.config, arguments, **self.settings)
