"""Rebuilding a network from what a checkpoint or export JSON says, through the recipe's allow-lists only.

A checkpoint never chooses code: its builder names are looked up in ``recipe.registry`` (after ``core.moved`` maps a
name an older version wrote), and anything else is refused in one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from image_finetune.core.errors import UserError
from image_finetune.core.moved import current
from image_finetune.models.backbone import Backbone
from image_finetune.recipe.backbones import TORCHVISION_BUILDER
from image_finetune.recipe.heads import LINEAR, Head
from image_finetune.recipe.registry import BUILDERS, HEADS

#: Arguments that only matter when weights are loaded; left out when rebuilding an architecture.
_LOADING_ONLY = ("weights", "allow_random_init")


def architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """The builder config without its weights: what rebuilds the same network (checkpoint weights are loaded after)."""
    config = dict(config)
    config.setdefault("_target_", TORCHVISION_BUILDER)  # checkpoints from before backbones were Hydra targets
    return {k: v for k, v in config.items() if k not in _LOADING_ONLY}


def rebuild_backbone(config: Mapping[str, Any], *, source: str = "the checkpoint") -> Backbone:
    """The backbone ``config`` describes, randomly initialised (no download), through an allow-listed builder only."""
    spec = architecture(config)
    target = current(str(spec.pop("_target_")))
    builder = BUILDERS.get(target)
    if builder is None:
        raise UserError(
            f"{source} names the backbone builder {target!r}, which is not one of {sorted(BUILDERS)}: only those are "
            "called to rebuild a model read from disk. Add yours to image_finetune.recipe.registry.BUILDERS."
        )
    return builder(**spec, weights=None)


def build_backbone_from_config(config: Mapping[str, Any]) -> Backbone:
    """A backbone from a plain mapping (e.g. ``ImageClassifier(backbone={"name": "resnet18", "weights": None})``),
    weights included; the builder must be allow-listed, as for ``rebuild_backbone``."""
    config = dict(config)
    target = current(str(config.pop("_target_", TORCHVISION_BUILDER)))
    builder = BUILDERS.get(target)
    if builder is None:
        raise UserError(f"model.backbone._target_={target!r} is not one of {sorted(BUILDERS)}")
    return builder(**config)


def rebuild_head(config: Mapping[str, Any], *, source: str = "model.head") -> Head:
    """The head ``config`` describes (its ``_target_`` and plain arguments), through an allow-listed builder only."""
    spec = dict(config)
    target = current(str(spec.pop("_target_", LINEAR)))
    builder = HEADS.get(target)
    if builder is None:
        raise UserError(
            f"{source} names the head builder {target!r}, which is not one of {sorted(HEADS)}: only those are called "
            "to rebuild a model read from disk. Add yours to image_finetune.recipe.registry.HEADS."
        )
    return builder(**spec)
