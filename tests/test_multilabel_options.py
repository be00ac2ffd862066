"""Multi-label data (``data=csv`` with several labels per row, ``loss=bce``) takes the training options unchanged:
mixup and cutmix mix the multi-hot targets convexly, EMA weights are what checkpoints hold and test uses, a gradual
unfreeze schedule steps through its phases, ``eval.py tta=...`` reports the TTA mAP from averaged sigmoids, and
``lr_find.py`` sweeps both phases.

One ``train.py`` run (3 epochs of 2 batches, 32 px, random init) serves the eval and the in-process checks; the data is
test_multilabel.py's pairs of digits (``support.write_pairs``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from support import LABELS, write_pairs
from test_entry_matrix import COMMON, run, script_env

from image_finetune.checkpoints import read_checkpoint
from image_finetune.inference.classifier import Classifier
from image_finetune.models.classifier import batch_mixing

MIXUP = {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}


def options(table: Path) -> list[str]:
    """Multi-label data with mixup + cutmix, EMA and a three-phase unfreeze (head, last stage, everything)."""
    return ["data=csv", f"data.file={table}", "data.image_size=32", "loss=bce", "data.test_fraction=0.2",
            "data.batch_size=16", *COMMON, "finetune=gradual", "finetune.unfreeze=[[1,1],[2,all]]",
            "trainer.max_epochs=3", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
            *(f"model.mixup.{key}={value}" for key, value in MIXUP.items()),
            "callbacks=ema", "callbacks.ema.decay=0.6"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("multilabel_options")
    table = write_pairs(root)
    env = script_env()
    result = run("train.py", *options(table), f"hydra.run.dir={root / 'train'}", env=env)
    metrics = json.loads((root / "train" / "metrics.json").read_text())
    return {"root": root, "table": table, "env": env, "output": result.stdout + result.stderr, "metrics": metrics,
            "best": Path(metrics["test"]["checkpoint"])}  # fmt: skip


def test_train_with_mixup_ema_and_gradual_unfreeze_reports_map(trained):
    metrics, run_dir = trained["metrics"], trained["root"] / "train"
    assert 0 <= metrics["best"]["val"]["map"] <= 1 and 0 <= metrics["test"]["map"] <= 1
    last = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert (
        last["hyper_parameters"]["task"] == "multilabel" and MIXUP.items() <= last["hyper_parameters"]["mixup"].items()
    )
    # The unfreeze happened: logged, and the trainable share of the backbone rose each epoch to all of it.
    assert "Unfreezing after epoch 1: the last 1 backbone stage(s) train(s) from now on" in trained["output"]
    assert "Unfreezing after epoch 2: the whole backbone train(s) from now on" in trained["output"]
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        shares = [float(row["finetune/backbone_trainable"]) for row in csv.DictReader(f)
                  if row["finetune/backbone_trainable"]]  # fmt: skip
    assert len(shares) == 3 and shares[0] < 0.01 < shares[1] < shares[2] == 1.0, shares
    # EMA (as test_regularisation.py's single-label test): the checkpoint's state_dict is the average and the raw
    # weights travel beside it; train's test scored the average, as eval.py (which loads state_dict) does below.
    average, raw = last["state_dict"], last["current_model_state"]
    assert average.keys() == raw.keys() and not torch.allclose(average["net.head.1.weight"], raw["net.head.1.weight"])


def test_mixed_multi_hot_targets_are_a_convex_mix_in_0_1():
    """torchvision's MixUp/CutMix mix each image with the previous one in the batch: the targets must be
    ``lam * t + (1 - lam) * t.roll(1)`` with the same ``lam`` as the pixels (mixup: blended; cutmix: area kept)."""
    targets = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for alphas in ({"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}):
        torch.manual_seed(1)
        mixed_images, mixed = batch_mixing(len(LABELS), **alphas)(images, targets)
        assert mixed.shape == targets.shape and ((mixed >= 0) & (mixed <= 1)).all()
        lam = mixed[0, 0].item()  # label 0: only image 0 has it
        assert 0 < lam < 1
        torch.testing.assert_close(mixed, lam * targets + (1 - lam) * targets.roll(1, 0))
        if "mixup_alpha" in alphas:
            torch.testing.assert_close(mixed_images, lam * images + (1 - lam) * images.roll(1, 0))
        else:
            kept = (mixed_images == images).all(dim=1).float().mean().item()
            assert kept == pytest.approx(lam, abs=1e-6), alphas


def test_eval_tta_reports_the_map_of_averaged_sigmoids(trained, tmp_path):
    run("eval.py", f"ckpt_path={trained['best']}", "tta=flip", "trainer=cpu", "interpret.top_losses=0", f"hydra.run.dir={tmp_path}",
        env=trained["env"])  # fmt: skip
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    assert evaluated["task"] == "multilabel" and evaluated["tta"] == "flip"
    assert isinstance(evaluated["tta/test/map"], float) and 0 <= evaluated["tta/test/map"] <= 1
    assert abs(evaluated["test/map"] - trained["metrics"]["test"]["map"]) <= 1e-6  # the EMA average, both times
    # The TTA probabilities are the mean sigmoid over the image and its mirror, per label (not a softmax).
    files = sorted((trained["table"].parent / "images").glob("p*.png"))[:4]
    plain = Classifier.from_checkpoint(trained["best"], "cpu")
    batch = torch.stack([plain.preprocess(str(p)) for p in files])
    got = Classifier.from_checkpoint(trained["best"], "cpu", tta="flip").probabilities(batch)
    expected = (plain.probabilities(batch) + plain.probabilities(batch.flip(-1))) / 2
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got.sum(dim=-1), torch.ones(len(files)), atol=1e-3)


def test_lr_find_sweeps_multilabel_data_with_the_same_options(trained):
    run_dir = trained["root"] / "lr_find"
    run("lr_find.py", *options(trained["table"]), "lr_find.num_steps=10", f"hydra.run.dir={run_dir}",
        env=trained["env"])  # fmt: skip
    found = json.loads((run_dir / "lr_find.json").read_text())
    lr, ratio = found["suggested"]["model.optimizer.lr"], found["suggested"]["finetune.backbone_lr_ratio"]
    assert 1e-7 <= lr <= 10 and ratio > 0 and found["frozen"]["suggestion"] == lr
