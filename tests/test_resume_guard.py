"""A resumed run is the run it claims to be: `train.py ... ckpt_path=last` with a setting that changes the result is
refused in one line naming each changed key old -> new; settings that cannot change it (a longer run, workers, a
moved data folder, where files go) are allowed and logged; `+resume.allow_changes=[...]` lets a change through and
the run records it. `trainer.max_epochs` that leaves nothing to train is one line too (issue 18, items 1 and 10)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from image_finetune.checkpoints import resume_epoch
from image_finetune.core.errors import ConfigError
from image_finetune.training.resume_guard import (
    ALLOWED,
    UNSET,
    allow_changes,
    check_epochs,
    check_resume,
    compare,
    describe,
    refusal,
    world_size,
)
from image_finetune.training.schedule import FinetuneSchedule

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2


def train_py(run_dir: Path, data_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """`python train.py` on the digits folder as a user runs it, a few batches per epoch."""
    command = [
        sys.executable, "train.py", "model.backbone.weights=null", "trainer=cpu", "data.image_size=32",
        "data.batch_size=16", "data.num_workers=0", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2",
        "test=false", f"trainer.max_epochs={EPOCHS}", f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
        "~callbacks.train_images", "~callbacks.misclassified", "~callbacks.confusion_matrix", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, digits_data_dir: Path) -> Path:
    """One finished 2-epoch run (the unfreeze after epoch 1 included); tests that train more resume a copy of it."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = train_py(run_dir, digits_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


# ---- train.py: refused -------------------------------------------------------------------------------------------
def test_a_resume_with_a_changed_image_size_is_refused_in_one_line_and_writes_nothing(trained, digits_data_dir):
    last = trained / "checkpoints" / "last.ckpt"
    before = {p: p.read_bytes() for p in (trained / ".hydra").iterdir()}
    stamp = last.stat().st_mtime_ns
    result = train_py(trained, digits_data_dir, "ckpt_path=last", "trainer.max_epochs=3", "data.image_size=64")
    assert one_line_error(result) == (
        f"error: ckpt_path={last} was trained with data.image_size=32; this command has data.image_size=64. A resume "
        f"must continue the same run: drop these overrides, or start a new run from these weights with "
        f"model.init_from={last} (in a new run dir), or allow them with +resume.allow_changes=[data.image_size]"
    )
    assert {p: p.read_bytes() for p in (trained / ".hydra").iterdir()} == before, ".hydra/ of the run was rewritten"
    assert last.stat().st_mtime_ns == stamp
    assert not (trained / "resume_history.json").exists()


