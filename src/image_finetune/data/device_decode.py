"""``data.decode=gpu``: JPEG decoding and crop/resize on the accelerator (nvJPEG via ``torchvision.io.decode_jpeg``).

Workers only read files (``DeviceJpegLoader``): a batch travels as JPEG bytes (``EncodedBatch``), is decoded in one
call on the GPU, and each image is cropped and resized to the training size there (``DeviceCrops``). The crop boxes
and flips are drawn on the host from the per-sample seeds of ``EpochSampler``, like ``RandomResizedCrop``'s
parameters, so what a sample looks like in an epoch is a function of ``(seed, epoch)`` alone, as on the CPU path, and
a resumed run sees the same batches. Files the device decoder would show differently (PNG, CMYK or greyscale JPEG, an
EXIF rotation, which nvJPEG ignores) are decoded by the CPU path in the worker and only cropped on the device; a file
that fails on the device is retried on the CPU, and one that fails there too is replaced by another image of its batch
with a warning, so a broken file never ends an epoch. On a machine without CUDA the same code runs with the CPU
decoder (what the tests use); ``require_gpu`` gives the one-line error for ``data.decode=gpu`` there.
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from image_finetune.data.decode import decode_rgb, exif_transpose_method, to_uint8_tensor
from image_finetune.data.files import ImageFileDataset
from image_finetune.data.scan import failure_reason
from image_finetune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # top, left, height, width


def require_gpu() -> torch.device:
    """The CUDA device for ``data.decode=gpu``, or a ``ConfigError`` saying what to do instead."""
    if not torch.cuda.is_available():
        raise ConfigError("data.decode=gpu needs a CUDA GPU (nvJPEG) and this machine has none: use data.decode=cpu")
    return torch.device("cuda", torch.cuda.current_device())


def decode_batch(files: Sequence[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Decode JPEG byte tensors (``torchvision.io.read_file``) to RGB uint8 CHW images on ``device``, in one call."""
    # torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec, which is not installed here;
    # decode_jpeg(device="cuda") is still the nvJPEG entry point of this torch/torchvision pair.
    return decode_jpeg(list(files), mode=ImageReadMode.RGB, device=device)


