"""`python predict.py` and the Python API: every input kind, unreadable files listed with reasons, safe loading."""

from __future__ import annotations

import csv
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from messy_folder import truncated_jpeg
from PIL import Image

from image_finetune.core.errors import DataError, UserError
from image_finetune.inference.classifier import Classifier, Preprocessing
from image_finetune.inference.predict import list_inputs, predict
from image_finetune.models.classifier import ImageClassifier

pytest_plugins = ["trained"]  # the shared `trained` fixture

REPO = Path(__file__).resolve().parents[1]


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def probabilities(row: dict[str, str]) -> dict[str, float]:
    return {row[f"label_{i}"]: float(row[f"probability_{i}"]) for i in range(1, 4) if row[f"label_{i}"]}


def messy_folder(trained, root: Path) -> dict[str, str | None]:
    """Good images (one nested), broken files and junk; returns each listed file's expected reason (None = good)."""
    good_jpg, good_png = trained.images / "class_0" / "img_000.jpg", trained.images / "class_2" / "img_001.png"
    (root / "nested" / "deeper").mkdir(parents=True)
    expected: dict[str, str | None] = {}
    for src, dst in ((good_jpg, root / "a.jpg"), (good_png, root / "nested" / "deeper" / "b.png")):
        dst.write_bytes(src.read_bytes())
        expected[str(dst)] = None
    truncated_jpeg(root / "cut.jpg")
    (root / "fake.jpg").write_text("not a picture")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("hello")
    (root / ".DS_Store").write_bytes(b"\0")  # hidden: not listed at all
    (root / "nested" / "._b.png").write_bytes(b"\0")
    os.mkfifo(root / "pipe.jpg")  # opening it would block for ever
    expected.update(
        {
            str(root / "cut.jpg"): "truncated",
            str(root / "fake.jpg"): "not an image",
            str(root / "empty.png"): "not an image",
            str(root / "notes.txt"): "unsupported extension: .txt",
            str(root / "pipe.jpg"): "unreadable: not a regular file",
        }
    )
    return expected


def test_predict_csv_lists_unreadable_files_with_reasons(trained, compose_cfg, tmp_path):
    expected = messy_folder(trained, tmp_path / "in")
    out = tmp_path / "out.csv"
    cfg = compose_cfg(
        f"ckpt_path={trained.checkpoint}", f"input={tmp_path / 'in'}", f"output={out}", "num_workers=2", "batch_size=2",
        "progress=false", config_name="predict",
    )  # fmt: skip
    assert predict(cfg) == out
    rows = read_rows(out)
    assert set(rows) == set(expected)
    assert list(next(iter(rows.values())))[-1] == "reason" and "label_3" in next(iter(rows.values()))  # k capped at 3
    for path, reason in expected.items():
        row = rows[path]
        if reason is None:
            assert row["reason"] == "" and row["label_1"] in {"class_0", "class_1", "class_2"}
            assert sum(probabilities(row).values()) == pytest.approx(1, abs=1e-5)
        else:
            assert row["reason"] == reason and row["label_1"] == "", path


def test_list_file_and_single_image_inputs(trained, compose_cfg, tmp_path):
    image = trained.images / "class_1" / "img_003.png"
    listing = tmp_path / "inputs.txt"
    (tmp_path / "rel.png").write_bytes(image.read_bytes())
    listing.write_text(f"# images to classify\n{image}\n\nrel.png\nmissing.jpg\n")
    rows = {}
    for name, input_path in (("list", listing), ("single", image)):
        cfg = compose_cfg(f"ckpt_path={trained.checkpoint}", f"input={input_path}", "num_workers=0", "progress=false",
                          config_name="predict", output_dir=tmp_path / name)  # fmt: skip
        rows[name] = read_rows(predict(cfg))
    assert list(rows["list"]) == [str(image), str(tmp_path / "rel.png"), str(tmp_path / "missing.jpg")]
    assert rows["list"][str(tmp_path / "missing.jpg")]["reason"] == "unreadable: no such file"
    # the same file, in a batch of 2 and alone: equal up to float noise in the last printed digit
    assert probabilities(rows["list"][str(tmp_path / "rel.png")]) == pytest.approx(
        probabilities(rows["single"][str(image)]), abs=2e-6
    )


def test_a_fifo_named_like_an_image_is_listed_with_a_reason_never_opened(tmp_path):
    os.mkfifo(tmp_path / "x.jpg")
    (tmp_path / "list.txt").write_text("x.jpg\n")
    assert list_inputs(tmp_path) == [(str(tmp_path / "list.txt"), "unsupported extension: .txt"),
                                     (str(tmp_path / "x.jpg"), "unreadable: not a regular file")]  # fmt: skip
    assert list_inputs(tmp_path / "list.txt") == [(str(tmp_path / "x.jpg"), "unreadable: not a regular file")]
    with pytest.raises(UserError, match=r"input='.*x\.jpg': unreadable: not a regular file"):
        list_inputs(tmp_path / "x.jpg")


