"""Regularisation a user turns on by name: augmentation presets, mixup/cutmix, weight EMA, stochastic depth.

Each promise is checked through the real config composition and training code on a tiny generated image folder.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from support import FAST
from torchvision.ops import StochasticDepth

from image_finetune.callbacks import EMAWeights
from image_finetune.core.errors import ConfigError
from image_finetune.data.files import ImageFileDataset
from image_finetune.data.transforms import train_transform
from image_finetune.models.classifier import ImageClassifier
from image_finetune.recipe.backbones import build_backbone
from image_finetune.recipe.losses import cross_entropy
from image_finetune.training import finetune
from image_finetune.training.train import build

pytestmark = pytest.mark.usefixtures("pretrained")


def folder_cfg(
    compose_cfg: Callable[..., DictConfig], root: Path, *overrides: str, output_dir: Path | None = None
) -> DictConfig:
    return compose_cfg(
        "data=imagefolder", f"data.root={root}", "trainer.max_epochs=3", "logger=csv", "test=false",
        *FAST, *overrides, output_dir=output_dir,
    )  # fmt: skip


def by_step(run_dir: Path) -> list[Path]:
    """The run's per-epoch checkpoints (``e*.ckpt``), in training order (whatever the epoch numbering)."""
    ckpts = (run_dir / "checkpoints").glob("e*.ckpt")
    return sorted(ckpts, key=lambda p: torch.load(p, map_location="cpu", weights_only=True)["global_step"])


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class RecordHead(L.Callback):
    """The raw head weight after every optimizer step (what the EMA averages)."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.weights.append(pl_module.net.head[1].weight.detach().clone())


EVERY_EPOCH = (
    "callbacks.model_checkpoint.save_top_k=-1",
    "callbacks.model_checkpoint.filename='e{epoch}'",
    "callbacks.model_checkpoint.monitor=null",
)


def test_ema_weights_are_what_validation_checkpoints_and_test_use(compose_cfg, image_folder, tmp_path):
    decay = 0.6
    cfg = folder_cfg(
        compose_cfg,
        image_folder,
        "callbacks=ema",
        f"callbacks.ema.decay={decay}",
        "finetune.freeze_epochs=1",
        "trainer.max_epochs=2",
        *EVERY_EPOCH,
        output_dir=tmp_path / "run",
    )
    run = build(cfg)
    recorder = RecordHead()
    run.trainer.callbacks.append(recorder)
    finetune.fit(run.trainer, run.model, run.datamodule, run.schedule)
    assert len(recorder.weights) >= 2  # steps on both sides of the unfreeze
    expected = recorder.weights[0]
    for w in recorder.weights[1:]:
        expected = decay * expected + (1 - decay) * w
    last = by_step(tmp_path / "run")[-1]
    ckpt = torch.load(last, weights_only=True)
    torch.testing.assert_close(ckpt["state_dict"]["net.head.1.weight"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ckpt["current_model_state"]["net.head.1.weight"], recorder.weights[-1], rtol=0, atol=0)
    assert not torch.allclose(expected, recorder.weights[-1], atol=1e-5)
    logged = run.trainer.callback_metrics["val/loss"].item()
    # Testing the checkpoint with the training trainer (as train() does) must test the average, not the raw weights.
    tested = run.trainer.test(
        run.model, datamodule=run.datamodule, ckpt_path=str(last), weights_only=True, verbose=False
    )
    torch.testing.assert_close(run.model.net.head[1].weight, expected, rtol=0, atol=1e-6)
    # A plain trainer scores whatever weights the model holds: the average gives what was logged, the raw ones do not.
    plain = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    scores = {}
    for key in ("state_dict", "current_model_state"):
        run.model.load_state_dict(ckpt[key])
        val = plain.validate(run.model, datamodule=run.datamodule, verbose=False)[0]["val/loss"]
        test = plain.test(run.model, datamodule=run.datamodule, verbose=False)[0]["test/loss"]
        scores[key] = (val, test)
    assert scores["state_dict"] == pytest.approx((logged, tested[0]["test/loss"]), abs=1e-5)
    assert scores["current_model_state"][0] != pytest.approx(logged, abs=1e-4)
    assert scores["current_model_state"][1] != pytest.approx(tested[0]["test/loss"], abs=1e-4)


def test_ema_mixup_and_strong_augmentation_resume_exactly_across_the_unfreeze(compose_cfg, image_folder, tmp_path):
    """From the last frozen epoch's checkpoint (the hard case: the uninterrupted run crosses the boundary through
    ``phase1.ckpt``, saved after the fit): the same raw and averaged weights."""
    common = ("callbacks=ema", "callbacks.ema.decay=0.6", "augment=strong", "model.mixup.mixup_alpha=0.4",
              "model.mixup.cutmix_alpha=1.0", "finetune.freeze_epochs=1", "trainer.max_epochs=2",
              *EVERY_EPOCH)  # fmt: skip

    def fit(name: str, ckpt: Path | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        run = build(folder_cfg(compose_cfg, image_folder, *common, output_dir=tmp_path / name))
        finetune.fit(run.trainer, run.model, run.datamodule, run.schedule, ckpt_path=ckpt)
        ema = next(cb for cb in run.trainer.callbacks if isinstance(cb, EMAWeights))
        return snapshot(run.model.net), snapshot(ema._average_model.module.net)  # after the fit: (average, raw)

    average, raw = fit("full")
    assert any(not torch.equal(average[k], raw[k]) for k in average)
    got_average, got_raw = fit("resumed", by_step(tmp_path / "full")[0])
    for key in average:
        torch.testing.assert_close(got_average[key], average[key], rtol=0, atol=1e-6, msg=f"average: {key}")
        torch.testing.assert_close(got_raw[key], raw[key], rtol=0, atol=1e-6, msg=f"raw: {key}")


# ---- augmentation presets --------------------------------------------------------------------------------------------
def train_set(compose_cfg, root: Path, *overrides: str):
    datamodule = instantiate(folder_cfg(compose_cfg, root, *overrides).data)
    datamodule.setup("fit")
    return datamodule, datamodule.datasets["train"]


def steps(transform) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


def test_augment_presets_choose_the_training_transform(compose_cfg, image_folder):
    expected = {
        "none": ["Resize", "CenterCrop"],
        "light": ["RandomResizedCrop", "RandomHorizontalFlip"],
        "standard": ["RandomResizedCrop", "RandomHorizontalFlip"],
        "strong": ["RandomResizedCrop", "RandomHorizontalFlip", "TrivialAugmentWide", "RandomErasing"],
        "randaugment": ["RandomResizedCrop", "RandomHorizontalFlip", "RandAugment"],
    }
    scales = {"light": (0.35, 1.0), "standard": (0.5, 1.0), "strong": (0.5, 1.0)}  # standard/strong: data.crop_scale
    for preset, names in expected.items():
        _, train = train_set(compose_cfg, image_folder, f"augment={preset}")
        assert steps(train.transform) == names, preset
        if preset in scales:
            assert train.transform.transforms[0].scale == scales[preset]
    # data.crop_scale still sets the default preset's crop; data.hflip=false vetoes every preset's flip
    _, train = train_set(compose_cfg, image_folder, "augment=strong", "data.crop_scale=[0.5,1.0]", "data.hflip=false")
    assert steps(train.transform) == ["RandomResizedCrop", "TrivialAugmentWide", "RandomErasing"]
    assert train.transform.transforms[0].scale == (0.5, 1.0)


@pytest.mark.parametrize("preset", ["strong", "randaugment"])
def test_strong_augmentation_is_a_function_of_the_sample_seed(compose_cfg, image_folder, preset):
    _, train = train_set(compose_cfg, image_folder, f"augment={preset}")
    first = [train[(i, 1000 + i)][0] for i in range(6)]
    assert all(torch.equal(a, train[(i, 1000 + i)][0]) for i, a in enumerate(first))
    assert any(not torch.equal(a, train[(i, 7)][0]) for i, a in enumerate(first))


def test_augment_none_trains_on_exactly_the_eval_crops(compose_cfg, image_folder):
    """What the training loader yields (and so the augmented-batch grid shows) is the preset's output."""
    datamodule, train = train_set(compose_cfg, image_folder, "augment=none")
    images, labels = next(iter(datamodule.train_dataloader()))
    order = [index for index, _ in list(iter(datamodule.train_dataloader().sampler))[: len(labels)]]
    evaluated = ImageFileDataset([train.samples[i] for i in order], datamodule.datasets["val"].transform, train.loader)
    assert torch.equal(images, torch.stack([evaluated[i][0] for i in range(len(order))]))


