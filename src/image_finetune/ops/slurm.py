"""SLURM (and torchrun): one run dir per job, and a requeued job resumes in it.

What happens on preemption or at the time limit:

* **Plain sbatch** (``scripts/slurm/train.sbatch``): ``#SBATCH --signal=USR1@90 --requeue``. Lightning sees the SLURM
  environment, builds ``SLURMEnvironment(auto_requeue=True)`` whose requeue signal is USR1, and on USR1 saves
  ``hpc_ckpt_N.ckpt`` in the run dir and calls ``scontrol requeue <job id>``; SLURM then ends the job and starts it
  again with ``SLURM_RESTART_COUNT`` one higher.
* **hydra-submitit-launcher** (``hydra/launcher=slurm``): submitit sends USR2 and handles it itself: it requeues the
  job with the same pickled config (``BaseSubmititLauncher.checkpoint``). Lightning registers no handler for a signal
  that already has one, so the two never both requeue. Set ``requeue_signal`` only if your sbatch uses another signal.

Either way the relaunched process must land in the same run dir and resume there. The run dir comes from the job id
(``${run_id:...}`` in configs/hydra/default.yaml: ``slurm-<job id>``, never the clock), and ``ckpt_path`` defaults to
``${resume_if_requeued:${paths.output_dir}}``: ``last`` when this is a requeued job (``SLURM_RESTART_COUNT > 0``) and
the run dir holds ``checkpoints/last.ckpt``, else null. ``last.ckpt`` is the state at the end of the last epoch, which
a resumed run continues bitwise (the epoch under way when the signal came is redone); Lightning's mid-epoch
``hpc_ckpt_N.ckpt`` is used only by Lightning itself, when a job is preempted before its first epoch ended.
TensorBoard appends to the run dir's event dir, W&B and MLflow continue the run of the run dir
(``image_finetune.ops.loggers``), so nothing forks.

Under ``torchrun`` every process composes its own config: ``run_id`` gives them one dir, ``torchrun-<rdzv id>``
(``--rdzv_id``; ``--standalone`` makes one up, the same for all local workers).
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf


def slurm_job_id() -> str | None:
    """``<array job>_<task>`` for array jobs (as ``scontrol requeue`` wants it), else ``SLURM_JOB_ID``; None outside."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def run_id(fallback: str) -> str:
    """The name of this run's dir: ``slurm-<job id>`` in a SLURM job, ``torchrun-<rdzv id>`` under torchrun with a
    rendezvous id, else ``fallback`` (the time). Stable across a job's requeues and the same for all its processes."""
    job = slurm_job_id()
    if job:
        return f"slurm-{job}"
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if rdzv and rdzv != "none":
        return f"torchrun-{rdzv}"
    return fallback


def requeue_count() -> int:
    """How many times SLURM has requeued this job (0 for a first start or outside SLURM)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def resume_if_requeued(output_dir: str) -> str | None:
    """``last`` when this is a requeued SLURM job and its run dir has ``checkpoints/last.ckpt``, else None."""
    if requeue_count() > 0 and (Path(output_dir) / "checkpoints" / "last.ckpt").is_file():
        return "last"
    return None


def register_resolvers() -> None:
    """``${run_id:fallback}`` and ``${resume_if_requeued:dir}``. ``run_id`` is cached: a pickled config (submitit)
    keeps the value it had when it was submitted."""
    OmegaConf.register_new_resolver("run_id", run_id, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("resume_if_requeued", resume_if_requeued, replace=True)
