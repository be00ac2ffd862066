"""What a person reads: `train.py` with stdout piped (as under SLURM, nohup, CI or `| tee`), metrics.json, the summary.

One real run in a subprocess (module-scoped, shared by the promises below) on a folder whose data allows a test
split; an in-process run on a folder that does not.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import FAST, make_image_folder

from image_finetune.training.train import train

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
# epoch 2/3  unfrozen  train loss 1.0811 acc 0.4167  val loss 1.0702 acc 0.3333  41 img/s  elapsed 0:00:19  eta 0:00:09
EPOCH_LINE = re.compile(
    r"^epoch (\d+)/(\d+)  (frozen|unfrozen)  train loss [\d.]+ acc [\d.]+  val loss [\d.]+ acc [\d.]+  "
    r"[\d,.]+ img/s  elapsed \d+:\d\d:\d\d  eta \d+:\d\d:\d\d$"
)


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory: pytest.TempPathFactory, hub_dir: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`python train.py` on a 3-class folder, 2 epochs (1 frozen), stdout and stderr piped: not a terminal."""
    root = tmp_path_factory.mktemp("piped")
    images = make_image_folder(root / "pets", per_class=12)
    run_dir = root / "run"
    overrides = [o for o in FAST if "progress_bar" not in o and "model_summary" not in o]  # the default console
    result = subprocess.run(
        [sys.executable, "train.py", "data=imagefolder", f"data.root={images}", f"trainer.max_epochs={EPOCHS}",
         *overrides, f"hydra.run.dir={run_dir}", f"paths.data_dir={root / 'data'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TORCH_HOME": str(hub_dir), "PYTHONWARNINGS": "default"},  # show every warning there is
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, run_dir


@pytest.mark.slow
def test_piped_stdout_gets_one_plain_line_per_epoch_with_phase_and_whole_run_eta(piped_run):
    result, _ = piped_run
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == EPOCHS, result.stdout
    for number, line in enumerate(lines, start=1):
        match = EPOCH_LINE.match(line)
        assert match, line
        assert (int(match[1]), int(match[2])) == (number, EPOCHS)
        assert match[3] == ("frozen" if number == 1 else "unfrozen")
    assert lines[-1].endswith("eta 0:00:00")
    assert "━" not in result.stdout and "\r" not in result.stdout  # no redrawn bar in a log file


@pytest.mark.slow
def test_piped_output_has_none_of_the_known_noise(piped_run):
    result, _ = piped_run
    output = result.stdout + result.stderr
    for noise in ("Tip:", "_pytree", "LeafSpec", "exists and is not empty", "FLOPs", "Test metric", "DataLoader 0",
                  "Trainer already configured", "estimate number of stepping batches"):  # fmt: skip
        assert noise not in output, noise
    summaries = [line for line in output.splitlines() if line.startswith("[") and "model: " in line]
    assert len(summaries) == 2  # one line per fit, saying what trains
    assert "(backbone frozen)" in summaries[0] and "(backbone unfrozen)" in summaries[1]


@pytest.mark.slow
def test_epochs_are_numbered_from_1_in_lines_file_names_summary_and_metrics_json(piped_run):
    result, run_dir = piped_run
    saved = json.loads((run_dir / "metrics.json").read_text())
    best = saved["best"]
    stored_epoch = torch.load(best["checkpoint"], weights_only=True, mmap=True)["epoch"]  # Lightning's, from 0
    assert best["epoch"] == stored_epoch + 1
    assert Path(best["checkpoint"]).name.startswith(f"epoch{best['epoch']:03d}-")
    assert f"best val (epoch {best['epoch']})" in result.stdout
    assert saved["last"]["epoch"] == EPOCHS and f"last val (epoch {EPOCHS})" in result.stdout
    assert "Unfreezing after epoch 1:" in result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith(f"epoch {best['epoch']}/"))
    assert f"val loss {best['val']['loss']:.4f} acc {best['val']['acc']:.4f}" in line  # the same epoch's numbers


@pytest.mark.slow
def test_metrics_json_and_the_summary_report_best_last_and_test_under_their_names(piped_run):
    result, run_dir = piped_run
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert set(saved) == {"epochs_counted_from", "best", "last", "test"}
    assert saved["best"]["monitor"] == "val/acc"
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    val_accs = [float(line.split(" acc ")[2].split()[0]) for line in epoch_lines]
    assert max(val_accs) == pytest.approx(saved["best"]["val"]["acc"], abs=5e-5)  # best = the best epoch by val/acc
    last_line = [line for line in result.stdout.splitlines() if line.startswith("epoch ")][-1]
    assert f"val loss {saved['last']['val']['loss']:.4f} acc {saved['last']['val']['acc']:.4f}" in last_line
    assert saved["last"]["checkpoint"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert saved["test"]["checkpoint"] == saved["best"]["checkpoint"] and 0 <= saved["test"]["acc"] <= 1
    test_row = next(line for line in result.stdout.splitlines() if "test (best checkpoint)" in line)
    assert f"acc {saved['test']['acc']:.4f}" in test_row and f"loss {saved['test']['loss']:.4f}" in test_row
    name = f"resnet18-pets-{run_dir.name}"
    assert f"tensorboard --logdir_spec {name}:{run_dir / 'tensorboard'}" in result.stdout.replace("\n", "")


@pytest.mark.usefixtures("pretrained")
def test_data_without_room_for_a_test_split_reports_no_test_metrics_never_val_as_test(compose_cfg, tmp_path, capsys):
    images = make_image_folder(tmp_path / "few", per_class=8)  # < 10 per class: data.test_fraction=auto holds none out
    cfg = compose_cfg("data=imagefolder", f"data.root={images}", "finetune=full", "trainer.max_epochs=1", *FAST)
    metrics = train(cfg)
    assert not any(key.startswith("test/") for key in metrics)
    saved = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert saved["test"] is None and saved["test_note"].startswith("no test split")
    assert saved["best"]["val"]["acc"] == pytest.approx(metrics["val/acc"])
    split = json.loads((Path(cfg.paths.output_dir) / "data_split.json").read_text())["splits"]
    assert set(split) == {"train", "val"}
    out = capsys.readouterr().out
    assert re.search(r"│ test\s+no test split", out), out
