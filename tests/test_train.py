"""`python train.py` and `python eval.py`: every experiment runs, the offline default trains, eval reproduces train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from support import FAST, TIMM_MODEL, make_image_folder

from image_finetune.inference.evaluate import evaluate
from image_finetune.training.train import train

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (REPO / "configs" / "trainer").glob("*.yaml"))


def test_no_arguments_is_the_digits_experiment(compose_cfg):
    default, digits = compose_cfg(), compose_cfg("experiment=digits")
    without_hydra = lambda cfg: {k: v for k, v in cfg.items() if k != "hydra"}
    assert without_hydra(default) == without_hydra(digits)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_experiment_composes_with_every_trainer(compose_cfg, experiment, trainer):
    cfg = compose_cfg(f"experiment={experiment}", f"trainer={trainer}")
    assert cfg.trainer._target_ == "lightning.Trainer"
    assert cfg.model.backbone.name.startswith("resnet")
    assert cfg.data._target_.startswith("image_finetune.data.")
    assert cfg.model.train_bn == cfg.finetune.train_bn and cfg.model.backbone_lr_ratio == cfg.finetune.backbone_lr_ratio


@pytest.mark.parametrize("trainer", ["cpu", "ddp_sim"])
def test_cpu_trainer_presets_instantiate(compose_cfg, trainer):
    cfg = compose_cfg(f"trainer={trainer}")
    built = instantiate(cfg.trainer)
    assert built.world_size == (2 if trainer == "ddp_sim" else 1)


def test_digits_offline_falls_back_to_random_init_and_records_it(compose_cfg, offline_hub, caplog):
    cfg = compose_cfg("debug=limit", "trainer.max_epochs=1", "logger=csv", *FAST)
    metrics = train(cfg)
    assert "TRAINING FROM RANDOM INITIALISATION" in caplog.text
    assert "test/acc" in metrics
    hparams = (Path(cfg.paths.output_dir) / "csv" / "hparams.yaml").read_text()
    assert "pretrained: false" in hparams


def test_fast_dev_run_cifar10_with_pretrained_resnet50(compose_cfg, pretrained, cifar_root):
    cfg = compose_cfg(
        "experiment=cifar10",
        "debug=fdr",
        *FAST,
        f"data.data_dir={cifar_root}",
        "data.val_size=20",
        "data.batch_size=4",
        "channels_last=false",
    )
    metrics = train(cfg)
    assert {"test/acc", "test/f1", "test/top5"} <= set(metrics)


def test_fast_dev_run_imagefolder_experiment(compose_cfg, pretrained, image_folder):
    metrics = train(compose_cfg("experiment=imagefolder", "debug=fdr", *FAST, f"data.root={image_folder}"))
    assert "test/acc" in metrics and "test/top5" not in metrics  # 3 classes: no top-5


def test_non_demo_runs_stop_when_weights_cannot_be_had(compose_cfg, offline_hub, image_folder):
    from image_finetune.core.errors import ConfigError

    cfg = compose_cfg("experiment=imagefolder", "debug=fdr", *FAST, f"data.root={image_folder}")
    with pytest.raises(Exception) as info:
        train(cfg)
    err = info.value.__cause__ if not isinstance(info.value, ConfigError) else info.value
    assert isinstance(err, ConfigError)
    assert "resnet50-" in str(err) and str(offline_hub / "hub" / "checkpoints") in str(err)
    # both ways out: a local file, or random initialisation
    assert "model.backbone.weights=PATH" in str(err) and "model.backbone.weights=null" in str(err)


def test_eval_reproduces_the_test_metrics_of_training(compose_cfg, pretrained, image_folder, tmp_path):
    cfg = compose_cfg(
        "data=imagefolder", f"data.root={image_folder}", "data.test_fraction=0.25", "trainer.max_epochs=2", *FAST
    )
    trained = train(cfg)
    best = trained["best_checkpoint"]
    evaluated = evaluate(compose_cfg(f"ckpt_path={best}", *FAST[:2], config_name="eval", output_dir=tmp_path / "eval"))
    assert set(evaluated) == {k for k in trained if k.startswith("test/")}
    for key, value in evaluated.items():
        assert value == pytest.approx(trained[key], abs=1e-6), key
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["test/acc"] == pytest.approx(trained["test/acc"])


def test_ckpt_path_last_without_a_checkpoint_is_an_error(compose_cfg):
    from image_finetune.core.errors import UserError

    with pytest.raises(UserError, match=r"no checkpoint at .*last\.ckpt.*hydra\.run\.dir"):
        train(compose_cfg("ckpt_path=last", *FAST))


def run_script(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_user_errors_are_one_line_not_a_traceback(tmp_path, hub_dir):
    result = run_script(
        "train.py",
        "data=imagefolder",
        f"data.root={tmp_path / 'nope'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer=cpu",
        f"paths.data_dir={tmp_path}",
        env={"TORCH_HOME": str(hub_dir)},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"error: data.root='{tmp_path / 'nope'}' does not exist" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("zoo", ["torchvision", "timm"])
def test_ddp_sim_keeps_ranks_identical_through_the_unfreeze(tmp_path, hub_dir, zoo, request):
    """Two gloo processes; CheckWeightsInSync compares a fingerprint of every weight across ranks after each epoch.
    Also on timm's tiny EfficientNet (its own stages and BatchNormAct2d layers), from a seeded HF cache."""
    run_dir = tmp_path / "ddp"
    zoo_args, zoo_env = [], {}
    if zoo == "timm":
        zoo_args = ["model=timm", f"model.backbone.name={TIMM_MODEL}", "data=imagefolder",
                    f"data.root={make_image_folder(tmp_path / 'images', per_class=12)}", "data.image_size=32"]  # fmt: skip
        zoo_env = {"HF_HUB_CACHE": str(request.getfixturevalue("hf_cache")), "HF_HUB_OFFLINE": "1"}
    result = run_script(
        # The default callbacks and logger: the progress bar and the TensorBoard visuals run on rank 0 only, which is
        # where a stray collective would hang (Lightning #21264).
        # Three phases (head, then layer4, then all): DDP re-wrapped at each boundary with the new trainable set.
        "train.py",
        "trainer=ddp_sim",
        "debug=limit",
        "trainer.max_epochs=3",
        "finetune.unfreeze=[[1,1],[2,all]]",
        "data.num_workers=0",
        "data.batch_size=16",
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={tmp_path / 'data'}",
        *zoo_args,
        env={"TORCH_HOME": str(hub_dir), **zoo_env},
        timeout=300,  # it takes ~30 s; a hang fails here instead of stalling CI
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "epoch 1: weights identical on all 2 ranks" in output  # epochs are counted from 1 in what a person reads
    assert "epoch 2: weights identical on all 2 ranks" in output
    assert "epoch 3: weights identical on all 2 ranks" in output
    assert "Unfreezing after epoch 1: the last 1 backbone stage(s) train(s) from now on" in output
    assert "Unfreezing after epoch 2: the whole backbone train(s) from now on" in output
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["pretrained"] is True
