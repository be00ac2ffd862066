"""One wiring, one contract: every data module the repo ships keeps ``ClassificationData``, gets the model's
preprocessing from ``wiring.build_model_and_data`` (lr_find's too), and no caller probes a data module."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
from hf_parquet import write_digits_parquet
from hydra.utils import get_class
from omegaconf import OmegaConf
from support import FakeFlowers102
from torch import nn

from image_finetune.core.errors import ConfigError
from image_finetune.data import ClassificationDataModule
from image_finetune.data.contract import ClassificationData
from image_finetune.data.preprocessing import Preprocessing
from image_finetune.recipe.backbones import Backbone
from image_finetune.training import finetune
from image_finetune.training.lr_find import lr_find
from image_finetune.training.wiring import build_model_and_data

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "image_finetune"
QUICK = ["trainer=cpu", "model.backbone.weights=null", "data.num_workers=0", "logger=csv"]
#: configs/data/<name>.yaml -> what makes it run offline here
SHIPPED = ["cifar10", "csv", "digits", "flowers102", "hf", "imagefolder"]


def shipped_data(name: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The overrides that select ``configs/data/<name>.yaml`` with its offline stand-in (conftest.py's fixtures)."""
    if name == "cifar10":
        return ["data=cifar10", f"data.data_dir={request.getfixturevalue('cifar_root')}", "data.val_size=20"]
    if name == "digits":
        return ["data=digits", f"paths.data_dir={request.getfixturevalue('digits_data_dir')}"]
    if name == "hf":
        parquet = write_digits_parquet(request.getfixturevalue("tmp_path") / "parquet", 60, 20)
        return [
            "data=hf",
            f"data.path={parquet}",
            f"data.hf_cache_dir={parquet.parent / 'hf_cache'}",
            "data.image_size=32",
        ]
    if name == "flowers102":
        monkeypatch.setattr(torchvision.datasets, "Flowers102", FakeFlowers102)
        return ["data=flowers102"]
    if name == "csv":  # the image folder's files listed in a CSV file beside them
        folder = request.getfixturevalue("image_folder")
        rows = [f"{p.relative_to(folder)},{p.parent.name}" for p in sorted(folder.rglob("img_*"))]
        (folder / "labels.csv").write_text("\n".join(["path,label", *rows]) + "\n")
        return ["data=csv", f"data.file={folder / 'labels.csv'}", "data.image_size=32"]
    return ["data=imagefolder", f"data.root={request.getfixturevalue('image_folder')}", "data.image_size=32"]


