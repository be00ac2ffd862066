"""The fine-tuning schedule: what is frozen stays bitwise frozen, the unfreeze happens, and nothing breaks it.

Runs on a tiny generated image folder with seeded "pretrained" ResNet-18 weights (see conftest).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig
from support import FAST, TIMM_MODEL, make_image_folder

from image_finetune.models.norms import is_norm_layer
from image_finetune.training import finetune
from image_finetune.training.train import Run, build, train

pytestmark = pytest.mark.usefixtures("pretrained")


@pytest.fixture(params=["torchvision", "timm"])
def backbone(request: pytest.FixtureRequest) -> tuple[str, ...]:
    """The config overrides of each zoo's backbone: ResNet-18, and a tiny timm EfficientNet (BatchNormAct2d layers),
    both with seeded "pretrained" weights loaded through the zoo's own code."""
    if request.param == "torchvision":
        return ()
    request.getfixturevalue("timm_pretrained")
    return ("model=timm", f"model.backbone.name={TIMM_MODEL}")


def folder_cfg(
    compose_cfg: Callable[..., DictConfig], root: Path, *overrides: str, output_dir: Path | None = None
) -> DictConfig:
    return compose_cfg(
        "data=imagefolder",
        f"data.root={root}",
        "trainer.max_epochs=3",
        "logger=csv",
        "test=false",
        *FAST,
        *overrides,
        output_dir=output_dir,
    )


FROZEN = ("finetune.freeze_epochs=null", "trainer.max_epochs=1")


class RecordPhases(L.Callback):
    """Records, at every training step, whether any backbone parameter required grad and whether grads were computed."""

    def __init__(self) -> None:
        self.requires_grad: dict[int, bool] = {}
        self.backbone_grads: dict[int, bool] = {}

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        modules = pl_module.net.backbone.modules()
        non_bn = [p for m in modules if not is_norm_layer(m) for p in m.parameters(recurse=False)]
        epoch = trainer.current_epoch
        self.requires_grad[epoch] = any(p.requires_grad for p in non_bn)
        self.backbone_grads[epoch] = any(p.grad is not None for p in non_bn)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def fit_recording(cfg: DictConfig) -> tuple[Run, RecordPhases, dict[str, torch.Tensor]]:
    """Run the whole schedule with a ``RecordPhases``; also returns the backbone's state before training."""
    run = build(cfg)
    before = snapshot(run.model._backbone.module)
    recorder = RecordPhases()
    run.trainer.callbacks.append(recorder)
    finetune.fit(run.trainer, run.model, run.datamodule, run.schedule)
    return run, recorder, before


def run_frozen_phase(
    cfg: DictConfig,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], RecordPhases, L.LightningModule]:
    """One epoch that never leaves the frozen phase; returns backbone state before and after."""
    run, recorder, before = fit_recording(cfg)
    return before, snapshot(run.model.net.backbone), recorder, run.model


def test_frozen_backbone_is_bitwise_unchanged_without_train_bn(compose_cfg, image_folder, backbone):
    before, after, recorder, _ = run_frozen_phase(
        folder_cfg(compose_cfg, image_folder, *backbone, *FROZEN, "finetune.train_bn=false")
    )
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], f"frozen backbone tensors changed: {changed[:5]}"
    assert recorder.requires_grad == {0: False} and recorder.backbone_grads == {0: False}


