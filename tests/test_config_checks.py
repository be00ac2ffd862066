"""Config values that cannot work get one line naming the key and the fix, before anything heavy runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import FAST

from image_finetune.core.config_checks import check_config
from image_finetune.core.errors import ConfigError
from image_finetune.training.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.batch_size=0"], r"^data.batch_size=0 must be a positive number of images per batch .*=64$"),
        (["data.batch_size=-8"], r"^data.batch_size=-8 must be a positive number"),
        (["data.image_size=0"], r"^data.image_size=0 must be a positive number of pixels .*data.image_size=224$"),
        (["data.image_size=big"], r"^data.image_size='big' must be a whole number, e.g. data.image_size=224$"),
        (["data=imagefolder"], r"^data.root is not set: point it at your images, e.g. data.root=~/pets"),
        (
            ["data.val_fraction=0"],
            r"^data.val_fraction=0 leaves no validation split, .*or give data.root a val/ folder",
        ),
        (
            ["trainer.max_epochs=0"],
            r"^trainer.max_epochs=0 must be a whole number of epochs >= 1, e.g. trainer.max_epochs=10",
        ),
        (["trainer.max_epochs=-1"], r"^trainer.max_epochs=-1 must be a whole number of epochs >= 1"),
    ],
)
def test_impossible_data_values_are_one_line_naming_the_key_and_the_fix(compose_cfg, overrides, message):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)
    with pytest.raises(ConfigError, match=message):  # train() checks first, before building anything
        train(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("trainer", ["gpu", "ddp"])
def test_a_gpu_trainer_without_a_gpu_suggests_trainer_cpu(compose_cfg, trainer):
    with pytest.raises(ConfigError, match=r"^trainer.accelerator=gpu .* no usable CUDA GPU: use trainer=cpu"):
        check_config(compose_cfg(f"trainer={trainer}"))


def test_a_sound_config_passes(compose_cfg, image_folder):
    check_config(compose_cfg())
    check_config(compose_cfg("experiment=imagefolder", f"data.root={image_folder}", *FAST))


def test_config_checks_import_nothing_heavy():
    code = "import sys, image_finetune.core.config_checks; print(sorted({'torch', 'lightning', 'hydra'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_missing_data_root_on_the_command_line_is_one_line_not_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "data=imagefolder", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "MissingMandatoryValue" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: data.root is not set")
