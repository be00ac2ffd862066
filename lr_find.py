"""Find learning rates for the fine-tuning schedule: ``python lr_find.py [experiment=...] [overrides]`` (see README).

``lr_find.apply=true`` then trains with the suggestions, as ``train.py`` would, in the same run dir.
"""

import hydra
from omegaconf import DictConfig

from image_finetune.core.cli import quick_help, user_errors
from image_finetune.core.config_checks import check_config


@hydra.main(version_base="1.3", config_path="configs", config_name="lr_find")
def main(cfg: DictConfig) -> float | None:
    with user_errors():
        check_config(cfg, validates=bool(cfg.lr_find.apply))  # before the heavy imports; the sweep never validates
        from image_finetune.training.lr_find import apply_suggestions, lr_find

        result = lr_find(cfg)
        if not cfg.lr_find.apply:
            return None
        from image_finetune.training.train import optimized_value, train

        return optimized_value(train(apply_suggestions(cfg, result)), cfg.get("optimized_metric"))


if __name__ == "__main__" and not quick_help(__file__, "lr_find"):  # Hydra's own --help takes ~2 s
    main()