def test_train_bn_trains_only_batchnorm_while_frozen(compose_cfg, image_folder, backbone):
    before, after, recorder, model = run_frozen_phase(
        folder_cfg(compose_cfg, image_folder, *backbone, *FROZEN, "finetune.train_bn=true")
    )
    bn_prefixes = tuple(f"{n}." for n, m in model.net.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn_keys = [k for k in before if k.startswith(bn_prefixes)]
    other_keys = [k for k in before if not k.startswith(bn_prefixes)]
    assert bn_keys and other_keys
    assert all(torch.equal(before[k], after[k]) for k in other_keys), "non-BatchNorm backbone weights must not move"
    assert any(not torch.equal(before[k], after[k]) for k in bn_keys if k.endswith("weight"))
    # BatchNorm layers inside frozen blocks run in train mode: their statistics adapt to the new data
    stats = [k for k in bn_keys if k.endswith("running_mean")]
    assert stats and all(not torch.equal(before[k], after[k]) for k in stats)
    assert recorder.backbone_grads == {0: False}


def test_unfreeze_trains_backbone_with_named_groups_and_lr_ratio(compose_cfg, image_folder):
    cfg = folder_cfg(compose_cfg, image_folder, "finetune.backbone_lr_ratio=0.25", "model.scheduler=null")
    run, recorder, _ = fit_recording(cfg)
    assert recorder.requires_grad == {0: False, 1: True, 2: True}
    assert recorder.backbone_grads == {0: False, 1: True, 2: True}
    groups = {g["name"]: g for g in run.trainer.optimizers[0].param_groups}
    assert set(groups) == {"head", "head/no_decay", "backbone", "backbone/no_decay"}
    assert groups["backbone"]["lr"] == pytest.approx(0.25 * groups["head"]["lr"])
    assert groups["backbone/no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] > 0
    assert (Path(cfg.paths.output_dir) / "checkpoints" / finetune.boundary_checkpoint(1)).is_file()
    metrics = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"lr-AdamW/head", "lr-AdamW/backbone"} <= set(metrics), "LearningRateMonitor must name the groups"


class RecordStages(L.Callback):
    """Records, at every training step, which backbone stages got gradients (BatchNorm excluded: train_bn)."""

    def __init__(self) -> None:
        self.stages_with_grads: dict[int, list[str]] = {}

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        got = set()
        for name, module in pl_module.net.backbone.named_modules():
            grads = any(p.grad is not None for p in module.parameters(recurse=False))
            if grads and not isinstance(module, torch.nn.BatchNorm2d):
                got.add(name.split(".")[0])
        self.stages_with_grads[trainer.current_epoch] = sorted(got)


def test_gradual_unfreezing_trains_the_last_stages_first_with_geometric_lrs(compose_cfg, image_folder):
    """finetune=gradual on ResNet-18 (stem, layer1..4): head only, then layer4, then layer3+4, then all; one named
    group per stage from the first step, LRs rising geometrically from lr * ratio (stem) towards the head's."""
    cfg = folder_cfg(
        compose_cfg,
        image_folder,
        "finetune=gradual",
        "trainer.max_epochs=4",
        "model.scheduler=null",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
    )
    run = build(cfg)
    recorder = RecordStages()
    run.trainer.callbacks.append(recorder)
    finetune.fit(run.trainer, run.model, run.datamodule, run.schedule)
    assert recorder.stages_with_grads == {
        0: [],
        1: ["layer4"],
        2: ["layer3", "layer4"],
        3: ["conv1", "layer1", "layer2", "layer3", "layer4"],
    }
    groups = {g["name"]: g for g in run.trainer.optimizers[0].param_groups}
    stages = ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert list(groups) == ["head", "head/no_decay", *(f"backbone.{s}{t}" for s in stages for t in ("", "/no_decay"))]
    lr, ratio = groups["head"]["lr"], cfg.finetune.backbone_lr_ratio
    for i, stage in enumerate(stages):  # fastai's slice(lr * ratio, lr) over 5 stages + head
        assert groups[f"backbone.{stage}"]["lr"] == pytest.approx(lr * ratio ** (1 - i / 5))
        assert groups[f"backbone.{stage}/no_decay"]["weight_decay"] == 0.0
    checkpoints = Path(cfg.paths.output_dir) / "checkpoints"
    assert [finetune.resume_epoch(checkpoints / finetune.boundary_checkpoint(k)) for k in (1, 2, 3)] == [1, 2, 3]
    metrics = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"lr-AdamW/head", "lr-AdamW/backbone.stem", "lr-AdamW/backbone.layer4"} <= set(metrics)


