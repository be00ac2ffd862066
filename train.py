"""Fine-tune a pretrained image classifier: ``python train.py [overrides]`` (see README)."""

import hydra
from omegaconf import DictConfig

from image_finetune.core.cli import quick_help, user_errors
from image_finetune.core.config_checks import check_config
from image_finetune.ops.multirun import multirun_job


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns ``optimized_metric`` (default ``val/acc``: the best checkpoint's) for sweepers such as ``hparams_search=optuna``."""
    with user_errors(), multirun_job():
        check_config(cfg)  # before the heavy imports: a wrong value costs a second, not the ~6 s of importing Lightning
        from image_finetune.training.train import (  # torch, Lightning, torchvision: only once a run starts
            optimized_value,
            train,
        )

        return optimized_value(train(cfg), cfg.get("optimized_metric"))


if __name__ == "__main__" and not quick_help(__file__, "train"):  # Hydra's own --help takes ~2 s
    main()
