"""Ctrl-C, as a terminal sends it (SIGINT to the whole process group): `train.py` stops after the batch, saves
`last.ckpt`, exits 130 with the resume line and resumes bitwise; a second Ctrl-C stops at once; Ctrl-C elsewhere is
one line. Also what a person reads after a resume (the resumed epoch's line) and while `lr_find.py` runs.

The entry scripts run in subprocesses, each in its own session (so the signal reaches them and their data loader
worker, never pytest). The signal is sent from inside, at a chosen hook (a few lines run before the script), so it
lands at the same batch however loaded the machine is.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from shared_runs import once_per_session
from support import make_image_folder
from test_resume import assert_bitwise_equal, train_command, weights

from image_finetune.checkpoints import read_checkpoint
from image_finetune.training import finetune

REPO = Path(__file__).resolve().parents[1]

# Run an entry script after patching each hook (module:Class.method) to send SIGINT to the process group, as Ctrl-C
# in a terminal does, when its condition (of the hook's `args` and of `sent`, the SIGINTs sent so far) holds.
CTRL_C_AT = """
import importlib, json, os, runpy, signal, sys
script, hooks = sys.argv[1], json.loads(sys.argv[2])
sent = []
def patch(target, when):
    module, attribute = target.split(":")
    owner, method = attribute.split(".")
    cls = getattr(importlib.import_module(module), owner)
    real = getattr(cls, method)
    def hooked(self, *args, **kwargs):
        if eval(when):
            sent.append(target)
            os.killpg(os.getpgrp(), signal.SIGINT)
        return real(self, *args, **kwargs)
    setattr(cls, method, hooked)
for target, when in hooks:
    patch(target, when)
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""
# ReseedEveryBatch.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx): after epoch 2's second batch
IN_EPOCH_2 = (
    "image_finetune.callbacks.reproducibility:ReseedEveryBatch.on_train_batch_end",
    "not sent and args[0].current_epoch == 1 and args[-1] == 1",
)
WHILE_SAVING = ("image_finetune.checkpoints.io:AtomicCheckpointIO.save_checkpoint", "len(sent) == 1")
LINE = "interrupted: received SIGINT {when}; resume with hydra.run.dir={run_dir} ckpt_path=last"


