"""``data.decode=gpu``: JPEG decoding and crop/resize on the accelerator (nvJPEG via ``torchvision.io.decode_jpeg``).

Workers only read files (``DeviceJpegLoader``): a batch travels as JPEG bytes (``EncodedBatch``), is decoded in one
call on the GPU, and each image is cropped and resized to the training size there (``DeviceCrops``). The crop boxes
and flips are drawn on the host from the per-sample seeds of ``EpochSampler`` by ``transforms.Geometry`` (the one
description of augmentation), so what a sample looks like in an epoch is a function of ``(seed, epoch)`` alone, as on the CPU path, and
a resumed run sees the same batches. Files the device decoder would show differently (PNG, CMYK or greyscale JPEG, an
EXIF rotation, which nvJPEG ignores) are decoded by the CPU path in the worker and only cropped on the device; a file
that fails on the device is retried on the CPU, and one that fails there too is replaced by another image of its batch
with a warning, so a broken file never ends an epoch. On a machine without CUDA the same code runs with the CPU
decoder (what the tests use); ``require_gpu`` gives the one-line error for ``data.decode=gpu`` there.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from image_finetune.core.errors import ConfigError, DataError
from image_finetune.data.decode import decode_rgb, exif_transpose_method, to_uint8_tensor
from image_finetune.data.files import ImageFileDataset
from image_finetune.data.scan import failure_reason
from image_finetune.data.transforms import Box, Geometry, SeedDraws
from image_finetune.data.transforms import center_box as center_box  # the eval crop, where the device path had it

log = logging.getLogger(__name__)


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


def random_resized_box(
    height: int, width: int, seed: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)
) -> tuple[Box, bool]:
    """A sample's training box (``Geometry.box``) and flip coin as the device paths draw them, from ``seed``."""
    draws = SeedDraws(seed)
    return Geometry(crop_scale=(scale[0], scale[1]), aspect=(ratio[0], ratio[1])).box(
        height, width, draws
    ), draws.coin()


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
    geometry = Geometry(size, crop_scale=(float(scale[0]), float(scale[1])), crop_ratio=crop_ratio, hflip=hflip)
    return DeviceCrops(geometry).crop(decode_batch(files, device), seeds, train)


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
    """The CPU path's training and evaluation crops, on the device: ``geometry``'s crop and flip for training (boxes
    and coins drawn on the host from each sample's ``SeedDraws``), its eval crop otherwise."""

    geometry: Geometry
    min_size: int | None = None  # what the CPU fallback decodes at (the data module's short side)

    def __call__(self, batch: EncodedBatch, device: torch.device, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.decode(batch, device)
        return self.crop(images, batch.seeds, train), labels.to(device, non_blocking=True)

    def crop(self, images: Sequence[torch.Tensor], seeds: Sequence[int] | None, train: bool) -> torch.Tensor:
        """One uint8 batch of ``size`` x ``size`` crops; training crops and flips are drawn from ``seeds``."""
        if train and (seeds is None or len(seeds) != len(images)):
            raise ValueError("training crops need one seed per image")
        g = self.geometry if train else replace(self.geometry, crop_scale=None, hflip=False)  # eval: no draws
        draws = [SeedDraws(int(seed)) for seed in (seeds if train else [0] * len(images))]
        boxes = [g.box(int(image.shape[-2]), int(image.shape[-1]), d) for image, d in zip(images, draws)]
        return crop_resize(images, boxes, g.size or 0, [g.flip(d) for d in draws], g.interpolation)

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
