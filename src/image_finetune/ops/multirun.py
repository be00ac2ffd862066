"""Hydra multiruns (``-m seed=1,2,3``, sweeps): a summary table across jobs, and DDP inside a multirun job.

* ``MultirunSummary`` is a Hydra callback (configs/hydra/default.yaml): when a multirun ends it reads every job's
  ``metrics.json`` from the sweep dir and writes ``summary.csv`` (one row per job and its overrides) and
  ``summary.md`` (mean +- std of each final metric over the jobs that repeat one setting: jobs that differ only in
  ``seed``, ``data.seed`` or ``data.fold`` are repeats; a sweep over other settings too gets one table per setting).
  The ``oof_predictions.csv`` of k-fold jobs are joined into ``<sweep dir>/oof_predictions.csv``. It reads the files rather than the jobs' return values so that
  it works with launchers that run jobs elsewhere (submitit) and after a resumed sweep.
* A failed job does not end a multirun. In a job, ``multirun_job`` prints a mistake's one line (naming the job) and
  raises ``JobFailed``, an ``Exception``: Hydra records the job as failed (``cli.user_errors`` would ``sys.exit``,
  and a ``SystemExit`` ends the whole multirun). ``MultirunSummary`` writes the failure to the job's ``error.json``;
  the sweeper (``KeepGoingSweeper``, or the Optuna one, which marks the trial failed) goes on with the next job; at
  the end the summary names the failed jobs and the process exits 2 (1 if a job crashed) with one line listing them.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from image_finetune.core.cli import _user_error, save_json

log = logging.getLogger(__name__)

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
METRICS_JSON = "metrics.json"
#: written into a job dir when the job failed: {"job", "error" (one line), "user_error", "overrides"}
ERROR_JSON = "error.json"
#: the path segments that make a ``metrics.json`` value a metric (``best/val/acc``, ``test/acc``), not bookkeeping
#: such as ``epochs_counted_from`` or ``best/epoch``
SPLITS = {"train", "val", "test"}
#: a k-fold job's predictions on its held-out fold (``out_of_fold``); the sweep dir gets them joined, under this name
OOF_CSV = "oof_predictions.csv"
#: overrides whose jobs are repeats of one setting (another seed, another fold): the mean +- std is taken over them
REPEAT_KEYS = ("seed", "data.seed", "data.fold")
Stats = dict[str, dict[str, float]]


class JobFailed(Exception):  # noqa: N818 (a job's outcome, carried through Hydra's launcher)
    """A multirun job stopped on a mistake a user can fix; its one line is printed. The cause is the ``UserError``."""


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``; a ``JobFailed`` is told by its cause."""
    if isinstance(error, JobFailed) and error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _job_order(path: Path) -> tuple[bool, int, str]:
    return (not path.name.isdigit(), int(path.name) if path.name.isdigit() else 0, path.name)


def job_dirs(sweep_dir: Path, marker: str = METRICS_JSON) -> list[Path]:
    """The sweep dir's job dirs holding ``marker`` (``metrics.json``: finished ones), in job-number order."""
    return sorted((p.parent for p in sweep_dir.glob(f"*/{marker}")), key=_job_order)


def failed_jobs(sweep_dir: Path) -> dict[Path, dict[str, Any]]:
    """The job dirs whose job failed (``error.json``, no ``metrics.json``) -> their ``error.json``."""
    return {
        d: _read_record(d / ERROR_JSON) or {"error": f"its {ERROR_JSON} cannot be read"}
        for d in job_dirs(sweep_dir, ERROR_JSON)
        if not (d / METRICS_JSON).is_file()
    }


def _read_record(path: Path) -> dict[str, Any] | None:
    """A job's ``metrics.json``/``error.json``; None, with a warning naming the file, when it is damaged or edited
    into something else (the summary then leaves that job's numbers out rather than stopping the whole summary)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning(
            "%s cannot be read (%s): that job is left out of the summary; re-run it or restore the file", path, err
        )
        return None
    if not isinstance(data, dict):
        log.warning("%s holds %s, not a JSON object: that job is left out of the summary", path, type(data).__name__)
        return None
    return data


def _overrides(job_dir: Path) -> list[str]:
    """The job's command-line overrides (``.hydra/overrides.yaml``, a list of strings); [] with a warning if damaged."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:  # yaml's scanner/parser errors have no common public base in OmegaConf's API
        log.warning("%s cannot be read (%s): the job's overrides are left out of the summary", path, err)
        return []
    if not isinstance(data, list) or not all(isinstance(o, str) for o in data):
        log.warning("%s is not a list of overrides: they are left out of the summary", path)
        return []
    return data


def is_metric(key: str) -> bool:
    """``best/val/acc``, ``last/train/loss``, ``test/acc``: yes; ``epochs_counted_from``, ``best/epoch``: no."""
    return bool(SPLITS & set(key.split("/")))


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"best": {"val": {"acc": 1}}}`` -> ``{"best/val/acc": 1}`` (metrics.json is nested)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_repeat(override: str) -> bool:
    """``seed=3``, ``data.fold=1``: an override that makes a job a repeat of the same setting (``REPEAT_KEYS``)."""
    return override.split("=", 1)[0].lstrip("+~") in REPEAT_KEYS


