"""`python export.py`: every format round-trips, and eval, predict, the API, ONNX and TorchScript give one answer.

Tolerances, measured on this test's model and images (CPU, float32):
* the same preprocessed tensor through the checkpoint's network, ONNX Runtime and TorchScript: < 1e-6 apart; eval,
  predict and the API share the preprocessing, so they agree to the 6 decimals the CSVs hold. Asserted: 1e-4.
* the numpy + Pillow example (examples/onnx_classify.py): Pillow's bilinear resize differs from torchvision's by at
  most 1 grey level on a few percent of pixels, which moved probabilities by up to ~3e-4. Asserted: pixels within
  1/255, probabilities within 1e-3.
"""

from __future__ import annotations

import csv
import errno
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from messy_folder import PHOTOS
from PIL import Image
from safetensors.torch import load_file
from support import FAST
from torchvision.datasets import CIFAR10

from image_finetune.core.errors import ConfigError, UserError
from image_finetune.data.scan import IMAGE_EXTENSIONS
from image_finetune.inference.classifier import Classifier, sidecar_path
from image_finetune.inference.evaluate import evaluate
from image_finetune.inference.export import FORMATS, WRITERS, export, export_classifier, load_exported
from image_finetune.inference.predict import predict
from image_finetune.training.train import train

pytest_plugins = ["trained"]  # the shared `trained` fixture

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "onnx_classify.py"


def csv_probabilities(path: Path) -> dict[str, dict[str, float]]:
    """path -> {label: probability} from an eval or predict CSV."""
    with open(path, newline="") as f:
        return {
            row["path"]: {row[f"label_{i}"]: float(row[f"probability_{i}"]) for i in range(1, 4)}
            for row in csv.DictReader(f)
        }


def as_dicts(probabilities: np.ndarray, class_names: list[str]) -> list[dict[str, float]]:
    return [dict(zip(class_names, map(float, row))) for row in probabilities]


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(logits).softmax(dim=-1).numpy()


def assert_close(a: dict[str, float], b: dict[str, float], tolerance: float) -> None:
    assert a.keys() == b.keys()
    assert max(abs(a[k] - b[k]) for k in a) <= tolerance, (a, b)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_export_round_trips(trained, compose_cfg, tmp_path, fmt):
    path = export(
        compose_cfg(f"ckpt_path={trained.checkpoint}", f"format={fmt}", config_name="export", output_dir=tmp_path)
    )
    assert path == tmp_path / f"model{FORMATS[fmt]}"
    classifier = trained.classifier
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["architecture"] == "resnet18" and meta["class_names"] == ["class_0", "class_1", "class_2"]
    assert meta["format"] == fmt and meta["source_checkpoint"] == str(trained.checkpoint)
    prep = meta["preprocessing"]
    assert (prep["resize"], prep["crop"]) == (37, 32)  # 32 px / crop_ratio 0.875
    assert (
        prep["mean"] == classifier.net.mean.flatten().tolist() and prep["std"] == classifier.net.std.flatten().tolist()
    )

    images = sorted((trained.images / "class_1").iterdir())[:4]
    batch = torch.stack([classifier.preprocess(p) for p in images])
    run = load_exported(path)
    for n in (1, 4):  # the batch axis is dynamic
        got = softmax(run(batch[:n].numpy()))
        assert np.abs(got - classifier.probabilities(batch[:n]).numpy()).max() <= 1e-4
    if fmt == "onnx":
        model = onnx.load(str(path))
        assert [i.name for i in model.graph.input] == ["images"] and [o.name for o in model.graph.output] == ["logits"]
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    if fmt == "safetensors":
        weights = load_file(path)
        assert weights.keys() == classifier.net.state_dict().keys()
        assert all(torch.equal(weights[k], v) for k, v in classifier.net.state_dict().items())


