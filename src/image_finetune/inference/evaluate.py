"""``evaluate(cfg)``: test a checkpoint on the data it was trained with (or on data the command line names).

Besides the ``test/...`` metrics of training (same code, same numbers), it writes per-class precision/recall/F1, the
confusion matrix (CSV and PNG), every image's top-k prediction and the interpretation (``interpretation``: most
confused pairs, top losses, calibration), all from one pass over the data. A multi-label checkpoint writes
``per_label.csv`` (precision, recall, F1 at its threshold, AP) and each image's true and predicted label sets with every
label's probability instead (no confusion matrix or interpretation: they assume one class per image).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
    multilabel_average_precision,
)

from image_finetune.checkpoints import resolve_ckpt_path
from image_finetune.core.atomic import atomic_path
from image_finetune.core.cli import instantiate_group, save_json, write_csv
from image_finetune.core.console import silence_lightning_noise
from image_finetune.core.errors import ConfigError, DataError, UserError
from image_finetune.core.plots import confusion_matrix_figure
from image_finetune.core.results import scalar_metrics
from image_finetune.data.contract import ClassificationData
from image_finetune.data.files import ImageFileDataset
from image_finetune.data.preprocessing import Preprocessing
from image_finetune.inference.classifier import (
    label_sets,
    prediction_cells,
    prediction_header,
    to_float,
    top_k_predictions,
)
from image_finetune.inference.interpretation import log_interpretation, options, write_interpretation
from image_finetune.inference.tta import TTA
from image_finetune.models.classifier import ImageClassifier
from image_finetune.ops.loggers import log_step
from image_finetune.recipe.metrics import at_threshold, macro_f1
from image_finetune.training.wiring import build_model_and_data, data_config

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "all")


class Relabelled(Dataset):
    """Maps a dataset's label indices to the checkpoint's, so classes are matched by name, not by position."""

    def __init__(self, dataset: Dataset, mapping: Sequence[int]) -> None:
        self.dataset, self.mapping = dataset, list(mapping)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        return image, self.mapping[int(label)]


def match_classes(dataset: Dataset, data_classes: Sequence[str], model_classes: Sequence[str], source: str) -> Dataset:
    """The dataset with labels in the checkpoint's order; classes the checkpoint does not know are an error.

    Classes of the checkpoint that the data lacks are fine (a test folder may hold some classes only): macro F1
    leaves them out, and ``evaluate`` says so (``absent_classes_note``).
    """
    data_classes, model_classes = list(data_classes), list(model_classes)
    if data_classes == model_classes:
        return dataset
    if isinstance(dataset, ImageFileDataset) and dataset.targets is not None:  # multi-hot: the same labels, in order
        raise DataError(
            f"{source} has the labels {data_classes}, the checkpoint {model_classes}: multi-label data is evaluated "
            "with the checkpoint's labels, in its order"
        )
    unknown = [name for name in data_classes if name not in model_classes]
    if unknown:
        raise DataError(
            f"{source} has classes the checkpoint was not trained on: {unknown}. The checkpoint's classes are "
            f"{model_classes}. Rename those class folders to the checkpoint's names, or leave them out."
        )
    return Relabelled(dataset, [model_classes.index(name) for name in data_classes])


def select_split(datamodule: ClassificationData, split: str, data_from_command_line: bool) -> tuple[str, Dataset]:
    """The split to evaluate and its dataset (with the eval transform).

    ``test`` falls back to every image (``all_images``) for data named on the command line that is one pool split by
    fractions (``data.root=DIR`` of class folders, a CSV file, a Hugging Face dataset: it then is the test set whole).
    A dataset's own train/val splits (CIFAR-10, ``data=flowers102``) are never a test set, nor is the checkpoint's own
    data without a test split: that is an error, never a silent switch to ``val`` (the val split chose the checkpoint,
    so its numbers are not a test).
    """
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: choose one of {list(SPLITS)}")
    if split == "test" and not datamodule.has_split("test"):
        if data_from_command_line and datamodule.all_images() is not None:
            log.info("%s has no test split: evaluating all its images", datamodule.source)
            split = "all"
        else:
            raise ConfigError(
                "split=test: the checkpoint's data has no test split (its run held none out). Evaluate held-out images "
                "with data=imagefolder data.root=DIR, or pass split=val for the validation split (which chose the "
                "checkpoint, so it is not an independent test)."
            )
    if split == "all":
        everything = datamodule.all_images()
        if everything is None:
            raise ConfigError(
                f"split=all needs every image of the data, which {type(datamodule).__name__}.all_images() does not give "
                "(None): give the data module an eval_views() (data/base.py), or evaluate split=test or split=val"
            )
        return split, everything
    if not datamodule.has_split(split):
        raise ConfigError(f"split={split}: the data has no {split} split (it has {sorted(datamodule.datasets)})")
    return split, datamodule.datasets[split]


def sample_ids(dataset: Dataset) -> list[str]:
    """Each sample's file path, or its index for in-memory data (CIFAR-10)."""
    inner = dataset.dataset if isinstance(dataset, Relabelled) else dataset
    samples = getattr(inner, "samples", None)
    return [path for path, _ in samples] if samples is not None else [str(i) for i in range(len(dataset))]  # type: ignore[arg-type]


