"""README "Extending", done exactly as the section shows it: a backbone, a head, a loss, a metric, an augmentation,
a dataset, a callback, an experiment."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping
from support import FakeFlowers102
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAUROC

from image_finetune.core.cli import compose_config
from image_finetune.core.errors import UserError
from image_finetune.data.preprocessing import Preprocessing
from image_finetune.inference.classifier import Classifier
from image_finetune.models.backbone import Backbone
from image_finetune.recipe.heads import Head
from image_finetune.recipe.registry import BUILDERS, HEADS
from image_finetune.training.train import train

REPO = Path(__file__).resolve().parents[1]
# small, quick runs on the CPU; nothing here changes what the section's lines do
QUICK = [
    "trainer=cpu",
    "data.num_workers=0",
    "logger=csv",
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
]


def test_a_dataset_config_as_shipped_trains_with_the_augment_preset_on_its_training_split(
    compose_cfg, pretrained, monkeypatch
):
    """`python train.py data=flowers102` (configs/data/flowers102.yaml), the dataset itself replaced offline."""
    monkeypatch.setattr(torchvision.datasets, "Flowers102", FakeFlowers102)
    cfg = compose_cfg("data=flowers102", "augment=standard", *QUICK, "data.batch_size=4", "trainer.max_epochs=2",
                      "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1")  # fmt: skip
    data = instantiate(cfg.data)
    assert data.class_names == FakeFlowers102.classes
    train_set, val_set = data.datasets["train"], data.datasets["val"]
    image, _ = train_set[(0, 1)]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 224, 224)
    assert torch.equal(train_set[(0, 1)][0], image), "augmentation is a function of the sample seed"
    assert not torch.equal(train_set[(0, 2)][0], image), "the augment preset acts on the training split"
    plain = FakeFlowers102(".", "val", instantiate(cfg.data.val.transform))[0][0]
    assert torch.equal(val_set[0][0], plain), "validation images are the dataset's own"

    metrics = train(cfg)
    assert {"test/acc", "last/val/acc"} <= set(metrics)


# ---- a backbone: a function returning a Backbone, named by model.backbone._target_ --------------------------------
def tiny_backbone(
    name: str = "tiny", weights: str | None = None, *, allow_random_init: bool = False, drop_path_rate=None
) -> Backbone:
    """The README's contract: the network without its head, its feature width, preprocessing, stages, and the call that
    rebuilds it (``config``) as plain values."""
    module = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip
    return Backbone(
        module,
        num_features=16,
        preprocessing=Preprocessing(size=32, crop_ratio=1.0),
        pretrained=False,
        stages=(("0.", "1."), ("3.",)),
        config={"_target_": f"{__name__}.tiny_backbone", "name": name},
    )


def test_your_own_backbone_trains_from_the_config_and_reloads_once_allow_listed(compose_cfg, image_folder, monkeypatch):
    cfg = compose_cfg(
        "data=imagefolder", f"data.root={image_folder}", f"model.backbone._target_={__name__}.tiny_backbone",
        "data.image_size=32", "data.batch_size=8", "trainer.max_epochs=2", *QUICK,
    )  # fmt: skip
    best = train(cfg)["best_checkpoint"]
    with pytest.raises(UserError, match=r"Add yours to image_finetune\.recipe\.registry\.BUILDERS"):
        Classifier.from_checkpoint(best, device="cpu")  # checkpoints never choose code...
    monkeypatch.setitem(BUILDERS, f"{__name__}.tiny_backbone", tiny_backbone)  # ...until you list your builder
    classifier = Classifier.from_checkpoint(best, device="cpu")
    predictions = classifier.predict(sorted(image_folder.rglob("*.png"))[:3], top_k=1)
    assert len(predictions) == 3 and all(p.label in classifier.class_names for p in predictions)


def test_a_callback_from_the_command_line_is_on_the_trainer(compose_cfg, image_folder, pretrained, monkeypatch):
    """`+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping +callbacks.stop.monitor=val/acc ...`"""
    checked: list[int] = []
    real = EarlyStopping.on_validation_end

    def spy(self: EarlyStopping, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            checked.append(trainer.current_epoch)
        real(self, trainer, pl_module)

    monkeypatch.setattr(EarlyStopping, "on_validation_end", spy)
    cfg = compose_cfg(
        "data=imagefolder", f"data.root={image_folder}", "data.image_size=32", "trainer.max_epochs=2", *QUICK,
        "+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping", "+callbacks.stop.monitor=val/acc",
        "+callbacks.stop.mode=max",
    )  # fmt: skip
    train(cfg)
    assert checked == [0, 1], "EarlyStopping ran after each epoch's validation (both phases)"


def test_an_experiment_copied_from_the_example_runs_by_name(tmp_path, image_folder, pretrained):
    """Copy configs/experiment/imagefolder.yaml to pets.yaml, edit it, `python train.py experiment=pets`."""
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    example = (configs / "experiment" / "imagefolder.yaml").read_text()
    edited = example.replace("${paths.data_dir}/my_images", str(image_folder)).replace("resnet50", "resnet18")
    (configs / "experiment" / "pets.yaml").write_text(edited.replace("image_size: 224", "image_size: 32"))
    cfg = compose_config(configs, "train", ["experiment=pets", f"paths.log_dir={tmp_path / 'logs'}",
                                            "trainer.max_epochs=2", *QUICK], tmp_path / "run")  # fmt: skip
    assert cfg.data.root == str(image_folder)
    metrics = train(cfg)
    assert metrics["last/val/acc"] >= 0.0 and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


# ---- a head, a loss, a metric and an augmentation: recipe functions and the config files that name them -------------
def wide_head(hidden: int = 24) -> Head:
    """A head as ``recipe/heads.py`` writes one: its config as plain values, and how to make it for a class count."""

    def make(features: int, classes: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    return Head({"_target_": f"{__name__}.wide_head", "hidden": hidden}, make)


LOSS_CALLS: list[list[int]] = []


def counted_cross_entropy(class_counts: list[int], label_smoothing: float = 0.0) -> nn.Module:
    """A loss as ``recipe/losses.py`` writes one: the training split's class counts in, a ``loss(logits, targets)`` out."""
    LOSS_CALLS.append(list(class_counts))
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def with_auroc(num_classes: int, split: str) -> MetricCollection:
    """A metric added to what ``recipe/metrics.py`` returns."""
    from image_finetune.recipe.metrics import classification_metrics

    metrics = classification_metrics(num_classes, split)
    metrics.add_metrics({"auroc": MulticlassAUROC(num_classes)})
    return metrics