def test_a_step_at_max_epochs_never_starts_an_empty_fit(compose_cfg, image_folder, caplog):
    """finetune=gradual's last step (epoch 3) in a 3-epoch run: warned of, then neither announced nor fitted (an empty
    fourth fit used to log "Unfreezing after epoch 3" and leave the run's last train metrics empty)."""
    cfg = folder_cfg(compose_cfg, image_folder, "finetune=gradual", "trainer.limit_train_batches=1",
                     "trainer.limit_val_batches=1")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="image_finetune"):
        run, recorder, _ = fit_recording(cfg)
    unfreezing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Unfreezing after epoch")]
    assert [m.split(":")[0] for m in unfreezing] == ["Unfreezing after epoch 1", "Unfreezing after epoch 2"]
    assert any("never unfreeze" in r.getMessage() for r in caplog.records)
    assert sorted(recorder.requires_grad) == [0, 1, 2] and run.trainer.current_epoch == 3
    assert "train/loss" in run.trainer.callback_metrics  # the last fit trained: its epoch metrics are there


def test_linear_probe_never_unfreezes(compose_cfg, image_folder):
    cfg = folder_cfg(compose_cfg, image_folder, "finetune=linear_probe", "trainer.max_epochs=2")
    run, recorder, _ = fit_recording(cfg)
    assert recorder.requires_grad == {0: False, 1: False}
    assert run.trainer.current_epoch == 2


def test_full_finetune_trains_everything_from_the_start(compose_cfg, image_folder):
    _, recorder, _ = fit_recording(folder_cfg(compose_cfg, image_folder, "finetune=full", "trainer.max_epochs=1"))
    assert recorder.requires_grad == {0: True} and recorder.backbone_grads == {0: True}


@pytest.mark.parametrize(
    "scheduler",
    [
        [
            "model.scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau",
            "model.scheduler_takes_total_steps=false",
            "~model.scheduler.warmup_fraction",
            "model.scheduler_interval=epoch",
        ],
        [
            "model.scheduler._target_=torch.optim.lr_scheduler.OneCycleLR",
            "~model.scheduler.warmup_fraction",
            "+model.scheduler.max_lr=0.01",
        ],
        [
            "model.scheduler._target_=torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
            "model.scheduler_takes_total_steps=false",
            "~model.scheduler.warmup_fraction",
            "+model.scheduler.T_0=2",
        ],
        [
            "model.scheduler._target_=torch.optim.lr_scheduler.StepLR",
            "model.scheduler_takes_total_steps=false",
            "~model.scheduler.warmup_fraction",
            "+model.scheduler.step_size=1",
        ],
    ],
    ids=["plateau", "onecycle", "warm_restarts", "step"],
)
def test_every_scheduler_survives_the_unfreeze_and_drives_every_group(compose_cfg, image_folder, scheduler):
    run = build(folder_cfg(compose_cfg, image_folder, *scheduler))
    finetune.fit(run.trainer, run.model, run.datamodule, run.schedule)
    assert run.trainer.current_epoch == 3
    config = run.trainer.lr_scheduler_configs[0]
    optimizer = run.trainer.optimizers[0]
    lrs = getattr(config.scheduler, "min_lrs", None) or config.scheduler.base_lrs
    assert len(lrs) == len(optimizer.param_groups) == 4