# ---- train.py: allowed -------------------------------------------------------------------------------------------
def test_a_longer_run_with_moved_data_and_more_workers_resumes_and_says_what_changed(
    trained, digits_data_dir, tmp_path
):
    """`trainer.max_epochs` extended trains the extra epoch; a moved data folder (the split is pinned by relative
    paths in data_split.json), another worker count and another run dir (the copy) change nothing and are logged."""
    run_dir = copy_of(trained, tmp_path)
    moved = shutil.copytree(digits_data_dir / "digits", tmp_path / "moved" / "digits")
    result = train_py(
        run_dir, digits_data_dir, "ckpt_path=last", "trainer.max_epochs=3", f"data.root={moved}", "data.num_workers=1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    log = result.stdout + result.stderr
    assert f"Resuming {last} with changes that leave the result as it was: " in log
    assert f"data.root {digits_data_dir / 'digits'} -> {moved}" in log
    assert "data.num_workers 0 -> 1" in log and "trainer.max_epochs 2 -> 3" in log
    assert resume_epoch(last) == 3, "the extra epoch was trained"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["last"]["epoch"] == 3
    assert "resume_changes" not in metrics, "nothing that changes the result was allowed"
    [entry] = json.loads((run_dir / "resume_history.json").read_text())
    assert entry["allowed_changes"] == {} and entry["resumed_at_epoch"] == EPOCHS + 1
    assert entry["other_changes"]["trainer.max_epochs"] == {"old": 2, "new": 3}


def test_allow_changes_lets_a_changed_batch_size_through_and_the_run_records_it(trained, digits_data_dir, tmp_path):
    """`+resume.allow_changes=[...]` (Hydra's `+`: `resume` is not in train.yaml) with a list; a key named there that
    did not change (model.dropout) is harmless."""
    run_dir = copy_of(trained, tmp_path)
    result = train_py(
        run_dir, digits_data_dir, "ckpt_path=last", "trainer.max_epochs=3", "data.batch_size=8",
        "+resume.allow_changes=[data.batch_size,model.dropout]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    history = run_dir / "resume_history.json"
    assert (
        f"Resuming {last} with changes allowed by resume.allow_changes (recorded in {history} and metrics.json): "
        "data.batch_size 16 -> 8"
    ) in result.stdout + result.stderr
    [entry] = json.loads(history.read_text())
    assert entry["allowed_changes"] == {"data.batch_size": {"old": 16, "new": 8}}
    assert entry["ckpt_path"] == str(last)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [change["allowed_changes"] for change in metrics["resume_changes"]] == [entry["allowed_changes"]]
    assert metrics["last"]["epoch"] == 3
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").data.batch_size == 8


# ---- train.py: epoch limits (item 10) ----------------------------------------------------------------------------
def test_max_epochs_below_or_at_a_finished_checkpoint_is_one_line(trained, digits_data_dir):
    last = trained / "checkpoints" / "last.ckpt"
    evaluate = f"to evaluate it as it is, run eval.py ckpt_path={last}"
    below = train_py(trained, digits_data_dir, "ckpt_path=last", "trainer.max_epochs=1")
    assert one_line_error(below) == (
        f"error: trainer.max_epochs=1 but ckpt_path={last} ends after epoch 2 (epochs counted from 1): nothing would "
        f"train. To continue it, give trainer.max_epochs=3 or more; {evaluate}"
    )
    finished = train_py(trained, digits_data_dir, "ckpt_path=last")
    assert one_line_error(finished) == (
        f"error: ckpt_path={last} is a finished run: it trained all trainer.max_epochs=2 epochs, so there is nothing "
        f"to resume. To train it longer, resume with a larger trainer.max_epochs (e.g. trainer.max_epochs=4); "
        f"{evaluate}"
    )


@pytest.mark.parametrize("max_epochs", ["0", "-1"])
def test_max_epochs_below_one_is_one_line(tmp_path, digits_data_dir, max_epochs):
    result = train_py(tmp_path / "run", digits_data_dir, f"trainer.max_epochs={max_epochs}")
    assert one_line_error(result) == (
        f"error: trainer.max_epochs={max_epochs} must be a whole number of epochs >= 1, e.g. trainer.max_epochs=10 "
        "(to test a checkpoint without training, run eval.py ckpt_path=...)"
    )
    assert not (tmp_path / "run" / "metrics.json").exists()


# ---- the comparison, in process ------------------------------------------------------------------------------------
STORED = {
    "seed": 42,
    "ckpt_path": None,
    "paths": {"output_dir": "/runs/a"},
    "data": {"image_size": 32, "batch_size": 16, "num_workers": 0, "augment": {"name": "none", "hflip": False}},
    "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "log_every_n_steps": 10},
    "callbacks": {"progress_bar": {"plain": None}, "model_checkpoint": {"dirpath": "/runs/a/checkpoints"}},
}


def changed(**dotted: object) -> dict:
    config = json.loads(json.dumps(STORED))
    for key, value in dotted.items():
        *parents, leaf = key.split("__")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        if value is UNSET:
            node.pop(leaf)
        else:
            node[leaf] = value
    return config


def test_changes_that_cannot_alter_the_result_are_benign_and_every_other_is_refused():
    current = changed(
        ckpt_path="last", paths__output_dir="/runs/b", data__num_workers=4, trainer__max_epochs=5,
        trainer__log_every_n_steps=1, callbacks__progress_bar=UNSET, callbacks__model_checkpoint__dirpath="/runs/b/c",
        data__image_size=64, data__augment__hflip=True, seed=7, trainer__precision="bf16-mixed",
    )  # fmt: skip
    benign, allowed, refused = compare(STORED, current)
    assert benign == {
        "ckpt_path": (None, "last"),
        "paths.output_dir": ("/runs/a", "/runs/b"),
        "data.num_workers": (0, 4),
        "trainer.max_epochs": (2, 5),
        "trainer.log_every_n_steps": (10, 1),
        "callbacks.progress_bar": ({"plain": None}, UNSET),  # a removed subtree is one change
        "callbacks.model_checkpoint.dirpath": ("/runs/a/checkpoints", "/runs/b/c"),
    }
    assert allowed == {}
    assert refused == {
        "seed": (42, 7),
        "data.image_size": (32, 64),
        "data.augment.hflip": (False, True),
        "trainer.precision": (UNSET, "bf16-mixed"),  # an added key counts
    }
    # the user's opt-in: a key, a section, or everything; a named key that did not change is harmless
    benign2, allowed2, refused2 = compare(STORED, current, ["seed", "data.augment", "model.dropout"])
    assert benign2 == benign and set(allowed2) == {"seed", "data.augment.hflip"}
    assert set(refused2) == {"data.image_size", "trainer.precision"}
    assert compare(STORED, current, ["all"])[2] == {}
    # model.init_from (a fresh run's starting weights) is never read by a resume; the rest of model.* is refused
    assert compare({"model": {"init_from": "/a.ckpt"}}, {"model": {"init_from": None}})[0] == {
        "model.init_from": ("/a.ckpt", None)
    }


def test_a_type_change_counts_even_when_the_values_compare_equal():
    assert compare(STORED, changed(data__augment__hflip=0))[2] == {"data.augment.hflip": (False, 0)}


@pytest.mark.parametrize(
    "trainer, same",
    [
        ({"devices": 1, "strategy": "ddp"}, True),  # one process either way
        ({"devices": [0]}, True),
        ({"devices": "auto"}, True),  # Lightning's CPU accelerator counts one device
        ({"devices": 2, "strategy": "ddp"}, False),  # trainer=ddp_sim: the global batch doubles
        ({"devices": 1, "num_nodes": 2}, False),
        ({"accelerator": "gpu", "devices": 1}, False),  # another device type
    ],
)
def test_devices_nodes_and_strategy_may_change_only_within_the_same_world_size(trainer, same):
    current = changed(**{f"trainer__{k}": v for k, v in trainer.items()})
    benign, _, refused = compare(STORED, current)
    assert (
        (not refused and benign)
        if same
        else set(refused) & {"trainer.devices", "trainer.num_nodes", "trainer.accelerator"}
    )


def test_a_world_size_the_config_alone_does_not_give_is_not_proven():
    assert world_size({"accelerator": "gpu", "devices": -1}) is None
    assert world_size({"accelerator": "gpu", "devices": "auto"}) is None
    assert world_size({"accelerator": "gpu", "devices": "0,1", "num_nodes": 2}) == 4


def test_the_refusal_stays_one_readable_line_for_many_keys():
    refused = {f"model.k{i}": (i, i + 1) for i in range(9)} | {"data.image_size": (32, 64)}
    message = refusal("/r/last.ckpt", refused)
    assert "\n" not in message
    assert "was trained with model.k0=0, model.k1=1, model.k2=2, model.k3=3, model.k4=4, model.k5=5 and 4 more;" in (
        message
    )
    assert message.endswith("allow them with +resume.allow_changes=[data,model]")


def test_every_allowed_key_says_why():
    assert all(isinstance(reason, str) and reason for reason in ALLOWED.values())


def test_allow_changes_must_list_keys():
    assert allow_changes(OmegaConf.create({"resume": {"allow_changes": ["data.batch_size"]}})) == ("data.batch_size",)
    assert allow_changes(OmegaConf.create({"resume": {"allow_changes": "seed"}})) == ("seed",)
    assert allow_changes(OmegaConf.create({})) == ()
    with pytest.raises(ConfigError, match=r"resume.allow_changes=\[3\] must list config keys"):
        allow_changes(OmegaConf.create({"resume": {"allow_changes": [3]}}))


def test_a_checkpoint_without_a_run_config_is_one_line_unless_all_changes_are_allowed(tmp_path):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "epoch": 0}, foreign)
    cfg = OmegaConf.create({"ckpt_path": str(foreign), "trainer": {"max_epochs": 3}})
    with pytest.raises(
        ConfigError, match=r"holds no run config .* or resume it anyway with \+resume.allow_changes=\[all\]$"
    ):
        check_resume(cfg, str(foreign))
    cfg.resume = {"allow_changes": ["all"]}
    assert check_resume(cfg, str(foreign)).refused == {}


