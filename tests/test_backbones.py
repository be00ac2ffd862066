"""Backbones are Hydra targets (torchvision and timm) that own their preprocessing and stages; checkpoints of either
rebuild with no code change, through allow-listed builders only.

timm weights come through timm's real loader: a seeded Hugging Face cache (``timm_pretrained``) or a local file.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from safetensors.torch import load_file
from support import TIMM_MODEL, make_image_folder, seed_hf_cache
from torch import nn

from image_finetune.core.errors import ConfigError, UserError
from image_finetune.data.preprocessing import Preprocessing
from image_finetune.inference.classifier import Classifier, sidecar_path
from image_finetune.inference.export import load_exported
from image_finetune.models.classifier import ImageClassifier
from image_finetune.models.norms import is_norm_layer
from image_finetune.recipe.backbones import Backbone, torchvision_backbone
from image_finetune.recipe.timm_backbone import timm_backbone

timm = pytest.importorskip("timm")

REPO = Path(__file__).resolve().parents[1]
TIMM = ("model=timm", f"model.backbone.name={TIMM_MODEL}")


def assert_stages_partition(backbone: Backbone) -> None:
    """Every parameter of the module falls in exactly one stage, and there is more than one stage."""
    prefixes = [(i, p) for i, stage in enumerate(backbone.stages) for p in stage]
    for name, _ in backbone.module.named_parameters():
        owners = {i for i, p in prefixes if name.startswith(p)}
        assert len(owners) == 1, f"{name} is in stages {owners}"
    assert len(backbone.stages) > 2


def seeded_weights() -> dict[str, torch.Tensor]:
    """The state dict ``seed_hf_cache`` writes (it seeds torch with 0)."""
    torch.manual_seed(0)
    return timm.create_model(TIMM_MODEL, pretrained=False).state_dict()


def test_model_group_instantiates_either_zoo_as_one_backbone_object(compose_cfg, pretrained, timm_pretrained):
    tv = instantiate(compose_cfg().model.backbone)
    assert isinstance(tv, Backbone) and tv.pretrained and tv.num_features == 512
    assert tv.preprocessing == Preprocessing(224, 0.875, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
    assert tv.stages == (("conv1.", "bn1."), ("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",))
    assert compose_cfg("model=resnet").model == compose_cfg("model=torchvision").model  # the old name still works

    tm = instantiate(compose_cfg(*TIMM).model.backbone)
    assert isinstance(tm, Backbone) and tm.pretrained and tm.num_features == 256
    # timm's own pretrained config for this tag: 160 px, crop_pct 0.95, bicubic
    prep = tm.preprocessing
    assert (prep.size, prep.crop_ratio, prep.interpolation) == (160, 0.95, "bicubic")
    assert tm.stages[0] == ("conv_stem.", "bn1.") and ("blocks.0.",) in tm.stages
    assert_stages_partition(tm)
    assert tm.config == {
        "_target_": "image_finetune.recipe.timm_backbone.timm_backbone",
        "name": TIMM_MODEL,
        "weights": "DEFAULT",
        "allow_random_init": True,
    }  # fmt: skip  (the digits demo may fall back)
    assert torch.equal(tm.module.conv_stem.weight, seeded_weights()["conv_stem.weight"])  # the seeded hub file
    assert tm.module(torch.rand(2, 3, 32, 32)).shape == (2, 256)  # headless: pooled features


def test_timm_weights_from_a_local_file_go_through_timms_loader(tmp_path):
    file = next(seed_hf_cache(tmp_path / "cache").rglob("model.safetensors"))
    backbone = timm_backbone(TIMM_MODEL, weights=str(file))
    assert backbone.pretrained and torch.equal(backbone.module.conv_stem.weight, load_file(file)["conv_stem.weight"])
    torch.save(nn.Linear(3, 3).state_dict(), tmp_path / "other.pth")
    with pytest.raises(
        ConfigError, match=r"other\.pth' does not fit timm's test_efficientnet\.r160_in1k: Missing keys"
    ):
        timm_backbone(TIMM_MODEL, weights=str(tmp_path / "other.pth"))


def test_timm_offline_without_weights_names_the_cache_path_unless_the_demo_falls_back(tmp_path, monkeypatch, caplog):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    folder = tmp_path / "empty" / "models--timm--test_efficientnet.r160_in1k"
    with pytest.raises(ConfigError) as info:
        timm_backbone(TIMM_MODEL)
    message = str(info.value)
    assert "\n" not in message and str(folder) in message
    assert "model.backbone.weights=/path/to/model.safetensors" in message and "model.backbone.weights=null" in message
    fallback = timm_backbone(TIMM_MODEL, allow_random_init=True)
    assert not fallback.pretrained and "TRAINING FROM RANDOM INITIALISATION" in caplog.text


@pytest.mark.parametrize(
    ("name", "weights", "message"),
    [
        ("resnet_nope", "DEFAULT", r"'resnet_nope' is not a timm model\. Did you mean"),
        ("test_efficientnet.bogus", "DEFAULT", r"Invalid pretrained tag \(bogus\).*\['test_efficientnet\.r160_in1k'\]"),
        (TIMM_MODEL, "IMAGENET1K_V1", r"weights='IMAGENET1K_V1': for a timm model use DEFAULT"),
        (TIMM_MODEL, "/no/such/file.safetensors", r"no such file"),
    ],
)
def test_unknown_timm_names_and_weights_are_clear_errors(name, weights, message):
    with pytest.raises(ConfigError, match=message):
        timm_backbone(name, weights)


def test_model_timm_without_timm_installed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` sees when it is not installed
    with pytest.raises(ConfigError, match=r"^model=timm needs the timm package: pip install 'image-finetune\[timm\]'$"):
        timm_backbone(TIMM_MODEL)


def test_norm_layers_of_torchvision_and_timm_are_recognised():
    from timm.layers import BatchNormAct2d, EvoNorm2dS0, GroupNormAct, LayerNorm2d, RmsNorm
    from torchvision.ops import FrozenBatchNorm2d

    norms = [nn.BatchNorm2d(4), nn.SyncBatchNorm(4), nn.GroupNorm(2, 4), nn.LayerNorm(4), nn.InstanceNorm2d(4),
             BatchNormAct2d(4), GroupNormAct(4, 2), LayerNorm2d(4), EvoNorm2dS0(4), RmsNorm(4)]  # fmt: skip
    assert all(is_norm_layer(m) for m in norms), [type(m).__name__ for m in norms if not is_norm_layer(m)]
    assert not any(is_norm_layer(m) for m in (nn.Conv2d(3, 4, 3), nn.Linear(4, 4), nn.Sequential(nn.BatchNorm2d(4))))
    assert not list(FrozenBatchNorm2d(4).parameters())  # nothing to train or freeze: no need to recognise it


# LayerNorm2d, GroupNormAct
@pytest.mark.parametrize("name", ["test_convnext.r160_in1k", "test_efficientnet_gn.r160_in1k"])
def test_train_bn_keeps_every_norm_layer_of_a_frozen_backbone_training(name):
    model = ImageClassifier(backbone=timm_backbone(name, None), class_names=["a", "b"])
    model.set_trainable_stages(0)  # frozen (what finetune.fit sets for the frozen phase)
    model._apply_freeze()
    model.train()
    modules = [m for m in model.net.backbone.modules() if list(m.parameters(recurse=False))]
    norms = [m for m in modules if is_norm_layer(m)]
    assert norms and len(norms) < len(modules)
    for m in modules:
        assert all(p.requires_grad == is_norm_layer(m) for p in m.parameters(recurse=False)), type(m).__name__
        assert m.training == is_norm_layer(m), type(m).__name__


def test_the_data_module_applies_the_backbones_preprocessing_unless_the_data_sets_its_size(
    compose_cfg, timm_pretrained
):
    from torchvision.transforms import InterpolationMode

    from image_finetune.training.train import build

    folder = make_image_folder(Path(compose_cfg().paths.data_dir) / "images")
    run = build(compose_cfg(*TIMM, "data=imagefolder", f"data.root={folder}", "data.num_workers=0"))
    assert run.datamodule.preprocessing == run.model.backbone.preprocessing  # 160 px, crop 0.95, bicubic
    common = (*TIMM, "data=imagefolder", f"data.root={folder}", "data.num_workers=0")
    run = build(compose_cfg(*common, "data.image_size=32"))
    assert run.datamodule.preprocessing == run.model.backbone.preprocessing.override(size=32)
    run.datamodule.setup("fit")
    datasets = run.datamodule.datasets
    train_crop, val_resize = datasets["train"].transform.transforms[0], datasets["val"].transform.transforms[0]
    assert train_crop.interpolation == val_resize.interpolation == InterpolationMode.BICUBIC


def test_preprocessing_values_round_trip_and_bad_values_are_one_line_errors():
    prep = Preprocessing(160, 0.95, (0.5,) * 3, (0.5,) * 3, "bicubic")
    assert Preprocessing.from_dict(json.loads(json.dumps(prep.as_dict()))) == prep
    assert prep.override(size=32) == Preprocessing(32, 0.95, (0.5,) * 3, (0.5,) * 3, "bicubic")
    old_json = {"resize": 37, "crop": 32, "interpolation": "bilinear, antialiased", "mean": [0.5] * 3, "std": [0.5] * 3}
    assert Preprocessing.from_dict(old_json).resize == 37  # exports written before crop_ratio was stored
    with pytest.raises(ConfigError, match=r"crop_ratio=1.5 must be in \(0, 1\]"):
        prep.override(crop_ratio=1.5)
    with pytest.raises(ConfigError, match=r"interpolation='lanczos': choose one of"):
        Preprocessing(interpolation="lanczos")


def test_checkpoints_and_exports_rebuild_only_through_allow_listed_builders(tmp_path):
    backbone = torchvision_backbone("resnet18", None)
    model = ImageClassifier(backbone=backbone, class_names=["a", "b"], preprocessing=Preprocessing(32))
    state = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    torch.save(state, tmp_path / "good.ckpt")
    classifier = Classifier.from_checkpoint(tmp_path / "good.ckpt", device="cpu")
    prep = classifier.preprocessing  # from the hparams alone: this checkpoint holds no run config
    assert (prep.size, prep.crop_ratio, prep.interpolation) == (32, 0.875, "bilinear")
    assert prep.mean == pytest.approx(Preprocessing().mean)  # as the network applies it (float32)

    evil = {**state["hyper_parameters"], "backbone": {"_target_": "os.system", "name": "echo pwned"}}
    torch.save({**state, "hyper_parameters": evil}, tmp_path / "evil.ckpt")
    with pytest.raises(UserError, match=r"evil\.ckpt names the backbone builder 'os\.system', which is not one of"):
        Classifier.from_checkpoint(tmp_path / "evil.ckpt", device="cpu")

    from image_finetune.inference.export import export_classifier

    path = export_classifier(classifier, "safetensors", tmp_path / "model.safetensors", source="x", verify=False)
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["backbone"] == {"_target_": "image_finetune.recipe.backbones.torchvision_backbone"}
    sidecar_path(path).write_text(json.dumps({**meta, "backbone": {"_target_": "builtins.exec"}}))
    with pytest.raises(UserError, match=r"model\.safetensors\.json names the backbone builder 'builtins\.exec'"):
        Classifier.from_safetensors(path)


@pytest.mark.slow
def test_timm_model_trains_offline_and_eval_predict_export_and_the_api_use_its_checkpoint(tmp_path, monkeypatch):
    """The acceptance run: `python train.py model=timm ...` through timm's real hub loader (seeded HF cache, offline),
    then eval.py, predict.py, export.py format=onnx and Classifier.from_checkpoint on that checkpoint, unchanged."""
    cache = seed_hf_cache(tmp_path / "hf_cache")
    images = make_image_folder(tmp_path / "images", classes=3, per_class=12)
    run_dir = tmp_path / "train"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch")}
    result = subprocess.run(
        [sys.executable, "train.py", *TIMM, "data=imagefolder", f"data.root={images}", "data.test_fraction=0.25",
         "data.image_size=32", "data.batch_size=8", "data.num_workers=0", "trainer=cpu", "trainer.max_epochs=2",
         "logger=csv", "~callbacks.progress_bar", f"hydra.run.dir={run_dir}", f"paths.data_dir={tmp_path / 'data'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ckpt = json.loads((run_dir / "metrics.json").read_text())["best"]["checkpoint"]
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert hparams["pretrained"] is True and hparams["backbone"]["name"] == TIMM_MODEL
    assert hparams["preprocessing"]["crop"] == 32 and hparams["preprocessing"]["interpolation"] == "bicubic"

    def script(name: str, *args: str) -> None:  # the entry script as a user runs it, in this process
        monkeypatch.setattr(sys, "argv", [name, f"ckpt_path={ckpt}", *args])
        GlobalHydra.instance().clear()
        runpy.run_path(str(REPO / name), run_name="__main__")

    script("eval.py", "trainer=cpu", f"hydra.run.dir={tmp_path / 'eval'}")
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert evaluated["test/acc"] == pytest.approx(trained["test"]["acc"], abs=1e-6)  # metrics.json of train is nested
    script("predict.py", f"input={images / 'class_1'}", "num_workers=0", "device=cpu", f"hydra.run.dir={tmp_path}/p")
    assert len((tmp_path / "p" / "predictions.csv").read_text().splitlines()) == 1 + 12
    script("export.py", "format=onnx", f"hydra.run.dir={tmp_path / 'export'}")  # verify=true: within 1e-4

    classifier = Classifier.from_checkpoint(ckpt, device="cpu")
    assert classifier.preprocessing.interpolation == "bicubic" and classifier.architecture == TIMM_MODEL
    files = sorted((images / "class_2").iterdir())[:4]
    batch = torch.stack([classifier.preprocess(p) for p in files])
    onnx_probabilities = torch.from_numpy(load_exported(tmp_path / "export" / "model.onnx")(batch.numpy())).softmax(-1)
    assert np.abs(onnx_probabilities.numpy() - classifier.probabilities(batch).numpy()).max() <= 1e-4