def test_eval_predict_api_onnx_and_torchscript_agree(trained, compose_cfg, tmp_path):
    evaluate(
        compose_cfg(f"ckpt_path={trained.checkpoint}", *FAST[:2], config_name="eval", output_dir=tmp_path / "eval")
    )
    by_eval = csv_probabilities(tmp_path / "eval" / "predictions.csv")
    paths = sorted(by_eval)
    (listing := tmp_path / "test_split.txt").write_text("\n".join(paths))
    cfg = compose_cfg(f"ckpt_path={trained.checkpoint}", f"input={listing}", "num_workers=0", "progress=false",
                      config_name="predict", output_dir=tmp_path / "predict")  # fmt: skip
    by_predict = csv_probabilities(predict(cfg))

    classifier = trained.classifier
    by_api = [dict(zip(p.labels, p.probabilities)) for p in classifier.predict(paths)]
    batch = torch.stack([classifier.preprocess(p) for p in paths]).numpy()
    exported = {}
    for fmt in ("onnx", "torchscript"):
        path = export_classifier(
            classifier, fmt, tmp_path / f"model.{fmt}", source=str(trained.checkpoint), verify=False
        )
        exported[fmt] = as_dicts(softmax(load_exported(path)(batch)), classifier.class_names)

    assert len(paths) == 12
    for i, path in enumerate(paths):
        for other in (by_predict[path], by_api[i], exported["onnx"][i], exported["torchscript"][i]):
            assert_close(by_eval[path], other, 1e-4)


def test_numpy_only_example_without_torch(trained, tmp_path):
    classifier = trained.classifier
    model = export_classifier(classifier, "onnx", tmp_path / "model.onnx", source=str(trained.checkpoint), verify=False)
    rgba = tmp_path / "cutout.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA").save(rgba)
    images = [*map(str, sorted((trained.images / "class_0").iterdir())[:3]), str(PHOTOS / "china.jpg"), str(rgba)]

    example = runpy.run_path(str(EXAMPLE))  # its functions, without running main()
    prep = json.loads(sidecar_path(model).read_text())["preprocessing"]
    for image in images:
        pixels = example["preprocess"](image, prep["resize"], prep["crop"])
        assert np.abs(pixels - classifier.preprocess(image).numpy()).max() <= 1 / 255 + 1e-6, image

    # As a user runs it, with torch made unimportable: it must not need it. A folder is searched like predict.py's.
    folder = tmp_path / "folder"
    (folder / "nested").mkdir(parents=True)
    (folder / "nested" / "a.jpg").write_bytes((trained.images / "class_1" / "img_000.jpg").read_bytes())
    (folder / "b.png").write_bytes((trained.images / "class_2" / "img_001.png").read_bytes())
    (folder / ".hidden.png").write_bytes(b"\0")
    (folder / "notes.txt").write_text("not an image")
    args = ["x", str(model), *images, str(folder), "--json"]
    code = f"import runpy, sys; sys.modules['torch'] = None; sys.argv = {args!r}; " \
           f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')"  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    images += [str(folder / "b.png"), str(folder / "nested" / "a.jpg")]
    assert [r["path"] for r in json.loads(result.stdout)] == images
    for got, expected in zip(json.loads(result.stdout), classifier.predict(images), strict=True):
        assert got["labels"][0] == expected.label
        assert_close(
            dict(zip(got["labels"], got["probabilities"])), dict(zip(expected.labels, expected.probabilities)), 1e-3
        )


def test_the_examples_image_extensions_are_the_projects():
    assert runpy.run_path(str(EXAMPLE))["IMAGE_EXTENSIONS"] == IMAGE_EXTENSIONS


def test_export_onto_a_folder_or_an_unwritable_place_is_one_line(trained, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match=r"output='.*out' is a folder; give a file path, e\.g\. output=.*model\.onnx"):
        export_classifier(trained.classifier, "onnx", tmp_path / "out", source="x")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(
        UserError, match=r"output='.*a_file/model\.onnx': cannot write there \(.*a_file is a file, not a folder\)"
    ):
        export_classifier(trained.classifier, "onnx", tmp_path / "a_file" / "model.onnx", source="x", verify=False)


def test_disk_full_during_export_says_so_and_keeps_the_previous_file(trained, tmp_path, monkeypatch):
    path = export_classifier(trained.classifier, "torchscript", tmp_path / "model.pt", source="x", verify=False)
    before = path.read_bytes()

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setitem(WRITERS, "torchscript", full)
    with pytest.raises(UserError, match=r"output: no space left on device while writing .*model\.pt; free space"):
        export_classifier(trained.classifier, "torchscript", path, source="x", verify=False)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.pt.json"]  # no temporary file left