def test_resume_across_every_unfreeze_matches_an_uninterrupted_run(compose_cfg, image_folder, tmp_path):
    """Three phases (frozen for 2 epochs, then layer4, then everything, with geometric LRs): checkpoints from inside
    the frozen phase and at each boundary all resume to the same final weights."""
    common = (
        "finetune.freeze_epochs=2",
        "finetune.unfreeze=[[2,1],[3,all]]",
        "finetune.lr_spread=geometric",
        "trainer.max_epochs=4",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.filename='e{epoch}'",
        "callbacks.model_checkpoint.monitor=null",
    )
    full_dir = tmp_path / "full"
    full = build(folder_cfg(compose_cfg, image_folder, *common, output_dir=full_dir))
    finetune.fit(full.trainer, full.model, full.datamodule, full.schedule)
    expected = snapshot(full.model.net)
    for epoch in (0, 1, 2):  # frozen, boundary 1 (last frozen epoch), boundary 2 (layer4 only -> everything)
        ckpt = full_dir / "checkpoints" / f"e{epoch + 1}.ckpt"  # file names count epochs from 1
        assert finetune.resume_epoch(ckpt) == epoch + 1
        resumed = build(folder_cfg(compose_cfg, image_folder, *common, output_dir=tmp_path / f"resume{epoch}"))
        finetune.fit(resumed.trainer, resumed.model, resumed.datamodule, resumed.schedule, ckpt_path=ckpt)
        got = snapshot(resumed.model.net)
        for key in expected:
            torch.testing.assert_close(
                got[key], expected[key], rtol=0, atol=1e-6, msg=f"resumed from epoch {epoch}: {key}"
            )


def test_a_warm_resized_cache_trains_exactly_as_the_run_that_filled_it(compose_cfg, tmp_path, monkeypatch):
    """The read that fills a cache entry returns the stored copy's pixels, so no epoch depends on the cache's state
    (and a run resumed after some entries were written matches an uninterrupted one)."""
    monkeypatch.setattr("image_finetune.data.cache.PNG_MAX_PIXELS", 0)  # lossy JPEG copies even at this test's size
    images = make_image_folder(tmp_path / "large", size=64)  # training reads 32 / 0.875 = 37 px: copies are made
    weights = []
    for name in ("cold", "warm"):
        run = build(
            folder_cfg(compose_cfg, images, "data.cache=resized", "trainer.max_epochs=2", output_dir=tmp_path / name)
        )
        finetune.fit(run.trainer, run.model, run.datamodule, run.schedule)
        weights.append(snapshot(run.model.net))
    copies = list((tmp_path / "data" / ".cache" / "resized").rglob("*.jpg"))
    assert len(copies) >= 16 + len(run.datamodule.splits["val"])  # the training batches drawn, and val
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=0, atol=1e-6, msg=key)


def test_compile_gets_a_fresh_graph_after_the_unfreeze(compose_cfg, image_folder, monkeypatch):
    """With compile=true the unfrozen phase must produce backbone gradients (no stale frozen graph)."""
    compiled: list[torch.nn.Module] = []
    real_compile = torch.compile

    def compile_cheaply(module: torch.nn.Module, **kwargs: object) -> torch.nn.Module:
        compiled.append(module)
        return real_compile(module, backend="aot_eager")  # dynamo + AOTAutograd, without a C++ toolchain run

    monkeypatch.setattr(torch, "compile", compile_cheaply)
    cfg = folder_cfg(
        compose_cfg,
        image_folder,
        "compile=true",
        "trainer.max_epochs=3",
        "finetune.train_bn=false",
        "finetune.unfreeze=[[1,1],[2,all]]",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
    )
    run = build(cfg)
    before = snapshot(run.model._backbone.module)
    recorder = RecordStages()
    run.trainer.callbacks.append(recorder)
    finetune.fit(run.trainer, run.model, run.datamodule, run.schedule)
    assert len(compiled) == 3, "one compiled graph per phase"
    assert recorder.stages_with_grads == {0: [], 1: ["layer4"], 2: ["conv1", "layer1", "layer2", "layer3", "layer4"]}
    after = snapshot(run.model.net.backbone)
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not [k for k in run.model.state_dict() if "_orig_mod" in k], "checkpoints must not depend on compile"


TIMM = ("model=timm", f"model.backbone.name={TIMM_MODEL}")