def finished_checkpoint(epochs: int) -> dict:
    progress = {"ready": epochs, "started": epochs, "processed": epochs, "completed": epochs}
    return {"state_dict": {}, "loops": {"fit_loop": {"epoch_progress": {"current": progress}}}}


def test_a_finished_run_requeued_by_slurm_is_let_through_to_finish_its_test(monkeypatch):
    """The SLURM requeue default (`ckpt_path: ${resume_if_requeued:...}`) may resume a run that finished training
    but was requeued while testing: that must go on (and test); the same checkpoint named by the user is refused."""
    stored = {"trainer": {"max_epochs": 2}}
    monkeypatch.setenv("REQUEUED_CKPT", "last")
    requeued = OmegaConf.create({"ckpt_path": "${oc.env:REQUEUED_CKPT}", "trainer": {"max_epochs": 2}})
    check_epochs(requeued, finished_checkpoint(2), "/r/last.ckpt", stored)
    named = OmegaConf.create({"ckpt_path": "last", "trainer": {"max_epochs": 2}})
    with pytest.raises(ConfigError, match="is a finished run"):
        check_epochs(named, finished_checkpoint(2), "/r/last.ckpt", stored)


def test_a_checkpoint_saved_mid_epoch_names_the_epoch_it_stopped_in():
    checkpoint = finished_checkpoint(2)
    checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["started"] = 3
    cfg = OmegaConf.create({"ckpt_path": "last", "trainer": {"max_epochs": 2}})
    with pytest.raises(ConfigError, match=r"stopped during epoch 3 \(epochs counted from 1\): nothing would train"):
        check_epochs(cfg, checkpoint, "/r/last.ckpt", {"trainer": {"max_epochs": 4}})
    cfg.trainer.max_epochs = 3
    check_epochs(cfg, checkpoint, "/r/last.ckpt", {"trainer": {"max_epochs": 4}})  # epoch 3 is still to finish


