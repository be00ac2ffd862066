"""Classify images from Python (notebooks, services) with a trained checkpoint or exported safetensors weights.

    from image_finetune.inference import Classifier
    classifier = Classifier.from_checkpoint("logs/train/runs/<run>/checkpoints/last.ckpt")
    classifier.predict(["cat.jpg", pil_image], top_k=3)   # -> [Prediction(labels=(...), probabilities=(...)), ...]

``Preprocessing`` is the one definition of "file -> network input" that ``predict.py``, this API and the exported
models' JSON share, and it is built from the same ``decode_rgb`` + ``eval_transform`` as the eval split of the data
module, so a file gets the same probabilities from ``eval.py``, ``predict.py``, this API and the exports.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from image_finetune.checkpoints import run_config
from image_finetune.data.decode import decode_rgb, to_rgb, to_uint8_tensor
from image_finetune.data.imagefolder import ImageFolderDataModule
from image_finetune.data.scan import failure_reason
from image_finetune.data.transforms import eval_transform
from image_finetune.errors import ConfigError, DataError, UserError
from image_finetune.models import ClassifierNet, ImageClassifier, build_backbone
from image_finetune.models.classifier import check_weights_fit

ImageInput = str | os.PathLike | Image.Image
INPUT_DESCRIPTION = "float32 RGB in [0, 1], NCHW; mean/std are applied inside the model"


@dataclass(frozen=True)
class Preprocessing:
    """Decode, resize the short side to ``resize``, centre-crop ``size``: the eval transform of the training data.

    ``mean``/``std`` are recorded for exports' JSON only: the network normalises its input itself.
    """

    size: int
    crop_ratio: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_data_config(
        cls,
        data: Mapping[str, Any],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        image_size: int | None = None,
        crop_ratio: float | None = None,
    ) -> Preprocessing:
        """From a run config's ``data`` group; ``image_size``/``crop_ratio`` override it."""
        size = image_size or data.get("image_size")
        if not size:
            raise ConfigError("the checkpoint stores no data.image_size (no run config): pass image_size=N (and crop_ratio=R)")
        ratio = crop_ratio or _crop_ratio(data)
        if not 0 < ratio <= 1:
            raise ConfigError(f"crop_ratio={ratio} must be in (0, 1]: the centre crop is that fraction of the resized image")
        return cls(int(size), float(ratio), tuple(float(m) for m in mean), tuple(float(s) for s in std))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        """Inverse of ``as_dict`` (an export's JSON)."""
        return cls(int(d["crop"]), d["crop"] / d["resize"], tuple(d["mean"]), tuple(d["std"]))

    @property
    def resize(self) -> int:
        """Short side before the crop, computed exactly as ``eval_transform`` does."""
        return round(self.size / self.crop_ratio)

    def as_dict(self) -> dict[str, Any]:
        return {
            "resize": self.resize,
            "crop": self.size,
            "interpolation": "bilinear, antialiased",
            "mean": list(self.mean),
            "std": list(self.std),
            "input": INPUT_DESCRIPTION,
        }

    @cached_property
    def transform(self) -> v2.Compose:
        return eval_transform(self.size, self.crop_ratio)

    def load(self, image: ImageInput) -> torch.Tensor:
        """uint8 CHW, resized and cropped; raises the decoder's exception for an unreadable file.

        Files decode as in training (JPEGs at reduced scale, EXIF orientation, transparency on white); a PIL image is
        converted the same way, on a copy, so the caller's image is left as it was.
        """
        if isinstance(image, Image.Image):
            rgb = to_rgb(image.copy())
        else:
            rgb = decode_rgb(image, min_size=self.resize)
        # channels_last as in ImageFileDataset: eval and predict then run the very same (and the faster) resize kernel.
        return self.transform(to_uint8_tensor(rgb, channels_last=True)).contiguous()

    def __call__(self, image: ImageInput) -> torch.Tensor:
        """float32 CHW in [0, 1]: what the network takes."""
        return to_float(self.load(image))


def _crop_ratio(data: Mapping[str, Any]) -> float:
    """The ratio the data module cropped with: the config's value, else its class's default (digits leaves it out).

    A data module without the option (CIFAR-10: whole 32x32 images; the network upsamples) gets 1: resize, no crop.
    """
    if data.get("crop_ratio") is not None:
        return float(data["crop_ratio"])
    module_name, _, class_name = str(data.get("_target_") or "").rpartition(".")
    try:
        module = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):  # no or vanished data module: the image-folder default is likeliest
        module = ImageFolderDataModule
    parameter = inspect.signature(module).parameters.get("crop_ratio")
    return 1.0 if parameter is None else float(parameter.default)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [0, 1], exactly as the data modules do on the device."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu``, ``gpu``/``cuda``, ``cuda:1``, ``mps``; Lightning's names accepted."""
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name == "gpu":
        name = "cuda"
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA GPU is available: use device=cpu")
    return resolved


@dataclass(frozen=True)
class Prediction:
    """The ``top_k`` most likely classes of one image, most likely first."""

    labels: tuple[str, ...]
    probabilities: tuple[float, ...]
    source: str | None = None  # the path, when the image was given as one

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def probability(self) -> float:
        return self.probabilities[0]


