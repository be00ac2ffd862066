"""``predict(cfg)``: classify an image, a folder (recursively) or a list of paths into a CSV, without the training data.

A file that cannot be read gets a row with its reason (the folder scan's vocabulary) instead of ending the run.
A multi-label checkpoint writes each image's predicted label set and every label's probability instead of the top k.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset

from image_finetune.checkpoints import resolve_ckpt_path
from image_finetune.core.cli import write_csv
from image_finetune.core.errors import DataError, UserError, check_output_file, writing
from image_finetune.data.base import default_num_workers
from image_finetune.data.scan import HIDDEN, failure_reason, path_kind, skip_reason, walk_files
from image_finetune.inference.classifier import (
    Classifier,
    Prediction,
    Preprocessing,
    prediction_cells,
    prediction_header,
)

log = logging.getLogger(__name__)

#: An input file with one of these suffixes is a list of image paths, one a line, not an image.
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})


@dataclass(frozen=True)
class Row:
    """One input file: its prediction, or why there is none."""

    path: str
    prediction: Prediction | None = None
    reason: str | None = None


def list_inputs(input_path: str | os.PathLike) -> list[tuple[str, str | None]]:
    """``(path, reason to skip or None)`` for an image, a folder (recursive, hidden files left out) or a list file.

    Only regular files with an image extension are decoded; everything else gets a reason (the folder scan's
    vocabulary and walk, so predict.py and training agree on what counts as an image), so that the CSV accounts for
    every file. A FIFO or device named ``x.jpg`` is listed, never opened (reading it would block forever). A list file
    holds one path a line (``#`` comments, blank lines ignored); relative paths are relative to the list file's folder.
    """
    path = Path(input_path).expanduser()
    kind, _ = path_kind(str(path))
    if kind == "dir":
        found = (f for f in walk_files(str(path)) if f.kind != HIDDEN)
        return sorted((f.path, skip_reason(f.path, f.kind)) for f in found)
    if kind != "file":
        problem = "no such file or folder" if kind.endswith("no such file") else kind
        raise UserError(
            f"input={str(input_path)!r}: {problem}. Give an image, a folder of images, or a .txt list of paths."
        )
    if path.suffix.lower() in LIST_SUFFIXES:
        lines = (line.strip() for line in path.read_text().splitlines())
        listed = [str(path.parent / Path(line).expanduser()) for line in lines if line and not line.startswith("#")]
        return [(p, _listed_file_reason(p)) for p in listed]
    return [(str(path), _listed_file_reason(str(path)))]


def _listed_file_reason(path: str) -> str | None:
    """A named file is decoded whatever its extension (the user chose it), but only if it is a regular file."""
    kind, _ = path_kind(path)
    return None if kind == "file" else kind


class ImageFiles(Dataset):
    """``ds[i]`` -> ``(i, uint8 CHW image or None, reason or None)``: a bad file is data, not an exception."""

    def __init__(self, paths: Sequence[str], preprocessing: Preprocessing) -> None:
        self.paths, self.preprocessing = list(paths), preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.preprocessing.load(self.paths[index]), None
        except Exception as e:  # whatever the decoder raised, the file gets a reason and the run goes on
            return index, None, failure_reason(e)


def collate_keeping_failures(
    items: list[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """Stack the images that loaded; pass the failures through as ``(index, reason)``."""
    loaded = [(i, image) for i, image, _ in items if image is not None]
    failed = [(i, reason or "") for i, image, reason in items if image is None]
    images = torch.stack([image for _, image in loaded]) if loaded else None
    return [i for i, _ in loaded], images, failed


def classify_files(
    classifier: Classifier,
    inputs: Sequence[tuple[str, str | None]],
    *,
    top_k: int = 5,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> list[Row]:
    """A row per input, in input order. Files decode in ``num_workers`` DataLoader workers."""
    rows: list[Row] = [Row(path, reason=reason) for path, reason in inputs]
    todo = [i for i, (_, reason) in enumerate(inputs) if reason is None]
    dataset = ImageFiles([inputs[i][0] for i in todo], classifier.input_preprocessing)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_keeping_failures,
        pin_memory=classifier.device.type == "cuda",
    )
    columns = [TextColumn("classifying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("classifying", total=len(dataset))
        for indices, images, failed in loader:
            if images is not None:
                k = len(classifier.class_names) if classifier.multilabel else top_k  # multi-label: every label
                predictions = classifier.predictions(classifier.probabilities(images), k)
                for j, prediction in zip(indices, predictions):
                    rows[todo[j]] = Row(rows[todo[j]].path, prediction=prediction)
            for j, reason in failed:
                rows[todo[j]] = Row(rows[todo[j]].path, reason=reason)
            bar.advance(task, len(indices) + len(failed))
    return rows


def write_predictions(rows: Sequence[Row], path: str | os.PathLike, k: int) -> Path:
    """``path, label_1, probability_1, ..., label_k, probability_k, reason``."""
    table = [["path", *prediction_header(k), "reason"]]
    table += [[row.path, *prediction_cells(row.prediction, k), row.reason or ""] for row in rows]
    return write_csv(path, table)


def write_label_sets(rows: Sequence[Row], path: str | os.PathLike, class_names: Sequence[str]) -> Path:
    """Multi-label: ``path, labels`` (the predicted set, space-separated, as the training CSV writes them),
    ``probability_<label>`` for every label, ``reason``."""
    table = [["path", "labels", *(f"probability_{name}" for name in class_names), "reason"]]
    for row in rows:
        if row.prediction is None:
            table.append([row.path, "", *([""] * len(class_names)), row.reason or ""])
            continue
        p = dict(zip(row.prediction.labels, row.prediction.probabilities))
        chosen = " ".join(row.prediction.label_set or ())
        table.append([row.path, chosen, *(f"{p[name]:.6f}" for name in class_names), ""])
    return write_csv(path, table)


def predict(cfg: DictConfig) -> Path:
    """Classify ``cfg.input`` with ``cfg.ckpt_path``; returns the CSV written to ``cfg.output``."""
    if not cfg.get("ckpt_path"):
        raise UserError(
            "ckpt_path is required: python predict.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt input=PATH"
        )
    if not cfg.get("input"):
        raise UserError(
            "input is required: an image, a folder of images, or a .txt file listing image paths (input=PATH)"
        )
    if cfg.top_k < 1 or cfg.batch_size < 1:
        raise UserError(f"top_k={cfg.top_k} and batch_size={cfg.batch_size} must be at least 1")
    output = check_output_file(cfg.output, "output", "predictions.csv")  # before classifying, not after
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir)
    assert ckpt_path is not None
    classifier = Classifier.from_checkpoint(
        ckpt_path, cfg.device, image_size=cfg.get("image_size"), crop_ratio=cfg.get("crop_ratio"), tta=cfg.get("tta")
    )
    inputs = list_inputs(cfg.input)
    if not inputs:
        raise DataError(f"input={cfg.input!r} holds no files to classify")
    workers = default_num_workers() if cfg.get("num_workers") is None else cfg.num_workers
    rows = classify_files(
        classifier,
        inputs,
        top_k=cfg.top_k,
        batch_size=cfg.batch_size,
        num_workers=workers,
        progress=cfg.get("progress", True),
    )
    with writing(output, "output"):  # a disk that filled up meanwhile
        if classifier.multilabel:
            out = write_label_sets(rows, output, classifier.class_names)
        else:
            out = write_predictions(rows, output, min(cfg.top_k, len(classifier.class_names)))
    failed = sum(row.prediction is None for row in rows)
    log.info("classified %d of %d files on %s -> %s", len(rows) - failed, len(rows), classifier.device, out)
    if failed:
        log.warning("%d file(s) could not be classified; their reasons are in the CSV's reason column", failed)
    return out
