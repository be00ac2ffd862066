"""Checkpoint code has one home (``image_finetune.checkpoints``), and moving a class there does not stop an old run
from resuming: its stored config names the old ``_target_``, which the resume guard reads as the same class."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import get_object
from omegaconf import OmegaConf

from image_finetune.core.errors import ConfigError
from image_finetune.core.moved import MOVED
from image_finetune.training.resume_guard import check_resume


def test_every_moved_target_resolves_where_it_lives_now():
    for new in MOVED.values():
        assert get_object(new).__module__ == new.rsplit(".", 1)[0]


def test_a_checkpoint_naming_the_old_checkpoint_io_resumes_with_no_change(tmp_path: Path):
    old, new = "image_finetune.checkpoint_io.AtomicCheckpointIO", "image_finetune.checkpoints.io.AtomicCheckpointIO"
    stored = {"trainer": {"max_epochs": 2, "plugins": [{"_target_": old}]}, "seed": 1}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "run_config": stored}, path)
    current = OmegaConf.create({**stored, "trainer": {"max_epochs": 2, "plugins": [{"_target_": new}]}})
    check = check_resume(current, str(path))
    assert check.refused == {} and check.benign == {}
    changed = OmegaConf.create({**stored, "trainer": {"max_epochs": 2, "plugins": [{"_target_": "x.Other"}]}})
    with pytest.raises(ConfigError, match=r"trainer\.plugins"):  # only the moved name is forgiven
        check_resume(changed, str(path))


def test_a_run_config_written_before_the_recipe_moved_resumes_with_no_change(tmp_path: Path):
    """The model, backbone, head, loss and metrics targets of a run from before ``recipe/`` name the same code."""
    old = {
        "_target_": "image_finetune.models.ImageClassifier",
        "backbone": {"_target_": "image_finetune.models.backbones.torchvision_backbone", "name": "resnet18"},
        "head": {"_target_": "image_finetune.models.heads.mlp_head", "hidden": 16},
        "loss": {"_target_": "image_finetune.models.losses.focal", "_partial_": True, "gamma": 2.0},
        "metrics": {"_target_": "image_finetune.models.metrics.classification_metrics", "_partial_": True},
    }
    new = {
        **old,
        "_target_": MOVED[old["_target_"]],
        **{k: {**old[k], "_target_": MOVED[old[k]["_target_"]]} for k in ("backbone", "head", "loss", "metrics")},
    }
    assert new["head"]["_target_"] == "image_finetune.recipe.heads.mlp_head"
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "run_config": {"model": old, "seed": 1}}, path)
    check = check_resume(OmegaConf.create({"model": new, "seed": 1}), str(path))
    assert check.refused == {} and check.benign == {}


def test_a_key_added_since_and_left_null_is_no_change_but_one_set_is(tmp_path: Path):
    """A run from before ``data.folds`` existed resumes; setting the new key changes the run and is refused."""
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "run_config": {"data": {"batch_size": 8}, "seed": 1}}, path)
    check = check_resume(OmegaConf.create({"data": {"batch_size": 8, "folds": None}, "seed": 1}), str(path))
    assert check.refused == {} and "data.folds" in check.benign
    with pytest.raises(ConfigError, match=r"data\.folds"):
        check_resume(OmegaConf.create({"data": {"batch_size": 8, "folds": 5}, "seed": 1}), str(path))