def top_k_predictions(
    probabilities: torch.Tensor, class_names: Sequence[str], k: int, sources: Sequence[str | None] | None = None
) -> list[Prediction]:
    """One ``Prediction`` per row of an (N, classes) probability matrix; ``k`` is capped at the number of classes."""
    values, indices = probabilities.topk(min(k, probabilities.shape[-1]), dim=-1)
    sources = sources if sources is not None else [None] * len(values)
    return [
        Prediction(tuple(class_names[i] for i in idx.tolist()), tuple(v.tolist()), source)
        for v, idx, source in zip(values, indices, sources)
    ]


def prediction_header(k: int) -> list[str]:
    """``label_1, probability_1, ..., label_k, probability_k``: the columns of predict.py's and eval.py's CSVs."""
    return [f"{name}_{rank}" for rank in range(1, k + 1) for name in ("label", "probability")]


def prediction_cells(prediction: Prediction | None, k: int) -> list[str]:
    """The cells under ``prediction_header(k)``; empty for a file without a prediction."""
    if prediction is None:
        return [""] * (2 * k)
    return [cell for label, p in zip(prediction.labels, prediction.probabilities) for cell in (label, f"{p:.6f}")]


class Classifier:
    """A network, its class names and its preprocessing: everything needed to classify images, nothing of training."""

    def __init__(
        self,
        net: nn.Module,
        class_names: Sequence[str],
        preprocessing: Preprocessing,
        *,
        architecture: str,
        device: str | torch.device = "auto",
    ) -> None:
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()
        self.class_names = list(class_names)
        self.preprocessing = preprocessing
        self.architecture = architecture

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "auto",
        *,
        image_size: int | None = None,
        crop_ratio: float | None = None,
    ) -> Classifier:
        """Load a training checkpoint safely (``weights_only=True``, no download); preprocessing from its run config."""
        model = ImageClassifier.from_checkpoint(path)
        net = model.net
        assert net is not None  # from_checkpoint always builds the head
        data = run_config(str(Path(path).expanduser())).get("data") or {}
        mean, std = net.mean.flatten().tolist(), net.std.flatten().tolist()
        preprocessing = Preprocessing.from_data_config(data, mean, std, image_size=image_size, crop_ratio=crop_ratio)
        return cls(net, model.class_names, preprocessing, architecture=model.hparams.backbone["name"], device=device)

    @classmethod
    def from_safetensors(cls, path: str | os.PathLike, device: str | torch.device = "auto") -> Classifier:
        """Load weights written by ``export.py format=safetensors``; the architecture comes from the JSON beside them."""
        from safetensors.torch import load_file  # an optional dependency (the ``export`` extra)

        path = Path(path).expanduser()
        meta = read_sidecar(path)
        backbone = build_backbone(meta["architecture"], None)
        names = meta["class_names"]
        preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        net = ClassifierNet(
            backbone.module, backbone.num_features, len(names), 0.0, preprocessing.mean, preprocessing.std, meta.get("upsample_to")
        )
        state = load_file(path)
        expected = f"{meta['architecture']}, {len(names)} classes, as {sidecar_path(path)} says"
        check_weights_fit(net, state, source=str(path), expected=expected)
        net.load_state_dict(state)
        return cls(net, names, preprocessing, architecture=meta["architecture"], device=device)

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """float32 CHW in [0, 1], as the network (and an exported model) takes it."""
        return self.preprocessing(image)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes for an NCHW batch (uint8, or float in [0, 1]); float32, on the CPU."""
        images = to_float(images.to(self.device, non_blocking=True))
        return self.net(images).float().softmax(dim=-1).cpu()

    def predict(self, images: ImageInput | Sequence[ImageInput], top_k: int = 5, batch_size: int = 32) -> list[Prediction]:
        """Classify paths and/or PIL images (one or a list) in batches; an unreadable file raises ``DataError``."""
        items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        predictions: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            batch = torch.stack([self._load(item) for item in chunk])
            sources = [None if isinstance(item, Image.Image) else str(item) for item in chunk]
            predictions.extend(top_k_predictions(self.probabilities(batch), self.class_names, top_k, sources))
        return predictions

    def _load(self, item: ImageInput) -> torch.Tensor:
        try:
            return self.preprocessing.load(item)
        except Exception as e:  # any decoder error: say which file and why, in the scan's vocabulary
            raise DataError(f"{item}: {failure_reason(e)}") from e

    def metadata(self) -> dict[str, Any]:
        """What an exported model needs beside its weights: architecture, class names, preprocessing.

        ``upsample_to`` is the network's own business (its input is still ``preprocessing.crop``), recorded so that
        safetensors weights rebuild the same network.
        """
        return {
            "architecture": self.architecture,
            "class_names": self.class_names,
            "preprocessing": self.preprocessing.as_dict(),
            "upsample_to": getattr(self.net, "upsample_to", None),
        }


def sidecar_path(model_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.onnx.json``: one JSON per exported file, so formats never overwrite each other's."""
    path = Path(model_path)
    return path.with_name(path.name + ".json")


def read_sidecar(model_path: str | os.PathLike) -> dict[str, Any]:
    path = sidecar_path(model_path)
    if not path.is_file():
        raise UserError(
            f"{path} is missing: it holds the architecture, class names and preprocessing of {model_path}. Re-run export.py."
        )
    return json.loads(path.read_text())
