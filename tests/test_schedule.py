"""The schedule as data (phases from the `finetune` group), backbone stages, and the stages' learning rates."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from image_finetune.core.errors import ConfigError
from image_finetune.models.stages import stage_names, torchvision_stages
from image_finetune.recipe.backbones import _replace_classifier
from image_finetune.training.schedule import FinetuneSchedule, Phase, stage_lr_ratios

SRC = Path(__file__).resolve().parents[1] / "src" / "image_finetune"


def test_the_presets_and_freeze_epochs_are_the_simple_cases(compose_cfg):
    phases = {
        preset: FinetuneSchedule.from_config(compose_cfg(f"finetune={preset}").finetune).phases()
        for preset in ("freeze_then_unfreeze", "full", "linear_probe", "gradual")
    }
    assert phases["freeze_then_unfreeze"] == (Phase(0, 1, 0), Phase(1, None, None))
    assert phases["full"] == (Phase(0, None, None),)
    assert phases["linear_probe"] == (Phase(0, None, 0),)
    assert phases["gradual"] == (Phase(0, 1, 0), Phase(1, 2, 1), Phase(2, 3, 2), Phase(3, None, None))
    assert FinetuneSchedule(freeze_epochs=3).phases() == (Phase(0, 3, 0), Phase(3, None, None))


def test_a_run_resumes_in_the_phase_of_its_epoch():
    schedule = FinetuneSchedule.from_config({"freeze_epochs": 2, "unfreeze": [[2, 1], [4, "all"]]})
    assert [schedule.phase_at(epoch) for epoch in range(7)] == [0, 0, 1, 1, 2, 2, 2]


@pytest.mark.parametrize(
    ("finetune", "message"),
    [
        ({"freeze_epochs": -1}, "freeze_epochs must be >= 0"),
        ({"freeze_epochs": 1, "unfreeze": [[1, 2], [2, 1]]}, "rising epochs and rising stage counts"),
        ({"freeze_epochs": 1, "unfreeze": [[1, 1], [1, 2]]}, "rising epochs"),
        ({"freeze_epochs": 1, "unfreeze": [[1, 0]]}, "rising stage counts"),
        ({"freeze_epochs": 1, "unfreeze": [[2, 1]]}, "set finetune.freeze_epochs=2"),
        ({"freeze_epochs": 1, "unfreeze": [[1, "some"]]}, "stages must be a count or 'all'"),
        ({"freeze_epochs": 1, "unfreeze": [1, 2]}, r"each step is \[epoch, stages\]"),
    ],
)
def test_bad_schedules_are_one_line_config_errors(finetune, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneSchedule.from_config(finetune)


def test_geometric_spread_is_fastais_slice_and_flat_is_one_ratio():
    assert stage_lr_ratios(4, 0.1, "flat") == (0.1,) * 4
    ratios = stage_lr_ratios(4, 0.01, "geometric")  # stem at 0.01, then x 0.01 ** (-1/4) per stage; the head at 1
    assert ratios == pytest.approx((0.01, 0.01**0.75, 0.01**0.5, 0.01**0.25))
    with pytest.raises(ConfigError, match="lr_spread='steep' is not one of flat, geometric"):
        stage_lr_ratios(4, 0.1, "steep")


def test_the_schedule_is_a_leaf_and_no_module_imports_in_a_circle():
    """schedule.py imports nothing heavy; the model does not import the driver (finetune.py) any more."""

    def imports(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
        }

    leaf = {"__future__", "collections.abc", "dataclasses", "typing", "image_finetune.core.errors"}
    assert imports(SRC / "training" / "schedule.py") <= leaf
    assert "image_finetune.training.finetune" not in imports(SRC / "models" / "classifier.py")


@pytest.mark.parametrize(
    ("name", "count", "first", "last"),
    [
        ("resnet18", 5, ("conv1.", "bn1."), ("layer4.",)),
        ("resnext50_32x4d", 5, ("conv1.", "bn1."), ("layer4.",)),
        ("efficientnet_b0", 9, ("features.0.",), ("features.8.",)),
        ("mobilenet_v3_small", 13, ("features.0.",), ("features.12.", "classifier.")),
        ("convnext_tiny", 5, ("features.0.",), ("features.6.", "features.7.", "classifier.")),
        ("regnet_y_400mf", 5, ("stem.",), ("trunk_output.block4.",)),
        ("vit_b_16", 13, ("conv_proj.", "class_token", "encoder.pos_embedding"), None),
        ("swin_t", 5, ("features.0.",), ("features.6.", "features.7.", "norm.")),
        ("squeezenet1_0", None, None, None),  # no Linear head: the generic split over top-level children
    ],
)
def test_every_backbone_parameter_belongs_to_exactly_one_stage(name, count, first, last):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):  # no memory, no init cost
                model = torchvision.models.get_model(name)
        except NotImplementedError:  # RegNet's init copies tensors
            model = torchvision.models.get_model(name)
    if name != "squeezenet1_0":
        _replace_classifier(model)
    stages = torchvision_stages(model)
    for param_name, _ in model.named_parameters():
        owners = [i for i, prefixes in enumerate(stages) if any(param_name.startswith(p) for p in prefixes)]
        assert len(owners) == 1, f"{name}: {param_name} is in stages {owners}"
    assert len(set(stage_names(stages))) == len(stages)
    if count is not None:
        assert (len(stages), stages[0]) == (count, first)
    if last is not None:
        assert stages[-1] == last
