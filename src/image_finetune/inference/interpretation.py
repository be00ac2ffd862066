"""What fastai's ``ClassificationInterpretation`` shows, for one evaluated split: the class pairs the model confuses
most, the images with the highest loss, and how well its confidence matches its accuracy (ECE, reliability diagram).

Pure functions from targets, probabilities and paths to tables (``most_confused``, ``highest_losses``, ``calibration``);
``write_interpretation`` saves them beside eval.py's other reports and ``log_interpretation`` sends the same pictures
and numbers to the run's loggers. Everything is single-label: one true class and one top-1 prediction per image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.classification import multiclass_confusion_matrix

from image_finetune.core.atomic import atomic_path
from image_finetune.core.cli import save_json, write_csv
from image_finetune.core.errors import ConfigError
from image_finetune.core.plots import TEXT_COLOUR, WRONG_COLOUR, image_grid, reliability_figure, render_figure
from image_finetune.ops.loggers import log_image, log_step, tensorboard_logger

#: eval.yaml's ``interpret`` keys and their defaults
DEFAULTS = {"top_losses": 16, "min_count": 1, "calibration_bins": 15}
MOST_CONFUSED_HEADER = ["true", "predicted", "count"]
TOP_LOSSES_HEADER = ["path", "true", "predicted", "probability_predicted", "probability_true", "loss"]


def most_confused(
    confusion: torch.Tensor | np.ndarray, class_names: Sequence[str], min_count: int = 1
) -> list[tuple[str, str, int]]:
    """``(true, predicted, count)`` for every off-diagonal cell of the confusion matrix (rows: true) holding at least
    ``min_count`` images, most first. Each direction is its own row (cat -> dog and dog -> cat); ties keep class order."""
    counts = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.int64)
    pairs = [
        (class_names[t], class_names[p], int(counts[t, p]))
        for t in range(counts.shape[0])
        for p in range(counts.shape[1])
        if t != p and counts[t, p] >= min_count
    ]
    return sorted(pairs, key=lambda pair: -pair[2])  # stable: equal counts stay in (true, predicted) order


@dataclass(frozen=True)
class TopLoss:
    """One image of ``highest_losses``: ``loss`` is the cross-entropy ``-log p(true)`` (no label smoothing)."""

    index: int
    path: str
    true: str
    predicted: str
    probability_predicted: float
    probability_true: float
    loss: float

    def cells(self) -> list[object]:
        """The row under ``TOP_LOSSES_HEADER``."""
        numbers = (self.probability_predicted, self.probability_true, self.loss)
        return [self.path, self.true, self.predicted, *(f"{x:.6f}" for x in numbers)]


def highest_losses(
    probabilities: torch.Tensor, targets: torch.Tensor, ids: Sequence[str], class_names: Sequence[str], k: int
) -> list[TopLoss]:
    """The ``k`` images with the highest loss, highest first (ties in dataset order). Correct predictions count too,
    as in fastai: a right answer given with low confidence can outrank a wrong one."""
    probabilities = probabilities.double()
    p_true = probabilities.gather(1, targets.long().view(-1, 1)).squeeze(1)
    losses = -p_true.log()  # inf where p(true) underflowed to 0: that image is the worst, and says so
    p_predicted, predicted = probabilities.max(dim=-1)
    order = losses.argsort(descending=True, stable=True)[: max(k, 0)].tolist()
    return [
        TopLoss(
            i,
            ids[i],
            class_names[int(targets[i])],
            class_names[int(predicted[i])],
            p_predicted[i].item(),
            p_true[i].item(),
            losses[i].item(),
        )
        for i in order
    ]


@dataclass(frozen=True)
class Calibration:
    """Expected calibration error over ``bins`` equal-width bins of the top-1 probability ("confidence").

    Bin ``i`` holds confidences in ``[i/bins, (i+1)/bins)``; the last is closed (a confidence of exactly 1.0, common
    in float32, is in it: torchmetrics' ``MulticlassCalibrationError`` counts it in an extra bin of its own,
    Lightning-AI/torchmetrics#3510, which is why the bins are counted here; tests check both agree otherwise).
    ``ece = sum over bins of count/N * |accuracy - confidence|`` (Guo et al. 2017). Empty bins have ``None``.
    """

    ece: float
    bins: int
    count: list[int]
    accuracy: list[float | None]
    confidence: list[float | None]

    @property
    def lower(self) -> list[float]:
        return [i / self.bins for i in range(self.bins)]

    def as_json(self) -> dict[str, object]:
        per_bin = [
            {"lower": lo, "upper": (i + 1) / self.bins, "count": n, "accuracy": a, "confidence": c}
            for i, (lo, n, a, c) in enumerate(zip(self.lower, self.count, self.accuracy, self.confidence))
        ]
        binning = (
            f"{self.bins} equal-width bins of the top-1 probability, [i/{self.bins}, (i+1)/{self.bins}), last closed"
        )
        return {
            "ece": self.ece,
            "bins": self.bins,
            "binning": binning,
            "num_samples": sum(self.count),
            "per_bin": per_bin,
        }


def calibration(probabilities: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> Calibration:
    """ECE and the per-bin accuracy, mean confidence and count of the top-1 predictions (see ``Calibration``)."""
    confidence, predicted = probabilities.double().max(dim=-1)
    correct = (predicted == targets.to(predicted.device)).double()
    boundaries = torch.linspace(0, 1, bins + 1, dtype=torch.float64)  # the boundaries torchmetrics bins with
    index = (torch.bucketize(confidence, boundaries, right=True) - 1).clamp(0, bins - 1)
    count = torch.zeros(bins, dtype=torch.float64).scatter_add_(0, index, torch.ones_like(confidence))
    hits = torch.zeros(bins, dtype=torch.float64).scatter_add_(0, index, correct)
    sure = torch.zeros(bins, dtype=torch.float64).scatter_add_(0, index, confidence)
    filled = count > 0
    accuracy, mean_confidence = hits / count.clamp_min(1), sure / count.clamp_min(1)
    ece = ((accuracy - mean_confidence).abs() * count).sum() / count.sum().clamp_min(1)
    return Calibration(
        ece=ece.item(),
        bins=bins,
        count=[int(n) for n in count.tolist()],
        accuracy=[a if f else None for a, f in zip(accuracy.tolist(), filled.tolist())],
        confidence=[c if f else None for c, f in zip(mean_confidence.tolist(), filled.tolist())],
    )


def summary_line(calib: Calibration, confused: Sequence[tuple[str, str, int]]) -> str:
    """``ECE 0.043 (15 bins); most confused: cat -> dog (7)``: the line eval.py prints."""
    worst = f"{confused[0][0]} -> {confused[0][1]} ({confused[0][2]})" if confused else "none"
    return f"ECE {calib.ece:.3f} ({calib.bins} bins); most confused: {worst}"


def top_losses_grid(rows: Sequence[TopLoss], image_of: Callable[[int], torch.Tensor]) -> np.ndarray:
    """The images of ``rows`` as the network saw them (``image_of(index)``: CHW, uint8 or float in [0, 1]), each
    captioned with true and predicted class, p(predicted), p(true) and loss; red where the prediction is wrong."""
    if not rows:
        return image_grid(torch.zeros(0, 3, 1, 1), [])
    images = torch.stack([image_of(row.index) for row in rows])
    captions = [
        f"true: {r.true}\npred: {r.predicted} ({r.probability_predicted:.0%})\n"
        f"p(true) {r.probability_true:.2f} loss {r.loss:.2f}"
        for r in rows
    ]
    colours = [WRONG_COLOUR if r.predicted != r.true else TEXT_COLOUR for r in rows]
    return image_grid(images, captions, columns=8, cell=128, caption_colours=colours)


@dataclass(frozen=True)
class Interpretation:
    """What ``write_interpretation`` wrote, for the loggers and the printed line."""

    confused: list[tuple[str, str, int]]
    losses: list[TopLoss]
    calibration: Calibration
    top_losses_image: np.ndarray
    reliability_image: np.ndarray

    @property
    def summary(self) -> str:
        return summary_line(self.calibration, self.confused)


def options(interpret: Mapping[str, Any] | None) -> dict[str, int]:
    """The ``interpret`` group of eval.yaml as ``write_interpretation``'s keyword arguments, checked."""
    given = dict(interpret or {})
    chosen = {key: given.pop(key, default) for key, default in DEFAULTS.items()}
    if given:
        raise ConfigError(f"interpret: unknown key(s) {sorted(given)}; the keys are {sorted(DEFAULTS)}")
    for key, value in chosen.items():
        least = 1 if key == "calibration_bins" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"interpret.{key}={value!r}: give a whole number >= {least} (default {DEFAULTS[key]})")
    return chosen