def test_api_classifies_paths_and_pil_images_alike(trained):
    classifier = Classifier.from_checkpoint(trained.checkpoint, device="cpu")
    path = trained.images / "class_2" / "img_004.jpg"
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    by_path, by_image = classifier.predict([path, image], top_k=2)
    assert by_path.source == str(path) and by_image.source is None
    assert by_path.labels == by_image.labels and len(by_path.labels) == 2
    assert by_path.probabilities == pytest.approx(by_image.probabilities, abs=1e-6)
    assert classifier.predict(str(path))[0].labels[:2] == by_path.labels  # one path, no list needed
    assert classifier.preprocess(path).shape == (3, 32, 32)
    (bad := trained.images.parent / "bad.jpg").write_text("nope")
    with pytest.raises(DataError, match=r"bad\.jpg: not an image"):
        classifier.predict(bad)


def test_checkpoint_with_another_class_count_says_what_differs(trained, tmp_path):
    checkpoint = torch.load(trained.checkpoint, weights_only=True)
    checkpoint["hyper_parameters"]["class_names"].append("class_3")
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    with pytest.raises(
        UserError, match=r"edited\.ckpt does not fit resnet18, 4 classes.*head is 512->3 \(3 classes\), not 512->4"
    ):
        Classifier.from_checkpoint(tmp_path / "edited.ckpt")


def test_resuming_into_another_architecture_says_what_differs(trained):
    model = ImageClassifier(backbone={"name": "resnet34", "weights": None}, class_names=["a", "b", "c", "d"])
    checkpoint = torch.load(trained.checkpoint, weights_only=True)
    with pytest.raises(UserError) as info:
        model.on_load_checkpoint(checkpoint)  # what trainer.fit(ckpt_path=...) calls before loading the weights
    message = str(info.value)
    assert message.startswith("the checkpoint (resnet18, 3 classes) does not fit this model (resnet34, 4 classes)")
    assert "head is 512->3 (3 classes), not 512->4 (4 classes)" in message and "another architecture" in message


def test_predict_script(trained, tmp_path, monkeypatch):
    """The entry script as a user runs it (in this process: a subprocess would spend seconds importing torch)."""
    run_dir = tmp_path / "run"
    argv = ["predict.py", f"ckpt_path={trained.checkpoint}", f"input={trained.images / 'class_1'}", "num_workers=0",
            "device=cpu", f"hydra.run.dir={run_dir}"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    GlobalHydra.instance().clear()
    runpy.run_path(str(REPO / "predict.py"), run_name="__main__")
    rows = read_rows(run_dir / "predictions.csv")
    assert len(rows) == 16 and all(row["reason"] == "" for row in rows.values())


def test_missing_input_is_a_user_error(trained, compose_cfg, tmp_path):
    cfg = compose_cfg(f"ckpt_path={trained.checkpoint}", f"input={tmp_path / 'nope'}", config_name="predict")
    with pytest.raises(UserError, match=r"input='.*nope': no such file or folder"):
        predict(cfg)


@pytest.mark.parametrize(
    ("data", "resize_crop"),
    [
        (
            {"_target_": "image_finetune.data.DigitsDataModule", "image_size": 32},
            (37, 32),
        ),  # the backbone's ratio: 0.875
        ({"_target_": "image_finetune.data.ImageFolderDataModule", "image_size": 224, "crop_ratio": 1.0}, (224, 224)),
        ({"_target_": "image_finetune.data.CIFAR10DataModule", "image_size": 32}, (32, 32)),  # no crop: resized whole
    ],
)
def test_preprocessing_follows_the_data_module_that_trained(data, resize_crop, tmp_path):
    """The data module applies the backbone's preprocessing at its own size; that is what checkpoints store."""
    from hydra.utils import instantiate

    backbone = Preprocessing(224, 0.875, mean=(0.5,) * 3, std=(0.25,) * 3)
    location = {"data_dir": tmp_path} if "CIFAR" in data["_target_"] else {"root": tmp_path}
    prep = instantiate({**data, **location}, _partial_=True)(
        preprocessing=backbone
    ).preprocessing  # as train.build does
    assert (prep.resize, prep.size) == resize_crop and (prep.mean, prep.std) == (backbone.mean, backbone.std)
    again = Preprocessing.from_dict(prep.as_dict())  # what an export's JSON and a checkpoint's hparams give back
    assert (again.resize, again.size, again.mean, again.std) == (prep.resize, prep.size, prep.mean, prep.std)
