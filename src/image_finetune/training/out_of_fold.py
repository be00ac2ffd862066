"""Out-of-fold predictions: a k-fold run's best checkpoint on the fold it held out (``oof_predictions.csv``).

Each fold's run predicts only the images it never trained on, so the K files of ``-m data.folds=K
data.fold='range(K)'`` together give one honest prediction for every image of the pool (the multirun summary joins
them into ``<sweep dir>/oof_predictions.csv``): what error analysis, stacking or label cleaning need. The images are
read from the original files at the eval transform, as ``eval.py`` reads them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from image_finetune.core.cli import write_csv
from image_finetune.data.contract import ClassificationData
from image_finetune.inference.classifier import label_sets, to_float
from image_finetune.models.classifier import ImageClassifier
from image_finetune.ops.multirun import OOF_CSV

log = logging.getLogger(__name__)


def oof_header(class_names: list[str]) -> list[str]:
    """``path, label, predicted`` and one probability column per class (``prob_<class>``, in label order)."""
    return ["path", "label", "predicted", *(f"prob_{name}" for name in class_names)]


def write_oof_predictions(
    datamodule: ClassificationData, ckpt_path: str | None, model: ImageClassifier, out_dir: str | os.PathLike
) -> Path | None:
    """``<out_dir>/oof_predictions.csv``: the probabilities ``ckpt_path`` (the best checkpoint; ``model`` as it is when
    there is none) gives each image of the held-out fold. None, writing nothing, when the run is no k-fold run of
    data split into files (only image folders know each image's file)."""
    dataset = datamodule.held_out_fold()
    if dataset is None:
        return None
    net = ImageClassifier.from_checkpoint(ckpt_path).net if ckpt_path else model.net
    assert net is not None  # a trained model has its head
    device = model.device
    net = net.to(device).eval()
    loader = DataLoader(dataset, batch_size=datamodule.batch_size, num_workers=datamodule.num_workers)  # type: ignore[attr-defined]
    probabilities, targets = [], []
    with torch.inference_mode():
        for images, target in loader:
            logits = net(to_float(images.to(device))).float()
            probabilities.append((logits.sigmoid() if model.multilabel else logits.softmax(dim=-1)).cpu())
            targets.append(target)
    names, probs = model.class_names, torch.cat(probabilities)
    if model.multilabel:  # label sets: the true ones, and those over the checkpoint's decision threshold
        truth = [" ".join(n for n, on in zip(names, row) if on >= 0.5) for row in torch.cat(targets).tolist()]
        predicted = [" ".join(chosen) for chosen in label_sets(probs, names, model.decision_threshold)]
    else:
        truth = [names[int(t)] for t in torch.cat(targets).tolist()]
        predicted = [names[int(p.argmax())] for p in probs]
    rows = [
        [path, t, c, *(f"{v:.6f}" for v in p.tolist())]
        for (path, _), t, c, p in zip(dataset.samples, truth, predicted, probs)
    ]
    path = write_csv(Path(out_dir) / OOF_CSV, [oof_header(names), *rows])
    log.info("Out-of-fold predictions of the best checkpoint on the %d held-out images: %s", len(rows), path)
    return path
