"""SLURM without a cluster: a fake ``scontrol`` on PATH and the SLURM environment variables of a job.

Lightning's ``SLURMEnvironment`` must answer the requeue signal by saving and asking ``scontrol requeue <job id>``;
the relaunched job (same job id, ``SLURM_RESTART_COUNT`` one higher) must find its run dir from the job id and
resume there; after two requeues it must end with the weights of an uninterrupted run, bitwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, REPO
from omegaconf import OmegaConf

from image_finetune.ops.slurm import resume_if_requeued, run_id, slurm_job_id

JOB_ID = "4242"
TINY = [
    "trainer=cpu",
    "trainer.max_epochs=5",
    "finetune.freeze_epochs=1",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=1",
    "data.num_workers=0",
    "data.batch_size=8",
    "test=false",
    "callbacks.model_checkpoint.save_top_k=-1",  # a checkpoint every epoch: last.ckpt is the final state
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
    "~callbacks.train_images",
    "~callbacks.misclassified",
    "~callbacks.confusion_matrix",
]

# What SLURM does on `scontrol requeue`: end the job (SIGTERM, then SIGKILL after KillWait) and start it again later.
FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "$FAKE_SLURM_LOG"
(kill -TERM $PPID; sleep 5; kill -KILL $PPID) >/dev/null 2>&1 &
exit 0
"""


def test_run_dir_and_resume_come_from_the_job(monkeypatch, tmp_path):
    for name in (
        "SLURM_JOB_ID",
        "SLURM_ARRAY_JOB_ID",
        "SLURM_ARRAY_TASK_ID",
        "SLURM_RESTART_COUNT",
        "TORCHELASTIC_RUN_ID",
    ):
        monkeypatch.delenv(name, raising=False)
    assert run_id("2026-01-01_00-00-00") == "2026-01-01_00-00-00"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "exp7")
    assert run_id("t") == "torchrun-exp7"
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert run_id("t") == "slurm-123" and slurm_job_id() == "123"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "120")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_id("t") == "slurm-120_3"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resume_if_requeued(str(tmp_path)) is None  # first start: a fresh run even if the dir has a checkpoint
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resume_if_requeued(str(tmp_path)) == "last"
    assert resume_if_requeued(str(tmp_path / "elsewhere")) is None
    # the configs use both
    hydra_cfg = OmegaConf.to_container(OmegaConf.load(Path(CONFIGS) / "hydra" / "default.yaml"), resolve=False)
    assert "/${run_id:${now:" in hydra_cfg["run"]["dir"]
    train_cfg = OmegaConf.to_container(OmegaConf.load(Path(CONFIGS) / "train.yaml"), resolve=False)
    assert train_cfg["ckpt_path"] == "${resume_if_requeued:${paths.output_dir}}"


def _launch(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Output to a file: a pipe nobody reads while we wait would fill up and stall the run."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "train.py", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _finish(process: subprocess.Popen, log: Path) -> str:
    process.wait(timeout=900)
    return log.read_text()


def _wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"exited ({process.returncode}) too early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _checkpoints(run_dir: Path) -> set[str]:
    return {p.name for p in (run_dir / "checkpoints").glob("epoch*.ckpt")}


@pytest.mark.slow
def test_a_job_requeued_twice_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path, hub_dir, digits_data_dir):
    common = [f"paths.data_dir={digits_data_dir}", *TINY]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    base_env["TORCH_HOME"] = str(hub_dir)
    reference_dir = tmp_path / "reference"
    reference_log = tmp_path / "reference.log"
    reference = _launch(
        [*common, f"hydra.run.dir={reference_dir}", f"paths.log_dir={tmp_path / 'ref_logs'}"], base_env, reference_log
    )

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    requeues = tmp_path / "scontrol.log"
    slurm_env = {
        **base_env,
        "PATH": f"{bin_dir}:{base_env['PATH']}",
        "FAKE_SLURM_LOG": str(requeues),
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "127.0.0.1",
    }
    run_dir = tmp_path / "logs" / "train" / "runs" / f"slurm-{JOB_ID}"  # from the job id, no hydra.run.dir given
    outputs = []
    for restart in range(3):
        seen = _checkpoints(run_dir) if run_dir.exists() else set()
        log = tmp_path / f"job{restart}.log"
        job = _launch(
            [*common, f"paths.log_dir={tmp_path / 'logs'}"], {**slurm_env, "SLURM_RESTART_COUNT": str(restart)}, log
        )
        if restart < 2:  # preempt it once it has finished an epoch of its own
            _wait_for(lambda seen=seen: run_dir.is_dir() and len(_checkpoints(run_dir) - seen) > 0, job, log)
            job.send_signal(signal.SIGUSR1)
        out = _finish(job, log)
        outputs.append(out)
        if restart < 2:
            assert job.returncode != 0, f"run {restart} was not stopped by the requeue:\n{out[-3000:]}"
            assert "Handling auto-requeue signal" in out, out[-3000:]
            assert list(run_dir.glob(f"hpc_ckpt_{restart + 1}.ckpt")), "no checkpoint saved on the signal"
    assert job.returncode == 0, outputs[-1][-3000:]
    assert requeues.read_text().splitlines() == [f"requeue {JOB_ID}", f"requeue {JOB_ID}"]
    assert "Restoring states from the checkpoint path at " + str(run_dir / "checkpoints" / "last.ckpt") in outputs[1]
    assert [p.name for p in (tmp_path / "logs" / "train" / "runs").iterdir()] == [f"slurm-{JOB_ID}"]  # one run dir

    reference_out = _finish(reference, reference_log)
    assert reference.returncode == 0, reference_out[-3000:]
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    expected = torch.load(reference_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert (
        (final["epoch"], final["global_step"])
        == (expected["epoch"], expected["global_step"])
        == (4, expected["global_step"])
    )
    different = [k for k, v in expected["state_dict"].items() if not torch.equal(v, final["state_dict"][k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"
    # TensorBoard kept one event dir: the three processes wrote to it (events.out.tfevents.<time>.<host>.<pid>.<n>)
    writers = {p.name.split(".")[-2] for p in (run_dir / "tensorboard").glob("events.out.tfevents.*")}
    assert len(writers) == 3


@pytest.mark.parametrize(("launcher", "nodes"), [("slurm", 1), ("slurm_multinode", 2)])
def test_slurm_launcher_configs_compose(compose_cfg, launcher, nodes):
    cfg = compose_cfg(f"hydra/launcher={launcher}", "hydra.launcher.partition=gpu")
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.partition) == (nodes, "gpu")
    assert cfg.hydra.launcher.signal_delay_s > 0 and cfg.hydra.launcher.max_num_timeout > 0  # time limits requeue too


def test_sbatch_script_sends_the_signal_lightning_requeues_on():
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    script = (REPO / "scripts" / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --signal=USR1@90" in script and "#SBATCH --requeue" in script
    assert SLURMEnvironment().requeue_signal == signal.SIGUSR1  # what Lightning builds when it detects SLURM
    assert "srun python train.py" in script