def test_safetensors_beside_the_json_of_another_model_says_what_differs(trained, tmp_path):
    classifier = trained.classifier
    path = export_classifier(
        classifier, "safetensors", tmp_path / "model.safetensors", source=str(trained.checkpoint), verify=False
    )
    meta = json.loads(sidecar_path(path).read_text())
    sidecar_path(path).write_text(json.dumps({**meta, "class_names": [*meta["class_names"], "class_3"]}))
    with pytest.raises(UserError, match=r"does not fit resnet18, 4 classes.*head is 512->3 \(3 classes\), not 512->4"):
        Classifier.from_safetensors(path)
    sidecar_path(path).write_text(json.dumps({**meta, "architecture": "resnet34"}))
    with pytest.raises(
        UserError,
        match=r"does not fit resnet34, 3 classes.*another architecture \(0 tensors of another shape, \d+ missing",
    ):
        Classifier.from_safetensors(path)


def test_unknown_format_is_a_config_error(trained, compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"format='tflite': choose one of \['onnx', 'torchscript', 'safetensors'\]"):
        export(
            compose_cfg(f"ckpt_path={trained.checkpoint}", "format=tflite", config_name="export", output_dir=tmp_path)
        )


def test_cifar_model_upsamples_inside_the_network_so_eval_predict_and_exports_agree(
    compose_cfg, pretrained, cifar_root, tmp_path
):
    """CIFAR's 32 px images reach the backbone at ``model.upsample_to``: a 32x32 file gets eval's probabilities everywhere."""
    metrics = train(compose_cfg(
        "experiment=cifar10", "model.backbone.name=resnet18", "model.backbone.weights=IMAGENET1K_V1", "model.upsample_to=64",
        "finetune=full", "trainer.max_epochs=1", "logger=csv", "channels_last=false", *FAST, f"data.data_dir={cifar_root}",
        "data.val_size=20",
    ))  # fmt: skip
    checkpoint = metrics["best_checkpoint"]
    evaluate(compose_cfg(f"ckpt_path={checkpoint}", *FAST[:2], config_name="eval", output_dir=tmp_path / "eval"))
    by_eval = csv_probabilities(tmp_path / "eval" / "predictions.csv")  # CIFAR's test samples by index

    folder = tmp_path / "cifar_png"
    folder.mkdir()
    for i, pixels in enumerate(CIFAR10(cifar_root, train=False).data):
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    cfg = compose_cfg(f"ckpt_path={checkpoint}", f"input={folder}", "num_workers=0", "progress=false",
                      config_name="predict", output_dir=tmp_path / "predict")  # fmt: skip
    by_predict = {Path(path).stem: p for path, p in csv_probabilities(predict(cfg)).items()}
    assert len(by_eval) == len(by_predict) == 30
    for path, probabilities in by_predict.items():
        assert_close(by_eval[str(int(path))], probabilities, 1e-4)

    classifier = Classifier.from_checkpoint(checkpoint, device="cpu")
    assert classifier.net.upsample_to == 64 and classifier.preprocessing.resize == classifier.preprocessing.size == 32
    paths = sorted(folder.iterdir())[:4]
    batch = torch.stack([classifier.preprocess(p) for p in paths])
    seen = []
    hook = classifier.net.backbone.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    expected = classifier.probabilities(batch).numpy()
    hook.remove()
    assert seen == [(4, 3, 64, 64)]  # the backbone sees upsampled images
    onnx_path = export_classifier(classifier, "onnx", tmp_path / "model.onnx", source=checkpoint)
    assert [d.dim_value for d in onnx.load(str(onnx_path)).graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 32, 32]
    assert np.abs(softmax(load_exported(onnx_path)(batch.numpy())) - expected).max() <= 1e-4
    weights = export_classifier(classifier, "safetensors", tmp_path / "model.safetensors", source=checkpoint)
    reloaded = Classifier.from_safetensors(weights, device="cpu")
    assert reloaded.net.upsample_to == 64
    assert np.abs(reloaded.probabilities(batch).numpy() - expected).max() <= 1e-6
