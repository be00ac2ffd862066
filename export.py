"""Export a checkpoint for serving: ``python export.py ckpt_path=PATH format=onnx|torchscript|safetensors`` (see README)."""

import hydra
from omegaconf import DictConfig

from image_finetune.core.cli import quick_help, user_errors


@hydra.main(version_base="1.3", config_path="configs", config_name="export")
def main(cfg: DictConfig) -> None:
    with user_errors():
        from image_finetune.inference.export import export  # heavy (torch, Lightning): only once a run starts

        export(cfg)


if __name__ == "__main__" and not quick_help(__file__, "export"):  # Hydra's own --help takes ~2 s
    main()
