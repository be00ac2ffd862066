"""Test-time augmentation (``tta=flip|five_crop``): a no-op where the views are all alike, and the same numbers from
``eval.py`` (beside the plain score), ``predict.py`` and the ``Classifier`` API."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import FAST

from image_finetune.core.errors import ConfigError
from image_finetune.inference.classifier import Classifier
from image_finetune.inference.evaluate import evaluate
from image_finetune.inference.predict import predict

pytest_plugins = ["trained"]  # the shared `trained` fixture


def with_tta(classifier: Classifier, tta: str | None) -> Classifier:
    return Classifier(
        classifier.net, classifier.class_names, classifier.preprocessing, architecture="resnet18", device="cpu", tta=tta
    )


def test_flip_tta_changes_nothing_for_a_mirror_symmetric_image_and_something_otherwise(trained):
    plain, flip = with_tta(trained.classifier, None), with_tta(trained.classifier, "flip")
    half = torch.randint(0, 256, (4, 3, 32, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)
    torch.testing.assert_close(flip.probabilities(symmetric), plain.probabilities(symmetric), rtol=0, atol=1e-6)
    asymmetric = torch.cat([half, half.roll(1, dims=0)], dim=-1)
    assert (flip.probabilities(asymmetric) - plain.probabilities(asymmetric)).abs().max() > 1e-4


def test_five_crop_tta_changes_nothing_for_a_uniform_image_and_something_otherwise(trained, tmp_path):
    """Through files, so the larger square five_crop loads is exercised too."""
    plain, five = with_tta(trained.classifier, None), with_tta(trained.classifier, "five_crop")
    assert five.input_preprocessing.size > plain.preprocessing.size
    uniform, textured = tmp_path / "uniform.png", tmp_path / "textured.png"
    Image.new("RGB", (50, 40), (200, 30, 90)).save(uniform)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(textured)
    same = [p.probabilities for p in (*plain.predict(uniform), *five.predict(uniform))]
    assert same[0] == pytest.approx(same[1], abs=1e-6)
    a, b = plain.predict(textured, top_k=3)[0], five.predict(textured, top_k=3)[0]
    assert dict(zip(a.labels, a.probabilities)) != pytest.approx(dict(zip(b.labels, b.probabilities)), abs=1e-4)


def accuracy_and_loss(classifier: Classifier, files: list[tuple[Path, int]]) -> tuple[float, float]:
    predictions = classifier.predict([path for path, _ in files], top_k=len(classifier.class_names))
    probabilities = [dict(zip(p.labels, p.probabilities)) for p in predictions]
    names = classifier.class_names
    correct = [max(p, key=p.get) == names[label] for p, (_, label) in zip(probabilities, files)]
    losses = [-np.log(p[names[label]]) for p, (_, label) in zip(probabilities, files)]
    return sum(correct) / len(files), float(np.mean(losses))


@pytest.mark.parametrize("mode", ["flip", "five_crop"])
def test_eval_reports_tta_beside_the_plain_score_as_the_api_computes_it(trained, compose_cfg, tmp_path, mode):
    out = tmp_path / "eval"
    metrics = evaluate(
        compose_cfg(f"ckpt_path={trained.checkpoint}", f"tta={mode}", *FAST[:2], config_name="eval", output_dir=out)
    )
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["tta"] == mode
    # The plain score is untouched: what training reported for this checkpoint.
    assert {k: v for k, v in metrics.items() if k.startswith("test/")} == pytest.approx(
        {k: v for k, v in trained.metrics.items() if k.startswith("test/")}, abs=1e-6
    )
    manifest = json.loads((trained.checkpoint.parents[1] / "data_split.json").read_text())
    files = [(Path(manifest["root"]) / rel, label) for rel, label in manifest["splits"]["test"]]
    acc, loss = accuracy_and_loss(with_tta(trained.classifier, mode), files)
    assert saved["tta/test/acc"] == pytest.approx(acc, abs=1e-6)
    assert saved["tta/test/loss"] == pytest.approx(loss, abs=1e-4)
    assert saved["tta/test/loss"] != pytest.approx(saved["test/loss"], abs=1e-4)


def test_predict_with_tta_writes_the_api_probabilities(trained, compose_cfg, tmp_path):
    folder = trained.images / "class_1"
    cfg = compose_cfg(f"ckpt_path={trained.checkpoint}", f"input={folder}", "tta=flip", "num_workers=0", "device=cpu",
                      "progress=false", config_name="predict", output_dir=tmp_path / "predict")  # fmt: skip
    with open(predict(cfg), newline="") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    expected = with_tta(trained.classifier, "flip").predict(sorted(folder.iterdir()), top_k=3)
    plain = trained.classifier.predict(sorted(folder.iterdir()), top_k=3)
    assert len(rows) == len(expected) == 16
    for prediction in expected:
        row = rows[prediction.source]
        assert [float(row[f"probability_{i}"]) for i in (1, 2, 3)] == pytest.approx(prediction.probabilities, abs=1e-5)
    assert any(e.probabilities != pytest.approx(p.probabilities, abs=1e-4) for e, p in zip(expected, plain))


def test_an_unknown_tta_mode_names_the_choices(trained):
    with pytest.raises(ConfigError, match=r"tta='mirror': choose flip .* five_crop"):
        with_tta(trained.classifier, "mirror")
