"""Fine-tune a pretrained image classifier: ``python train.py [overrides]`` (see README)."""

import hydra
from omegaconf import DictConfig

from image_finetune.cli import user_errors
from image_finetune.train import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    with user_errors():
        train(cfg)


if __name__ == "__main__":
    main()