def test_a_timm_backbone_resumes_exactly_from_the_unfreeze_boundary(
    compose_cfg, image_folder, tmp_path, timm_pretrained
):
    """The resume guarantee on timm's EfficientNet (BatchNormAct2d, its own stage split): the boundary checkpoint
    resumes, through the unfreeze, to an uninterrupted run's weights."""
    common = (*TIMM, "finetune.freeze_epochs=1", "trainer.max_epochs=3", "callbacks.model_checkpoint.monitor=null",
              "callbacks.model_checkpoint.save_top_k=-1", "callbacks.model_checkpoint.filename='e{epoch}'")  # fmt: skip
    full = build(folder_cfg(compose_cfg, image_folder, *common, output_dir=tmp_path / "full"))
    finetune.fit(full.trainer, full.model, full.datamodule, full.schedule)
    resumed = build(folder_cfg(compose_cfg, image_folder, *common, output_dir=tmp_path / "resumed"))
    boundary = tmp_path / "full" / "checkpoints" / "phase1.ckpt"
    finetune.fit(resumed.trainer, resumed.model, resumed.datamodule, resumed.schedule, ckpt_path=boundary)
    expected, got = snapshot(full.model.net), snapshot(resumed.model.net)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_a_compiled_timm_backbone_gets_a_fresh_graph_after_the_unfreeze(
    compose_cfg, image_folder, monkeypatch, timm_pretrained
):
    compiled: list[torch.nn.Module] = []
    real_compile = torch.compile

    def compile_cheaply(module: torch.nn.Module, **kwargs: object) -> torch.nn.Module:
        compiled.append(module)
        return real_compile(module, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_cheaply)
    cfg = folder_cfg(compose_cfg, image_folder, *TIMM, "compile=true", "trainer.max_epochs=2", "finetune.train_bn=false",
                     "trainer.limit_train_batches=1", "trainer.limit_val_batches=1")  # fmt: skip
    run, recorder, before = fit_recording(cfg)
    assert len(compiled) == 2, "one compiled graph per phase"
    assert recorder.backbone_grads == {0: False, 1: True}
    after = snapshot(run.model.net.backbone)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert not [k for k in run.model.state_dict() if "_orig_mod" in k]


def test_train_writes_checkpoints_that_load_with_weights_only(compose_cfg, image_folder):
    cfg = folder_cfg(compose_cfg, image_folder, "trainer.max_epochs=2", "test=true")
    metrics = train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(last) == []
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["hyper_parameters"]["class_names"] == ["class_0", "class_1", "class_2"]
    assert checkpoint["hyper_parameters"]["pretrained"] is True
    assert checkpoint["run_config"]["data"]["root"] == str(image_folder)
    assert 0.0 <= metrics["test/acc"] <= 1.0 and Path(metrics["best_checkpoint"]).is_file()


def test_checkpoint_bookkeeping_spans_the_unfreeze(compose_cfg, image_folder):
    """Best and last checkpoints are tracked across both fits: the best is the best of all epochs, `last.ckpt` is the
    final epoch, and no `last-v1.ckpt` appears (ModelCheckpoint must record the frozen epoch before the boundary)."""
    cfg = folder_cfg(
        compose_cfg,
        image_folder,
        "trainer.max_epochs=3",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.filename='e{epoch}-{val/acc:.6f}'",
    )
    run = build(cfg)
    finetune.fit(run.trainer, run.model, run.datamodule, run.schedule)
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("last*.ckpt")) == ["last.ckpt"]
    assert finetune.resume_epoch(ckpts / "last.ckpt") == 3
    scores = {p.name: float(p.stem.split("-")[1]) for p in ckpts.glob("e*.ckpt")}
    assert len(scores) == 3
    callback = run.trainer.checkpoint_callback
    assert float(callback.best_model_score) == pytest.approx(max(scores.values()), abs=1e-6)
    assert Path(callback.best_model_path).name in {
        name for name, score in scores.items() if score == max(scores.values())
    }
