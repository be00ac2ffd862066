"""Monitoring: what a short run writes to TensorBoard, read back with TensorBoard's own EventAccumulator.

Also the end-of-run summary, the progress bar's extra fields, each visual's off switch, a CSV-only run, and the
bounded accumulators the visuals keep on validation batches.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image
from support import FAST
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import image_finetune.training.train as train_module
from image_finetune.callbacks import ConfusionMatrixImage, MisclassifiedGrid, PerClassAccuracy, TrainingProgressBar
from image_finetune.callbacks.visuals import (
    CONFUSION_MATRIX_TAG,
    MISCLASSIFIED_TAG,
    PHASE_TAG,
    PHASE_TEXT_TAG,
    TRAIN_IMAGES_TAG,
)
from image_finetune.core.plots import image_grid
from image_finetune.core.results import HPARAM_COLUMNS
from image_finetune.training.train import Run, train

pytestmark = pytest.mark.usefixtures("pretrained")

CLASSES = ["class_0", "class_1", "class_2"]  # the image_folder fixture's
# the rich bar, even though pytest's stdout is not a terminal (where the bar would print plain lines instead)
WITH_PROGRESS_BAR = [*(o for o in FAST if "progress_bar" not in o), "callbacks.progress_bar.plain=false"]
# One fit of one epoch, no test: the cheapest run that still validates.
CHEAP = ["finetune=full", "trainer.max_epochs=1", "test=false", *FAST]


def folder_run(
    compose_cfg: Callable[..., DictConfig], root: Path, *overrides: str
) -> tuple[DictConfig, dict[str, Any]]:
    cfg = compose_cfg("data=imagefolder", f"data.root={root}", *overrides)
    return cfg, train(cfg)


def events(cfg: DictConfig) -> EventAccumulator:
    accumulator = EventAccumulator(
        str(Path(cfg.paths.output_dir) / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0}
    )
    return accumulator.Reload()


def hparams_data(ea: EventAccumulator) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    try:
        content = ea.PluginTagToContent("hparams")
    except KeyError:  # no hparams summary in the run
        return {}
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(data) for tag, data in content.items()}


def values(ea: EventAccumulator, tag: str) -> list[float]:
    return [event.value for event in ea.Scalars(tag)]


def decode(ea: EventAccumulator, tag: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(event.encoded_image_string))) for event in ea.Images(tag)]


def plugin_text(event: Any) -> str:
    """The string of a TensorBoard text event."""
    return event.tensor_proto.string_val[0].decode()


def visible_tags(ea: EventAccumulator) -> set[str]:
    tags = ea.Tags()
    return {*tags["images"], *tags["scalars"], *(f"hparams-plugin:{tag}" for tag in hparams_data(ea))}


def test_short_run_writes_every_tag_with_sane_values(compose_cfg, image_folder, monkeypatch, capsys):
    built: list[Run] = []
    build = train_module.build
    monkeypatch.setattr(train_module, "build", lambda cfg: built.append(build(cfg)) or built[-1])
    cfg, metrics = folder_run(
        compose_cfg, image_folder, "data.test_fraction=0.2", "trainer.max_epochs=2", *WITH_PROGRESS_BAR
    )
    ea = events(cfg)
    scalars = set(ea.Tags()["scalars"])

    # Scalars: per split, per named param group, per class; all sane.
    for split in ("train", "val", "test"):
        for name in ("loss", "acc", "f1"):
            assert f"{split}/{name}" in scalars, (split, name)
            assert all(math.isfinite(v) for v in values(ea, f"{split}/{name}"))
        assert all(v > 0 for v in values(ea, f"{split}/loss"))
        assert all(0 <= v <= 1 for v in values(ea, f"{split}/acc") + values(ea, f"{split}/f1"))
    head, backbone = values(ea, "lr-AdamW/head"), values(ea, "lr-AdamW/backbone")
    assert head and all(v > 0 for v in head)
    assert backbone == pytest.approx([0.1 * v for v in head])  # finetune.backbone_lr_ratio, in every phase
    val_steps = [event.step for event in ea.Scalars("val/acc")]
    assert len(val_steps) == 2  # one per epoch: the sanity check logs nothing
    for name in CLASSES:
        events_ = ea.Scalars(f"val/acc_per_class/{name}")
        assert [e.step for e in events_] == val_steps
        assert all(0 <= e.value <= 1 for e in events_)

    # Images: the augmented batch once, the validation visuals once per validation epoch (not during the sanity check).
    assert set(ea.Tags()["images"]) == {TRAIN_IMAGES_TAG, CONFUSION_MATRIX_TAG, MISCLASSIFIED_TAG}
    (grid,) = decode(ea, TRAIN_IMAGES_TAG)
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.shape[1] > grid.shape[0] > 100 and grid.std() > 10
    for tag in (CONFUSION_MATRIX_TAG, MISCLASSIFIED_TAG):
        assert [e.step for e in ea.Images(tag)] == val_steps
        assert all(image.shape[0] > 20 and image.std() > 1 for image in decode(ea, tag))

    # The hparams tab: the columns people compare (not the whole config) and the final metrics (best val epoch, test).
    plugin = hparams_data(ea)
    start, experiment = (
        plugin["_hparams_/session_start_info"].session_start_info,
        plugin["_hparams_/experiment"].experiment,
    )
    assert set(start.hparams) == set(HPARAM_COLUMNS) - {"augment"}  # every column the config has; it has no augment
    assert start.hparams["seed"].number_value == 42
    assert start.hparams["image_size"].number_value == 32
    assert start.hparams["batch_size"].number_value == 16
    assert start.hparams["backbone"].string_value == "resnet18"
    assert start.hparams["weights"].string_value == "DEFAULT"
    assert start.hparams["lr"].number_value == pytest.approx(cfg.model.optimizer.lr)
    assert start.hparams["freeze_epochs"].number_value == 1 and start.hparams["train_bn"].string_value == "true"
    assert start.hparams["precision"].string_value == "32-true" and start.hparams["max_epochs"].number_value == 2
    assert {h.name for h in experiment.hparam_infos} == set(start.hparams)  # the columns of the table

    # The unfreeze, marked: a scalar per epoch (0 frozen .. 1 unfrozen) and a text event at each phase change.
    trainable = values(ea, PHASE_TAG)
    assert len(trainable) == 2 and trainable[0] < 0.01 and trainable[1] == 1.0
    texts = [plugin_text(event) for event in ea.Tensors(f"{PHASE_TEXT_TAG}/text_summary")]
    assert (
        len(texts) == 2
        and texts[0].startswith("epoch 1: backbone frozen")
        and texts[1].startswith("epoch 2: backbone unfrozen")
    )
    metric_tags = {info.name.tag for info in experiment.metric_infos}
    assert {"hparams/val/acc", "hparams/val/loss", "hparams/test/acc", "hparams/test/f1"} <= metric_tags
    assert values(ea, "hparams/test/acc") == pytest.approx([metrics["test/acc"]])
    checkpoint = built[0].trainer.checkpoint_callback
    assert values(ea, "hparams/val/acc") == pytest.approx([float(checkpoint.best_model_score)])

    # The console: one summary naming the best checkpoint and how to open TensorBoard.
    out = capsys.readouterr().out
    assert out.count("Run summary") == 1
    assert metrics["best_checkpoint"] in out.replace("\n", "")
    best_epoch = torch.load(metrics["best_checkpoint"], weights_only=True, mmap=True)["epoch"] + 1  # counted from 1
    assert f"best val (epoch {best_epoch})" in out  # the metrics shown are those of that checkpoint's epoch
    assert f"epoch{best_epoch:03d}-" in Path(metrics["best_checkpoint"]).name  # file names count epochs the same way
    assert "last val (epoch 2)" in out and "test (best checkpoint)" in out
    run_dir = Path(cfg.paths.output_dir)
    assert f"tensorboard --logdir_spec resnet18-images-{run_dir.name}:{run_dir / 'tensorboard'}" in out
    # The progress bar: step and throughput, computed on rank 0 from batch sizes and wall time.
    run = built[0]
    bar = next(cb for cb in run.trainer.callbacks if isinstance(cb, TrainingProgressBar))
    shown = bar.get_metrics(run.trainer, run.model)
    assert shown["step"] == str(run.trainer.global_step)
    assert float(shown["img/s"].replace(",", "")) > 0
    assert "v_num" not in shown and set(shown) - {"step", "img/s"} <= set(bar.metrics or [])


OFF_SWITCHES = {
    "train_images": ("callbacks.train_images=null", TRAIN_IMAGES_TAG),
    "confusion_matrix": ("callbacks.confusion_matrix=null", CONFUSION_MATRIX_TAG),
    "misclassified": ("callbacks.misclassified=null", MISCLASSIFIED_TAG),
    "per_class_accuracy": ("callbacks.per_class_accuracy=null", "val/acc_per_class/class_0"),
    "hparams": ("callbacks.run_summary.hparams=false", "hparams-plugin:_hparams_/session_start_info"),
    "finetune_phase": ("callbacks.finetune_phase=null", PHASE_TAG),
}
ALL_VISUALS = {tag for _, tag in OFF_SWITCHES.values()}


@pytest.mark.parametrize("visual", sorted(OFF_SWITCHES))
def test_switching_a_visual_off_removes_only_its_tags(compose_cfg, image_folder, visual):
    override, tag = OFF_SWITCHES[visual]
    cfg, _ = folder_run(compose_cfg, image_folder, *CHEAP, override)
    tags = visible_tags(events(cfg))
    assert tag not in tags
    assert ALL_VISUALS - {tag} <= tags
    if visual == "hparams":
        assert not any(t.startswith("hparams/") for t in tags)


def test_csv_only_run_logs_per_class_scalars_and_no_images(compose_cfg, image_folder, capsys):
    cfg, _ = folder_run(compose_cfg, image_folder, *CHEAP, "logger=csv")
    out_dir = Path(cfg.paths.output_dir)
    assert not (out_dir / "tensorboard").exists()
    with open(out_dir / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    per_class = [float(row["val/acc_per_class/class_1"]) for row in rows if row.get("val/acc_per_class/class_1")]
    assert len(per_class) == 1 and 0 <= per_class[0] <= 1
    assert "this run has no TensorBoard logger" in capsys.readouterr().out


# ---- the accumulators, batch by batch ----------------------------------------------------------------------------
def one_hot_logits(preds: list[int], confidence: list[float], num_classes: int = 3) -> torch.Tensor:
    """Logits whose softmax gives ``confidence`` to ``preds`` (the rest shared evenly)."""
    logits = torch.zeros(len(preds), num_classes)
    for i, (p, c) in enumerate(zip(preds, confidence)):
        rest = (1 - c) / (num_classes - 1)
        logits[i] = math.log(rest)
        logits[i, p] = math.log(c)
    return logits


def test_misclassified_keeps_the_most_confident_mistakes_across_batches():
    grid = MisclassifiedGrid(max_images=3)
    grid._state = grid._init_state(3, torch.device("cpu"))
    batches = [
        # (targets, predictions, confidences): mistakes at 0.9, 0.5 | 0.95, 0.4 | none
        ([0, 1, 2, 0], [1, 1, 0, 0], [0.9, 0.99, 0.5, 0.8]),
        ([2, 1, 1], [0, 1, 0], [0.95, 0.9, 0.4]),
        ([0, 1], [0, 1], [0.7, 0.7]),
    ]
    for index, (targets, preds, conf) in enumerate(batches):
        images = torch.full((len(targets), 1, 4, 4), index / 4)  # greyscale: grows to RGB in the buffer
        grid._update(images, torch.tensor(targets), one_hot_logits(preds, conf))
    state = grid._state
    assert state["images"].shape == (3, 3, 4, 4) and state["images"].dtype == torch.uint8
    order = state["score"].argsort(descending=True)
    assert state["score"][order].tolist() == pytest.approx([0.95, 0.9, 0.5])
    assert state["target"][order].tolist() == [2, 0, 2] and state["pred"][order].tolist() == [0, 1, 0]
    assert state["images"][order][:, 0, 0, 0].tolist() == [64, 0, 0]  # from batches 1, 0, 0


def test_per_class_accuracy_counts_correct_and_total_per_class():
    acc = PerClassAccuracy()
    acc._state = acc._init_state(3, torch.device("cpu"))
    acc._update(torch.zeros(5, 3, 2, 2), torch.tensor([0, 0, 1, 2, 2]), one_hot_logits([0, 1, 1, 0, 2], [0.9] * 5))
    acc._update(torch.zeros(1, 3, 2, 2), torch.tensor([0]), one_hot_logits([0], [0.9]))
    assert acc._state["counts"].tolist() == [[2, 1, 1], [3, 1, 2]]


def test_confusion_matrix_counts_true_class_by_predicted_class_across_batches():
    matrix = ConfusionMatrixImage()
    matrix._state = matrix._init_state(3, torch.device("cpu"))
    matrix._update(torch.zeros(5, 3, 2, 2), torch.tensor([0, 0, 1, 2, 2]), one_hot_logits([0, 1, 1, 0, 2], [0.9] * 5))
    matrix._update(torch.zeros(2, 3, 2, 2), torch.tensor([0, 2]), one_hot_logits([0, 0], [0.9] * 2))
    assert matrix._state["matrix"].tolist() == [[2, 1, 0], [0, 1, 0], [2, 0, 1]]  # rows: true class


def test_image_grid_draws_a_caption_under_every_image():
    images = torch.rand(5, 3, 16, 16)
    grid = image_grid(images, [f"label {i}\nline 2" for i in range(5)], columns=4, cell=32)
    assert grid.dtype == np.uint8 and grid.shape[2] == 3
    assert grid.shape[1] == 4 * (32 + 4) + 4  # 4 columns
    two_rows = grid.shape[0]
    assert two_rows > 2 * (32 + 2 * 16)  # room for two caption lines under each row
    one_line = image_grid(images, [f"label {i}" for i in range(5)], columns=4, cell=32)
    assert one_line.shape[0] < two_rows
