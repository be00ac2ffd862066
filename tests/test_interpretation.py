"""`python eval.py` interprets the model as fastai's ClassificationInterpretation does: most confused pairs, top losses,
calibration (ECE and reliability diagram), in its run dir and its TensorBoard, each number checked against a
recomputation from eval's own predictions.csv; the pure functions on handmade arrays where a wrong formula fails."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.classification import MulticlassCalibrationError

from image_finetune.core.errors import ConfigError
from image_finetune.inference.interpretation import calibration, highest_losses, most_confused, options, summary_line

pytest_plugins = ["trained"]  # the shared `trained` fixture

REPO = Path(__file__).resolve().parents[1]
TOP = 5  # fewer than the 12 test images: the table is a real top-N


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@dataclass(frozen=True)
class Evaluated:
    out: Path
    console: str  # stdout + stderr
    predictions: list[dict[str, str]]  # eval's predictions.csv: every class is listed (top_k 5 > 3 classes)


_RUN: list[Evaluated] = []


@pytest.fixture
def evaluated(trained, hub_dir, tmp_path_factory) -> Evaluated:
    """``python eval.py`` once per module on the shared checkpoint (cached: ``trained`` is function-scoped)."""
    if not _RUN:
        root = tmp_path_factory.mktemp("interpret")
        result = subprocess.run(
            [sys.executable, "eval.py", f"ckpt_path={trained.checkpoint}", "trainer=cpu", f"interpret.top_losses={TOP}",
             f"hydra.run.dir={root / 'eval'}", f"paths.data_dir={root / 'data'}", f"paths.log_dir={root / 'logs'}"],
            cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "TORCH_HOME": str(hub_dir)},
        )  # fmt: skip
        console = result.stdout + result.stderr
        assert result.returncode == 0, console[-3000:]
        assert "Traceback" not in result.stderr
        out = root / "eval"
        _RUN.append(Evaluated(out, console, read_csv(out / "predictions.csv")))
    return _RUN[0]


def probability_of(row: dict[str, str], label: str) -> float:
    """The probability predictions.csv gives ``label`` in ``row``."""
    rank = next(r for r in range(1, 4) if row[f"label_{r}"] == label)
    return float(row[f"probability_{rank}"])


def test_most_confused_lists_the_confusion_matrix_off_diagonal(evaluated):
    names = ["class_0", "class_1", "class_2"]
    pairs = [(row["target"], row["label_1"]) for row in evaluated.predictions]
    recount = {(t, p): pairs.count((t, p)) for t in names for p in names if t != p}
    matrix = {row["true \\ predicted"]: row for row in read_csv(evaluated.out / "confusion_matrix.csv")}
    assert all(int(matrix[t][p]) == n for (t, p), n in recount.items())
    expected = sorted(((t, p, n) for (t, p), n in recount.items() if n >= 1), key=lambda r: -r[2])
    assert expected, "want a model that confuses something"
    rows = [(r["true"], r["predicted"], int(r["count"])) for r in read_csv(evaluated.out / "most_confused.csv")]
    assert rows == expected


def test_top_losses_are_the_highest_cross_entropies_sorted(evaluated):
    rows = read_csv(evaluated.out / "top_losses.csv")
    assert len(rows) == TOP
    by_path = {row["path"]: row for row in evaluated.predictions}
    everyone = sorted((-math.log(probability_of(r, r["target"])) for r in evaluated.predictions), reverse=True)
    losses = [float(row["loss"]) for row in rows]
    assert losses == sorted(losses, reverse=True)
    assert losses == pytest.approx(everyone[:TOP], abs=2e-5)  # the top N of all images, not any N
    for row in rows:
        image = by_path[row["path"]]
        assert (row["true"], row["predicted"]) == (image["target"], image["label_1"])
        p_true = probability_of(image, image["target"])
        assert float(row["probability_true"]) == pytest.approx(p_true, abs=2e-6)
        assert float(row["probability_predicted"]) == pytest.approx(float(image["probability_1"]), abs=2e-6)
        assert float(row["loss"]) == pytest.approx(-math.log(float(row["probability_true"])), abs=1e-5)
    with Image.open(evaluated.out / "top_losses.png") as png:
        assert png.format == "PNG" and png.width == TOP * (128 + 4) + 4  # one cell per listed image


def hand_ece(confidences: list[float], correct: list[bool], bins: int = 15) -> float:
    """Guo et al.'s ECE written out: equal-width bins [i/bins, (i+1)/bins), the last closed."""
    total = 0.0
    for i in range(bins):
        lo, hi = i / bins, (i + 1) / bins
        members = [k for k, c in enumerate(confidences) if lo <= c < hi or (i == bins - 1 and c == 1.0)]
        if members:
            accuracy = sum(correct[k] for k in members) / len(members)
            confidence = sum(confidences[k] for k in members) / len(members)
            total += len(members) / len(confidences) * abs(accuracy - confidence)
    return total


