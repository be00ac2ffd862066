"""Classify images from Python (notebooks, services) with a trained checkpoint or exported safetensors weights.

    from image_finetune.inference.classifier import Classifier
    classifier = Classifier.from_checkpoint("logs/train/runs/<run>/checkpoints/last.ckpt")
    classifier.predict(["cat.jpg", pil_image], top_k=3)   # -> [Prediction(labels=(...), probabilities=(...)), ...]

``Preprocessing`` (``data/preprocessing.py``) is the one definition of "file -> network input" that the eval split of
the data module, ``predict.py``, this API and the exported models' JSON share; a checkpoint stores it as plain values
(the backbone's, at the data's size), so a file gets the same probabilities from ``eval.py``, ``predict.py``, this API
and the exports, with no code or config of the training run needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from image_finetune.core.errors import ConfigError, DataError, UserError
from image_finetune.data.preprocessing import INPUT_DESCRIPTION, Preprocessing
from image_finetune.data.scan import failure_reason
from image_finetune.models.classifier import ClassifierNet, ImageClassifier, check_weights_fit
from image_finetune.models.rebuild import architecture, rebuild_backbone, rebuild_head
from image_finetune.recipe.heads import LINEAR

__all__ = ["INPUT_DESCRIPTION", "Classifier", "Prediction", "Preprocessing", "read_sidecar", "sidecar_path"]
from image_finetune.inference.tta import TTA

ImageInput = str | os.PathLike | Image.Image


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
    label_set: tuple[str, ...] | None = None
    """Multi-label: the labels whose probability is at least the checkpoint's decision threshold (None: single-label)."""

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


