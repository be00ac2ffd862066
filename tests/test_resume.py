"""Checkpoints and resume a user can trust: `last.ckpt` is the latest state, a killed or terminated run resumes to
bitwise the weights of an uninterrupted one, one run per run dir, no leftovers, one-line errors."""

from __future__ import annotations

import errno
import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

import lightning as L
import numpy as np
import pytest
import torch
from support import FAST, make_image_folder

from image_finetune.callbacks.reproducibility import reseed_globals
from image_finetune.checkpoints import read_checkpoint
from image_finetune.checkpoints.io import AtomicCheckpointIO
from image_finetune.core.atomic import remove_orphans
from image_finetune.core.errors import RunInterrupted, UserError
from image_finetune.core.rundir import LOCK_NAME, clean_run_dir, drop_checkpoints_after_last, run_dir_lock
from image_finetune.models.classifier import ImageClassifier
from image_finetune.training import finetune
from image_finetune.training.train import build, train

REPO = Path(__file__).resolve().parents[1]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


def assert_bitwise_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, f"{what}: {len(different)}/{len(expected)} tensors differ, e.g. {different[:3]}"


# ---- last.ckpt ----------------------------------------------------------------------------------------------------
def test_last_ckpt_is_the_final_epoch_even_when_an_earlier_epoch_was_best(
    compose_cfg, pretrained, image_folder, monkeypatch
):
    """With the default callbacks (save_top_k 1) and val/acc falling every epoch, the best checkpoint is the first epoch (epoch001, counted from 1) and
    `last.ckpt` must still hold the end of the final epoch (Lightning 2.6's save_last keeps a copy of the best)."""
    real_log_dict = ImageClassifier.log_dict

    def falling_val_acc(self: ImageClassifier, values: dict, **kwargs: object) -> None:
        if "val/acc" in values and not self.trainer.sanity_checking:
            values = {**values, "val/acc": torch.tensor(0.9 - 0.1 * self.current_epoch)}
        real_log_dict(self, values, **kwargs)

    monkeypatch.setattr(ImageClassifier, "log_dict", falling_val_acc)
    cfg = compose_cfg("data=imagefolder", f"data.root={image_folder}", "trainer.max_epochs=3", "test=false", *FAST)
    run = build(cfg)
    finetune.fit(run.trainer, run.model, run.datamodule, run.schedule)
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch001-acc0.9000.ckpt", "last.ckpt", "phase1.ckpt"]
    assert finetune.resume_epoch(ckpts / "last.ckpt") == 3
    assert_bitwise_equal(weights(ckpts / "last.ckpt"), run.model.state_dict(), "last.ckpt vs the trained model")
    assert Path(run.trainer.checkpoint_callback.best_model_path).name == "epoch001-acc0.9000.ckpt"


# ---- exact resume ---------------------------------------------------------------------------------------------------
def test_reseeding_per_batch_draws_what_seed_everything_draws():
    """``ReseedEveryBatch`` seeds the global generators itself (Lightning's ``seed_everything`` costs up to ~2 ms of
    host time per batch); every stream must draw what it would after ``seed_everything``."""

    def draws() -> tuple[list[float], float, float, str | None]:
        return torch.rand(3).tolist(), random.random(), float(np.random.rand()), os.environ.get("PL_GLOBAL_SEED")

    L.seed_everything(1234, workers=True, verbose=False)
    expected = draws()
    L.seed_everything(99, workers=True, verbose=False)
    reseed_globals(1234)
    assert draws() == expected


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_a_run_stopped_by_sigterm_mid_epoch_resumes_to_the_uninterrupted_weights(
    compose_cfg, pretrained, tmp_path, monkeypatch, decode
):
    """SIGTERM in the middle of an unfrozen epoch: `train` saves `last.ckpt` at that batch and raises RunInterrupted;
    `ckpt_path=last` then skips the batches already trained and ends bitwise where an uninterrupted run ends. Also
    with `data.decode=gpu` (its crops drawn on the host from the sample seeds; the CPU decoder stands in for nvJPEG)."""
    images = make_image_folder(tmp_path / "images", per_class=16)
    if decode == "gpu":
        monkeypatch.setattr("image_finetune.data.imagefolder.require_gpu", lambda: torch.device("cpu"))
    common = (
        "data=imagefolder",
        f"data.root={images}",
        "trainer.max_epochs=3",
        "test=false",
        *FAST,
        "data.batch_size=8",
        f"data.decode={decode}",
        "augment=standard",
    )
    full = compose_cfg(*common, output_dir=tmp_path / "full")
    train(full)
    expected = weights(tmp_path / "full" / "checkpoints" / "last.ckpt")

    class SendSigterm(L.Callback):  # stands in for a scheduler: one signal, during a training batch
        sent = False

        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            if not SendSigterm.sent and trainer.current_epoch == 1 and trainer.fit_loop.epoch_loop.batch_idx == 1:
                SendSigterm.sent = True
                os.kill(os.getpid(), signal.SIGTERM)

    real_build = build

    def build_with_sigterm(cfg):  # type: ignore[no-untyped-def]
        run = real_build(cfg)
        run.trainer.callbacks.append(SendSigterm())
        return run

    monkeypatch.setattr("image_finetune.training.train.build", build_with_sigterm)
    with pytest.raises(
        RunInterrupted, match=r"received SIGTERM during training; resume with hydra\.run\.dir=.* ckpt_path=last"
    ) as info:
        train(compose_cfg(*common, output_dir=tmp_path / "stopped"))
    assert info.value.exit_code == 128 + signal.SIGTERM
    last = read_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.ckpt", mmap=True)
    loops = last["loops"]["fit_loop"]
    assert loops["epoch_progress"]["current"]["processed"] == 1, "saved mid-epoch 1"
    assert loops["epoch_loop.batch_progress"]["current"]["processed"] == 2, "after its second batch"
    monkeypatch.setattr("image_finetune.training.train.build", real_build)
    train(compose_cfg(*common, "ckpt_path=last", output_dir=tmp_path / "stopped"))
    assert_bitwise_equal(weights(tmp_path / "stopped" / "checkpoints" / "last.ckpt"), expected, "resumed after SIGTERM")


