"""The fastai peer of benchmarks/finetune_study.py: ``vision_learner`` + ``fine_tune`` on a study task's folder.

Runs in its own virtual environment (fastai is not a dependency of this project):

    python3 -m venv /work/venvs/fastai && /work/venvs/fastai/bin/pip install fastai==2.8.12 torch==2.14.1 torchvision==0.29.1

The study's pretrained backbone reaches fastai through fastai's own ``pretrained=True`` path: ``TORCH_HOME`` points at a
hub cache whose torchvision resnet18 ImageNet file holds the study's weights, so fastai builds its body, head, ImageNet
normalisation and three-group split exactly as it does for ImageNet weights. Prints one JSON line per seed:
``{"seed": 0, "acc": 0.91, "seconds": 12.3}`` (seconds: data loaders + learner + ``fine_tune``, imports excluded).

``--multilabel``: the task folder holds ``labels.csv`` (``path,label,split``, labels space-separated), read by a
``DataBlock(ImageBlock, MultiCategoryBlock)`` whose validation rows are the ``val`` rows (the template's
``data.split_column``); fastai's loss is then ``BCEWithLogitsLossFlat``. Scored from ``learn.get_preds()`` on those
rows: ``map`` (macro average precision, scikit-learn's ``average_precision_score``, the same number as the template's
torchmetrics ``MultilabelAveragePrecision(average="macro")``), ``f1_micro`` at the threshold of 0.01 .. 0.99 with the
best micro F1 on the validation rows (the template's rule), ``f1_micro_at_0.5`` and ``acc_multi`` (fastai's metric,
per-label accuracy at 0.5).
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
    parser.add_argument("--multilabel", action="store_true", help="--root holds labels.csv (path,label,split)")
    args = parser.parse_args()
    os.environ["TORCH_HOME"] = args.torch_home

    import torch

    torch.set_num_threads(args.threads)
    from fastai.vision.all import ImageDataLoaders, Resize, accuracy, accuracy_multi, resnet18, set_seed, vision_learner

    torch.hub.download_url_to_file = _refuse  # offline: the weights must come from --torch-home
    for seed in args.seeds:
        set_seed(seed, reproducible=True)
        start = time.perf_counter()
        if args.multilabel:
            dls = multilabel_loaders(args.root, args.size, args.batch_size)
            learn = vision_learner(dls, resnet18, metrics=accuracy_multi, pretrained=True)
        else:
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
            row = {"seed": seed, "acc": float(learn.validate()[1])}
            if args.multilabel:
                probs, targets = learn.get_preds()  # the validation rows; sigmoid applied by BCEWithLogitsLossFlat
                row = {"seed": seed, "acc_multi": row["acc"], "num_val": len(targets)}
                row.update(multilabel_scores(probs.numpy(), targets.numpy()))
        print(json.dumps({**row, "seconds": time.perf_counter() - start}), flush=True)


def multilabel_loaders(root: str, size: int, batch_size: int):
    """``root/labels.csv`` as fastai data loaders: multi-hot targets, the ``val`` rows as the validation set."""
    from pathlib import Path

    import pandas as pd
    from fastai.vision.all import ColReader, ColSplitter, DataBlock, ImageBlock, MultiCategoryBlock, Resize

    frame = pd.read_csv(Path(root) / "labels.csv", keep_default_na=False)
    frame["is_valid"] = frame["split"] == "val"
    block = DataBlock(
        blocks=(ImageBlock, MultiCategoryBlock),
        get_x=ColReader("path", pref=Path(root)),
        get_y=ColReader("label", label_delim=" "),
        splitter=ColSplitter("is_valid"),
        item_tfms=Resize(size),
    )
    return block.dataloaders(frame, bs=batch_size, num_workers=0)


def multilabel_scores(probs, targets) -> dict[str, float]:
    """Macro mAP (scikit-learn), micro F1 at the best threshold of 0.01 .. 0.99 on these rows (the lowest of ties,
    as the template's ``best_threshold``) and at 0.5, and the exact-set accuracy at the best threshold."""
    import numpy as np
    from sklearn.metrics import average_precision_score

    actual = targets.astype(bool)

    def f1(threshold: float) -> float:
        predicted = probs >= threshold
        tp = (predicted & actual).sum()
        return float(2 * tp / max(1, 2 * tp + (predicted & ~actual).sum() + (~predicted & actual).sum()))

    grid = [round(0.01 * i, 2) for i in range(1, 100)]
    best = grid[int(np.argmax([f1(t) for t in grid]))]
    return {
        "map": float(average_precision_score(actual, probs, average="macro")),
        "f1_micro": f1(best),
        "f1_micro_at_0.5": f1(0.5),
        "exact": float(((probs >= best) == actual).all(axis=1).mean()),
        "threshold": best,
    }


def _refuse(url: str, *args: object, **kwargs: object) -> None:
    raise RuntimeError(f"fastai_peer.py is offline: refused to download {url}; check --torch-home")


if __name__ == "__main__":
    main()