def label_sets(
    probabilities: torch.Tensor, class_names: Sequence[str], threshold: float | Sequence[float]
) -> list[tuple[str, ...]]:
    """Multi-label: each row's labels with probability >= ``threshold`` (one value, or one per label), in label order."""
    over = probabilities >= torch.as_tensor(threshold, dtype=probabilities.dtype)
    return [tuple(class_names[i] for i, on in enumerate(row) if on) for row in over.tolist()]


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
        backbone: Mapping[str, Any] | None = None,
        head: Mapping[str, Any] | None = None,
        device: str | torch.device = "auto",
        tta: str | None = None,
        task: str = "multiclass",
        threshold: float | Sequence[float] | None = None,
    ) -> None:
        """``backbone``/``head``: the builder configs that rebuild ``net`` (default: torchvision ``architecture``
        with the dropout + linear head). ``task="multilabel"``: sigmoid per label, and ``threshold`` (one value or one
        per label, default 0.5) decides each prediction's ``label_set``."""
        self.device = resolve_device(device)
        self.net = net.to(self.device).eval()
        self.class_names = list(class_names)
        self.preprocessing = preprocessing
        self.architecture = architecture
        self.backbone = dict(backbone or {"name": architecture})
        self.head = dict(head or {"_target_": LINEAR})
        self.tta = TTA.parse(tta, preprocessing.size, preprocessing.crop_ratio)
        self.task = task
        self.threshold = (0.5 if threshold is None else threshold) if self.multilabel else None
        # What the images are loaded as: the plain preprocessing, or the larger square five_crop cuts its views from.
        self.input_preprocessing = preprocessing
        if self.tta is not None and self.tta.input_size != preprocessing.size:
            self.input_preprocessing = preprocessing.override(size=self.tta.input_size, crop_ratio=1.0)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "auto",
        *,
        image_size: int | None = None,
        crop_ratio: float | None = None,
        tta: str | None = None,
    ) -> Classifier:
        """Load a training checkpoint safely (``weights_only=True``, no download, allow-listed backbone builders only).

        Preprocessing comes from the checkpoint's stored values; ``image_size``/``crop_ratio`` override them (and are
        needed only for checkpoints written before the preprocessing was stored).

        ``tta`` (``flip`` or ``five_crop``) averages the probabilities over views of each image (``tta.py``).
        """
        model = ImageClassifier.from_checkpoint(path)
        net = model.net
        assert net is not None  # from_checkpoint always builds the head
        stored = model.hparams.get("preprocessing")
        if not stored and not image_size:
            raise ConfigError(
                f"{path} stores no preprocessing (an older checkpoint): pass image_size=N (and crop_ratio=R)"
            )
        # mean/std as the network applies them (its float32 buffers), so the export JSON says exactly what runs
        applied = {"mean": net.mean.flatten().tolist(), "std": net.std.flatten().tolist()}
        base = Preprocessing.from_dict({**stored, **applied}) if stored else Preprocessing(image_size, **applied)
        preprocessing = base.override(size=image_size, crop_ratio=crop_ratio)
        backbone = model.hparams.backbone
        name = backbone["name"]
        head = model.hparams.head
        return cls(
            net,
            model.class_names,
            preprocessing,
            architecture=name,
            backbone=backbone,
            head=head,
            device=device,
            tta=tta,
            task=model.hparams.get("task") or "multiclass",
            threshold=model.decision_threshold if model.multilabel else None,
        )

    @classmethod
    def from_safetensors(cls, path: str | os.PathLike, device: str | torch.device = "auto") -> Classifier:
        """Load weights written by ``export.py format=safetensors``; the architecture comes from the JSON beside them.

        The JSON's ``architecture`` is the name the backbone builder (its ``backbone`` entry, allow-listed) is called
        with; the weights are then checked against that network.
        """
        from safetensors.torch import load_file  # an optional dependency (the ``export`` extra)

        path = Path(path).expanduser()
        meta = read_sidecar(path)
        config = {**(meta.get("backbone") or {}), "name": meta["architecture"]}
        backbone = rebuild_backbone(config, source=str(sidecar_path(path)))
        names = meta["class_names"]
        preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        # exports before heads were configurable name none: theirs is the dropout + linear head
        head = rebuild_head(meta.get("head") or {"_target_": LINEAR}, source=str(sidecar_path(path)))
        net = ClassifierNet(
            backbone.module,
            head.make(backbone.num_features, len(names), 0.0),
            preprocessing.mean,
            preprocessing.std,
            meta.get("upsample_to"),
        )
        state = load_file(path)
        expected = f"{meta['architecture']}, {len(names)} classes, as {sidecar_path(path)} says"
        check_weights_fit(net, state, source=str(path), expected=expected)
        net.load_state_dict(state)
        return cls(
            net,
            names,
            preprocessing,
            architecture=meta["architecture"],
            backbone=config,
            head=head.config,
            device=device,
            task=meta.get("task", "multiclass"),
            threshold=meta.get("threshold"),
        )

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """float32 CHW in [0, 1], as the network (and an exported model) takes it."""
        return self.preprocessing(image)

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes (multi-label: sigmoid per label) for an NCHW batch (uint8, or float in [0, 1]);
        float32, on the CPU.

        With ``tta`` the batch is what ``input_preprocessing`` loads, and the result the mean over its views.
        """
        images = to_float(images.to(self.device, non_blocking=True))
        if self.tta is not None:
            return self.tta.probabilities(self.net, images, self.multilabel).cpu()
        logits = self.net(images).float()
        return (logits.sigmoid() if self.multilabel else logits.softmax(dim=-1)).cpu()

    def predict(
        self, images: ImageInput | Sequence[ImageInput], top_k: int = 5, batch_size: int = 32
    ) -> list[Prediction]:
        """Classify paths and/or PIL images (one or a list) in batches; an unreadable file raises ``DataError``.
        Multi-label: each ``Prediction`` also has its ``label_set``."""
        items = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        predictions: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            batch = torch.stack([self._load(item) for item in chunk])
            sources = [None if isinstance(item, Image.Image) else str(item) for item in chunk]
            predictions.extend(self.predictions(self.probabilities(batch), top_k, sources))
        return predictions

    def predictions(
        self, probabilities: torch.Tensor, top_k: int, sources: Sequence[str | None] | None = None
    ) -> list[Prediction]:
        """``top_k_predictions`` of a probability matrix, with each multi-label ``label_set``."""
        predictions = top_k_predictions(probabilities, self.class_names, top_k, sources)
        if not self.multilabel:
            return predictions
        assert self.threshold is not None
        sets = label_sets(probabilities, self.class_names, self.threshold)
        return [replace(p, label_set=chosen) for p, chosen in zip(predictions, sets)]

    def _load(self, item: ImageInput) -> torch.Tensor:
        try:
            return self.input_preprocessing.load(item)
        except Exception as e:  # any decoder error: say which file and why, in the scan's vocabulary
            raise DataError(f"{item}: {failure_reason(e)}") from e

    def metadata(self) -> dict[str, Any]:
        """What an exported model needs beside its weights: architecture (and its builder), class names, preprocessing.

        ``upsample_to`` is the network's own business (its input is still ``preprocessing.crop``), recorded so that
        safetensors weights rebuild the same network.
        """
        return {
            "architecture": self.architecture,
            # the builder (and its other arguments) that ``architecture`` is built with; no weights
            "backbone": {k: v for k, v in architecture(self.backbone).items() if k != "name"},
            # the head's builder and plain arguments (models/registry.HEADS), as the checkpoint records it
            "head": self.head,
            "class_names": self.class_names,
            "preprocessing": self.preprocessing.as_dict(),
            "upsample_to": getattr(self.net, "upsample_to", None),
            # multi-label only (single-label JSONs stay as they were): sigmoid per label, labels at >= threshold
            **({"task": self.task, "threshold": self.threshold} if self.multilabel else {}),
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
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        meta, problem = None, f"cannot be read as JSON ({getattr(e, 'strerror', None) or e})"
    else:
        problem = _sidecar_problem(meta)
    if problem is not None:
        raise UserError(f"{path} {problem}: it describes {model_path}. Re-run export.py to write both again.")
    return meta


# What every reader of the JSON beside an exported model takes from it, and the type it must have.
_SIDECAR_KEYS: dict[str, type] = {"format": str, "architecture": str, "class_names": list, "preprocessing": dict}


def _sidecar_problem(meta: Any) -> str | None:
    """Why ``meta`` is not a usable sidecar (a hand edit, a cut-short copy), or None."""
    if not isinstance(meta, dict):
        return f"holds a JSON {type(meta).__name__}, not an object"
    for key, kind in _SIDECAR_KEYS.items():
        if not isinstance(meta.get(key), kind):
            return (
                f"has no {kind.__name__} {key!r}"
                if key not in meta
                else f"has {key!r} = {meta[key]!r}, not a {kind.__name__}"
            )
    if not meta["class_names"] or not all(isinstance(name, str) for name in meta["class_names"]):
        return "has 'class_names' that are not a list of names"
    return None