class CollectLogits(L.Callback):
    """Keep each test batch's logits and targets, so the per-class report needs no second pass over the data."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.logits.append(outputs["logits"].float().cpu())
        self.targets.append(batch[1].cpu())


def per_class_metrics(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """precision, recall, f1 (0 where undefined), support, and the confusion matrix (rows: true, columns: predicted)."""
    args = (logits, targets, num_classes)
    confusion = multiclass_confusion_matrix(*args)
    return {
        "precision": multiclass_precision(*args, average=None),
        "recall": multiclass_recall(*args, average=None),
        "f1": multiclass_f1_score(*args, average=None),
        "support": confusion.sum(dim=1),
        "confusion": confusion,
    }


def write_report(
    out_dir: Path,
    logits: torch.Tensor,
    targets: torch.Tensor,
    ids: Sequence[str],
    class_names: Sequence[str],
    top_k: int,
) -> dict[str, dict[str, float]]:
    """``per_class_metrics.csv``, ``confusion_matrix.csv/.png``, ``predictions.csv``; returns the per-class table."""
    stats = per_class_metrics(logits, targets, len(class_names))
    columns = ("precision", "recall", "f1", "support")
    table = {name: {c: stats[c][i].item() for c in columns} for i, name in enumerate(class_names)}
    cells = ([name, *(f"{row[c]:.6f}" for c in columns[:3]), int(row["support"])] for name, row in table.items())
    write_csv(out_dir / "per_class_metrics.csv", [["class", *columns], *cells])
    confusion = stats["confusion"].tolist()
    write_csv(
        out_dir / "confusion_matrix.csv",
        [["true \\ predicted", *class_names], *([n, *r] for n, r in zip(class_names, confusion))],
    )
    plot_confusion_matrix(stats["confusion"], class_names, out_dir / "confusion_matrix.png")
    k = min(top_k, len(class_names))
    predictions = top_k_predictions(logits.softmax(dim=-1), class_names, k)
    rows = [[i, class_names[t], *prediction_cells(p, k)] for i, t, p in zip(ids, targets.tolist(), predictions)]
    write_csv(out_dir / "predictions.csv", [["path", "target", *prediction_header(k)], *rows])
    return table


def write_multilabel_report(
    out_dir: Path,
    logits: torch.Tensor,
    targets: torch.Tensor,
    ids: Sequence[str],
    class_names: Sequence[str],
    threshold: float | Sequence[float],
) -> dict[str, dict[str, float]]:
    """Multi-label: ``per_label.csv`` (precision, recall, F1 at ``threshold``, AP, support, and the false positives and
    false negatives per label: fastai's interpretation for label sets) and ``predictions.csv``
    (each image's true and predicted label sets and every label's probability); returns the per-label table."""
    probs, labels = logits.float().sigmoid(), (targets >= 0.5).long()
    predicted, actual = probs >= torch.as_tensor(threshold), labels.bool()
    tp = (predicted & actual).sum(0).double()
    fp, fn = predicted.sum(0) - tp, actual.sum(0) - tp
    ap = multilabel_average_precision(probs, labels, len(class_names), average=None, thresholds=None)
    columns = ("precision", "recall", "f1", "ap", "support", "false_positives", "false_negatives")
    values = {
        "precision": tp / (tp + fp).clamp_min(1),
        "recall": tp / (tp + fn).clamp_min(1),
        "f1": 2 * tp / (2 * tp + fp + fn).clamp_min(1),
        "ap": ap.nan_to_num(0.0),  # a label without positives has no AP: 0, with support 0
        "support": tp + fn,
        "false_positives": fp,
        "false_negatives": fn,
    }
    table = {name: {c: values[c][i].item() for c in columns} for i, name in enumerate(class_names)}
    cells = (
        [name, *(f"{row[c]:.6f}" for c in columns[:4]), *(int(row[c]) for c in columns[4:])]
        for name, row in table.items()
    )
    write_csv(out_dir / "per_label.csv", [["label", *columns], *cells])
    chosen = label_sets(probs, class_names, threshold)
    truth = [" ".join(class_names[i] for i, on in enumerate(row) if on) for row in labels.tolist()]
    rows = [[i, t, " ".join(c), *(f"{p:.6f}" for p in row)] for i, t, c, row in zip(ids, truth, chosen, probs.tolist())]
    header = ["path", "target", "predicted", *(f"probability_{name}" for name in class_names)]
    write_csv(out_dir / "predictions.csv", [header, *rows])
    return table


def macro_classes_note(per_class: dict[str, dict[str, float]], source: str, split: str) -> str:
    """``"2 of 3 present"`` for metrics.json; warns naming the classes with no images, which macro F1 leaves out
    (``models.metrics.macro_over_present``: an absent class has no F1 to average, whatever the model predicted)."""
    absent = [name for name, row in per_class.items() if row["support"] == 0]
    present, total = len(per_class) - len(absent), len(per_class)
    if absent:
        log.warning(
            "%s (%s split) has no images of %s: per_class_metrics.csv lists them with support 0, and macro F1 "
            "averages over the %d of %d classes present",
            source, split, absent, present, total,
        )  # fmt: skip
    return f"{present} of {total} present"


def plot_confusion_matrix(confusion: torch.Tensor, class_names: Sequence[str], path: Path) -> Path:
    """The same drawing as TensorBoard's ``val/confusion_matrix``, saved atomically as a PNG."""
    fig = confusion_matrix_figure(confusion, class_names, title="confusion matrix")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def tta_dataset(dataset: Dataset, tta: TTA, preprocessing: Preprocessing) -> Dataset:
    """``dataset`` loading the square ``tta`` cuts its views from (files; in-memory data is scaled on the device)."""
    if isinstance(dataset, (Subset, Relabelled)):
        inner = tta_dataset(dataset.dataset, tta, preprocessing)
        return Subset(inner, dataset.indices) if isinstance(dataset, Subset) else Relabelled(inner, dataset.mapping)
    if tta.input_size == tta.size or not isinstance(dataset, ImageFileDataset):
        return dataset
    square = preprocessing.override(size=tta.input_size, crop_ratio=1.0)
    resized = ImageFileDataset(dataset.samples, square.transform, dataset.loader)
    resized.targets = dataset.targets
    return resized


def tta_metrics(
    model: ImageClassifier, datamodule: ClassificationData, dataset: Dataset, tta: TTA, trainer: L.Trainer
) -> dict[str, float]:
    """The ``test/...`` metrics with ``tta``, keyed ``tta/test/...``: accuracy, macro F1, top-5 (> 5 classes) and the
    cross-entropy of the averaged probabilities, defined as the plain ones are (``ImageClassifier``'s metrics)."""
    loader = DataLoader(
        tta_dataset(dataset, tta, model.preprocessing),
        batch_size=datamodule.batch_size,
        num_workers=datamodule.num_workers,
    )
    device = trainer.strategy.root_device
    model.to(device).eval()
    probabilities, targets = [], []
    with torch.inference_mode(), trainer.precision_plugin.forward_context():
        for images, labels in loader:
            probabilities.append(tta.probabilities(model, to_float(images.to(device)), model.multilabel).cpu())
            targets.append(torch.as_tensor(labels))
    probs, target = torch.cat(probabilities), torch.cat(targets)
    n = len(model.class_names)
    if model.multilabel:  # the mean sigmoid per label, scored as ImageClassifier's multi-label metrics
        labels = (target >= 0.5).long()
        threshold = torch.as_tensor(model.decision_threshold)
        multilabel = {
            "tta/test/map": multilabel_average_precision(probs, labels, n, average="macro", thresholds=None),
            **{f"tta/test/{name}": at_threshold(probs, labels, threshold, average)
               for name, average in (("f1_micro", "micro"), ("f1_macro", "macro"), ("acc", "exact"))},
            "tta/test/loss": F.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), target.float()),
        }  # fmt: skip
        return {key: value.item() for key, value in multilabel.items()}
    metrics = {
        "tta/test/acc": multiclass_accuracy(probs, target, n, average="micro"),
        "tta/test/f1": macro_f1(probs, target, n),
        "tta/test/loss": F.nll_loss(probs.clamp_min(1e-12).log(), target),
    }
    if n > 5:
        metrics["tta/test/top5"] = multiclass_accuracy(probs, target, n, top_k=5, average="micro")
    return {key: value.item() for key, value in metrics.items()}


