"""The fine-tuning study's multi-label task: its mosaics hold exactly the labelled photographs (validation tiles from
the region training never saw), and the study runs it through the template's data=csv at toy size without fastai
(in this process: the CLI itself is smoke-tested as a subprocess by test_finetune_study.py)."""

from __future__ import annotations

import csv
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import study_tasks  # noqa: E402


def cells(mosaic: np.ndarray) -> list[np.ndarray]:
    tile = mosaic.shape[0] // 2
    return [mosaic[y : y + tile, x : x + tile] for y in (0, tile) for x in (0, tile)]


def test_mosaics_hold_one_tile_per_label_from_the_split_region_and_distractors_elsewhere() -> None:
    photos = study_tasks.photographs(study_tasks.FINETUNE_PHOTOS)
    marked = {}
    for name, photo in photos.items():
        photo = photo.copy()
        photo[:, round(photo.shape[1] * study_tasks.TRAIN_REGION) :] = 0  # black out the validation region
        marked[name] = photo
    white = {"white": np.full((400, 400, 3), 255, np.uint8)}
    rng = np.random.default_rng(0)
    train, train_labels = study_tasks.mosaics(marked, white, 20, 32, rng, (0.0, study_tasks.TRAIN_REGION))
    val, val_labels = study_tasks.mosaics(marked, white, 20, 32, rng, (study_tasks.TRAIN_REGION, 1.0))
    assert train.shape == val.shape == (20, 32, 32, 3)
    for images, label_sets, labelled_tile_is_black in ((train, train_labels, False), (val, val_labels, True)):
        assert {name for labels in label_sets for name in labels} == set(study_tasks.FINETUNE_PHOTOS)
        for mosaic, labels in zip(images, label_sets):
            assert 1 <= len(labels) <= 3 and len(set(labels)) == len(labels)
            distractor = [bool((c == 255).all()) for c in cells(mosaic)]
            black = [bool((c == 0).all()) for c in cells(mosaic)]
            assert sum(distractor) == 4 - len(labels), "one tile per label; the other tiles are distractors"
            assert sum(black) == (len(labels) if labelled_tile_is_black else 0), (
                "validation tiles only from the validation region, training tiles only from the training region"
            )


@pytest.fixture
def logger_levels():
    """The study quiets Lightning's and the template's loggers (``quiet_logs``): put every level back afterwards, so
    that later tests in this process still see INFO lines."""
    loggers = [logging.root, *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    levels = {logger: logger.level for logger in loggers}
    yield
    for logger, level in levels.items():
        logger.setLevel(level)


@pytest.mark.slow
@pytest.mark.usefixtures("logger_levels")
def test_the_study_runs_the_multilabel_task_through_data_csv_and_reports_map_and_f1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # in this process (torch and Lightning are imported already; a subprocess would double the test's time)
    import finetune_study
    import torch

    out_md = tmp_path / "study.md"
    finetune_study.main(["--toy", "--work", str(tmp_path / "work"), "--out", str(out_md), "--tasks", "photos-multilabel",
                         "--recipes", "defaults", "fastai", "--seeds", "0", "--fastai-python",
                         str(tmp_path / "no-venv" / "python"), "--threads", str(torch.get_num_threads())])  # fmt: skip
    printed = capsys.readouterr().out
    assert "no fastai venv" in printed, "a missing peer venv is said, not a crash"
    table = out_md.read_text()
    assert table in printed
    assert "| recipe | photos-multilabel (10 train / 6 val, 2 ep, mAP) |" in table
    row = re.search(r"^\| defaults \| (\d\.\d{3}) ± 0\.000 \(\d+ s, n=1\) \|$", table, re.M)
    assert row and 0 < float(row.group(1)) <= 1, table
    f1 = re.search(r"^\| defaults \| (\d\.\d{3}) ± 0\.000 \|$", table.split("micro F1")[1], re.M)
    assert f1 and 0 <= float(f1.group(1)) <= 1, table
    assert "| fastai |" not in table
    (result,) = [json.loads(line) for line in (tmp_path / "work" / "results.jsonl").read_text().splitlines()]
    assert abs(result["acc"] - float(row.group(1))) < 5e-4, "the cell is the mAP the run recorded"
    assert set(result["extra"]) == {"f1_micro", "exact"}

    root = tmp_path / "work" / "tasks" / "photos-multilabel"
    with (root / "labels.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["split"] for r in rows] == ["train"] * 10 + ["val"] * 6, "the split column both sides validate on"
    labels = [r["label"].split(" ") for r in rows]
    assert all(1 <= len(ls) <= 3 and set(ls) <= set(study_tasks.FINETUNE_PHOTOS) for ls in labels)
    assert any(len(ls) > 1 for ls in labels), "several labels in a cell: data.task=auto picks multi-label"
    with Image.open(root / rows[0]["path"]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