RECIPE_CONFIGS = {
    "head/wide.yaml": f"# @package model.head\n_target_: {__name__}.wide_head\nhidden: 24\n",
    "loss/counted.yaml": f"# @package model.loss\n_target_: {__name__}.counted_cross_entropy\n_partial_: true\n"
    "label_smoothing: 0.1\n",
    "augment/blur.yaml": "# @package data.augment\n_target_: image_finetune.data.transforms.Augmentation\nname: blur\n"
    "random_crop: true\ncrop_scale: [0.5, 1.0]\nhflip: true\nops:\n"
    "  - {_target_: torchvision.transforms.v2.GaussianBlur, kernel_size: 5, sigma: 3.0}\n",
}


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``python train.py head=wide loss=counted augment=blur model.metrics._target_=...`` after adding those three files
    to a copy of configs/ (one run shared by the four tests below)."""
    from support import make_image_folder

    root = tmp_path_factory.mktemp("recipe")
    configs = root / "configs"
    shutil.copytree(REPO / "configs", configs)
    for name, text in RECIPE_CONFIGS.items():
        (configs / name).write_text(text)
    images = make_image_folder(root / "images", classes=3, per_class=8)
    overrides = [
        f"paths.root_dir={REPO}", f"paths.data_dir={root / 'data'}", f"paths.log_dir={root / 'logs'}",
        "data=imagefolder", f"data.root={images}", "data.image_size=32", "data.batch_size=8",
        f"model.backbone._target_={__name__}.tiny_backbone", "head=wide", "loss=counted", "augment=blur",
        f"model.metrics._target_={__name__}.with_auroc", "trainer.max_epochs=2", *QUICK,
    ]  # fmt: skip
    LOSS_CALLS.clear()
    cfg = compose_config(configs, "train", overrides, root / "run")
    metrics = train(cfg)
    return {"cfg": cfg, "metrics": metrics, "images": images, "loss_calls": list(LOSS_CALLS)}


def test_your_own_head_trains_from_its_config_and_reloads_once_allow_listed(recipe_run, monkeypatch):
    best = recipe_run["metrics"]["best_checkpoint"]
    assert torch.load(best, map_location="cpu", weights_only=True)["hyper_parameters"]["head"] == {
        "_target_": f"{__name__}.wide_head", "hidden": 24,
    }  # fmt: skip
    monkeypatch.setitem(BUILDERS, f"{__name__}.tiny_backbone", tiny_backbone)
    with pytest.raises(UserError, match=r"Add yours to image_finetune\.recipe\.registry\.HEADS"):
        Classifier.from_checkpoint(best, device="cpu")  # checkpoints never choose code...
    monkeypatch.setitem(HEADS, f"{__name__}.wide_head", wide_head)  # ...until you list your head
    classifier = Classifier.from_checkpoint(best, device="cpu")
    assert [type(m) for m in classifier.net.head] == [nn.Dropout, nn.Linear, nn.ReLU, nn.Linear]


def test_your_own_loss_is_built_from_the_training_split_counts(recipe_run):
    counts = recipe_run["loss_calls"]
    assert counts and all(c == counts[0] for c in counts), "built once per fit, from the same split"
    assert len(counts[0]) == 3 and 0 < sum(counts[0]) < 24, "the training split's images per class (val held out)"


def test_your_own_metric_is_logged_for_validation(recipe_run):
    assert 0.0 <= recipe_run["metrics"]["last/val/auroc"] <= 1.0


def test_your_own_augmentation_preset_acts_on_the_training_images(recipe_run):
    data = instantiate(recipe_run["cfg"].data)
    data.setup("fit")
    ops = data.augment.ops
    assert len(ops) == 1 and isinstance(ops[0], torchvision.transforms.v2.GaussianBlur)
    image, _ = data.datasets["train"][(0, 1)]
    assert tuple(image.shape) == (3, 32, 32) and torch.equal(data.datasets["train"][(0, 1)][0], image)
