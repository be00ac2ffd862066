"""Find learning rates for the fine-tuning schedule: ``python lr_find.py [experiment=...] [overrides]`` (see README)."""

import hydra
from omegaconf import DictConfig

from image_finetune.cli import user_errors
from image_finetune.lr_find import lr_find


@hydra.main(version_base="1.3", config_path="configs", config_name="lr_find")
def main(cfg: DictConfig) -> None:
    with user_errors():
        lr_find(cfg)


if __name__ == "__main__":
    main()