def run(command: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Its own session: a SIGINT to its process group never reaches pytest."""
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, start_new_session=True
    )


def ctrl_c(command: list[str], *hooks: tuple[str, str]) -> list[str]:
    """``command`` (``python script.py args...``) with Ctrl-C pressed at ``hooks``."""
    return [command[0], "-c", CTRL_C_AT, command[1], json.dumps(hooks), *command[2:]]


def seconds(duration: str) -> int:
    hours, minutes, secs = (int(part) for part in duration.split(":"))
    return 3600 * hours + 60 * minutes + secs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, hub_dir: Path) -> dict[str, Any]:
    """`train.py` (4 epochs, 1 frozen, a data loader worker): uninterrupted; Ctrl-C'd after epoch 2's second batch,
    then resumed with `ckpt_path=last`; and Ctrl-C'd there twice, the second time while `last.ckpt` is being saved."""

    def build(root: Path) -> None:  # once per session: both xdist workers share it (shared_runs.py)
        images = make_image_folder(root / "images", per_class=12)
        env = {**os.environ, "TORCH_HOME": str(hub_dir), "PYTHONPATH": str(REPO / "src")}
        done = {name: run(command, env) for name, command in {
            "full": train_command(root / "full", images),
            "stopped": ctrl_c(train_command(root / "stopped", images), IN_EPOCH_2),
            "twice": ctrl_c(train_command(root / "twice", images), IN_EPOCH_2, WHILE_SAVING),
        }.items()}  # fmt: skip
        shutil.copy(root / "stopped" / "checkpoints" / "last.ckpt", root / "stopped_last.ckpt")  # as Ctrl-C left it
        done["resumed"] = run(train_command(root / "stopped", images, "ckpt_path=last"), env)
        (root / "runs.pickle").write_bytes(pickle.dumps(done))

    root = once_per_session(tmp_path_factory, "interrupts", build)
    done = pickle.loads((root / "runs.pickle").read_bytes())
    return {"root": root, "stopped_last": read_checkpoint(root / "stopped_last.ckpt", mmap=True), **done}


@pytest.mark.slow
def test_ctrl_c_mid_epoch_exits_130_with_the_resume_line_and_resumes_to_the_uninterrupted_weights(runs):
    root, stopped = runs["root"], runs["stopped"]
    assert runs["full"].returncode == 0, runs["full"].stderr[-3000:]
    assert stopped.returncode == 128 + signal.SIGINT == 130, stopped.stderr[-3000:]
    assert stopped.stderr.splitlines()[-1] == LINE.format(when="during training", run_dir=root / "stopped")
    assert "Traceback" not in stopped.stderr and "Detected KeyboardInterrupt" not in stopped.stderr + stopped.stdout
    loops = runs["stopped_last"]["loops"]["fit_loop"]
    assert loops["epoch_progress"]["current"]["processed"] == 1, "saved in epoch 2 (0-based 1)"
    assert loops["epoch_loop.batch_progress"]["current"]["processed"] == 2, "after the batch Ctrl-C landed in"
    assert runs["resumed"].returncode == 0, runs["resumed"].stderr[-3000:]
    assert_bitwise_equal(
        weights(root / "stopped" / "checkpoints" / "last.ckpt"),
        weights(root / "full" / "checkpoints" / "last.ckpt"),
        "resumed after Ctrl-C",
    )


@pytest.mark.slow
def test_a_second_ctrl_c_while_saving_stops_at_once_and_keeps_the_last_whole_checkpoint(runs):
    root, twice = runs["root"], runs["twice"]
    assert twice.returncode == 130, twice.stderr[-3000:]
    when = "again while stopping, and stopped at once"
    assert twice.stderr.splitlines()[-1] == LINE.format(when=when, run_dir=root / "twice")
    assert "Traceback" not in twice.stderr
    last = root / "twice" / "checkpoints" / "last.ckpt"
    assert finetune.resume_epoch(last) == 1, "the interrupted save left the end of epoch 1 whole"
    assert not list(last.parent.glob(".*.tmp")), "the interrupted save removed its temporary file"


@pytest.mark.slow
def test_the_resumed_epochs_line_times_only_the_batches_this_process_trained(runs):
    """A fit resumed mid-epoch gets no epoch-start hook: its line said "0 img/s, eta 1:14:12" (the clock counted from
    the machine's boot). Now img/s and the ETA come from the batches trained after the resume."""
    lines = [line for line in runs["resumed"].stdout.splitlines() if line.startswith("epoch ")]
    assert lines and lines[0].startswith("epoch 2/4  unfrozen"), runs["resumed"].stdout[-3000:]
    match = re.search(r"  ([\d,.]+) img/s  elapsed (\S+)  eta (\S+)$", lines[0])
    assert match, lines[0]
    rate, elapsed, eta = float(match[1].replace(",", "")), seconds(match[2]), seconds(match[3])
    # at least one batch of 8 images trained within `elapsed` (shown rounded to the second)
    assert rate >= 0.9 * 8 / (elapsed + 1), lines[0]
    # 2 epochs left, each at most (batches per epoch <= 10) x the part of one this process timed
    assert eta <= 2 * 10 * (elapsed + 1), lines[0]


@pytest.mark.slow
def test_ctrl_c_before_training_starts_is_one_line(tmp_path, hub_dir):
    env = {**os.environ, "TORCH_HOME": str(hub_dir), "PYTHONPATH": str(REPO / "src")}
    images = make_image_folder(tmp_path / "images", per_class=4)
    in_setup = ("image_finetune.models.classifier:ImageClassifier.__init__", "not sent")
    result = run(ctrl_c(train_command(tmp_path / "run", images), in_setup), env)
    assert result.returncode == 130, result.stderr[-3000:]
    line = "interrupted: received SIGINT before training started; no checkpoint was saved"
    assert result.stderr.splitlines()[-1] == line and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def lr_find_run(tmp_path_factory: pytest.TempPathFactory, hub_dir: Path) -> subprocess.CompletedProcess[str]:
    """`lr_find.py` (10 steps a sweep), stdout piped, Ctrl-C'd at the second sweep's 4th step."""
    root = tmp_path_factory.mktemp("lr_find")
    images = make_image_folder(root / "images", per_class=8)
    env = {**os.environ, "TORCH_HOME": str(hub_dir), "PYTHONPATH": str(REPO / "src")}
    command = [
        sys.executable, "lr_find.py", "data=imagefolder", f"data.root={images}", "trainer=cpu", "data.num_workers=0",
        "data.image_size=32", "data.batch_size=8", "trainer.max_epochs=2", "lr_find.num_steps=10",
        f"paths.data_dir={root / 'data'}", f"hydra.run.dir={root / 'run'}",
    ]  # fmt: skip
    in_sweep_2 = (
        "image_finetune.training.lr_find:SweepCallback.on_train_batch_end",
        "not sent and self.label.startswith('LR sweep 2/2') and len(self.sweep.losses) == 3",
    )
    return run(ctrl_c(command, in_sweep_2), env)


@pytest.mark.slow
def test_lr_find_prints_each_sweeps_progress_and_the_frozen_phases_epoch_line(lr_find_run):
    lines = lr_find_run.stdout.splitlines()
    step = re.compile(r"^LR sweep (\d)/2 \((.+)\): step (\d+)/10, lr (\S+), loss (\d+\.\d{3})(; the loss diverged.*)?$")
    steps = [(int(m[1]), int(m[3])) for m in map(step.match, lines) if m]
    first = [s for sweep, s in steps if sweep == 1]  # a line a step (10% of 10); it may stop early, diverged
    assert len(first) >= 5 and first == list(range(1, len(first) + 1)), lr_find_run.stdout[-3000:]
    assert [s for sweep, s in steps if sweep == 2] == [1, 2, 3], "Ctrl-C'd in its 4th step"
    assert "LR sweep 1/2 (head, backbone frozen): 10 steps, lr 1.0e-07 to 1.0e+01" in lines
    assert any(
        line.startswith("LR sweep 2/2 (backbone, head at lr ") and line.endswith(": 10 steps, lr 1.0e-07 to 1.0e+01")
        for line in lines
    )
    frozen = [line for line in lines if line.startswith("epoch 1/2  frozen  train loss ")]
    assert len(frozen) == 1 and frozen[0].endswith("eta 0:00:00"), "the frozen phase's line, its ETA to its end"
    order = [i for i, line in enumerate(lines) if line.startswith(("LR sweep 1/2", "epoch 1/2", "LR sweep 2/2"))]
    assert order == sorted(order)


@pytest.mark.slow
def test_ctrl_c_in_lr_find_is_one_line_and_exit_130(lr_find_run):
    """Lightning turns Ctrl-C inside a fit into `exit(1)`; the entry point says it in one line, with 130."""
    assert lr_find_run.returncode == 130, lr_find_run.stderr[-3000:]
    assert lr_find_run.stderr.splitlines()[-1] == "interrupted: received SIGINT (Ctrl-C); stopped before the end"
    assert "Traceback" not in lr_find_run.stderr and "Detected KeyboardInterrupt" not in lr_find_run.stderr
