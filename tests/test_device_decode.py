"""nvJPEG decoding path (data/device_decode.py), checked on the CPU decoder: the same batching, boxes and resizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import read_file
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from image_finetune.data import device_decode
from image_finetune.data.device_decode import center_box, crop_resize, decode_crop_batch, random_resized_box
from image_finetune.errors import ConfigError


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