def log_side_by_side(plain: dict[str, float], with_tta: dict[str, float], mode: str) -> None:
    """One line per metric: the plain score and the TTA score."""
    lines = [f"{'metric':<12} {'plain':>10} {'tta=' + mode:>16}"]
    for key, value in with_tta.items():
        name = key.removeprefix("tta/")
        lines.append(f"{name:<12} {plain.get(name, float('nan')):>10.4f} {value:>16.4f}")
    log.info("test-time augmentation:\n%s", "\n".join(lines))


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Run ``trainer.test`` on the checkpoint; write ``metrics.json`` and the per-class report in the run dir.

    Returns the metrics named after the split (``test/...``, ``val/...``, ``all/...``), computed exactly as training
    computes them.
    """
    if not cfg.get("ckpt_path"):
        raise UserError("ckpt_path is required: python eval.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt")
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir)
    assert ckpt_path is not None
    silence_lightning_noise()
    # one pool of images named on the command line (split by data.test_fraction): a test set whole when it holds none out
    data_from_command_line = cfg.get("data") is not None and "test_fraction" in cfg.data
    # The checkpoint's own preprocessing (stored values) reaches the data module, whatever the data config says or lacks.
    model, datamodule = build_model_and_data(data_config(cfg, ckpt_path), checkpoint=ckpt_path)
    datamodule.prepare_data()
    datamodule.setup("test")
    split, dataset = select_split(datamodule, cfg.get("split") or "test", data_from_command_line)
    datamodule.datasets["test"] = match_classes(dataset, datamodule.class_names, model.class_names, datamodule.source)
    geometry = datamodule.preprocessing or model.preprocessing  # the size and crop the network's inputs are made at
    tta = TTA.parse(cfg.get("tta"), geometry.size, geometry.crop_ratio)
    interpret = options(cfg.get("interpret"))  # checked before the pass over the data
    collector = CollectLogits()
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=instantiate_group(cfg.get("logger")) or False, callbacks=[collector]
    )
    if trainer.world_size > 1:
        raise ConfigError("eval.py runs on one device (per-image predictions need one process): use trainer.devices=1")
    trainer.test(model, datamodule=datamodule)
    # Lightning names what trainer.test computes test/...; name it after the split it really is (val/..., all/...).
    tested = scalar_metrics(trainer.callback_metrics, ("test/",))
    metrics = {f"{split}/{key.removeprefix('test/')}": value for key, value in tested.items()}
    logits, targets = torch.cat(collector.logits), torch.cat(collector.targets)
    if tta is not None:
        # the images the plain pass saw (limit_test_batches may stop it early)
        seen = Subset(datamodule.datasets["test"], range(len(targets)))
        with_tta = {
            f"tta/{split}/{key.removeprefix('tta/test/')}": value
            for key, value in tta_metrics(model, datamodule, seen, tta, trainer).items()
        }
        log_side_by_side(metrics, with_tta, tta.mode)
        metrics.update(with_tta)
    out_dir = Path(cfg.paths.output_dir)
    ids = sample_ids(datamodule.datasets["test"])[: len(targets)]  # limit_test_batches may stop early
    if model.multilabel:
        per_label = write_multilabel_report(out_dir, logits, targets, ids, model.class_names, model.decision_threshold)
        errors = {
            f"{split}/{kind}/{name}": row[kind]
            for name, row in per_label.items()
            for kind in ("false_positives", "false_negatives")
        }
        for logger in trainer.loggers:  # the same counts in TensorBoard (and any other logger)
            logger.log_metrics(errors, step=log_step(trainer))
            logger.finalize("success")
        summary = {
            **metrics,
            "tta": tta.mode if tta else None,
            "checkpoint": ckpt_path,
            "split": split,
            "num_samples": len(targets),
            "task": "multilabel",
            "threshold": model.decision_threshold,
            "per_label": per_label,
        }
        save_json(summary, out_dir / "metrics.json")
        log.info("evaluated %d images (%s split, multi-label); report in %s", len(targets), split, out_dir)
        return metrics
    per_class = write_report(out_dir, logits, targets, ids, model.class_names, cfg.get("top_k", 5))
    interpretation = write_interpretation(
        out_dir, logits.double().softmax(dim=-1), targets, ids, model.class_names,
        lambda index: datamodule.datasets["test"][index][0], **interpret,
    )  # fmt: skip
    log_interpretation(trainer, split, interpretation)
    summary = {
        **metrics,
        "tta": tta.mode if tta else None,
        "checkpoint": ckpt_path,
        "split": split,
        "num_samples": len(targets),
        "macro_over_classes": macro_classes_note(per_class, datamodule.source, split),
        "per_class": per_class,
    }
    save_json(summary, out_dir / "metrics.json")
    log.info("evaluated %d images (%s split); report in %s", len(targets), split, out_dir)
    log.info("%s", interpretation.summary)
    return metrics
