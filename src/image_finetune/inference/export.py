"""``export(cfg)``: a checkpoint as ONNX, TorchScript or safetensors, each with a JSON beside it that says how to use it.

Every format takes ``images``, float32 RGB in [0, 1], NCHW (any batch size, ``crop`` x ``crop`` pixels) and returns
``logits``; the mean/std normalisation is inside the network. The JSON (``<file>.json``) holds the architecture, the
class names and the preprocessing (``Preprocessing.as_dict``: the same definition predict.py uses), so serving code
needs nothing else; a multi-label model's also ``task: multilabel`` and its decision ``threshold`` (sigmoid per label,
labels at or over it). After writing, the file is loaded back and checked against the checkpoint's network.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from image_finetune import __version__
from image_finetune.checkpoints import resolve_ckpt_path
from image_finetune.core.atomic import atomic_path
from image_finetune.core.cli import save_json
from image_finetune.core.errors import ConfigError, UserError, check_output_file, writing
from image_finetune.inference.classifier import Classifier, read_sidecar, sidecar_path

log = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
INPUT_NAME, OUTPUT_NAME = "images", "logits"
#: Largest difference in probability between the exported model and the checkpoint's network that passes the check.
TOLERANCE = 1e-4


def _write_onnx(net: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        # dynamo=False: the dynamo exporter needs onnxscript, which is not installed; the TorchScript-based one is
        # deprecated (hence the warning) but exports these CNNs exactly (see verify_export).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter(
            "ignore", torch.jit.TracerWarning
        )  # upsample_to's size check: fixed by the example's size
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )


def _write_torchscript(net: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but it is what TorchScript users load
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # as in _write_onnx
        traced = torch.jit.trace(net, example)
    traced.save(str(path))


def _write_safetensors(net: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


WRITERS: dict[str, Callable[[nn.Module, torch.Tensor, Path, int], None]] = {
    "onnx": _write_onnx,
    "torchscript": _write_torchscript,
    "safetensors": _write_safetensors,
}


def export_classifier(
    classifier: Classifier, fmt: str, path: str | os.PathLike, *, source: str, opset: int = 17, verify: bool = True
) -> Path:
    """Write ``classifier`` to ``path`` in ``fmt`` and its JSON to ``<path>.json``, both atomically."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: choose one of {list(FORMATS)}")
    if opset < 17:
        raise ConfigError(f"opset={opset}: use 17 or newer")
    path = check_output_file(path, "output", f"model{FORMATS[fmt]}")
    net = classifier.net.cpu().eval()
    size = classifier.preprocessing.size
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with writing(path, "output"), atomic_path(path) as tmp:
        WRITERS[fmt](net, example, tmp, opset)
    meta = {
        **classifier.metadata(),
        "format": fmt,
        "file": path.name,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "source_checkpoint": os.path.abspath(source),
        "image_finetune_version": __version__,
    }
    if fmt == "onnx":
        meta["opset"] = opset
    with writing(sidecar_path(path), "output"):
        save_json(meta, sidecar_path(path))
    if verify:
        diff = verify_export(path, classifier)
        log.info("%s: probabilities agree with the checkpoint to %.1e (batch of 3)", path, diff)
    return path


def load_exported(path: str | os.PathLike) -> Callable[[np.ndarray], np.ndarray]:
    """The exported model as a function: float32 NCHW images in [0, 1] -> logits (numpy), whatever the format."""
    fmt = read_sidecar(path)["format"]
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise UserError("onnxruntime is not installed: pip install 'image-finetune[export]'") from None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda images: session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", FutureWarning
            )  # deprecated like torch.jit.trace; still how TorchScript loads
            module = torch.jit.load(str(path), map_location="cpu").eval()
    else:
        module = Classifier.from_safetensors(path, device="cpu").net

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(images)).numpy()

    return run


def verify_export(path: str | os.PathLike, classifier: Classifier, tolerance: float = TOLERANCE) -> float:
    """Max |probability difference| between the file and ``classifier`` on 3 random images (not the traced batch
    size of 2, so a batch axis that is not dynamic fails here); raises if it exceeds ``tolerance``."""
    size = classifier.preprocessing.size
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    expected = classifier.probabilities(images)
    logits = torch.from_numpy(load_exported(path)(images.numpy()))
    got = logits.sigmoid() if classifier.multilabel else logits.softmax(dim=-1)
    diff = (got - expected).abs().max().item()
    if not diff <= tolerance:
        raise RuntimeError(
            f"{path} does not reproduce the checkpoint: probabilities differ by {diff:.2e} > {tolerance:.0e}"
        )
    return diff


def export(cfg: DictConfig) -> Path:
    """Export ``cfg.ckpt_path`` as ``cfg.format`` to ``cfg.output`` (default: ``model.<ext>`` in the run dir)."""
    if not cfg.get("ckpt_path"):
        raise UserError(
            "ckpt_path is required: python export.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt format=onnx"
        )
    fmt = str(cfg.get("format") or "").lower()
    if fmt not in FORMATS:
        raise ConfigError(f"format={cfg.get('format')!r}: choose one of {list(FORMATS)}")
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir)
    assert ckpt_path is not None
    classifier = Classifier.from_checkpoint(
        ckpt_path, "cpu", image_size=cfg.get("image_size"), crop_ratio=cfg.get("crop_ratio")
    )
    out = Path(cfg.output) if cfg.get("output") else Path(cfg.paths.output_dir) / f"model{FORMATS[fmt]}"
    path = export_classifier(
        classifier, fmt, out, source=ckpt_path, opset=cfg.get("opset", 17), verify=cfg.get("verify", True)
    )
    log.info("wrote %s and %s", path, sidecar_path(path))
    return path