def test_calibration_json_is_the_ece_of_the_predictions(evaluated):
    saved = json.loads((evaluated.out / "calibration.json").read_text())
    confidences = [float(row["probability_1"]) for row in evaluated.predictions]
    correct = [row["label_1"] == row["target"] for row in evaluated.predictions]
    assert saved["bins"] == len(saved["per_bin"]) == 15 and saved["num_samples"] == len(confidences) == 12
    assert saved["ece"] == pytest.approx(hand_ece(confidences, correct), abs=1e-6)
    assert saved["ece"] > 0.01  # a 2-epoch model is not calibrated: a zero would hide a broken formula
    for i, entry in enumerate(saved["per_bin"]):
        members = [k for k, c in enumerate(confidences) if i / 15 <= c < (i + 1) / 15]
        assert entry["count"] == len(members)
        if members:
            assert entry["accuracy"] == pytest.approx(sum(correct[k] for k in members) / len(members))
            assert entry["confidence"] == pytest.approx(np.mean([confidences[k] for k in members]), abs=1e-6)
    with Image.open(evaluated.out / "reliability.png") as png:
        assert png.format == "PNG" and min(png.size) > 200


def test_eval_prints_the_summary_line_and_logs_it_all_to_tensorboard(evaluated):
    saved = json.loads((evaluated.out / "calibration.json").read_text())
    first = read_csv(evaluated.out / "most_confused.csv")[0]
    line = (
        f"ECE {saved['ece']:.3f} (15 bins); most confused: {first['true']} -> {first['predicted']} ({first['count']})"
    )
    assert f"[image_finetune.inference.evaluate][INFO] - {line}\n" in evaluated.console

    ea = EventAccumulator(str(evaluated.out / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    assert [e.value for e in ea.Scalars("test/ece")] == [pytest.approx(saved["ece"], rel=1e-6)]
    for tag, name in (("test/top_losses", "top_losses.png"), ("test/reliability", "reliability.png")):
        (event,) = ea.Images(tag)
        logged = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        with Image.open(evaluated.out / name) as png:
            assert np.array_equal(logged, np.asarray(png.convert("RGB")))  # the same picture as the run dir's
    (text,) = ea.Tensors("test/most_confused/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert f"| {first['true']} | {first['predicted']} | {first['count']} |" in table


# ---- the pure functions on handmade arrays ----------------------------------------------------------------------
def test_most_confused_reads_rows_as_true_keeps_both_directions_and_sorts():
    confusion = torch.tensor([[5, 2, 0], [3, 4, 1], [0, 2, 6]])  # rows: true
    assert most_confused(confusion, "abc", min_count=2) == [("b", "a", 3), ("a", "b", 2), ("c", "b", 2)]
    assert most_confused(confusion, "abc") == [("b", "a", 3), ("a", "b", 2), ("c", "b", 2), ("b", "c", 1)]
    assert most_confused(torch.eye(3, dtype=torch.long) * 4, "abc") == []


def test_highest_losses_rank_by_the_true_class_probability_not_the_predicted_one():
    probabilities = torch.tensor(
        [
            [0.70, 0.20, 0.10],  # 0: right, sure        loss 0.357
            [0.10, 0.60, 0.30],  # 1: wrong (true 2)     loss 1.204
            [0.45, 0.55, 0.00],  # 2: wrong (true 0)     loss 0.799
            [0.34, 0.33, 0.33],  # 3: right, unsure      loss 1.079: outranks the wrong image 2
            [0.05, 0.05, 0.90],  # 4: right, sure        loss 0.105
        ]
    )
    targets = torch.tensor([0, 2, 0, 0, 2])
    ids = [f"img{i}" for i in range(5)]
    rows = highest_losses(probabilities, targets, ids, ["a", "b", "c"], k=3)
    assert [row.path for row in rows] == ["img1", "img3", "img2"]
    assert [row.loss for row in rows] == pytest.approx([-math.log(0.30), -math.log(0.34), -math.log(0.45)])
    assert (rows[0].true, rows[0].predicted, rows[0].probability_predicted) == ("c", "b", pytest.approx(0.6))
    assert rows[0].probability_true == pytest.approx(0.3)
    assert len(highest_losses(probabilities, targets, ids, ["a", "b", "c"], k=99)) == 5


def test_ece_weights_each_bin_by_its_share_of_images_and_puts_a_certainty_in_the_last_bin():
    probabilities = torch.tensor(
        [[0.95, 0.03, 0.02], [0.95, 0.03, 0.02], [0.55, 0.45, 0.0], [0.35, 0.33, 0.32]], dtype=torch.float64
    )
    targets = torch.tensor([0, 1, 0, 2])  # right, wrong, right, wrong
    calib = calibration(probabilities, targets, bins=15)
    # bins 14 (2 images, acc 0.5, conf 0.95), 8 (acc 1, conf 0.55), 5 (acc 0, conf 0.35):
    assert calib.ece == pytest.approx(2 / 4 * 0.45 + 1 / 4 * 0.45 + 1 / 4 * 0.35)  # 0.425, not the unweighted 0.417
    assert [i for i, n in enumerate(calib.count) if n] == [5, 8, 14] and calib.count[14] == 2
    assert calib.accuracy[14] == 0.5 and calib.confidence[14] == pytest.approx(0.95) and calib.accuracy[0] is None
    library = MulticlassCalibrationError(num_classes=3, n_bins=15, norm="l1")
    assert calib.ece == pytest.approx(library(probabilities, targets).item(), abs=1e-6)

    certain = torch.cat([probabilities, torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)])
    with_certain = calibration(certain, torch.cat([targets, torch.tensor([1])]), bins=15)
    assert with_certain.count[14] == 3 and sum(with_certain.count) == 5  # confidence 1.0 is in the last bin
    assert with_certain.ece == pytest.approx(3 / 5 * abs(1 / 3 - 2.9 / 3) + 1 / 5 * 0.45 + 1 / 5 * 0.35)


def test_ece_agrees_with_torchmetrics_on_random_predictions():
    generator = torch.Generator().manual_seed(0)
    probabilities = (torch.randn(500, 7, generator=generator, dtype=torch.float64) * 2).softmax(dim=-1)
    targets = torch.randint(0, 7, (500,), generator=generator)
    for bins in (1, 10, 15):
        library = MulticlassCalibrationError(num_classes=7, n_bins=bins, norm="l1")
        assert calibration(probabilities, targets, bins).ece == pytest.approx(library(probabilities, targets).item())


def test_summary_line_and_options():
    calib = calibration(torch.tensor([[0.9, 0.1]]), torch.tensor([0]), bins=10)
    assert summary_line(calib, [("cat", "dog", 7), ("dog", "cat", 2)]) == (
        "ECE 0.100 (10 bins); most confused: cat -> dog (7)"
    )
    assert summary_line(calib, []) == "ECE 0.100 (10 bins); most confused: none"
    assert options(None) == {"top_losses": 16, "min_count": 1, "calibration_bins": 15}
    assert options({"top_losses": 0})["top_losses"] == 0
    with pytest.raises(ConfigError, match=r"^interpret\.calibration_bins=0: give a whole number >= 1 \(default 15\)$"):
        options({"calibration_bins": 0})
    with pytest.raises(ConfigError, match=r"^interpret: unknown key\(s\) \['top_loss'\]"):
        options({"top_loss": 3})
