"""benchmarks/finetune_study.py at toy size: it builds its offline tasks, trains through train(cfg) and prints the table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_study_builds_its_tasks_runs_each_recipe_and_seed_and_writes_the_table(tmp_path: Path) -> None:
    out_md = tmp_path / "study.md"
    command = [sys.executable, "benchmarks/finetune_study.py", "--toy", "--work", str(tmp_path / "work"), "--out", str(out_md),
               "--tasks", "digits-4shot", "--recipes", "defaults", "before", "fastai",
               "--seeds", "0", "1", "--fastai-python", str(tmp_path / "no-venv" / "python")]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no fastai venv" in result.stdout, "a missing peer venv is said, not a crash"
    table = out_md.read_text()
    assert table in result.stdout.replace("\r", "")
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in table.splitlines()
        if line.startswith("| ") and "---" not in line
    }
    assert set(rows) == {"recipe", "defaults", "before"}, "one row per template recipe; no fastai row without its venv"
    assert "digits-4shot (20 train / 20 val, 2 ep)" in rows["recipe"]
    for name in ("defaults", "before"):
        cells = re.findall(r"(\d\.\d{3}) ± (\d\.\d{3}) \((\d+) s, n=2\)", rows[name])
        assert len(cells) == 1 and all(0 <= float(mean) <= 1 and float(std) >= 0 for mean, std, _ in cells)
    digits = tmp_path / "work" / "tasks" / "digits-4shot"
    assert sorted(p.name for p in (digits / "train").iterdir()) == ["5", "6", "7", "8", "9"], (
        "the classes pretraining never saw"
    )
    # a second run reuses every finished run instead of training again
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "for 0 runs (4 more reused" in again.stdout


def test_photo_patches_come_from_real_photographs_and_validation_from_a_region_training_never_saw() -> None:
    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    import study_tasks

    photos = study_tasks.photographs(study_tasks.FINETUNE_PHOTOS + study_tasks.PRETRAIN_PHOTOS[:2])
    assert all(
        p.ndim == 3 and p.shape[2] == 3 and p.dtype == np.uint8 and min(p.shape[:2]) >= 300 for p in photos.values()
    )
    marked = photos["china"].copy()
    width = marked.shape[1]
    marked[:, : round(width * study_tasks.TRAIN_REGION)] = 0  # black out the training region
    val = study_tasks.patches(marked, 50, 32, np.random.default_rng(0), (study_tasks.TRAIN_REGION, 1.0))
    train = study_tasks.patches(marked, 50, 32, np.random.default_rng(0), (0.0, study_tasks.TRAIN_REGION))
    assert val.shape == (50, 32, 32, 3) and (val.reshape(50, -1).max(axis=1) > 0).all(), (
        "no validation patch from the training region"
    )
    assert train.max() == 0, "training patches only from the training region"
