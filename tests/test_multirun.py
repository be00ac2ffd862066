"""Multiruns and several processes: a summary across jobs, DDP inside a multirun job, and two torchrun "nodes"."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from image_finetune.ops.multirun import SUMMARY_CSV, SUMMARY_MD, summarize

TINY = [
    "trainer.max_epochs=2",
    "finetune.freeze_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "data.num_workers=0",
    "data.batch_size=8",
    "~callbacks.train_images",
    "~callbacks.misclassified",
    "~callbacks.confusion_matrix",
]


def test_summary_gives_mean_and_std_of_each_metric_across_jobs(tmp_path):
    for job, (acc, loss) in enumerate([(0.5, 1.0), (0.7, 2.0), (0.9, 3.0)]):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / "metrics.json").write_text(
            json.dumps({"test/acc": acc, "test/loss": loss, "best_checkpoint": "x"})
        )
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n- trainer=cpu\n")
    (tmp_path / "3").mkdir()  # a job that died: no metrics.json, left out
    stats = summarize(tmp_path)
    assert stats["test/acc"]["mean"] == pytest.approx(0.7) and stats["test/acc"]["std"] == pytest.approx(0.2)
    assert stats["test/loss"] == {"mean": 2.0, "std": 1.0, "n": 3}
    rows = list(csv.DictReader((tmp_path / SUMMARY_CSV).read_text().splitlines()))
    assert [(r["job"], r["overrides"], r["test/acc"]) for r in rows] == [
        ("0", "seed=0", "0.5"),
        ("1", "seed=1", "0.7"),
        ("2", "seed=2", "0.9"),
    ]
    assert "| test/acc | 0.7000 | 0.2000 | 3 |" in (tmp_path / SUMMARY_MD).read_text()


def run(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_seed_multirun_with_ddp_writes_one_dir_per_job_shared_by_its_ranks_and_a_summary(
    tmp_path, hub_dir, digits_data_dir
):
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "TORCH_HOME": str(hub_dir)}
    result = run(
        [
            sys.executable,
            "train.py",
            "-m",
            "seed=1,2",
            "trainer=ddp_sim",
            f"hydra.sweep.dir={sweep_dir}",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"paths.data_dir={digits_data_dir}",
            *TINY,
        ],
        env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]  # no per-rank dirs
    assert not (tmp_path / "logs").exists()  # the second rank did not start a run dir of its own
    for job, seed in (("0", 1), ("1", 2)):
        assert json.loads((sweep_dir / job / "metrics.json").read_text())["test"]["acc"] >= 0
        checkpoint = torch.load(sweep_dir / job / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["run_config"]["seed"] == seed
    assert output.count("epoch 1: weights identical on all 2 ranks") == 2  # both jobs ran on 2 ranks
    rows = list(csv.DictReader((sweep_dir / SUMMARY_CSV).read_text().splitlines()))
    assert [(r["job"], r["overrides"]) for r in rows] == [("0", "seed=1"), ("1", "seed=2")]
    assert "| test/acc |" in (sweep_dir / SUMMARY_MD).read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_train_through_the_unfreeze_in_one_run_dir(tmp_path, hub_dir, digits_data_dir):
    """Two torchrun launches (``--nnodes=2``, c10d rendezvous on 127.0.0.1, gloo), as on two machines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(TORCH_HOME=str(hub_dir), OMP_NUM_THREADS="1")
    port = _free_port()
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=twonodes",
        "train.py",
        "trainer=ddp_sim",
        "trainer.devices=1",
        "+trainer.num_nodes=2",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.data_dir={digits_data_dir}",
        *TINY,
    ]
    nodes = [
        subprocess.Popen(
            [*args[:3], f"--node_rank={rank}", *args[3:]],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-4000:]
    runs = tmp_path / "logs" / "train" / "runs"
    assert [p.name for p in runs.iterdir()] == ["torchrun-twonodes"]  # one run dir, named by the rendezvous id
    run_dir = runs / "torchrun-twonodes"
    both = "".join(outputs)
    # epochs counted from 1, as everywhere a person reads them
    assert "epoch 1: weights identical on all 2 ranks" in both and "epoch 2: weights identical on all 2 ranks" in both
    assert "Unfreezing after epoch 1" in both
    assert (run_dir / "checkpoints" / "phase1.ckpt").is_file() and (run_dir / "metrics.json").is_file()
    assert not list(run_dir.glob("**/.pl_ddp*")) and not list(run_dir.glob("*/.hydra"))  # no per-rank output dirs
