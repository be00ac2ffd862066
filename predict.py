"""Classify images with a checkpoint: ``python predict.py ckpt_path=PATH input=PATH`` (see README)."""

import hydra
from omegaconf import DictConfig

from image_finetune.core.cli import quick_help, user_errors


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    with user_errors():
        from image_finetune.inference.predict import predict  # heavy (torch, Lightning): only once a run starts

        predict(cfg)


if __name__ == "__main__" and not quick_help(__file__, "predict"):  # Hydra's own --help takes ~2 s
    main()