def train_command(run_dir: Path, images: Path, *overrides: str) -> list[str]:
    """`python train.py` as a user runs it: default callbacks, logger, cache setting and worker processes."""
    return [
        sys.executable, "train.py", "data=imagefolder", f"data.root={images}", "data.image_size=32", "data.batch_size=8",
        "data.num_workers=1", "trainer=cpu", "trainer.max_epochs=4", "finetune.freeze_epochs=1", "test=false",
        f"paths.data_dir={run_dir.parent / 'data'}", f"hydra.run.dir={run_dir}", *overrides,
    ]  # fmt: skip


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    """Output goes to a file: a pipe nobody reads while the run trains would fill up and stall it."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    process.log = log  # type: ignore[attr-defined]
    return process


def finish(process: subprocess.Popen[str], timeout: float = 900) -> tuple[int, str]:
    process.wait(timeout=timeout)
    return process.returncode, process.log.read_text()[-6000:]  # type: ignore[attr-defined]


def wait_for_epoch(last: Path, epoch: int, process: subprocess.Popen[str], timeout: float = 900) -> None:
    """Poll until `last` resumes at ``epoch`` or later (it is replaced atomically, so it is always whole)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run ended before epoch {epoch}: {finish(process)[1]}"
        if last.is_file() and finetune.resume_epoch(last) >= epoch:
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of epoch {epoch} after {timeout} s")


@pytest.mark.slow
def test_kill_9_then_ckpt_path_last_ends_bitwise_equal_and_the_dir_is_locked_meanwhile(tmp_path, hub_dir):
    """`train.py` (workers, default callbacks and cache, the unfreeze after epoch 0) killed with SIGKILL during epoch 2
    and resumed with `ckpt_path=last` in the same run dir ends with bitwise the weights of an uninterrupted run.
    While it runs, a second run in its dir stops at once with one line naming the dir and the holder; the lock dies
    with the killed process, so the resume starts."""
    images = make_image_folder(tmp_path / "images", per_class=16)
    env = {**os.environ, "TORCH_HOME": str(hub_dir), "PYTHONPATH": str(REPO / "src")}
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    full = start(train_command(full_dir, images), env, tmp_path / "full.log")
    killed = start(train_command(killed_dir, images), env, tmp_path / "killed.log")

    wait_for_epoch(killed_dir / "checkpoints" / "last.ckpt", 2, killed)
    killed.send_signal(signal.SIGSTOP)  # alive and holding the lock, however slowly the second run starts
    record = (killed_dir / ".hydra" / "overrides.yaml").read_text()
    code, output = finish(start(train_command(killed_dir, images, "seed=7"), env, tmp_path / "second.log"), timeout=600)
    assert code == 2 and "Traceback" not in output, output
    assert f"error: run dir {killed_dir} is in use by another training run (pid {killed.pid} on" in output
    assert (killed_dir / ".hydra" / "overrides.yaml").read_text() == record, "the refused run overwrote the record"
    killed.kill()  # SIGKILL (its data loader worker may outlive it for seconds: it must not hold the lock)
    killed.wait()

    code, output = finish(start(train_command(killed_dir, images, "ckpt_path=last"), env, tmp_path / "resumed.log"))
    assert code == 0, output
    assert finish(full)[0] == 0
    assert_bitwise_equal(
        weights(killed_dir / "checkpoints" / "last.ckpt"),
        weights(full_dir / "checkpoints" / "last.ckpt"),
        "resumed after kill -9",
    )
    assert not list(killed_dir.rglob("*.tmp")), "temporary files of the killed run are cleaned up"


