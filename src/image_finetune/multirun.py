"""Hydra multiruns (``-m seed=1,2,3``, sweeps): a summary table across jobs, and DDP inside a multirun job.

* ``MultirunSummary`` is a Hydra callback (configs/hydra/default.yaml): when a multirun ends it reads every job's
  ``metrics.json`` from the sweep dir and writes ``summary.csv`` (one row per job and its overrides) and
  ``summary.md`` (mean +- std of each final metric). It reads the files rather than the jobs' return values so that
  it works with launchers that run jobs elsewhere (submitit) and after a resumed sweep.
* ``multirun_job`` makes ``trainer=ddp`` work inside a multirun job. Lightning starts the other ranks by re-running
  ``sys.argv`` with ``hydra.run.dir=<HydraConfig run.dir>`` appended (``_hydra_subprocess_cmd``). In a multirun that
  is ``-m`` (the whole sweep again, in every rank) and the run-dir pattern instead of the job's dir
  (lightning-hydra-template#393). We point both at this job: ``sys.argv`` becomes this job's overrides, and
  ``hydra.run.dir`` its output dir, so the ranks compose this job's config and share its dir. At the end of the job
  the process group is destroyed and the environment restored (Lightning's launcher leaves ``LOCAL_RANK`` & co. in
  it), so the next job starts its own ranks.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep dir's job dirs that finished (have ``metrics.json``), in job-number order."""
    found = [p.parent for p in sweep_dir.glob("*/metrics.json")]
    return sorted(found, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def _overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    return list(OmegaConf.load(path)) if path.is_file() else []  # type: ignore[arg-type]


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"best": {"val": {"acc": 1}}}`` -> ``{"best/val/acc": 1}`` (metrics.json is nested)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def summarize(sweep_dir: str | Path) -> dict[str, dict[str, float]]:
    """Write ``summary.csv`` and ``summary.md`` into the sweep dir; returns ``{metric: {mean, std, n}}``."""
    sweep_dir = Path(sweep_dir)
    rows = []
    dirs = job_dirs(sweep_dir)
    overrides = {d: _overrides(d) for d in dirs}
    shared = set.intersection(*(set(o) for o in overrides.values())) if overrides else set()
    for job_dir in dirs:
        metrics = _flatten(json.loads((job_dir / "metrics.json").read_text()))
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        own = " ".join(o for o in overrides[job_dir] if o not in shared or len(dirs) == 1)  # what differs per job
        rows.append({"job": job_dir.name, "overrides": own, **numbers})
    names = sorted({k for row in rows for k in row if k not in ("job", "overrides")})
    stats: dict[str, dict[str, float]] = {}
    for name in names:
        values = [row[name] for row in rows if name in row and not math.isnan(row[name])]
        if values:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            stats[name] = {"mean": statistics.fmean(values), "std": std, "n": len(values)}
    if not rows:
        return stats
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["job", "overrides", *names], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (sweep_dir / SUMMARY_CSV).write_text(buffer.getvalue())
    lines = [f"# {len(rows)} jobs in {sweep_dir}", "", "| metric | mean | std | jobs |", "|---|---|---|---|"]
    lines += [f"| {k} | {s['mean']:.4f} | {s['std']:.4f} | {int(s['n'])} |" for k, s in stats.items()]
    (sweep_dir / SUMMARY_MD).write_text("\n".join(lines) + "\n")
    return stats


class MultirunSummary(Callback):
    """Hydra callback: after a multirun, the table across its jobs (``summary.csv``, ``summary.md``)."""

    def __init__(self, metrics: list[str] | None = None) -> None:
        self.metrics = metrics  # which to print (all are written); None: best/val/* and test/*

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        stats = summarize(sweep_dir)
        if not stats:
            log.warning("No job of %s wrote metrics.json: no summary", sweep_dir)
            return
        shown = self.metrics or [k for k in stats if k.startswith(("best/val/", "test/"))]
        n = max(int(s["n"]) for s in stats.values())
        log.info("Across %d jobs (%s):", n, sweep_dir / SUMMARY_MD)
        for name in shown:
            if name in stats:
                log.info("  %-20s %.4f +- %.4f", name, stats[name]["mean"], stats[name]["std"])


class FinishTrackers(Callback):
    """Hydra callback: after each job, end its W&B run (see ``loggers.finish_wandb_run``)."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from image_finetune.loggers import finish_wandb_run

        finish_wandb_run()


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def multirun_job() -> Iterator[None]:
    """Inside a multirun job: DDP ranks started by Lightning run this job, in this job's dir (see module doc)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hydra_cfg = HydraConfig.get()
    argv, run_dir, environ = list(sys.argv), hydra_cfg.run.dir, dict(os.environ)
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        with read_write(hydra_cfg), open_dict(hydra_cfg):
            hydra_cfg.run.dir = run_dir
        _destroy_process_group()
        # Lightning's launcher leaves LOCAL_RANK, WORLD_SIZE, MASTER_PORT, ... in this process's environment; with
        # LOCAL_RANK set the next job's Trainer would take its processes as started from outside and start none.
        os.environ.clear()
        os.environ.update(environ)
