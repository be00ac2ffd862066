"""JPEG decoding and crop/resize on the accelerator: nvJPEG through ``torchvision.io.decode_jpeg(device="cuda")``.

A batch of JPEG files travels as bytes (a worker only reads files), is decoded in one call on the GPU, and each image
is cropped and resized to the training size there. The crop boxes are drawn on the host from per-sample seeds (the
``EpochSampler``'s), exactly like ``RandomResizedCrop``'s parameters, so what a sample looks like in an epoch is a
function of ``(seed, epoch)`` alone, as on the CPU path. On a machine without CUDA the same code runs with the CPU
decoder (what the unit tests use); ``require_gpu`` gives the one-line error for ``data.decode=gpu`` there.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from image_finetune.errors import ConfigError

Box = tuple[int, int, int, int]  # top, left, height, width


def require_gpu() -> torch.device:
    """The CUDA device for ``data.decode=gpu``, or a ``ConfigError`` saying what to do instead."""
    if not torch.cuda.is_available():
        raise ConfigError("data.decode=gpu needs a CUDA GPU (nvJPEG) and this machine has none: use data.decode=cpu")
    return torch.device("cuda", torch.cuda.current_device())


def decode_batch(files: Sequence[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Decode JPEG byte tensors (``torchvision.io.read_file``) to RGB uint8 CHW images on ``device``, in one call."""
    return decode_jpeg(list(files), mode=ImageReadMode.RGB, device=device)


def random_resized_box(
    height: int, width: int, seed: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)
) -> tuple[Box, bool]:
    """``RandomResizedCrop.get_params`` (same tries and fallback) drawn from ``seed``, and a horizontal-flip coin."""
    rng = random.Random(seed)
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    flip = rng.random() < 0.5
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return (rng.randint(0, height - h), rng.randint(0, width - w), h, w), flip
    in_ratio = width / height  # fallback: the central crop of the allowed aspect ratios
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return ((height - h) // 2, (width - w) // 2, h, w), flip


def center_box(height: int, width: int, crop_ratio: float = 0.875) -> Box:
    """The region that ``Resize(size / crop_ratio)`` + ``CenterCrop(size)`` keeps, in the original image's pixels."""
    side = min(height, width) * crop_ratio
    h = w = max(1, round(side))
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(
    images: Sequence[torch.Tensor], boxes: Sequence[Box], size: int, flips: Sequence[bool] | None = None
) -> torch.Tensor:
    """Crop each image to its box and resize it to ``size`` x ``size`` (bilinear, antialiased), on the images' device.

    Returns one uint8 NCHW batch, as the CPU path collates it. Images differ in size, so this is one small resize per
    image: on a GPU a few kernels each, far below a decode's cost.
    """
    out = []
    for i, (image, (top, left, h, w)) in enumerate(zip(images, boxes)):
        crop = image[:, top : top + h, left : left + w].unsqueeze(0).float()
        resized = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if flips is not None and flips[i]:
            resized = resized.flip(-1)
        out.append(resized)
    return torch.cat(out).round_().clamp_(0, 255).to(torch.uint8)


def decode_crop_batch(
    files: Sequence[torch.Tensor],
    size: int,
    device: torch.device | str,
    *,
    train: bool,
    seeds: Sequence[int] | None = None,
    scale: Sequence[float] = (0.08, 1.0),
    crop_ratio: float = 0.875,
    hflip: bool = True,
) -> torch.Tensor:
    """JPEG bytes -> a uint8 batch of training crops (``train``, seeded) or evaluation centre crops, on ``device``."""
    images = decode_batch(files, device)
    if train:
        if seeds is None or len(seeds) != len(images):
            raise ValueError("training crops need one seed per image")
        drawn = [random_resized_box(int(im.shape[1]), int(im.shape[2]), int(s), scale) for im, s in zip(images, seeds)]
        boxes, flips = [b for b, _ in drawn], [f and hflip for _, f in drawn]
        return crop_resize(images, boxes, size, flips)
    return crop_resize(images, [center_box(int(im.shape[1]), int(im.shape[2]), crop_ratio) for im in images], size)
