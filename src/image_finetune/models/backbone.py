"""``Backbone``: a headless feature extractor and what the pipeline must know about it (the seam between the recipe's
builders and the engine), and the weights-file checks every builder shares.

A builder (``recipe/backbones.py``, ``recipe/timm_backbone.py``, or yours) returns a ``Backbone``; the engine reads only
these fields: the module, its feature width, its preprocessing (stored in the checkpoint), its stages (what the freeze
schedule unfreezes) and the plain-valued call that rebuilds it (``config``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from image_finetune.core.errors import ConfigError
from image_finetune.data.preprocessing import Preprocessing
from image_finetune.models.stages import Stages

_NO_WEIGHTS = {None, "", "none", "null", "random", "false"}


@dataclass(frozen=True)
class Backbone:
    """A feature extractor plus what the rest of the pipeline must know about it."""

    module: nn.Module
    """The network without its classifier: images (normalised) in, ``num_features`` pooled features out."""
    num_features: int
    preprocessing: Preprocessing
    """What its pretrained weights expect: input size, crop ratio, mean/std, interpolation."""
    pretrained: bool
    """True when pretrained weights were actually loaded (False for ``weights=null`` or the offline fallback)."""
    stages: Stages = ()
    """Parameter-name prefixes of ``module``, grouped from input (stem) to output; each parameter in exactly one."""
    config: Mapping[str, Any] = field(default_factory=dict)
    """The builder call that made it, as plain values (``_target_`` + arguments): stored in checkpoints, it rebuilds
    the architecture through ``registry.rebuild_backbone`` (which only calls the builders it lists)."""

    @property
    def mean(self) -> tuple[float, ...]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.preprocessing.std


def no_weights(weights: object) -> bool:
    """``null``, ``none``, ``random``, ``false`` and the empty string all mean random initialisation."""
    return weights is None or weights is False or str(weights).strip().lower() in _NO_WEIGHTS


def looks_like_path(weights: str) -> bool:
    return (
        os.sep in weights
        or weights.endswith((".pth", ".pt", ".bin", ".safetensors", ".ckpt"))
        or weights.startswith("~")
    )


def local_weights_file(weights: str) -> Path:
    """``model.backbone.weights=PATH``: the file, or a one-line error (also for a whole classifier of this project)."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"model.backbone.weights={weights!r}: no such file. Give a path to a state_dict (.pth, .safetensors)."
        )
    if _is_whole_classifier(path):
        raise ConfigError(
            f"model.backbone.weights={weights!r} is a whole classifier of this project (a train.py checkpoint or an "
            "export.py .safetensors), not a backbone state_dict: to start a new run from it, use "
            f'model.init_from={weights} instead (README "Start from a finished run")'
        )
    return path


def _is_whole_classifier(path: Path) -> bool:
    """A Lightning checkpoint, or tensors named as ``ClassifierNet``'s (``backbone.*`` + ``head.*``): what
    ``model.init_from`` takes. Only the names are read (a safetensors header, or a memory-mapped safe load)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(state, Mapping):
                return False
            if "state_dict" in state and "hyper_parameters" in state:
                return True
            keys = list(state)
    except Exception:  # unreadable here: the builder's own load says what is wrong with it
        return False
    names = {str(k).removeprefix("net.") for k in keys}
    return any(name.startswith("head.") for name in names) and any(name.startswith("backbone.") for name in names)
