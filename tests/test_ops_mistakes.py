"""Operating mistakes (issue 18): a failed multirun job does not end the multirun, the summary holds only metrics,
a stored Optuna study is checked before it is continued, a genuinely failed trial counts (no endless retry), and
W&B without credentials is one line. Driven as a user runs them: ``python train.py ...`` subprocesses."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import REPO
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from image_finetune.core.errors import ConfigError
from image_finetune.ops.multirun import ERROR_JSON, SUMMARY_CSV, SUMMARY_MD, JobFailed, MultirunSummary, summarize
from image_finetune.ops.sweep import open_study, run_study

TINY = [
    "trainer=cpu",
    "data.image_size=32",
    "model.backbone.weights=null",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "data.num_workers=0",
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
    "~callbacks.train_images",
    "~callbacks.misclassified",
    "~callbacks.confusion_matrix",
    "logger=csv",
]
BATCH_SIZE_0 = "data.batch_size=0 must be a positive number of images per batch (per device), e.g. data.batch_size=64"


def train_py(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=env or dict(os.environ),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ---- 12d, 12c: a multirun whose first job fails ------------------------------------------------------------------
@pytest.fixture(scope="module")
def failed_first(tmp_path_factory, digits_data_dir):
    """``-m data.batch_size=0,8,16``: job 0 is a config mistake, jobs 1 and 2 train."""
    tmp = tmp_path_factory.mktemp("multirun")
    sweep_dir = tmp / "sweep"
    result = train_py(
        "-m",
        "data.batch_size=0,8,16",
        f"hydra.sweep.dir={sweep_dir}",
        f"paths.log_dir={tmp / 'logs'}",
        f"paths.data_dir={digits_data_dir}",
        *TINY,
    )
    return result, sweep_dir


@pytest.mark.slow
def test_a_failed_first_job_is_one_line_the_others_run_and_the_multirun_exits_2(failed_first):
    result, sweep_dir = failed_first
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines.count(f"error: job 0 ({sweep_dir / '0'}): {BATCH_SIZE_0}") == 1  # when it failed
    assert lines[-1] == (  # at the end: the one line listing the failed jobs
        f"error: 1 job(s) of the multirun failed: 0 ({sweep_dir / '0'}); see {sweep_dir / SUMMARY_MD}"
    )
    for job in ("1", "2"):
        assert (sweep_dir / job / "metrics.json").is_file()
    assert json.loads((sweep_dir / "0" / ERROR_JSON).read_text())["error"] == f"ConfigError: {BATCH_SIZE_0}"


@pytest.mark.slow
def test_the_summary_covers_the_jobs_that_finished_and_names_the_failed_one(failed_first):
    _, sweep_dir = failed_first
    rows = list(csv.DictReader((sweep_dir / SUMMARY_CSV).read_text().splitlines()))
    assert [(r["job"], r["overrides"], r["error"]) for r in rows] == [
        ("0", "data.batch_size=0", f"ConfigError: {BATCH_SIZE_0}"),
        ("1", "data.batch_size=8", ""),
        ("2", "data.batch_size=16", ""),
    ]
    assert rows[0]["test/acc"] == "" and float(rows[1]["test/acc"]) >= 0
    summary = (sweep_dir / SUMMARY_MD).read_text()
    assert summary.startswith(f"# 2 of 3 jobs finished in {sweep_dir}\n")
    assert "| test/acc |" in summary and summary.split("| test/acc |")[1].split("\n")[0].endswith("| 2 |")
    assert f"- job 0 (`data.batch_size=0`, {sweep_dir / '0'}): ConfigError: {BATCH_SIZE_0}" in summary
    # 12c: only metrics in the mean +- std table (the multirun's metrics.json files hold epochs_counted_from)
    assert "epochs_counted_from" in (sweep_dir / "1" / "metrics.json").read_text()
    assert "epochs_counted_from" not in summary and "| best/epoch |" not in summary
    assert "epochs_counted_from" not in rows[0]


def test_summary_table_holds_metrics_not_bookkeeping(tmp_path):
    """The shape ``metrics.json`` has (callbacks/progress.run_results): only train/val/test values are metrics."""
    for job, acc in enumerate([0.5, 0.7]):
        (tmp_path / str(job)).mkdir()
        metrics = {
            "epochs_counted_from": 1,
            "best": {"epoch": 2, "checkpoint": "x.ckpt", "monitor": "val/acc", "val": {"acc": acc}},
            "last": {"epoch": 3, "val": {"acc": acc}, "train": {"loss": 1.0}},
            "test": {"acc": acc},
            "test_note": "",
        }
        (tmp_path / str(job) / "metrics.json").write_text(json.dumps(metrics))
    stats = summarize(tmp_path)
    assert sorted(stats) == ["best/val/acc", "last/train/loss", "last/val/acc", "test/acc"]
    assert "epochs_counted_from" not in (tmp_path / SUMMARY_MD).read_text()


def test_a_damaged_job_record_leaves_that_job_out_of_the_summary_with_a_warning(tmp_path, caplog):
    """Files read back are checked: a cut-short metrics.json, a non-object one and a broken overrides.yaml each leave
    that job's numbers (or overrides) out with a warning naming the file, and the summary of the others is written."""
    for job, acc in enumerate([0.5, 0.7, 0.9, 0.3]):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / "metrics.json").write_text(json.dumps({"best": {"val": {"acc": acc}}}))
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
    (tmp_path / "1" / "metrics.json").write_text('{"best": {"val": ')
    (tmp_path / "2" / "metrics.json").write_text("[1, 2]")
    (tmp_path / "3" / ".hydra" / "overrides.yaml").write_text("- [unclosed\n")
    with caplog.at_level("WARNING"):
        stats = summarize(tmp_path)
    assert stats["best/val/acc"]["n"] == 2 and stats["best/val/acc"]["mean"] == pytest.approx(0.4)
    warned = caplog.text
    assert f"{tmp_path / '1' / 'metrics.json'} cannot be read" in warned
    assert f"{tmp_path / '2' / 'metrics.json'} holds list, not a JSON object" in warned
    assert f"{tmp_path / '3' / '.hydra' / 'overrides.yaml'} cannot be read" in warned
    assert (tmp_path / SUMMARY_CSV).is_file()


