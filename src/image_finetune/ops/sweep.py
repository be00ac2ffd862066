"""Hyperparameter sweeps with Optuna, driven through Hydra's multirun: ``python train.py -m hparams_search=optuna``.

Why not hydra-optuna-sweeper: its latest release (1.3.0) pins ``optuna<3`` (we use Optuna 5: optuna-integration's
Lightning pruning callback needs it), creates the study in a timestamped sweep dir (a killed sweep starts over:
Hydra #3328, lightning-hydra-template #535), and gives trials no way to report intermediate values (no pruning,
lightning-hydra-template #176). So ``OptunaSweep`` drives Optuna's ask/tell API itself, behind a thin Hydra sweeper
plugin (``hydra_plugins/image_finetune_sweeper``), keeping the plugin's search-space syntax
(``choice(...)``, ``interval(...)``, ``range(...)``, ``tag(log, interval(...))``) and using Hydra's launchers
(basic, or submitit for SLURM) to run the trials.

* The study lives in the sweep dir (``sqlite:///<sweep dir>/optuna.db``), and the sweep dir is named after the study
  (configs/hparams_search/optuna.yaml), so running the same command again **continues** the study:
  ``n_trials`` is the study's total. A trial that did not finish (left running by a killed sweep, or stopped by a
  signal) is marked failed with the user attr ``interrupted``, does not count, and is run again with its parameters
  (``enqueue_trial``; the new trial has the user attr ``rerun_of``). A stored study that is not an Optuna storage,
  or was run with another direction or search space, stops the sweep with one line naming the file and the fix.
* Trial ``N`` runs in ``<sweep dir>/N`` (Hydra's job number is the trial number), with
  ``callbacks.optuna_pruning.trial_number=N``: ``OptunaPruning`` reports the per-epoch validation metric and stops a
  bad trial (``optuna.TrialPruned``), in whichever fine-tuning phase (each phase is its own ``Trainer.fit``; epochs
  number on across them).
* A trial whose job raised is marked failed, with the error kept as the trial's ``error`` attribute; it counts (it is
  not retried). A job's config mistake fails its trial only (``multirun.JobFailed``), and the sweep goes on.
* At the end: ``trials.csv`` (trial, state, value, params, run dir, error) in the sweep dir, and the best trial's
  command in the log.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from image_finetune.core.errors import ConfigError
from image_finetune.ops.multirun import one_line

log = logging.getLogger(__name__)

TRIAL_OVERRIDE = "callbacks.optuna_pruning.trial_number"
RESULTS_CSV = "trials.csv"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
#: user attrs: on a trial that did not finish (it does not count), and on the trial that runs its parameters again
INTERRUPTED = "interrupted"
RERUN_OF = "rerun_of"


# ---- search space: Hydra's sweep grammar -> Optuna distributions ----------------------------------------------------
def distribution(override: Override) -> BaseDistribution:
    """``choice(a,b)`` -> categorical, ``range(1,5)`` -> int (end exclusive), ``interval(lo,hi)`` -> float (int if both
    ends are ints), ``tag(log, ...)`` -> log scale."""
    value = override.value()
    log_scale = "log" in getattr(value, "tags", set())
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution([override._convert_value(v) for v in value.list])  # type: ignore[misc]
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if all(isinstance(x, int) for x in (start, stop, step)):
            last = int(stop) - int(step)  # type: ignore[arg-type]
            return IntDistribution(int(start), last, step=int(step), log=log_scale)  # type: ignore[arg-type]
        return FloatDistribution(float(start), float(stop) - float(step), step=float(step))  # type: ignore[arg-type]
    if isinstance(value, IntervalSweep):
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)  # type: ignore[arg-type]
    raise ConfigError(
        f"hydra.sweeper.params.{override.key_or_group}={override.input_line!r} is not a sweep "
        "(use choice(...), range(...), interval(...) or tag(log, interval(...)))"
    )


def search_space(
    params: dict[str, Any] | None, arguments: Sequence[str]
) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Distributions from ``hydra.sweeper.params`` and the command line's sweep overrides; the other command-line
    overrides are fixed for every trial."""
    parser = OverridesParser.create()
    lines = [f"{key}={value}" for key, value in (params or {}).items()]
    space: dict[str, BaseDistribution] = {}
    for override in parser.parse_overrides(lines):
        if override.is_sweep_override():
            space[override.get_key_element()] = distribution(override)
        else:  # a plain value in params: fixed
            arguments = [*arguments, override.input_line]  # type: ignore[list-item]
    fixed = []
    for override in parser.parse_overrides(list(arguments)):
        if override.is_sweep_override():
            space[override.get_key_element()] = distribution(override)
        else:
            fixed.append(override.input_line)
    return space, [f for f in fixed if f is not None]