def test_digits_are_never_flipped_and_cifar_takes_only_its_device_presets(compose_cfg, cifar_root):
    digits = instantiate(compose_cfg("augment=light").data)
    assert "RandomHorizontalFlip" not in steps(train_transform(32, digits.crop_scale, digits.hflip, digits.augment))
    with pytest.raises(InstantiationException) as info:
        instantiate(compose_cfg("data=cifar10", f"paths.data_dir={cifar_root}", "augment=strong").data)
    assert isinstance(info.value.__cause__, ConfigError)
    assert re.match(r"augment=strong: CIFAR-10 .* augment=standard .* augment=none", str(info.value.__cause__))
    for preset, augmented in (("none", False), ("standard", True)):
        cifar = instantiate(
            compose_cfg("data=cifar10", f"paths.data_dir={cifar_root}", "data.val_size=20", f"augment={preset}").data
        )
        cifar.setup("fit")
        order, _ = cifar.train_sampler().draw()
        images, _ = next(iter(cifar.train_dataloader()))  # the training batch as the device-resident loader yields it
        assert torch.equal(images, cifar.datasets["train"].images[order[: len(images)]]) != augmented, preset


# ---- mixup / cutmix --------------------------------------------------------------------------------------------------
def mixing_model(**mixup: float) -> ImageClassifier:
    model = ImageClassifier({"name": "resnet18", "weights": None}, class_names=["a", "b", "c", "d"], dropout=0.0,
                            loss=partial(cross_entropy, label_smoothing=0.1), mixup=mixup)  # fmt: skip
    model.make_loss([2, 2, 2, 2])
    return model.eval()  # BatchNorm in eval mode: a forward is a pure function of its input


