"""Heads and losses chosen in the config; the module injected, not inspected; checkpoints of before still load."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from support import FAST, make_image_folder

from image_finetune.inference.classifier import Classifier
from image_finetune.models.classifier import ImageClassifier, check_weights_fit
from image_finetune.recipe.heads import mlp_head
from image_finetune.recipe.losses import balanced_weights, focal

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "main_checkpoint"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def test_focal_with_gamma_0_is_cross_entropy_on_labels_and_soft_targets():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    loss = focal([3, 3, 3, 3], gamma=0.0)
    torch.testing.assert_close(loss(logits, labels), F.cross_entropy(logits, labels))
    soft = torch.softmax(torch.randn(6, 4), dim=-1)
    torch.testing.assert_close(loss(logits, soft), F.cross_entropy(logits, soft))
    assert focal([3, 3, 3, 3], gamma=2.0)(logits, labels) < F.cross_entropy(logits, labels)


def test_balanced_weights_come_from_the_counts():
    torch.testing.assert_close(balanced_weights([10, 30, 0]), torch.tensor([4 / 3, 4 / 9, 0.0]))
    loss = focal([10, 30], gamma=0.0, weights="balanced")
    torch.testing.assert_close(loss.weights, torch.tensor([2.0, 2 / 3]))
    assert "weights" not in loss.state_dict()  # checkpoints hold only the network


def test_mlp_head_shapes_and_its_checkpoint_record():
    head = mlp_head(hidden=16)
    assert head.config == {"_target_": "image_finetune.recipe.heads.mlp_head", "hidden": 16}
    module = head.make(32, 5, 0.1)
    assert module(torch.randn(4, 32)).shape == (4, 5) and module[-1].weight.shape == (5, 16)


def test_weights_fit_names_the_class_count_for_any_head():
    model = ImageClassifier({"name": "resnet18", "weights": None}, class_names=["a", "b", "c"], head=mlp_head(8))
    other = ImageClassifier({"name": "resnet18", "weights": None}, class_names=list("abcde"), head=mlp_head(8))
    with pytest.raises(Exception, match=r"its head is 8->5 \(5 classes\), not 8->3 \(3 classes\)"):
        check_weights_fit(model, other.state_dict(), source="x", expected="y")
    linear = ImageClassifier({"name": "resnet18", "weights": None}, class_names=["a", "b", "c"])
    with pytest.raises(Exception, match="its head is another head"):
        check_weights_fit(model, linear.state_dict(), source="x", expected="y")


def test_the_module_inspects_nothing_and_takes_its_freeze_state_through_one_method():
    source = (REPO / "src/image_finetune/models/classifier.py").read_text()
    assert not re.search(r"\binspect\b|\"keywords\"|object\.__setattr__", source)
    model = ImageClassifier({"name": "resnet18", "weights": None}, class_names=["a", "b"], lr=0.5)
    assert {g["lr"] for g in model.param_groups() if g["name"].startswith("head")} == {0.5}
    model.set_trainable_stages(0)
    assert model.trainable_stages == 0
    with pytest.raises(AttributeError):
        model.trainable_stages = 1  # read-only: set_trainable_stages is the one way in


def test_a_checkpoint_written_by_main_before_heads_loads_with_the_same_probabilities(tmp_path):
    expected = json.loads((FIXTURE / "expected.json").read_text())
    classifier = Classifier.from_checkpoint(FIXTURE / "model.ckpt", device="cpu")
    images = sorted(expected["probabilities"])
    probabilities = classifier.probabilities(torch.stack([classifier.preprocess(FIXTURE / i) for i in images]))
    torch.testing.assert_close(probabilities, torch.tensor([expected["probabilities"][i] for i in images]))
    result = run("predict.py", f"ckpt_path={FIXTURE / 'model.ckpt'}", f"input={FIXTURE / 'images'}", "device=cpu",
                 "num_workers=0", "progress=false", f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(images)
    for row in rows:
        probs = expected["probabilities"][str(Path(row["path"]).resolve().relative_to(FIXTURE))]
        assert abs(float(row["probability_1"]) - max(probs)) < 1e-6


@pytest.fixture(scope="module")
def mlp_focal_run(tmp_path_factory) -> Path:
    """``python train.py head=mlp loss=focal`` on a tiny generated folder, as a user runs it (shared by the tests)."""
    root = tmp_path_factory.mktemp("mlp_focal")
    images = make_image_folder(root / "images", classes=3, per_class=8)
    result = run("train.py", "head=mlp", "model.head.hidden=16", "loss=focal", "model.loss.weights=balanced",
                 "data=imagefolder", f"data.root={images}", "model.backbone.weights=null", "trainer.max_epochs=2",
                 "logger=csv", "test=false", f"hydra.run.dir={root / 'run'}", *FAST)  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return root


def test_mlp_focal_checkpoint_serves_eval_predict_and_onnx_export(mlp_focal_run):
    ckpt = mlp_focal_run / "run" / "checkpoints" / "last.ckpt"
    hparams = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["head"] == {"_target_": "image_finetune.recipe.heads.mlp_head", "hidden": 16}
    for args in (
        ["eval.py", f"ckpt_path={ckpt}", "data=imagefolder", f"data.root={mlp_focal_run / 'images'}", "split=all",
         "trainer=cpu", "data.num_workers=0", f"hydra.run.dir={mlp_focal_run / 'eval'}"],
        ["predict.py", f"ckpt_path={ckpt}", f"input={mlp_focal_run / 'images'}", "device=cpu", "num_workers=0",
         "progress=false", f"hydra.run.dir={mlp_focal_run / 'predict'}"],
        ["export.py", f"ckpt_path={ckpt}", "format=onnx", f"hydra.run.dir={mlp_focal_run / 'export'}"],
    ):  # fmt: skip
        result = run(*args)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (args[0], result.stderr[-3000:])
    assert (mlp_focal_run / "predict" / "predictions.csv").is_file()
    exported = json.loads((mlp_focal_run / "export" / "model.onnx.json").read_text())
    assert exported["head"] == hparams["head"]


def test_debug_overfit_composes_with_every_shipped_loss(compose_cfg):
    """``debug=overfit`` turns label smoothing off (``model.loss.label_smoothing``): every loss must take it."""
    for path in sorted((Path(__file__).resolve().parents[1] / "configs" / "loss").glob("*.yaml")):
        cfg = compose_cfg("debug=overfit", f"loss={path.stem}")
        assert cfg.model.loss.label_smoothing == 0.0
        loss = instantiate(cfg.model.loss)(class_counts=[2, 3])
        targets = torch.eye(2) if path.stem == "bce" else torch.tensor([0, 1])  # bce: multi-hot label sets
        assert torch.isfinite(loss(torch.zeros(2, 2), targets))


def test_focal_label_smoothing_smooths_the_targets_as_cross_entropy_does():
    logits, targets = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    smoothed = focal([1, 1, 1, 1], gamma=0.0, label_smoothing=0.2)(logits, targets)
    assert torch.allclose(smoothed, torch.nn.CrossEntropyLoss(label_smoothing=0.2)(logits, targets), atol=1e-6)