def test_the_list_covers_every_data_config_and_every_shipped_data_module():
    import image_finetune.data as data

    configs = {p.stem: OmegaConf.load(p) for p in (REPO / "configs" / "data").glob("*.yaml")}
    assert sorted(configs) == SHIPPED
    # digits.yaml is a `@package _global_` preset (it also sets the model's offline fallback): its module is data._target_
    targets = {(c.data if "data" in c else c)._target_ for c in configs.values()}
    exported = {f"image_finetune.data.{name}" for name in data.__all__ if isinstance(getattr(data, name), type)}
    engine = {name for name in exported if issubclass(get_class(name), ClassificationDataModule)}
    # the engine's data modules, plus the recipe's one-line wrapper of any dataset (recipe/datasets.py)
    shipped = engine - {"image_finetune.data.ClassificationDataModule"} | {
        "image_finetune.recipe.datasets.DatasetDataModule"
    }
    assert targets == shipped


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_data_module_keeps_the_contract(name, request, monkeypatch, compose_cfg):
    cfg = compose_cfg(*shipped_data(name, request, monkeypatch), *QUICK)
    model, datamodule = build_model_and_data(cfg.data, model=cfg.model)
    assert isinstance(datamodule, ClassificationData)
    assert isinstance(datamodule.preprocessing, Preprocessing)
    # handed over by the wiring: the backbone's mean/std and interpolation, whatever size the data chooses
    backbone = model.backbone.preprocessing
    assert (datamodule.preprocessing.mean, datamodule.preprocessing.interpolation) == (
        backbone.mean,
        backbone.interpolation,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.class_names and all(isinstance(c, str) for c in datamodule.class_names)
    assert {"train", "val"} <= set(datamodule.datasets)
    for split in ("train", "val", "test", "all"):
        assert datamodule.has_split(split) == (split in datamodule.datasets)
    assert isinstance(datamodule.batch_size, int) and isinstance(datamodule.num_workers, int)
    # every image at the eval transform (eval.py split=all, find_issues.py), each named by image_names
    everything, names = datamodule.all_images(), datamodule.image_names()
    assert len(everything) == len(names) == sum(len(d) for d in datamodule.datasets.values())
    assert Counter(name.split for name in names) == {split: len(d) for split, d in datamodule.datasets.items()}
    assert len({name.id for name in names}) == len(names)
    for i in (0, len(names) - 1):  # the eval view: one size (the data's eval size), the label the name gives
        image, label = everything[i]
        assert image.dtype == torch.uint8 and int(label) == names[i].label
    if name in ("imagefolder", "digits", "csv"):  # files: named by path
        assert all(name.is_file and Path(name.id).is_file() for name in names)
    else:  # rows and arrays: <split>/<index>
        assert not any(name.is_file for name in names)
        assert all(re.fullmatch(r"(train|val|test)/\d+", name.id) for name in names), names[:3]
    if name in ("imagefolder", "digits", "hf", "csv"):  # one pool of files (rows)
        prefix = {"hf": "data.path=", "csv": "data.file="}.get(name, "data.root=")
        assert datamodule.source.startswith(prefix)
    else:
        assert datamodule.source == "the data"


class NotADataModule(L.LightningDataModule):
    """A LightningDataModule that keeps none of the contract (no class_names, datasets, has_split, ...)."""

    def __init__(self, preprocessing: object = None) -> None:
        super().__init__()


def test_a_data_module_that_breaks_the_contract_is_refused_in_one_line(compose_cfg, image_folder):
    cfg = compose_cfg("data=imagefolder", f"data.root={image_folder}", *QUICK)
    data = OmegaConf.create({"_target_": f"{__name__}.NotADataModule"})
    with pytest.raises(ConfigError, match=r"makes a NotADataModule, which does not keep the data-module contract"):
        build_model_and_data(data, model=cfg.model)


def distinctive_backbone(name: str = "distinctive", weights: str | None = None, **kwargs: object) -> Backbone:
    """A backbone whose preprocessing no data default has: 40 px, crop ratio 0.5, bicubic."""
    module = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Backbone(
        module,
        num_features=8,
        preprocessing=Preprocessing(size=40, crop_ratio=0.5, interpolation="bicubic"),
        pretrained=False,
        stages=(("0.",),),
        config={"_target_": f"{__name__}.distinctive_backbone", "name": name},
    )


class ReachedFitError(Exception):
    """Stops lr_find at its first fit: the data module it trains on is all this test needs."""


def test_lr_find_gives_the_data_module_the_backbones_preprocessing(compose_cfg, image_folder, monkeypatch):
    """Was: lr_find.py instantiated cfg.data without it, so a timm backbone's crop and interpolation never reached it."""
    seen: list[Preprocessing] = []

    def first_fit(trainer, model, datamodule, *args, **kwargs):
        seen.append(datamodule.preprocessing)
        raise ReachedFitError

    monkeypatch.setattr(finetune, "fit_phase", first_fit)
    cfg = compose_cfg(
        "data=imagefolder", f"data.root={image_folder}", f"model.backbone._target_={__name__}.distinctive_backbone",
        "lr_find.num_steps=10", *QUICK, config_name="lr_find",
    )  # fmt: skip
    with pytest.raises(ReachedFitError):
        lr_find(cfg)
    assert seen == [Preprocessing(size=40, crop_ratio=0.5, interpolation="bicubic")]


CALLERS = [
    "training/train.py",
    "inference/evaluate.py",
    "training/lr_find.py",
    "training/wiring.py",
    "inference/predict.py",
    "inference/export.py",
    "training/out_of_fold.py",
    "inference/data_issues.py",
    "models/classifier.py",
    "callbacks/visuals.py",
]
ASKING = {"getattr", "hasattr", "isinstance"}
CONCRETE = {"ImageFolderDataModule", "DigitsDataModule", "CIFAR10DataModule", "DatasetDataModule"}


@pytest.mark.parametrize("module", CALLERS)
def test_no_caller_probes_the_data_module(module):
    """Callers read the contract; they never ask a data module what it is or has (getattr/hasattr/isinstance), reach
    into its datasets' insides (``datasets["train"].loader``) or import a concrete data module class."""
    # the one question allowed: whether it keeps the contract (a model may be fit on bare dataloaders)
    allowed = {"isinstance(datamodule, ClassificationData)", "isinstance(trainer.datamodule, ClassificationData)"}
    probes = []
    tree = ast.parse((PACKAGE / module).read_text())
    # what a data module hands out, asked what it has (find_issues used to read ``samples`` of each split's dataset to
    # name images and their splits; ``image_names`` says that): loop variables over its datasets, its all_images()
    handed = {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.For | ast.comprehension) and "datamodule.datasets" in ast.unparse(node.iter)
        for target in ast.walk(node.target)
        if isinstance(target, ast.Name)
    }
    for node in ast.walk(tree):
        asks = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ASKING and node.args
        subject = ast.unparse(node.args[0]) if asks else ""
        if (
            asks
            and ast.unparse(node) not in allowed
            and (subject.endswith("datamodule") or subject in handed or "datamodule." in subject)
        ):
            probes.append(ast.unparse(node))
        if isinstance(node, ast.Attribute) and node.attr == "loader" and "datasets" in ast.unparse(node.value):
            probes.append(ast.unparse(node))
        if isinstance(node, ast.ImportFrom):
            probes += [alias.name for alias in node.names if alias.name in CONCRETE]
    assert probes == []