@pytest.mark.parametrize(
    "hook, fit", [("on_fit_end", 1), ("on_fit_start", 2)], ids=["after_the_first_fit", "as_the_second_fit_starts"]
)
def test_a_sigterm_at_the_unfreeze_stops_the_run_as_one_inside_a_fit_does(
    compose_cfg, pretrained, tmp_path, monkeypatch, hook, fit
):
    """Lightning handles SIGTERM from just before a fit's first step to its teardown, and forgets what it saw when the
    next fit registers its handler again. One after the first fit's teardown (``on_fit_end`` runs after it) used to
    kill the process outright (exit -15, nothing said); one in the second fit's set-up (``on_fit_start`` runs before
    Lightning registers) was forgotten, and the run trained on to the end and exited 0 (found by the subprocess test
    in CI). Both must end the run as any SIGTERM does: exit 143, resumable at the boundary."""
    seen: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # also: no pytest killed

    class SigtermAtTheUnfreeze(L.Callback):
        calls = 0

        def send(self, *args: object) -> None:
            SigtermAtTheUnfreeze.calls += 1
            if SigtermAtTheUnfreeze.calls == fit:
                os.kill(os.getpid(), signal.SIGTERM)

    setattr(SigtermAtTheUnfreeze, hook, SigtermAtTheUnfreeze.send)

    def build_with_sigterm(cfg):  # type: ignore[no-untyped-def]
        run = build(cfg)
        run.trainer.callbacks.append(SigtermAtTheUnfreeze())
        return run

    monkeypatch.setattr("image_finetune.training.train.build", build_with_sigterm)
    images = make_image_folder(tmp_path / "images", per_class=8)
    cfg = compose_cfg("data=imagefolder", f"data.root={images}", "trainer.max_epochs=2", "test=false", *FAST)
    try:
        with pytest.raises(RunInterrupted, match="received SIGTERM during training; resume with") as info:
            train(cfg)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert seen == [signal.SIGTERM], "a handler installed before the run still gets the signal"
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert finetune.resume_epoch(last) == 1, "resumable at the boundary; no unfrozen epoch trained after the signal"


# ---- the run dir ------------------------------------------------------------------------------------------------------
def test_sigterm_saves_a_checkpoint_and_exits_non_zero(tmp_path, hub_dir):
    """What a scheduler sees: exit code 143 (never 0) and one line saying how to resume; `last.ckpt` is written at
    the interruption."""
    images = make_image_folder(tmp_path / "images", per_class=16)
    env = {**os.environ, "TORCH_HOME": str(hub_dir), "PYTHONPATH": str(REPO / "src")}
    run_dir = tmp_path / "run"
    process = start(train_command(run_dir, images, "trainer.max_epochs=20"), env, tmp_path / "run.log")
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_for_epoch(last, 1, process)
    step = read_checkpoint(last, mmap=True)["global_step"]
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    code, output = finish(process, timeout=600)
    assert code == 128 + signal.SIGTERM, output
    assert (
        f"interrupted: received SIGTERM during training; resume with hydra.run.dir={run_dir} ckpt_path=last" in output
    )
    assert "Traceback" not in output, output
    # (the in-process test above pins the save to a batch mid-epoch; here the signal may also land at an epoch's end)
    assert read_checkpoint(last, mmap=True)["global_step"] >= step, "last.ckpt holds the state at the interruption"


