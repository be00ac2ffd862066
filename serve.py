"""Serve a checkpoint over HTTP: ``python serve.py ckpt_path=PATH [backend=onnx] [port=8000]`` (see README)."""

import hydra
from omegaconf import DictConfig

from image_finetune.core.cli import quick_help, user_errors


@hydra.main(version_base="1.3", config_path="configs", config_name="serve")
def main(cfg: DictConfig) -> None:
    with user_errors():
        from image_finetune.inference.serving import serve  # heavy (torch, LitServe): only once a run starts

        serve(cfg)


if __name__ == "__main__" and not quick_help(__file__, "serve"):  # Hydra's own --help takes ~2 s
    main()