# ---- Optuna: a trial with a genuine error is failed with its error, and counts ------------------------------------
def test_a_failing_trial_is_marked_failed_with_its_error_and_is_not_retried(tmp_path):
    """No training: the trial's config is wrong (data.batch_size=0), so each run takes the start-up time only."""
    command = [
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.study_name=failing",
        "data.batch_size=0",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.data_dir={tmp_path / 'data'}",
        "trainer=cpu",
    ]
    sweep_dir = tmp_path / "logs" / "train" / "sweeps" / "failing"
    first = train_py(*command)
    assert first.returncode == 2, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    assert f"error: job 0 ({sweep_dir / '0'}): {BATCH_SIZE_0}" in first.stderr.splitlines()
    assert first.stderr.strip().splitlines()[-1].startswith("error: 1 job(s) of the multirun failed: 0 (")
    storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    (trial,) = optuna.load_study(study_name="failing", storage=storage).trials
    assert trial.state == TrialState.FAIL and trial.user_attrs["error"] == f"ConfigError: {BATCH_SIZE_0}"
    rows = list(csv.DictReader((sweep_dir / "trials.csv").read_text().splitlines()))
    assert [(r["state"], r["error"]) for r in rows] == [("FAIL", f"ConfigError: {BATCH_SIZE_0}")]

    again = train_py(*command)  # the failed trial counts: nothing runs again
    assert "already has 1 of 1 trials: continuing" in again.stdout + again.stderr
    assert len(optuna.load_study(study_name="failing", storage=storage).trials) == 1