def _as_override(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{key}={value!r}"
    return f"{key}={str(value).lower() if isinstance(value, bool) else value}"


# ---- the study --------------------------------------------------------------------------------------------------
def requeue_unfinished(study: optuna.Study, trials: Sequence[optuna.trial.BaseTrial], why: str) -> None:
    """Mark trials that did not finish as failed and ``interrupted`` (they do not count towards ``n_trials``), and
    enqueue their parameters: the next trials asked run them again.

    (One sweeper per study: two sweeps of one study at once would requeue each other's running trials.)"""
    for trial in trials:
        trial_id = trial._trial_id  # type: ignore[attr-defined]
        study._storage.set_trial_user_attr(trial_id, "error", why)
        study._storage.set_trial_user_attr(trial_id, INTERRUPTED, True)
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(dict(trial.params), user_attrs={RERUN_OF: trial.number})


def requeue_abandoned(study: optuna.Study) -> int:
    """Trials still RUNNING when a sweep starts were left by a killed sweep: run them again (``requeue_unfinished``)."""
    abandoned = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    requeue_unfinished(study, abandoned, "the sweep was killed while it ran; run again as a new trial")
    return len(abandoned)


def counted(study: optuna.Study) -> int:
    """Finished trials that count towards ``n_trials``: not the ones that did not finish (run again)."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=FINISHED) if not t.user_attrs.get(INTERRUPTED))


def open_study(
    *,
    study_name: str,
    storage: str,
    direction: str,
    space: dict[str, BaseDistribution],
    sampler: optuna.samplers.BaseSampler | None,
    pruner: optuna.pruners.BasePruner | None,
) -> optuna.Study:
    """Create the study, or load the stored one after checking it is the study this command runs: same direction,
    same search space. Anything else stops in one line naming the file and the fix."""
    where = storage.removeprefix("sqlite:///")
    fix = f"delete {Path(where).parent} to start the study over, or use another hydra.sweeper.study_name=NAME"
    try:
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            direction=direction,
            load_if_exists=True,
        )
    except Exception as error:  # sqlalchemy's DatabaseError, Optuna's schema-version RuntimeError, ...
        raise ConfigError(f"{where}: not a usable Optuna study storage ({one_line(error)}); {fix}") from None
    stored = [d.name.lower() for d in study.directions]
    if stored != [direction.lower()]:
        raise ConfigError(
            f"{where}: study {study_name!r} was run to {'/'.join(stored)}, this command asks to {direction}; {fix}"
        )
    asked = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)  # WAITING: no space yet
    for trial in study.get_trials(deepcopy=False, states=asked):
        for name in sorted(set(trial.distributions) | set(space)):
            before, now = trial.distributions.get(name), space.get(name)
            if before != now:
                raise ConfigError(
                    f"{where}: study {study_name!r} was run with another search space ({name}: "
                    f"{_describe(before)} in trial {trial.number}, {_describe(now)} now); {fix}"
                )
    return study


def _describe(distribution: BaseDistribution | None) -> str:
    return "absent" if distribution is None else repr(distribution)


def record(study: optuna.Study, trial: optuna.Trial, result: JobReturn | BaseException) -> None:
    """Tell the study how a trial's job ended: its value, pruned, or failed (with the error)."""
    if isinstance(result, JobReturn):
        run_dir = str(result.hydra_cfg.hydra.runtime.output_dir) if result.hydra_cfg is not None else ""
        trial.set_user_attr("run_dir", run_dir)
        error = result._return_value if result.status == JobStatus.FAILED else None
        value = result._return_value if result.status == JobStatus.COMPLETED else None
    else:
        error, value = result, None
    if isinstance(error, optuna.TrialPruned):
        study.tell(trial, state=TrialState.PRUNED)
        return
    if error is None and (not isinstance(value, (int, float)) or math.isnan(value)):
        error = ValueError(f"the job returned {value!r}, not a number (optimized_metric)")
    if error is not None:
        trial.set_user_attr("error", one_line(error))
        log.error("Trial %d failed: %s", trial.number, one_line(error))
        study.tell(trial, state=TrialState.FAIL)
        return
    study.tell(trial, float(value))  # type: ignore[arg-type]


def results_table(study: optuna.Study) -> str:
    """CSV: trial, state, value, one column per parameter, run dir, error."""
    trials = study.get_trials(deepcopy=False)
    names = sorted({k for t in trials for k in t.params})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial", "state", "value", *names, "run_dir", "error"])
    for t in trials:
        value = "" if t.value is None else t.value
        params = [t.params.get(n, "") for n in names]
        attrs = t.user_attrs
        writer.writerow([t.number, t.state.name, value, *params, attrs.get("run_dir", ""), attrs.get("error", "")])
    return buffer.getvalue()


def best_command(study: optuna.Study, fixed: Sequence[str]) -> str | None:
    """The command that trains the best trial's configuration as a single run."""
    try:
        best = study.best_trial
    except ValueError:  # no completed trial
        return None
    params = [_as_override(k, v) for k, v in best.params.items()]
    return shlex.join(["python", "train.py", *fixed, *params])


def run_study(
    launcher: Launcher,
    config: DictConfig,
    arguments: Sequence[str],
    *,
    study_name: str,
    storage: str,
    direction: str,
    n_trials: int,
    n_jobs: int,
    sampler: optuna.samplers.BaseSampler | None,
    pruner: optuna.pruners.BasePruner | None,
    params: dict[str, Any] | None,
) -> optuna.Study:
    """Ask, launch, tell until the study holds ``n_trials`` finished trials; then write ``trials.csv``."""
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    space, fixed = search_space(params, arguments)
    if not space:
        raise ConfigError(
            "hparams_search: nothing to search (empty hydra.sweeper.params, no sweep on the command line)"
        )
    study = open_study(
        study_name=study_name, storage=storage, direction=direction, space=space, sampler=sampler, pruner=pruner
    )
    requeue_abandoned(study)
    done = counted(study)
    if done:
        log.info("Study %r in %s already has %d of %d trials: continuing", study_name, storage, done, n_trials)
    while done < n_trials:
        trials = [study.ask(space) for _ in range(min(n_jobs, n_trials - done))]
        for t in trials:
            if RERUN_OF in t.user_attrs:
                params = " ".join(_as_override(k, v) for k, v in t.params.items())
                log.warning(
                    "Trial %d runs trial %d again (it did not finish): %s", t.number, t.user_attrs[RERUN_OF], params
                )
        overrides = [
            [*fixed, *(_as_override(k, v) for k, v in t.params.items()), f"{TRIAL_OVERRIDE}={t.number}"] for t in trials
        ]
        try:
            results: Sequence[JobReturn | BaseException] = launcher.launch(overrides, initial_job_idx=trials[0].number)
        except Exception as error:
            results = [error] * len(trials)
        except SystemExit as error:
            # a job stopped by a signal (cli.user_errors exits 130 or 143): the sweep stops, the next one reruns it
            requeue_unfinished(
                study, trials, f"stopped (exit code {error.code}) while it ran; run again as a new trial"
            )
            raise
        for trial, result in zip(trials, results):
            record(study, trial, result)
        done += len(trials)
    (sweep_dir / RESULTS_CSV).write_text(results_table(study))
    log.info("Trials: %s", sweep_dir / RESULTS_CSV)
    command = best_command(study, fixed)
    if command:
        best = study.best_trial
        log.info("Best trial %d: %s = %s\n  %s", best.number, config.get("optimized_metric"), best.value, command)
    else:
        log.warning("No trial of study %r completed", study_name)
    return study


# ---- inside a trial ---------------------------------------------------------------------------------------------
def optuna_pruning(
    monitor: str,
    storage: str | None,
    study_name: str | None,
    trial_number: int | None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> L.Callback:
    """The trial's pruning callback (optuna-integration's), or a no-op when this run is not a trial of a sweep.

    ``pruner`` must be the sweep's: a loaded study does not remember its pruner.
    """
    if trial_number is None or storage is None or study_name is None:
        return L.Callback()
    from optuna_integration import PyTorchLightningPruningCallback

    study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, int(trial_number))
    return PyTorchLightningPruningCallback(optuna.trial.Trial(study, trial_id), monitor=monitor)