@pytest.mark.parametrize("alphas", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}])
def test_mixed_targets_are_distributions_and_the_loss_uses_them(alphas):
    model = mixing_model(**alphas)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    torch.manual_seed(3)
    mixed, targets = model.mixing(images, labels)
    assert targets.shape == (8, 4) and targets.is_floating_point()
    torch.testing.assert_close(targets.sum(dim=-1), torch.ones(8))
    assert (targets.max(dim=-1).values < 1).all() and not torch.equal(mixed, images)
    torch.manual_seed(3)
    loss = model.training_step((images, labels), 0)["loss"]
    logits = model(mixed)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets, label_smoothing=0.1))
    assert not torch.allclose(loss, F.cross_entropy(logits, labels, label_smoothing=0.1))
    # Train accuracy counts each mixed image as its dominant class.
    expected_acc = (logits.argmax(-1) == targets.argmax(-1)).float().mean()
    torch.testing.assert_close(model.metrics["train_metrics"].compute()["train/acc"], expected_acc)


def test_mixup_leaves_validation_alone_and_is_off_by_default(compose_cfg):
    model = mixing_model(mixup_alpha=0.4, cutmix_alpha=1.0)
    images, labels = torch.rand(8, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    out = model.validation_step((images, labels), 0)
    torch.testing.assert_close(out["logits"], model(images))
    values = model.metrics["val_metrics"].compute()
    assert values["val/acc"] == (model(images).argmax(-1) == labels).float().mean()
    assert model.losses["val_loss"].compute() == pytest.approx(F.cross_entropy(model(images), labels).item(), abs=1e-6)
    assert instantiate(compose_cfg("model.backbone.weights=null", "+model.class_names=[a,b]").model).mixing is None
    with pytest.raises(ConfigError, match=r"model.mixup has unknown keys \['alpha'\]"):
        mixing_model(alpha=0.2)


# ---- stochastic depth ------------------------------------------------------------------------------------------------
def test_drop_path_rate_reaches_torchvision_stochastic_depth_or_names_the_key():
    backbone = build_backbone("efficientnet_b0", None, drop_path_rate=0.3)
    rates = [m.p for m in backbone.module.modules() if isinstance(m, StochasticDepth)]
    assert rates and max(rates) == pytest.approx(0.3 * 15 / 16)  # torchvision scales the rate up to the last block
    with pytest.raises(ConfigError, match=r"model.backbone.drop_path_rate=0.1: resnet18 has no stochastic depth"):
        build_backbone("resnet18", None, drop_path_rate=0.1)