def test_the_log_line_lists_what_the_user_chose_before_the_paths_that_follow_the_run_dir():
    changes = {
        "paths.output_dir": ("/runs/a", "/runs/b"),
        "ckpt_path": (None, "last"),
        "data.root": ("/data/a", "/data/b"),
        "trainer.max_epochs": (2, 3),
    }
    assert describe(changes) == (
        "data.root /data/a -> /data/b, trainer.max_epochs 2 -> 3, paths.output_dir /runs/a -> /runs/b"
    )


def test_max_epochs_that_ends_before_an_unfreeze_step_warns_and_the_schedule_is_unchanged():
    """The schedule's semantics stay as they are: a step at or after max_epochs is simply never reached; say so."""
    gradual = FinetuneSchedule(freeze_epochs=1, unfreeze=((1, 1), (2, 2), (3, None)))
    assert gradual.unreached(4) == []
    assert gradual.unreached(3) == [
        "finetune.unfreeze steps at epoch(s) 3 (counted from 0) start at or after trainer.max_epochs=3: those stages "
        "never unfreeze. Raise trainer.max_epochs or move the steps earlier"
    ]
    assert gradual.unreached(1)[0].startswith("finetune.freeze_epochs=1 >= trainer.max_epochs=1: the backbone never")
    assert FinetuneSchedule(freeze_epochs=None).unreached(1) == []  # linear probe: frozen on purpose
    assert FinetuneSchedule(freeze_epochs=0).unreached(1) == []  # full fine-tune
    assert [p.end for p in gradual.phases()] == [1, 2, 3, None]