def flip_coin(seed: int) -> bool:
    """The horizontal-flip coin of a sample: the first draw of its seed, as in ``random_resized_box``."""
    return random.Random(seed).random() < 0.5


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
    images: Sequence[torch.Tensor],
    boxes: Sequence[Box],
    size: int,
    flips: Sequence[bool] | None = None,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Crop each image to its box and resize it to ``size`` x ``size`` (antialiased), on the images' device.

    Returns one uint8 NCHW batch, as the CPU path collates it. Images differ in size, so this is one small resize per
    image: on a GPU a few kernels each, far below a decode's cost.
    """
    options: dict[str, Any] = {"mode": interpolation}
    if interpolation != "nearest":
        options.update(antialias=True, align_corners=False)
    out = []
    for i, (image, (top, left, h, w)) in enumerate(zip(images, boxes)):
        crop = image[:, top : top + h, left : left + w].unsqueeze(0).float()
        resized = F.interpolate(crop, size=(size, size), **options)
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
    crops = DeviceCrops(size, crop_ratio, random_crop=True, scale=(float(scale[0]), float(scale[1])), hflip=hflip)
    return crops.crop(decode_batch(files, device), seeds, train)


# ---- data.decode=gpu in a data module ---------------------------------------------------------------------------------
class DeviceJpegLoader:
    """The worker's part: path -> the file's bytes (1-D uint8) when the device decoder shows it as the CPU path would
    (a JPEG in RGB colours, no EXIF rotation), else the image decoded by the CPU path (uint8 CHW). Pickles under spawn.
    """

    def __init__(self, min_size: int | None = None) -> None:
        self.min_size = min_size

    def __call__(self, path: str) -> torch.Tensor:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:  # headers only; a file broken since the scan raises here
            device_reads_it = im.format == "JPEG" and im.mode == "RGB" and exif_transpose_method(im, path) is None
        if device_reads_it:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return to_uint8_tensor(decode_rgb(path, min_size=self.min_size, data=data))


@dataclass
class EncodedBatch:
    """A collated ``data.decode=gpu`` batch: per sample its payload (JPEG bytes or a decoded CHW image), seed, label and
    path. ``ImageFolderDataModule.on_before_batch_transfer`` turns it into ``(uint8 NCHW images, labels)`` on the
    device."""

    payloads: list[torch.Tensor]
    seeds: list[int]
    labels: torch.Tensor
    paths: list[str]

    def __len__(self) -> int:
        return len(self.payloads)


class EncodedImageDataset(ImageFileDataset):
    """``ds[i]`` or ``ds[(i, seed)]`` -> ``(payload, seed, label, path)`` for a ``DeviceJpegLoader``; batches collate
    into an ``EncodedBatch`` (the images differ in size until the device crops them)."""

    def __init__(self, samples: Sequence[tuple[str, int]], loader: DeviceJpegLoader) -> None:
        super().__init__(samples, None, loader)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int, str]:  # type: ignore[override]
        index, seed = key if isinstance(key, tuple) else (key, 0)
        payload, label, path = self.load(index)
        assert isinstance(payload, torch.Tensor)
        return payload, seed, label, path

    @staticmethod
    def collate_fn(items: Sequence[tuple[torch.Tensor, int, int, str]]) -> EncodedBatch:
        payloads, seeds, labels, paths = zip(*items)
        return EncodedBatch(list(payloads), list(seeds), torch.tensor(labels, dtype=torch.int64), list(paths))


@dataclass(frozen=True)
class DeviceCrops:
    """The CPU path's training and evaluation crops, on the device: the random resized crop at ``scale`` (or, with
    ``random_crop=False``, the eval crop) and the flip for training, the eval crop (resize to ``size / crop_ratio``,
    centre crop) otherwise."""

    size: int
    crop_ratio: float = 0.875
    interpolation: str = "bilinear"
    random_crop: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    min_size: int | None = None  # what the CPU fallback decodes at (the data module's short side)

    def __call__(self, batch: EncodedBatch, device: torch.device, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.decode(batch, device)
        return self.crop(images, batch.seeds, train), labels.to(device, non_blocking=True)

    def crop(self, images: Sequence[torch.Tensor], seeds: Sequence[int] | None, train: bool) -> torch.Tensor:
        """One uint8 batch of ``size`` x ``size`` crops; training crops and flips are drawn from ``seeds``."""
        sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        if not train:
            return crop_resize(
                images, [center_box(h, w, self.crop_ratio) for h, w in sizes], self.size, None, self.interpolation
            )
        if seeds is None or len(seeds) != len(images):
            raise ValueError("training crops need one seed per image")
        if self.random_crop:
            drawn = [random_resized_box(h, w, int(seed), self.scale) for (h, w), seed in zip(sizes, seeds)]
            boxes, flips = [box for box, _ in drawn], [flip and self.hflip for _, flip in drawn]
        else:
            boxes = [center_box(h, w, self.crop_ratio) for h, w in sizes]
            flips = [self.hflip and flip_coin(int(seed)) for seed in seeds]
        return crop_resize(images, boxes, self.size, flips, self.interpolation)

    def decode(self, batch: EncodedBatch, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every payload as a uint8 CHW image on ``device``; a file no decoder reads is replaced by another of the
        batch (image and label), with a warning naming it."""
        images: list[torch.Tensor | None] = [
            payload.to(device, non_blocking=True) if payload.ndim == 3 else None for payload in batch.payloads
        ]
        encoded = [i for i, payload in enumerate(batch.payloads) if payload.ndim == 1]
        if encoded:
            try:
                decoded: list[torch.Tensor | None] = list(decode_batch([batch.payloads[i] for i in encoded], device))
            except Exception:  # one bad file fails the whole batched call: decode them one by one
                decoded = [self._decode_one(batch.payloads[i], batch.paths[i], device) for i in encoded]
            for i, image in zip(encoded, decoded):
                images[i] = image
        good = [i for i, image in enumerate(images) if image is not None]
        if not good:
            raise DataError(
                f"none of the {len(images)} images of a batch could be decoded (first: {batch.paths[0]}). The files "
                "changed since the scan; check that the data folder is still mounted and readable, or use data.decode=cpu"
            )
        labels = batch.labels.clone()
        for k, i in enumerate(i for i, image in enumerate(images) if image is None):
            j = good[k % len(good)]
            images[i], labels[i] = images[j], labels[j]
        return [image for image in images if image is not None], labels

    def _decode_one(self, payload: torch.Tensor, path: str, device: torch.device) -> torch.Tensor | None:
        try:
            return decode_batch([payload], device)[0]
        except Exception:
            pass
        try:  # what the device decoder refused, the CPU path (Pillow's checks) decodes or explains
            return to_uint8_tensor(decode_rgb(path, min_size=self.min_size)).to(device)
        except Exception as e:
            log.warning(
                "skipping %s, which no longer loads (%s: %s); using another image of its batch instead",
                path, failure_reason(e), e,
            )  # fmt: skip
            return None
