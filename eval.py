"""Test a checkpoint: ``python eval.py ckpt_path=PATH [data=... data.root=...]`` (see README)."""

import hydra
from omegaconf import DictConfig

from image_finetune.core.cli import quick_help, user_errors


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    with user_errors():
        from image_finetune.inference.evaluate import evaluate  # heavy (torch, Lightning): only once a run starts

        evaluate(cfg)


if __name__ == "__main__" and not quick_help(__file__, "eval"):  # Hydra's own --help takes ~2 s
    main()
