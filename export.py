"""Export a checkpoint for serving: ``python export.py ckpt_path=PATH format=onnx|torchscript|safetensors`` (see README)."""

import hydra
from omegaconf import DictConfig

from image_finetune.cli import user_errors


@hydra.main(version_base="1.3", config_path="configs", config_name="export")
def main(cfg: DictConfig) -> None:
    with user_errors():
        from image_finetune.export import export  # heavy (torch, Lightning): only once a run starts

        export(cfg)


if __name__ == "__main__":
    main()
