"""The LR finder: its suggestion on a problem where the right LR is known, and `python lr_find.py` end to end."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from image_finetune.checkpoints import read_checkpoint
from image_finetune.training.lr_find import LRSweep

REPO = Path(__file__).resolve().parents[1]


def sweep_least_squares(scale: float, seed: int) -> tuple[float | None, float]:
    """SGD on least squares with features scaled by ``scale``; returns the suggestion and 2/L, above which SGD diverges
    (L: the largest eigenvalue of the loss's Hessian, which grows as scale**2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g) * scale
    y = x @ torch.randn(8, generator=g) + 0.1 * torch.randn(256, generator=g)
    w = torch.zeros(8, requires_grad=True)
    optimizer = torch.optim.SGD([w], lr=0.0)
    sweep = LRSweep(min_lr=1e-6, max_lr=10.0, num_steps=100)
    for step in range(sweep.num_steps):
        batch = torch.randint(0, 256, (32,), generator=g)
        optimizer.param_groups[0]["lr"] = lr = sweep.lr(step)
        loss = ((x[batch] @ w - y[batch]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if sweep.record(lr, loss.item()):
            break
    hessian_max = torch.linalg.eigvalsh(2 * x.T @ x / len(x)).max().item()
    return sweep.suggestion(), 2 / hessian_max


@pytest.mark.parametrize("seed", [0, 1])
def test_the_suggestion_is_a_converging_lr_and_follows_the_problems_scale(seed):
    suggestions = {}
    for scale in (1.0, 10.0):
        suggestion, diverges_above = sweep_least_squares(scale, seed)
        assert suggestion is not None
        # below the optimum 1/L (= diverges_above / 2), but not so far below that nothing moves
        assert diverges_above / 100 < suggestion < diverges_above / 2, (scale, suggestion, diverges_above)
        suggestions[scale] = suggestion
    # features 10x larger: curvature 100x, so the LR must fall by one to two orders of magnitude
    assert 10 < suggestions[1.0] / suggestions[10.0] < 1000


def test_a_sweep_stops_when_the_loss_diverges():
    sweep = LRSweep(min_lr=1e-3, max_lr=1.0, num_steps=50)
    steps = 0
    while not sweep.record(sweep.lr(steps), 1.0 if steps < 20 else 10.0**steps):
        steps += 1
    assert steps < 25 and len(sweep.losses) < 50


@pytest.mark.slow
def test_lr_find_cli_writes_the_plot_the_suggestions_and_the_command(tmp_path, hub_dir, image_folder):
    run_dir = tmp_path / "lr_find"
    overrides = [
        "data=imagefolder",
        f"data.root={image_folder}",
        "trainer=cpu",
        "data.num_workers=0",
        "data.image_size=32",
        "data.batch_size=8",
        "trainer.max_epochs=2",
        "finetune.unfreeze=[[1,1],[2,all]]",
        f"paths.data_dir={tmp_path / 'data'}",
    ]
    result = subprocess.run(
        [
            sys.executable,
            "lr_find.py",
            *overrides,
            "lr_find.num_steps=10",
            "lr_find.apply=true",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TORCH_HOME": str(hub_dir)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads((run_dir / "lr_find.json").read_text())
    lr, ratio = found["suggested"]["model.optimizer.lr"], found["suggested"]["finetune.backbone_lr_ratio"]
    assert 1e-7 <= lr <= 10 and ratio > 0
    assert found["frozen"]["suggestion"] == lr and found["unfrozen"]["suggestion"] == pytest.approx(ratio * lr)
    assert 5 <= len(found["frozen"]["losses"]) <= 10 and 5 <= len(found["unfrozen"]["losses"]) <= 10
    assert (run_dir / "lr_find.png").stat().st_size > 1000
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    applied = f"model.optimizer.lr={lr:.3g} finetune.backbone_lr_ratio={ratio:.3g}"
    assert f"{shlex.join(['python', 'train.py', *overrides])} {applied}\n" in result.stdout
    # lr_find.apply=true: then it trained, in the same run dir, at the suggested values
    trained = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert trained["epoch"] == 1 and trained["run_config"]["model"]["optimizer"]["lr"] == pytest.approx(lr)
    assert trained["run_config"]["finetune"]["backbone_lr_ratio"] == pytest.approx(ratio)
