"""Regularisation a user turns on by name: augmentation presets, mixup/cutmix, weight EMA, stochastic depth.

Each promise is checked through the real config composition and training code on a tiny generated image folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig

from image_finetune import finetune
from image_finetune.callbacks import EMAWeights
from image_finetune.train import build
from support import FAST

pytestmark = pytest.mark.usefixtures("pretrained")


def folder_cfg(compose_cfg: Callable[..., DictConfig], root: Path, *overrides: str, output_dir: Path | None = None) -> DictConfig:
    return compose_cfg(
        "data=imagefolder", f"data.root={root}", "trainer.max_epochs=3", "logger=csv", "test=false",
        *FAST, *overrides, output_dir=output_dir,
    )  # fmt: skip


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class RecordHead(L.Callback):
    """The raw head weight after every optimizer step (what the EMA averages)."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.weights.append(pl_module.net.head[1].weight.detach().clone())


EVERY_EPOCH = ("callbacks.model_checkpoint.save_top_k=-1", "callbacks.model_checkpoint.filename='e{epoch}'",
               "callbacks.model_checkpoint.monitor=null")


def test_ema_weights_are_what_validation_checkpoints_and_test_use(compose_cfg, image_folder, tmp_path):
    decay = 0.6
    cfg = folder_cfg(compose_cfg, image_folder, "callbacks=ema", f"callbacks.ema.decay={decay}", "finetune.freeze_epochs=1",
                     *EVERY_EPOCH, output_dir=tmp_path / "run")
    run = build(cfg)
    recorder = RecordHead()
    run.trainer.callbacks.append(recorder)
    finetune.fit(run.trainer, run.model, run.datamodule)
    assert len(recorder.weights) >= 3  # steps on both sides of the unfreeze
    expected = recorder.weights[0]
    for w in recorder.weights[1:]:
        expected = decay * expected + (1 - decay) * w
    last = tmp_path / "run" / "checkpoints" / "e2.ckpt"
    ckpt = torch.load(last, weights_only=True)
    torch.testing.assert_close(ckpt["state_dict"]["net.head.1.weight"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ckpt["current_model_state"]["net.head.1.weight"], recorder.weights[-1], rtol=0, atol=0)
    assert not torch.allclose(expected, recorder.weights[-1], atol=1e-5)
    logged = run.trainer.callback_metrics["val/loss"].item()
    # Testing the checkpoint with the training trainer (as train() does) uses the average. The data has no test split,
    # so the test set is the val set: the same loss as validation logged.
    tested = run.trainer.test(run.model, datamodule=run.datamodule, ckpt_path=str(last), weights_only=True, verbose=False)
    assert tested[0]["test/loss"] == pytest.approx(logged, abs=1e-5)
    torch.testing.assert_close(run.model.net.head[1].weight, expected, rtol=0, atol=1e-6)
    # ... and the raw weights would have given another validation loss.
    plain = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    run.model.load_state_dict(ckpt["current_model_state"])
    raw = plain.validate(run.model, datamodule=run.datamodule, verbose=False)[0]["val/loss"]
    assert raw != pytest.approx(logged, abs=1e-4)
