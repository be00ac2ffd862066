"""Optuna sweeps (``python train.py -m hparams_search=optuna``): search space, failed/pruned trials, resume after a kill."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import optuna
import pytest
import torch
from conftest import REPO
from hydra.core.utils import JobReturn, JobStatus
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from image_finetune.core.errors import ConfigError
from image_finetune.ops.sweep import TRIAL_OVERRIDE, optuna_pruning, record, results_table, search_space
from image_finetune.training.train import optimized_value


def test_search_space_reads_hydra_sweep_syntax():
    params = {
        "model.optimizer.lr": "tag(log, interval(1e-4, 1e-2))",
        "finetune.freeze_epochs": "range(0, 3)",
        "data.crop_scale.0": "choice(0.08, 0.6)",
        "model.dropout": "0.3",
    }
    space, fixed = search_space(params, ["trainer=cpu", "model.loss.label_smoothing=interval(0.0, 0.2)"])
    assert space["model.optimizer.lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert space["finetune.freeze_epochs"] == IntDistribution(0, 2)
    assert space["data.crop_scale.0"] == CategoricalDistribution([0.08, 0.6])
    assert space["model.loss.label_smoothing"] == FloatDistribution(0.0, 0.2)
    assert fixed == ["trainer=cpu", "model.dropout=0.3"]


def _job(status: JobStatus, value: object) -> JobReturn:
    job = JobReturn(status=status)
    job._return_value = value
    return job


def test_trials_are_recorded_as_complete_failed_or_pruned():
    study = optuna.create_study(direction="maximize")
    space = {"x": FloatDistribution(0, 1)}
    trials = [study.ask(space) for _ in range(4)]
    record(study, trials[0], _job(JobStatus.COMPLETED, 0.75))
    record(study, trials[1], _job(JobStatus.FAILED, RuntimeError("CUDA out of memory\nmore lines")))
    record(study, trials[2], _job(JobStatus.FAILED, optuna.TrialPruned("pruned at epoch 1")))
    record(study, trials[3], _job(JobStatus.COMPLETED, float("nan")))
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.FAIL]
    assert study.trials[1].user_attrs["error"] == "RuntimeError: CUDA out of memory"
    rows = list(csv.DictReader(results_table(study).splitlines()))
    assert [r["state"] for r in rows] == ["COMPLETE", "FAIL", "PRUNED", "FAIL"]
    assert rows[0]["value"] == "0.75" and rows[0]["x"] == str(trials[0].params["x"])


def test_pruning_callback_stops_a_bad_trial_of_the_stored_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    pruner = optuna.pruners.ThresholdPruner(lower=0.5)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize", pruner=pruner)
    trial = study.ask({"x": FloatDistribution(0, 1)})
    callback = optuna_pruning("val/acc", storage, "s", trial.number, pruner)
    trainer = SimpleNamespace(
        sanity_checking=False,
        callback_metrics={"val/acc": torch.tensor(0.9)},
        _accelerator_connector=SimpleNamespace(is_distributed=False),
    )
    callback.on_fit_start(trainer, None)
    callback.on_validation_end(trainer, SimpleNamespace(current_epoch=0))  # good: goes on
    trainer.callback_metrics["val/acc"] = torch.tensor(0.1)
    with pytest.raises(optuna.TrialPruned):
        callback.on_validation_end(trainer, SimpleNamespace(current_epoch=1))
    assert optuna.load_study(study_name="s", storage=storage).trials[0].intermediate_values == pytest.approx(
        {0: 0.9, 1: 0.1}
    )
    # outside a sweep (no trial number) the configured callback does nothing
    assert type(optuna_pruning("val/acc", storage, "s", None)).__name__ == "Callback"


def test_optimized_metric_must_be_one_of_the_runs_metrics():
    assert optimized_value({"val/acc_best": 0.5}, "val/acc_best") == 0.5
    assert optimized_value({"val/acc_best": 0.5}, None) is None
    with pytest.raises(ConfigError, match=r"optimized_metric='val/f1_best' is not among .*val/acc_best"):
        optimized_value({"val/acc_best": 0.5}, "val/f1_best")


TINY = [
    "trainer=cpu",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "data.num_workers=0",
    "data.batch_size=8",
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
    "~callbacks.train_images",
    "~callbacks.misclassified",
    "~callbacks.confusion_matrix",
    "logger=csv",
]


@pytest.mark.slow
def test_a_killed_sweep_runs_the_killed_trial_again_when_run_again(tmp_path, hub_dir):
    """Kill the sweep (SIGKILL) while trial 1 trains; the same command again marks it failed and ``interrupted`` (it
    does not count) and runs its parameters again as trial 2, which completes the study's 2 trials."""
    command = [
        sys.executable,
        "train.py",
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.study_name=kill_test",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.data_dir={tmp_path / 'data'}",
        *TINY,
    ]
    env = {**os.environ, "TORCH_HOME": str(hub_dir)}
    sweep_dir = tmp_path / "logs" / "train" / "sweeps" / "kill_test"
    first = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    # trial 1's .hydra/ is written once its run holds its dir (after the study marked it RUNNING): it is training
    deadline = time.monotonic() + 300
    while not (sweep_dir / "1" / ".hydra").is_dir() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, "the sweep ended before trial 1 started"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    killed = optuna.load_study(study_name="kill_test", storage=storage).trials
    assert [t.state for t in killed] == [TrialState.COMPLETE, TrialState.RUNNING]

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    output = again.stderr + again.stdout
    assert "already has 1 of 2 trials: continuing" in output
    trials = optuna.load_study(study_name="kill_test", storage=storage).trials
    assert [t.number for t in trials] == [0, 1, 2]
    assert trials[0].state == TrialState.COMPLETE and trials[0].value == killed[0].value  # kept, not re-run
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs["interrupted"] is True
    assert "killed" in trials[1].user_attrs["error"]
    assert trials[2].state == TrialState.COMPLETE and trials[2].user_attrs["rerun_of"] == 1
    assert trials[2].params == killed[1].params  # the killed trial's parameters, run again
    (rerun_line,) = [line for line in output.splitlines() if "Trial 2 runs trial 1 again (it did not finish): " in line]
    logged = set(rerun_line.split("(it did not finish): ")[1].split())  # one line per re-run trial, with its params
    assert {k for k, _ in (p.split("=", 1) for p in logged)} == set(killed[1].params)
    rows = list(csv.DictReader((sweep_dir / "trials.csv").read_text().splitlines()))
    assert [(r["trial"], r["state"]) for r in rows] == [("0", "COMPLETE"), ("1", "FAIL"), ("2", "COMPLETE")]
    assert rows[0]["run_dir"] == str(sweep_dir / "0")
    params = [k for k in rows[0] if k not in ("trial", "state", "value", "run_dir", "error")]
    assert [rows[2][k] for k in params] == [rows[1][k] for k in params]
    assert (sweep_dir / "2" / "metrics.json").is_file()
    # trial 2 ran with trial 1's params and knew its own trial number (for pruning)
    overrides = (sweep_dir / "2" / ".hydra" / "overrides.yaml").read_text()
    assert f"{TRIAL_OVERRIDE}=2" in overrides
    assert f"model.optimizer.lr={killed[1].params['model.optimizer.lr']!r}" in overrides
    assert "python train.py hparams_search=optuna" in output  # the best trial's command
