"""nvJPEG decoding path (data/device_decode.py), checked on the CPU decoder: the same batching, boxes and resizing."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from support import FAST, make_image_folder
from torchvision.io import read_file
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from image_finetune.core.errors import ConfigError
from image_finetune.data import device_decode
from image_finetune.data.base import EpochSampler
from image_finetune.data.device_decode import (
    EncodedImageDataset,
    center_box,
    crop_resize,
    decode_crop_batch,
    random_resized_box,
)
from image_finetune.data.imagefolder import ImageFolderDataModule
from image_finetune.data.transforms import Augmentation
from image_finetune.training.train import build, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def jpegs(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(64, 48), (40, 80), (50, 50)]):
        path = tmp_path / f"{i}.jpg"
        smooth = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize(
            (w, h), Image.Resampling.BICUBIC
        )
        smooth.save(path, quality=95)  # photo-like: resampling differences stay at rounding level
        paths.append(path)
    return paths


def test_training_boxes_are_randomresizedcrop_boxes_drawn_from_each_seed():
    boxes = {random_resized_box(300, 400, seed) for seed in range(200)}
    assert len(boxes) > 150  # different seeds, different crops
    assert random_resized_box(300, 400, 7) == random_resized_box(300, 400, 7)  # one seed, one crop: exact resume
    for (top, left, h, w), _ in boxes:
        assert top >= 0 and top + h <= 300 and left >= 0 and left + w <= 400
        assert 0.08 * 300 * 400 * 0.99 <= h * w <= 300 * 400 and 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    assert 60 < sum(flip for _, flip in boxes) < 140


def test_eval_crop_is_resize_then_center_crop():
    # 64 px -> Resize(28 / 0.875 = 32) -> CenterCrop(28) keeps the central 56 px of the original: the same pixels
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    assert center_box(64, 64, 0.875) == (4, 4, 56, 56)
    ours = crop_resize([image], [center_box(64, 64, 0.875)], 28)
    theirs = v2.Compose([v2.Resize(32, antialias=True), v2.CenterCrop(28)])(image)
    assert ours.shape == (1, 3, 28, 28)
    # Inside, rounding only; the border row/column differs a little: resizing first lets the antialiasing filter see
    # the pixels just outside the crop, cropping first (ours) repeats the edge instead.
    assert (ours[0].float() - theirs.float())[:, 1:-1, 1:-1].abs().max() <= 1


def test_a_batch_of_jpeg_bytes_decodes_to_one_uint8_batch_with_seeded_crops(jpegs):
    files = [read_file(str(p)) for p in jpegs]
    train = decode_crop_batch(files, 24, "cpu", train=True, seeds=[1, 2, 3])
    assert train.dtype == torch.uint8 and train.shape == (3, 3, 24, 24)
    assert torch.equal(train, decode_crop_batch(files, 24, "cpu", train=True, seeds=[1, 2, 3]))
    assert not torch.equal(train, decode_crop_batch(files, 24, "cpu", train=True, seeds=[4, 5, 6]))
    whole = TF.to_image(Image.open(jpegs[2]).convert("RGB"))
    (top, left, h, w), flip = random_resized_box(50, 50, 3)
    expected = TF.resize(whole[:, top : top + h, left : left + w], [24, 24], antialias=True)
    expected = expected.flip(-1) if flip else expected
    assert (train[2].float() - expected.float()).abs().mean() < 3  # libjpeg vs PIL decode differ by rounding only
    evaluation = decode_crop_batch(files, 24, "cpu", train=False)
    assert evaluation.shape == (3, 3, 24, 24)


def test_decode_gpu_without_a_gpu_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setattr(device_decode.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^data\.decode=gpu needs a CUDA GPU \(nvJPEG\) .*use data\.decode=cpu$"):
        device_decode.require_gpu()


# ---- data.decode=gpu in ImageFolderDataModule (the CPU decoder stands in for nvJPEG) ----------------------------------
@pytest.fixture
def device_path_on_cpu(monkeypatch):
    """``data.decode=gpu`` on this GPU-less machine: the same code, decoding on the CPU."""
    monkeypatch.setattr("image_finetune.data.imagefolder.require_gpu", lambda: torch.device("cpu"))


def encoded_module(root, **kwargs):  # type: ignore[no-untyped-def]
    options = {"image_size": 24, "num_workers": 0, "test_fraction": 0.0, "cache": None, "decode": "gpu", **kwargs}
    module = ImageFolderDataModule(root, **options)
    module.setup()
    return module


def first_batch(module, split="train", epoch=0):  # type: ignore[no-untyped-def]
    dataset = module.datasets[split]
    keys = list(EpochSampler(len(dataset), seed=module.seed, epoch=epoch)) if split == "train" else range(len(dataset))
    return dataset.collate_fn([dataset[key] for key in list(keys)[:8]])


def test_decode_gpu_sends_plain_jpegs_as_bytes_and_decodes_other_files_in_the_worker(tmp_path, device_path_on_cpu):
    module = encoded_module(make_image_folder(tmp_path / "images", per_class=6))
    assert isinstance(module.datasets["train"], EncodedImageDataset)
    batch = first_batch(module)
    kinds = {Path(path).suffix: payload.ndim for path, payload in zip(batch.paths, batch.payloads)}
    assert kinds == {".jpg": 1, ".png": 3}, "JPEG bytes travel to the device; PNGs arrive decoded"


def smooth_folder(root: Path) -> Path:
    """Photo-like (smooth) pictures in three aspect ratios whose eval crop at 28 px (resize to 32, centre crop 28) is
    exactly a box of the original (twice the size): any difference is rounding, and a misplaced crop shows plainly."""
    rng = np.random.default_rng(1)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i, (w, h) in enumerate([(64, 64), (64, 96), (96, 64)] * 2):
            coarse = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
            picture = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
            picture.save(root / f"c{c}" / f"{i}.{'png' if i % 3 == 2 else 'jpg'}", quality=95)
    return root


def test_decode_gpu_eval_crops_match_the_cpu_eval_transform(tmp_path, device_path_on_cpu):
    images = smooth_folder(tmp_path / "images")
    cpu = encoded_module(images, decode="cpu", image_size=28, val_fraction=0.5)
    device = encoded_module(images, image_size=28, val_fraction=0.5)
    on_device, labels = device.on_before_batch_transfer(first_batch(device, "val"), 0)  # no trainer: eval, CPU
    on_cpu = torch.stack([cpu.datasets["val"][i][0] for i in range(len(labels))])
    assert on_device.dtype == torch.uint8 and on_device.shape == on_cpu.shape == (6, 3, 28, 28)
    assert torch.equal(labels, torch.tensor([cpu.datasets["val"][i][1] for i in range(len(labels))]))
    # The same region at the same size. Inside the border row/column (see test_eval_crop_is_resize_then_center_crop)
    # the PNGs differ by rounding only (0.2 grey levels when written) and the JPEGs by ~3.5, since the CPU path decodes
    # them at half scale (libjpeg's DCT scaling) before resizing. A crop one pixel off differs by ~19.
    inside = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    difference = (on_device.float() - on_cpu.float())[inside].abs().mean()
    assert difference < 3, difference
    assert (on_device.roll(1, -1).float() - on_cpu.float())[inside].abs().mean() > 4 * difference


def test_decode_gpu_training_crops_are_a_function_of_the_sample_seeds(tmp_path, device_path_on_cpu):
    augment = Augmentation(name="standard", random_crop=True, hflip=True)
    module = encoded_module(make_image_folder(tmp_path / "images", per_class=6, size=48), augment=augment)
    crops = module.device_crops
    batch = first_batch(module, epoch=0)
    first, labels = crops(batch, torch.device("cpu"), train=True)
    again, _ = crops(
        first_batch(encoded_module(module.root, augment=augment), epoch=0), torch.device("cpu"), train=True
    )
    assert first.shape == (8, 3, 24, 24) and torch.equal(first, again), "same seed and epoch: the same batch (resume)"
    reseeded = replace(batch, seeds=[seed + 1 for seed in batch.seeds])
    assert not torch.equal(first, crops(reseeded, torch.device("cpu"), train=True)[0])
    assert torch.equal(labels, batch.labels)


def test_decode_gpu_replaces_a_jpeg_broken_after_the_scan_by_another_image_of_its_batch(
    tmp_path, device_path_on_cpu, caplog
):
    module = encoded_module(make_image_folder(tmp_path / "images", per_class=6))
    batch = first_batch(module)
    broken = next(i for i, payload in enumerate(batch.payloads) if payload.ndim == 1)
    path = Path(batch.paths[broken])
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\xff\xda") + 20])  # header intact, image data cut: both decoders refuse
    batch = first_batch(module)
    with caplog.at_level("WARNING"):
        images, labels = module.device_crops(batch, torch.device("cpu"), train=False)  # eval crops: no per-seed box
    assert images.shape == (8, 3, 24, 24)
    assert f"skipping {path}, which no longer loads" in caplog.text
    twins = [i for i in range(8) if i != broken and torch.equal(images[i], images[broken])]
    assert twins and labels[broken] == labels[twins[0]], "another image of the batch, with its label, takes its place"


def test_decode_gpu_trains_and_validates_end_to_end(compose_cfg, pretrained, tmp_path, device_path_on_cpu, monkeypatch):
    seen: list[torch.Tensor] = []
    modules: list[Any] = []

    class SeeBatches(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, *args: Any) -> None:
            seen.append(batch[0])

    def build_and_watch(cfg):  # type: ignore[no-untyped-def]
        run = build(cfg)
        run.trainer.callbacks.append(SeeBatches())
        modules.append(run.datamodule)
        return run

    monkeypatch.setattr("image_finetune.training.train.build", build_and_watch)
    images = make_image_folder(tmp_path / "images", per_class=8)
    cfg = compose_cfg(
        "data=imagefolder", f"data.root={images}", "data.decode=gpu", "augment=standard", "trainer.max_epochs=2", *FAST
    )
    metrics = train(cfg)
    assert isinstance(modules[0].datasets["train"], EncodedImageDataset)
    assert isinstance(modules[0].datasets["val"], EncodedImageDataset)
    assert len(seen) >= 4 and all(b.dtype == torch.float32 and b.shape[1:] == (3, 32, 32) for b in seen)
    assert min(float(b.min()) for b in seen) >= 0 and max(float(b.max()) for b in seen) <= 1
    assert 0 <= metrics["val/acc"] <= 1


def test_decode_settings_that_cannot_work_are_one_line_config_errors(tmp_path, device_path_on_cpu):
    images = make_image_folder(tmp_path / "images", per_class=4)
    with pytest.raises(ConfigError, match=r"^data\.decode='nvjpeg': use cpu .* or gpu "):
        ImageFolderDataModule(images, decode="nvjpeg")
    strong = Augmentation(name="randaugment", ops=[v2.RandAugment()])
    with pytest.raises(ConfigError, match=r"^data\.decode=gpu crops and flips on the GPU, but augment=randaugment"):
        ImageFolderDataModule(images, decode="gpu", augment=strong)


def test_decode_gpu_on_a_machine_without_a_gpu_says_so_from_the_command_line(tmp_path, hub_dir):
    images = make_image_folder(tmp_path / "images", per_class=4)
    result = subprocess.run(
        [sys.executable, "train.py", "data=imagefolder", f"data.root={images}", "data.decode=gpu", "trainer=cpu",
         f"paths.data_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "TORCH_HOME": str(hub_dir)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: data.decode=gpu needs a CUDA GPU (nvJPEG) and this machine has none: use data.decode=cpu"
    )
