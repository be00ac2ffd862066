"""Heads: what maps the backbone's features to class scores. Add yours here and to ``registry.HEADS``.

A head builder is a Hydra ``_target_`` (``configs/head/*.yaml``) that takes plain arguments and returns a ``Head``: the
arguments as a checkpoint records them (``config``) and a function that makes the module once the class count is known
(from the data, in ``ImageClassifier.setup``). The module is an ``nn.Sequential`` whose last layer gives one score per
class (``init_from`` reorders that layer's rows by class name). ``model.dropout`` is every head's dropout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from image_finetune.core.errors import ConfigError

LINEAR = "image_finetune.recipe.heads.linear_head"
MLP = "image_finetune.recipe.heads.mlp_head"


@dataclass(frozen=True)
class Head:
    """A head's recipe: ``config`` (its builder's ``_target_`` and plain arguments) and ``make(features, classes,
    dropout)``, which returns the ``nn.Sequential``."""

    config: Mapping[str, Any]
    make: Callable[[int, int, float], nn.Sequential]


def linear_head() -> Head:
    """Dropout + linear (the default; ``head.1.*``, as every checkpoint before heads were configurable)."""
    return Head({"_target_": LINEAR}, lambda features, classes, dropout: nn.Sequential(
        nn.Dropout(dropout), nn.Linear(features, classes)
    ))  # fmt: skip


def mlp_head(hidden: int = 512) -> Head:
    """Dropout + linear to ``hidden`` + GELU + dropout + linear: a little more capacity on a frozen backbone."""
    if hidden < 1:
        raise ConfigError(f"model.head.hidden={hidden} must be a positive width")

    def make(features: int, classes: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(
            nn.Dropout(dropout), nn.Linear(features, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, classes)
        )

    return Head({"_target_": MLP, "hidden": hidden}, make)
