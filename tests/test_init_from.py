"""`model.init_from=`: a new run starts from a finished run's weights (issue 18, item 11).

One 10-class digits run (A) is trained once for the module, as a user would (`python train.py`), with another seed
and the whole network training, so its weights differ from any fresh initialisation. The rest reuses its checkpoint:
a 3-class fine-tune from it and `eval.py` on that (subprocesses), and the loading rules in-process through the same
functions `train.py` calls (`init_from.read_init_weights` + `apply_init_weights`, which `InitFrom` runs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from shared_runs import once_per_session
from support import FAST, make_image_folder

from image_finetune.checkpoints import read_checkpoint
from image_finetune.core.errors import ConfigError, UserError
from image_finetune.inference.classifier import Classifier
from image_finetune.inference.export import export_classifier
from image_finetune.models.classifier import ImageClassifier
from image_finetune.recipe.backbones import torchvision_backbone
from image_finetune.training.init_from import InitFrom, apply_init_weights, init_from_callbacks, read_init_weights
from image_finetune.training.train import build

REPO = Path(__file__).resolve().parents[1]
TINY = ["trainer=cpu", "data.image_size=32", "model.backbone.weights=null", "data.num_workers=0", "logger=csv"]
DIGITS = [str(d) for d in range(10)]


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ)
    )


@pytest.fixture(scope="module")
def run_a(tmp_path_factory: pytest.TempPathFactory, digits_data_dir: Path) -> Path:
    """A's last.ckpt: digits (10 classes), one short epoch with the whole network training (finetune=full)."""

    def build(root: Path) -> None:  # once per session: both xdist workers share it (shared_runs.py)
        result = run_script(
            "train.py", "experiment=digits", *TINY, f"paths.data_dir={digits_data_dir}", f"hydra.run.dir={root / 'A'}",
            "finetune=full", "seed=7", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1", "test=false",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]

    return once_per_session(tmp_path_factory, "init_from", build) / "A" / "checkpoints" / "last.ckpt"


def net_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's network tensors under ``ClassifierNet``'s names."""
    return {k.removeprefix("net."): v for k, v in read_checkpoint(ckpt)["state_dict"].items() if k.startswith("net.")}


def fresh_model(class_names: list[str]) -> ImageClassifier:
    """The model train.build makes (head sized from the classes), before the file is applied."""
    torch.manual_seed(0)
    return ImageClassifier(backbone={"name": "resnet18", "weights": None}, class_names=class_names)


def assert_backbone_is(model: ImageClassifier, state: dict[str, torch.Tensor]) -> None:
    assert model.net is not None
    own = model.net.backbone.state_dict()
    theirs = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    assert own.keys() == theirs.keys()
    for key, value in own.items():
        assert torch.equal(value, theirs[key]), key


def test_a_10_class_run_starts_a_3_class_fine_tune_that_eval_then_tests(run_a, tmp_path):
    """The acceptance case, as a user runs it; A's file is deleted before eval: only B's checkpoint is read."""
    source = tmp_path / "A_last.ckpt"
    shutil.copy(run_a, source)
    a_state = net_state(run_a)
    folder = make_image_folder(tmp_path / "B_images", classes=3, per_class=12)
    run_b = tmp_path / "B"
    # One epoch of B is its frozen phase: the backbone's convolutions do not train, so B's checkpoint must hold A's.
    result = run_script(
        "train.py", "data=imagefolder", f"data.root={folder}", *TINY, f"hydra.run.dir={run_b}", "trainer.max_epochs=1",
        f"model.init_from={source}", "test=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    n = sum(k.startswith("backbone.") for k in a_state)
    line = (
        f"model.init_from='{source}': loaded backbone ({n} tensors); head new (3 classes; the checkpoint had 10); "
        "optimizer, epochs, EMA state and data split start fresh"
    )
    assert line in result.stdout + result.stderr
    assert line in (run_b / "train.log").read_text()

    b_ckpt = read_checkpoint(run_b / "checkpoints" / "last.ckpt")
    b_state = {k.removeprefix("net."): v for k, v in b_ckpt["state_dict"].items()}
    convs = [k for k, v in a_state.items() if k.startswith("backbone.") and v.ndim == 4]
    assert len(convs) == 20
    for key in convs:
        assert torch.equal(b_state[key], a_state[key]), key
    # a fresh run of its own: epoch 1 of B, its own classes, and the source recorded (not re-read, see below)
    assert b_ckpt["hyper_parameters"]["class_names"] == ["class_0", "class_1", "class_2"]
    assert b_ckpt["epoch"] == 0
    assert b_ckpt["hyper_parameters"]["init_from"] == str(source)
    assert b_ckpt["run_config"]["model"]["init_from"] == str(source)

    source.unlink()
    result = run_script(
        "eval.py", f"ckpt_path={run_b / 'checkpoints' / 'last.ckpt'}", "trainer=cpu", f"hydra.run.dir={tmp_path / 'E'}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    metrics = json.loads((tmp_path / "E" / "metrics.json").read_text())
    assert 0.0 <= metrics["test/acc"] <= 1.0


def test_another_architecture_is_one_line_naming_both(run_a, tmp_path):
    result = run_script(
        "train.py", "data=imagefolder", f"data.root={tmp_path / 'never_read'}", *TINY, f"hydra.run.dir={tmp_path / 'R'}",
        "model.backbone.name=resnet34", f"model.init_from={run_a}",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: model.init_from='{run_a}' holds a resnet18 (torchvision_backbone) backbone, but this run builds "
        "resnet34 (torchvision_backbone): the architectures must match. Set model.backbone.name=resnet18 (and the "
        "model group it was trained with), or leave model.init_from out"
    )


def test_the_new_classes_get_a_new_head_and_the_backbone_is_the_checkpoints(run_a):
    model = fresh_model(["cat", "dog", "owl"])
    assert model.net is not None
    head = {k: v.clone() for k, v in model.net.head.state_dict().items()}
    line = apply_init_weights(model, read_init_weights(str(run_a)))
    assert "; head new (3 classes; the checkpoint had 10);" in line
    assert_backbone_is(model, net_state(run_a))
    for key, value in model.net.head.state_dict().items():
        assert torch.equal(value, head[key]), key


def test_the_same_classes_load_the_head_too_and_another_order_is_reordered_by_name(run_a):
    a_state = net_state(run_a)
    model = fresh_model(DIGITS)
    line = apply_init_weights(model, read_init_weights(str(run_a)))
    assert line.endswith("and head (10 classes, same names); optimizer, epochs, EMA state and data split start fresh")
    assert_backbone_is(model, a_state)
    assert model.net is not None
    assert torch.equal(model.net.head[1].weight, a_state["head.1.weight"])
    assert torch.equal(model.net.head[1].bias, a_state["head.1.bias"])

    reordered = DIGITS[::-1]
    model = fresh_model(reordered)
    line = apply_init_weights(model, read_init_weights(str(run_a)))
    assert "and head (10 classes, same names in another order: rows reordered by name)" in line
    assert model.net is not None
    for row, name in enumerate(reordered):  # row i of the new head is the old row of the same class name
        assert torch.equal(model.net.head[1].weight[row], a_state["head.1.weight"][DIGITS.index(name)])
        assert torch.equal(model.net.head[1].bias[row], a_state["head.1.bias"][DIGITS.index(name)])


def test_an_exported_safetensors_starts_a_run_like_its_checkpoint(run_a, tmp_path):
    path = export_classifier(
        Classifier.from_checkpoint(run_a, device="cpu"),
        "safetensors",
        tmp_path / "model.safetensors",
        source=str(run_a),
    )
    model = fresh_model(DIGITS)
    line = apply_init_weights(model, read_init_weights(str(path)))
    assert line.startswith(f"model.init_from='{path}': loaded backbone (")
    assert "and head (10 classes, same names)" in line
    a_state = net_state(run_a)
    assert_backbone_is(model, a_state)
    assert model.net is not None
    assert torch.equal(model.net.head[1].weight, a_state["head.1.weight"])
    # and given as backbone weights, it is refused with a pointer to model.init_from
    with pytest.raises(ConfigError) as err:
        torchvision_backbone("resnet18", weights=str(path))
    assert str(err.value) == (
        f"model.backbone.weights='{path}' is a whole classifier of this project (a train.py checkpoint or an export.py "
        f".safetensors), not a backbone state_dict: to start a new run from it, use model.init_from={path} instead "
        '(README "Start from a finished run")'
    )


def test_a_checkpoint_as_backbone_weights_points_to_init_from(run_a):
    with pytest.raises(ConfigError, match=r"is a whole classifier of this project .* use model\.init_from="):
        torchvision_backbone("resnet18", weights=str(run_a))


def test_an_ema_checkpoint_gives_the_weights_it_evaluates_with(run_a, tmp_path):
    """``callbacks/ema.py``: ``state_dict`` holds the average (validated, tested, exported), ``current_model_state`` the
    raw weights that training continues; a new run starts from the average."""
    checkpoint = read_checkpoint(run_a)
    checkpoint["current_model_state"] = {k: v + 1 for k, v in checkpoint["state_dict"].items()}
    path = tmp_path / "ema.ckpt"
    torch.save(checkpoint, path)
    model = fresh_model(DIGITS)
    apply_init_weights(model, read_init_weights(str(path)))
    assert_backbone_is(model, net_state(run_a))


def test_damaged_files_are_one_line(run_a, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(run_a.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"^model\.init_from='.*truncated\.ckpt' cannot be read: it is truncated"):
        read_init_weights(str(truncated))
    exported = tmp_path / "model.safetensors"
    export_classifier(Classifier.from_checkpoint(run_a, device="cpu"), "safetensors", exported, source=str(run_a))
    exported.write_bytes(exported.read_bytes()[:1000])
    with pytest.raises(UserError, match=r"^model\.init_from='.*model\.safetensors' cannot be read: it is truncated"):
        read_init_weights(str(exported))
    with pytest.raises(UserError, match=r"^model\.init_from='.*nope\.ckpt': no such file$"):
        read_init_weights(str(tmp_path / "nope.ckpt"))


def test_a_resumed_run_never_reads_init_from(run_a, compose_cfg, image_folder, tmp_path):
    """The file may be gone by then: a resume (and every later fit of the run) takes its weights from its checkpoint."""
    gone = tmp_path / "gone.ckpt"
    overrides = ["data=imagefolder", f"data.root={image_folder}", "model.backbone.weights=null", *FAST]
    run = build(compose_cfg(*overrides, f"model.init_from={gone}", f"ckpt_path={run_a}"))
    assert not any(isinstance(c, InitFrom) for c in run.trainer.callbacks)
    with pytest.raises(UserError, match=r"^model\.init_from='.*gone\.ckpt': no such file$"):
        build(compose_cfg(*overrides, f"model.init_from={gone}"))

    # A fresh run's callback applies the file at its first fit only; a fit that restores a checkpoint keeps it.
    (callback,) = init_from_callbacks(str(run_a), fresh_model(DIGITS).backbone)
    model = fresh_model(DIGITS)
    assert model.net is not None
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    callback.setup(SimpleNamespace(ckpt_path="phase2.ckpt"), model, "fit")  # type: ignore[arg-type]
    callback.setup(SimpleNamespace(ckpt_path=None), model, "fit")  # type: ignore[arg-type]
    for key, value in model.net.state_dict().items():
        assert torch.equal(value, before[key]), key
    other = fresh_model(DIGITS)
    callback.setup(SimpleNamespace(ckpt_path=None), other, "fit")  # type: ignore[arg-type]
    assert_backbone_is(other, net_state(run_a))