def test_a_second_run_in_a_locked_dir_fails_at_once_and_a_dead_holder_leaves_no_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from image_finetune.core.rundir import run_dir_lock\n"
         "with run_dir_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)", str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with (
            pytest.raises(
                UserError, match=rf"run dir {tmp_path} is in use by another training run \(pid {holder.pid} on "
            ),
            run_dir_lock(tmp_path),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with run_dir_lock(tmp_path) as lock:
        assert lock == tmp_path / LOCK_NAME
        assert f"pid {os.getpid()} on" in lock.read_text()


def test_a_forked_worker_that_outlives_a_killed_trainer_does_not_keep_the_dir_locked(tmp_path):
    """Data loader workers are forked while the lock is held; one still alive after its trainer died (as after
    `kill -9`, until its watchdog notices) must not hold the lock: a flock belongs to the open file, not the process."""
    script = (
        "import os, sys, time; from image_finetune.core.rundir import run_dir_lock\n"
        "with run_dir_lock(sys.argv[1]):\n"
        "    if os.fork() == 0:\n        os.write(1, b'forked\\n'); time.sleep(600)\n"
        "    os.write(1, b'locked\\n'); time.sleep(600)"
    )  # the child writes once its at-fork handlers have run; one os.write each: lines never interleave in the pipe
    trainer = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert trainer.stdout is not None
        assert sorted(trainer.stdout.readline().strip() for _ in range(2)) == ["forked", "locked"]
        trainer.kill()  # the trainer only; its forked child lives on
        trainer.wait()
        with run_dir_lock(tmp_path) as lock:
            assert lock == tmp_path / LOCK_NAME
    finally:
        os.killpg(trainer.pid, signal.SIGKILL)


def test_ranks_other_than_zero_take_no_lock(tmp_path, monkeypatch):
    """Under DDP the launching process holds the lock; the other ranks of the same run must not block on it."""
    with run_dir_lock(tmp_path):
        for variable in ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"):
            monkeypatch.setenv(variable, "1")
            with run_dir_lock(tmp_path) as lock:
                assert lock is None
            monkeypatch.delenv(variable)


def test_only_our_own_temporary_files_are_cleaned_up(tmp_path):
    ours = [tmp_path / "checkpoints" / ".unfreeze.ckpt.k2j_9x0a.tmp", tmp_path / ".metrics.json.abcdefgh.tmp"]
    others = [
        tmp_path / "checkpoints" / "last.ckpt", tmp_path / "notes.tmp", tmp_path / ".hidden.tmp",
        tmp_path / ".unfreeze.ckpt.TOOLONGNAME.tmp", tmp_path / ".hydra" / "config.yaml",
    ]  # fmt: skip
    for path in ours + others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert sorted(clean_run_dir(tmp_path)) == sorted(ours)
    assert all(p.exists() for p in others) and not any(p.exists() for p in ours)
    assert remove_orphans(tmp_path) == []


def test_resuming_from_last_removes_checkpoints_the_killed_run_wrote_after_it(tmp_path):
    """A run killed between saving a new best and saving `last.ckpt` leaves a best checkpoint nothing tracks."""
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()

    def save(name: str, step: int, tracked: tuple[str, ...] = ()) -> Path:
        state = {
            "best_model_path": tracked[0] if tracked else "",
            "best_k_models": {p: torch.tensor(0.5) for p in tracked},
        }
        torch.save({"state_dict": {}, "global_step": step, "callbacks": {"ModelCheckpoint{}": state}}, ckpts / name)
        return ckpts / name

    old_best = save("epoch001-acc0.5000.ckpt", 20)
    unrelated = save("mine.ckpt", 5)
    orphan = save("epoch003-acc0.9000.ckpt", 40)
    save("last.ckpt", 30, tracked=(str(old_best),))
    assert drop_checkpoints_after_last(ckpts) == [orphan]
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(["last.ckpt", old_best.name, unrelated.name])


# ---- messages ---------------------------------------------------------------------------------------------------------
def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "last.ckpt"
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint({"step": 1}, target)
    real_save = torch.save

    class FullDisk(io.RawIOBase):
        def __init__(self, f: BinaryIO) -> None:
            self.f, self.written = f, 0

        def writable(self) -> bool:
            return True

        def write(self, data: bytes) -> int:  # type: ignore[override]
            if self.written + len(data) > 100:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.f.write(data)

    with (
        monkeypatch.context() as patch,
        pytest.raises(
            UserError, match=rf"no space left on device while saving checkpoint {target}.*previous last\.ckpt is intact"
        ),
    ):
        patch.setattr(torch, "save", lambda obj, f: real_save(obj, FullDisk(f)))
        io_.save_checkpoint({"step": 2, "w": torch.zeros(10_000)}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_freeze_epochs_at_or_beyond_max_epochs_warns_that_the_backbone_never_unfreezes(
    compose_cfg, pretrained, image_folder, caplog
):
    cfg = compose_cfg("data=imagefolder", f"data.root={image_folder}", "trainer.max_epochs=1", "finetune.freeze_epochs=1",
                      "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "test=false", *FAST)  # fmt: skip
    run = build(cfg)
    finetune.fit(run.trainer, run.model, run.datamodule, run.schedule)
    assert "finetune.freeze_epochs=1 >= trainer.max_epochs=1: the backbone never unfreezes" in caplog.text