def metric_stats(rows: list[dict[str, Any]], names: list[str]) -> Stats:
    """``{metric: {mean, std, n}}`` over ``rows`` (NaNs and missing values left out)."""
    stats: Stats = {}
    for name in names:
        values = [row[name] for row in rows if name in row and not math.isnan(row[name])]
        if values:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            stats[name] = {"mean": statistics.fmean(values), "std": std, "n": len(values)}
    return stats


@dataclass
class SweepSummary:
    """``stats`` over every finished job; ``groups``: setting -> its repeats' stats, when the sweep repeats settings
    (seeds, folds) and varies others too (else empty); ``repeats``: the repeat keys the jobs differ in."""

    stats: Stats = field(default_factory=dict)
    groups: dict[str, Stats] = field(default_factory=dict)
    repeats: list[str] = field(default_factory=list)


def summarize(sweep_dir: str | Path) -> Stats:
    """Write ``summary.csv`` and ``summary.md`` into the sweep dir; returns ``{metric: {mean, std, n}}`` over every
    finished job (``summarize_sweep`` has the per-setting numbers too)."""
    return summarize_sweep(sweep_dir).stats


def summarize_sweep(sweep_dir: str | Path) -> SweepSummary:
    """Write ``summary.csv``, ``summary.md`` (and the joined ``oof_predictions.csv``) into the sweep dir.

    Finished jobs give the metrics; failed jobs (``error.json``) get a row with their error and are named in
    ``summary.md``. Jobs that differ only in ``REPEAT_KEYS`` are repeats: when several settings are repeated, each
    gets its own mean +- std table."""
    sweep_dir = Path(sweep_dir)
    rows = []
    dirs = job_dirs(sweep_dir)
    failed = failed_jobs(sweep_dir)
    overrides = {d: _overrides(d) for d in dirs} | {d: list(e.get("overrides", [])) for d, e in failed.items()}
    shared = set.intersection(*(set(o) for o in overrides.values())) if overrides else set()

    def own_overrides(job_dir: Path) -> list[str]:  # what differs per job
        return [o for o in overrides[job_dir] if o not in shared or len(overrides) == 1]

    def own(job_dir: Path) -> str:
        return " ".join(own_overrides(job_dir))

    for job_dir in dirs:
        metrics = _flatten(_read_record(job_dir / METRICS_JSON) or {})
        numbers = {
            k: float(v)
            for k, v in metrics.items()
            if is_metric(k) and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        rows.append({"job": job_dir.name, "overrides": own(job_dir), **numbers})
    names = sorted({k for row in rows for k in row if k not in ("job", "overrides")})
    summary = SweepSummary(metric_stats(rows, names))
    setting = {d: " ".join(o for o in own_overrides(d) if not is_repeat(o)) for d in dirs}
    summary.repeats = sorted(
        {o.split("=", 1)[0].lstrip("+~") for d in dirs for o in overrides[d] if is_repeat(o) and o not in shared}
    )
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for job_dir, row in zip(dirs, rows):
        by_setting.setdefault(setting[job_dir], []).append(row)
    if len(by_setting) > 1 and any(len(group) > 1 for group in by_setting.values()):
        summary.groups = {name: metric_stats(group, names) for name, group in by_setting.items()}
    stats = summary.stats
    if not rows and not failed:
        return summary
    join_oof_predictions(sweep_dir, dirs)
    rows += [{"job": d.name, "overrides": own(d), "error": e.get("error", "")} for d, e in failed.items()]
    rows.sort(key=lambda row: _job_order(Path(row["job"])))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["job", "overrides", *names, "error"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (sweep_dir / SUMMARY_CSV).write_text(buffer.getvalue())
    finished = len(dirs)
    title = (
        f"# {finished} jobs in {sweep_dir}"
        if not failed
        else f"# {finished} of {finished + len(failed)} jobs finished in {sweep_dir}"
    )
    over = f" (repeats over {', '.join(summary.repeats)})" if summary.repeats else ""
    lines = [title + over, ""]
    for name, group_stats in summary.groups.items() or {"": stats}.items():
        if name:
            lines += [f"## {name}", ""]
        lines += ["| metric | mean | std | jobs |", "|---|---|---|---|"]
        lines += [f"| {k} | {s['mean']:.4f} | {s['std']:.4f} | {int(s['n'])} |" for k, s in group_stats.items()]
        lines += [""] if summary.groups else []
    if failed:
        lines += ["", f"## {len(failed)} failed", ""]
        lines += [f"- job {d.name} (`{own(d)}`, {d}): {e.get('error', '')}" for d, e in failed.items()]
    (sweep_dir / SUMMARY_MD).write_text("\n".join(lines).rstrip("\n") + "\n")
    return summary


def join_oof_predictions(sweep_dir: Path, dirs: list[Path]) -> Path | None:
    """``<sweep dir>/oof_predictions.csv``: the jobs' out-of-fold predictions in job order, each row led by its job;
    None when no job wrote any. A file with other columns (other classes) is left out with a warning."""
    found = [d for d in dirs if (d / OOF_CSV).is_file()]
    if not found:
        return None
    header: list[str] | None = None
    out: list[list[str]] = []
    for job_dir in found:
        with open(job_dir / OOF_CSV, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or (header is not None and rows[0] != header):
            log.warning("%s has other columns than %s: left out of the joined file", job_dir / OOF_CSV, found[0])
            continue
        header = header or rows[0]
        out += [[job_dir.name, *row] for row in rows[1:]]
    path = sweep_dir / OOF_CSV
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([["job", *(header or [])], *out])
    path.write_text(buffer.getvalue())
    return path


class MultirunSummary(Callback):
    """Hydra callback: records each failed job (``error.json``); after a multirun, the table across its jobs
    (``summary.csv``, ``summary.md``), and exit code 2 (1 if a job crashed) when a job failed."""

    def __init__(self, metrics: list[str] | None = None) -> None:
        self.metrics = metrics  # which to print (all are written); None: best/val/* and test/*

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        job_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status != JobStatus.FAILED:
            (job_dir / ERROR_JSON).unlink(missing_ok=True)  # a job run again in its dir (a resumed sweep) and fine now
            return
        error = job_return._return_value  # (the `return_value` property re-raises it)
        optuna = sys.modules.get("optuna")
        if optuna is not None and isinstance(error, optuna.TrialPruned):
            return  # a pruned Optuna trial did what it should
        if not isinstance(error, JobFailed):  # a crash: its traceback, as Hydra would have shown it
            log.error("Job %s (%s) failed:", config.hydra.job.num, job_dir, exc_info=error)
        record = {
            "job": config.hydra.job.num,
            "error": one_line(error),
            "user_error": isinstance(error, JobFailed),
            "overrides": list(config.hydra.overrides.task),
        }
        save_json(record, job_dir / ERROR_JSON)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = summarize_sweep(sweep_dir)
        stats = summary.stats
        failed = failed_jobs(sweep_dir)
        if not stats and not failed:
            log.warning("No job of %s wrote metrics.json: no summary", sweep_dir)
        if stats:
            shown = self.metrics or [k for k in stats if k.startswith(("best/val/", "test/"))]
            n = max(int(s["n"]) for s in stats.values())
            over = f", mean ± std over {', '.join(summary.repeats)}" if summary.repeats else ""
            log.info("Across %d jobs%s (%s):", n, over, sweep_dir / SUMMARY_MD)
            for setting, group in summary.groups.items() or {"": stats}.items():
                if setting:
                    log.info(" %s (%d jobs):", setting, max(int(s["n"]) for s in group.values()))
                for name in shown:
                    if name in group:
                        log.info("  %-20s %.4f ± %.4f", name, group[name]["mean"], group[name]["std"])
            if (sweep_dir / OOF_CSV).is_file():
                log.info("Out-of-fold predictions of every job: %s", sweep_dir / OOF_CSV)
        if failed:
            # Hydra calls this after the sweeper returned and before the process ends: the multirun's exit code.
            # (Hydra calls on_multirun_end in the reverse order of configs/hydra/default.yaml's callbacks: the ones
            # listed before this one, called after it, must have no on_multirun_end of their own.)
            listed = ", ".join(f"{d.name} ({d})" for d in failed)
            print(
                f"error: {len(failed)} job(s) of the multirun failed: {listed}; see {sweep_dir / SUMMARY_MD}",
                file=sys.stderr,
            )
            sys.exit(2 if all(e.get("user_error") for e in failed.values()) else 1)


class FinishTrackers(Callback):
    """Hydra callback: after each job, end its W&B run (see ``loggers.finish_wandb_run``)."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from image_finetune.ops.loggers import finish_wandb_run

        finish_wandb_run()


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def multirun_job() -> Iterator[None]:
    """Inside a multirun job: DDP ranks started by Lightning run this job, in this job's dir, and a mistake fails
    this job only (``JobFailed``; see module doc). Use inside ``cli.user_errors``."""
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
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"error: job {hydra_cfg.job.num} ({hydra_cfg.runtime.output_dir}): {user_error}", file=sys.stderr)
        raise JobFailed(str(user_error)) from user_error
    finally:
        sys.argv = argv
        with read_write(hydra_cfg), open_dict(hydra_cfg):
            hydra_cfg.run.dir = run_dir
        _destroy_process_group()
        # Lightning's launcher leaves LOCAL_RANK, WORLD_SIZE, MASTER_PORT, ... in this process's environment; with
        # LOCAL_RANK set the next job's Trainer would take its processes as started from outside and start none.
        os.environ.clear()
        os.environ.update(environ)