def write_interpretation(
    out_dir: Path,
    probabilities: torch.Tensor,
    targets: torch.Tensor,
    ids: Sequence[str],
    class_names: Sequence[str],
    image_of: Callable[[int], torch.Tensor],
    *,
    top_losses: int = 16,
    min_count: int = 1,
    calibration_bins: int = 15,
) -> Interpretation:
    """``most_confused.csv``, ``top_losses.csv/.png``, ``calibration.json`` and ``reliability.png`` in ``out_dir``."""
    confusion = multiclass_confusion_matrix(
        probabilities, targets, len(class_names)
    )  # the same as confusion_matrix.csv
    confused = most_confused(confusion, class_names, min_count)
    write_csv(out_dir / "most_confused.csv", [MOST_CONFUSED_HEADER, *confused])
    losses = highest_losses(probabilities, targets, ids, class_names, top_losses)
    write_csv(out_dir / "top_losses.csv", [TOP_LOSSES_HEADER, *(row.cells() for row in losses)])
    grid = top_losses_grid(losses, image_of)
    bins = calibration_bins
    calib = calibration(probabilities, targets, bins)
    save_json(calib.as_json(), out_dir / "calibration.json")
    title = f"ECE {calib.ece:.3f} ({bins} bins, {sum(calib.count)} images)"
    reliability = render_figure(reliability_figure(calib.lower, calib.accuracy, calib.confidence, calib.count, title))
    for name, picture in (("top_losses.png", grid), ("reliability.png", reliability)):
        with atomic_path(out_dir / name) as tmp:
            Image.fromarray(picture).save(tmp, format="PNG")
    return Interpretation(confused, losses, calib, grid, reliability)


def log_interpretation(trainer: L.Trainer, split: str, result: Interpretation) -> None:
    """The same numbers and pictures to the run's loggers: ``<split>/ece`` to every logger, the two images to every
    logger that shows images, the most confused pairs as a text table in TensorBoard."""
    step = log_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics({f"{split}/ece": result.calibration.ece}, step=step)
    log_image(trainer, f"{split}/top_losses", result.top_losses_image, step)
    log_image(trainer, f"{split}/reliability", result.reliability_image, step)
    tb = tensorboard_logger(trainer)
    if tb is not None:
        rows = "\n".join(f"| {t} | {p} | {n} |" for t, p, n in result.confused) or "| (none) | | |"
        tb.experiment.add_text(f"{split}/most_confused", f"| true | predicted | count |\n|---|---|---|\n{rows}", step)
    for logger in trainer.loggers:
        logger.finalize("success")  # flush: the writers were closed after trainer.test and reopened for these