# ---- Optuna: the resumed sweep state is checked ----------------------------------------------------------------
def test_a_sweep_dir_whose_optuna_db_is_not_a_study_is_one_line(tmp_path):
    sweep_dir = tmp_path / "logs" / "train" / "sweeps" / "broken"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "optuna.db").write_bytes(b"this is not an SQLite file" * 40)
    result = train_py(
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.study_name=broken",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.data_dir={tmp_path / 'data'}",
        "trainer=cpu",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {sweep_dir / 'optuna.db'}: not a usable Optuna study storage (DatabaseError: (sqlite3.DatabaseError) "
        f"file is not a database); delete {sweep_dir} to start the study over, or use another "
        "hydra.sweeper.study_name=NAME"
    )
    assert not (sweep_dir / "0").exists()  # no trial ran


def test_a_stored_study_with_another_direction_or_search_space_is_refused(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = {"model.optimizer.lr": FloatDistribution(1e-4, 1e-2, log=True)}
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.tell(study.ask(space), 0.5)
    fix = f"delete {tmp_path} to start the study over, or use another hydra.sweeper.study_name=NAME"
    same = {"study_name": "s", "storage": storage, "sampler": None, "pruner": None}
    assert open_study(**same, direction="maximize", space=space).trials[0].value == 0.5  # the same: continued
    with pytest.raises(ConfigError) as info:
        open_study(**same, direction="minimize", space=space)
    assert str(info.value) == (
        f"{tmp_path / 'optuna.db'}: study 's' was run to maximize, this command asks to minimize; {fix}"
    )
    wider = {"model.optimizer.lr": FloatDistribution(1e-5, 1e-2, log=True)}
    with pytest.raises(ConfigError) as info:
        open_study(**same, direction="maximize", space=wider)
    message = str(info.value)
    assert message.startswith(
        f"{tmp_path / 'optuna.db'}: study 's' was run with another search space (model.optimizer.lr: "
    )
    assert "low=0.0001" in message and "low=1e-05" in message and message.endswith(fix)


# ---- 6: W&B without credentials -----------------------------------------------------------------------------------
def test_wandb_without_an_api_key_and_not_offline_is_one_line(tmp_path, digits_data_dir):
    """A clean HOME (no ~/.netrc, no wandb settings), no WANDB_* variables and stdin not a terminal: wandb raises its
    ``UsageError`` before any request (it verifies no key it has not got); the server URL points at a closed local
    port all the same, so nothing could leave the machine."""
    (tmp_path / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_BASE_URL="http://127.0.0.1:9")
    result = train_py(
        "logger=wandb",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.data_dir={digits_data_dir}",
        *[a for a in TINY if a != "logger=csv"],
        env=env,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: logger=wandb: no W&B API key here; run `wandb login` (or set WANDB_API_KEY), or log offline with "
        "WANDB_MODE=offline (or logger.wandb.offline=true) and upload later with `wandb sync`"
    )
    assert not Path(tmp_path / "run" / "checkpoints").exists()  # stopped before training


# ---- the mechanisms, in-process ---------------------------------------------------------------------------------
class _Launcher:
    """Stands in for Hydra's launcher: each call takes the next outcome (a value, or an exception it raises)."""

    def __init__(self, *outcomes: object) -> None:
        self.outcomes, self.launched = list(outcomes), []

    def launch(self, job_overrides, initial_job_idx):
        self.launched.append(list(job_overrides[0]))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        job = JobReturn(status=JobStatus.COMPLETED)
        job.return_value = outcome
        return [job]


def test_a_trial_stopped_by_a_signal_is_run_again_and_does_not_count(tmp_path):
    """A job stopped by SIGTERM/SIGINT exits (``cli.user_errors``): the sweep stops, and the next one reruns it."""
    settings = {
        "study_name": "s",
        "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
        "direction": "maximize",
        "n_trials": 2,
        "n_jobs": 1,
        "sampler": optuna.samplers.RandomSampler(seed=0),
        "pruner": None,
        "params": {"model.dropout": "interval(0.0, 0.5)"},
    }
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    with pytest.raises(SystemExit):
        run_study(_Launcher(SystemExit(143)), config, [], **settings)
    study = optuna.load_study(study_name="s", storage=settings["storage"])
    stopped = study.trials[0]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["interrupted"] is True
    assert stopped.user_attrs["error"] == "stopped (exit code 143) while it ran; run again as a new trial"

    launcher = _Launcher(0.5, 0.7)
    study = run_study(launcher, config, [], **settings)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].params == stopped.params and trials[1].user_attrs["rerun_of"] == 0
    assert f"model.dropout={stopped.params['model.dropout']!r}" in launcher.launched[0]


def test_a_failed_job_is_recorded_for_the_summary_a_crash_with_its_traceback_a_pruned_trial_not(tmp_path, caplog):
    def job_config(num: int) -> DictConfig:
        return OmegaConf.create(
            {"hydra": {"runtime": {"output_dir": str(tmp_path / str(num))}, "job": {"num": num},
                       "overrides": {"task": [f"seed={num}"]}}}
        )  # fmt: skip

    def raised(error: Exception) -> Exception:  # with a traceback, as a job's error has
        try:
            raise error
        except Exception as caught:
            return caught

    outcomes = [JobFailed("x"), raised(RuntimeError("CUDA out of memory\nmore")), optuna.TrialPruned("pruned")]
    outcomes[0].__cause__ = ConfigError("data.batch_size=0 must be positive")
    for num, error in enumerate(outcomes):
        (tmp_path / str(num)).mkdir()
        job = JobReturn(status=JobStatus.FAILED)
        job.return_value = error
        MultirunSummary().on_job_end(job_config(num), job)
    assert json.loads((tmp_path / "0" / ERROR_JSON).read_text()) == {
        "job": 0,
        "error": "ConfigError: data.batch_size=0 must be positive",
        "user_error": True,
        "overrides": ["seed=0"],
    }
    assert json.loads((tmp_path / "1" / ERROR_JSON).read_text())["user_error"] is False
    assert "RuntimeError: CUDA out of memory" in caplog.text and "Traceback" in caplog.text  # a crash stays loud
    assert not (tmp_path / "2" / ERROR_JSON).exists()  # pruning is not a failure
    with pytest.raises(SystemExit) as exit_info:  # a crash among the failures: exit 1, as an uncaught error would
        MultirunSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert exit_info.value.code == 1
