"""The fastai peer of benchmarks/finetune_study.py: ``vision_learner`` + ``fine_tune`` on a study task's folder.

Runs in its own virtual environment (fastai is not a dependency of this project):

    python3 -m venv /work/venvs/fastai && /work/venvs/fastai/bin/pip install fastai==2.8.12 torch==2.14.1 torchvision==0.29.1

The study's pretrained backbone reaches fastai through fastai's own ``pretrained=True`` path: ``TORCH_HOME`` points at a
hub cache whose torchvision resnet18 ImageNet file holds the study's weights, so fastai builds its body, head, ImageNet
normalisation and three-group split exactly as it does for ImageNet weights. Prints one JSON line per seed:
``{"seed": 0, "acc": 0.91, "seconds": 12.3}`` (seconds: data loaders + learner + ``fine_tune``, imports excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="task folder with train/ and val/ class folders")
    parser.add_argument(
        "--torch-home", required=True, help="hub cache holding the study's weights as resnet18's ImageNet file"
    )
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, required=True, help="total epochs: 1 frozen + (epochs - 1) unfrozen")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the study gives both sides the same)")
    args = parser.parse_args()
    os.environ["TORCH_HOME"] = args.torch_home

    import torch

    torch.set_num_threads(args.threads)
    from fastai.vision.all import ImageDataLoaders, Resize, accuracy, resnet18, set_seed, vision_learner

    torch.hub.download_url_to_file = _refuse  # offline: the weights must come from --torch-home
    for seed in args.seeds:
        set_seed(seed, reproducible=True)
        start = time.perf_counter()
        dls = ImageDataLoaders.from_folder(
            args.root,
            train="train",
            valid="val",
            item_tfms=Resize(args.size),
            bs=args.batch_size,
            num_workers=0,
            seed=seed,
        )
        learn = vision_learner(dls, resnet18, metrics=accuracy, pretrained=True)
        with learn.no_bar(), learn.no_logging():
            learn.fine_tune(args.epochs - 1, freeze_epochs=1)
            acc = float(learn.validate()[1])
        print(json.dumps({"seed": seed, "acc": acc, "seconds": time.perf_counter() - start}), flush=True)


def _refuse(url: str, *args: object, **kwargs: object) -> None:
    raise RuntimeError(f"fastai_peer.py is offline: refused to download {url}; check --torch-home")


if __name__ == "__main__":
    main()
