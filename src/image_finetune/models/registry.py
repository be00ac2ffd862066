"""The backbone and head builders a checkpoint or an export JSON may name, and the one function that rebuilds from them.

Training instantiates whatever ``_target_`` the config gives (configs are code, written by the user). A checkpoint is
data, possibly from elsewhere: rebuilding from it calls only the builders listed here, never an import of a name
read from disk (the trust issue). To reload checkpoints of your own builder, add it to ``BUILDERS`` (a head: ``HEADS``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from image_finetune.errors import UserError
from image_finetune.models.backbones import TORCHVISION_BUILDER, Backbone, torchvision_backbone
from image_finetune.models.heads import LINEAR, MLP, Head, linear_head, mlp_head
from image_finetune.models.timm_backbone import TIMM_BUILDER, timm_backbone

#: ``_target_`` -> builder. Each builder takes ``name`` and ``weights`` (None: random init, nothing downloaded).
BUILDERS: dict[str, Callable[..., Backbone]] = {
    TORCHVISION_BUILDER: torchvision_backbone,
    TIMM_BUILDER: timm_backbone,
}
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
    target = str(spec.pop("_target_"))
    builder = BUILDERS.get(target)
    if builder is None:
        raise UserError(
            f"{source} names the backbone builder {target!r}, which is not one of {sorted(BUILDERS)}: only those are "
            "called to rebuild a model read from disk. Add yours to image_finetune.models.registry.BUILDERS."
        )
    return builder(**spec, weights=None)


def build_backbone_from_config(config: Mapping[str, Any]) -> Backbone:
    """A backbone from a plain mapping (e.g. ``ImageClassifier(backbone={"name": "resnet18", "weights": None})``),
    weights included; the builder must be allow-listed, as for ``rebuild_backbone``."""
    config = dict(config)
    target = str(config.pop("_target_", TORCHVISION_BUILDER))
    builder = BUILDERS.get(target)
    if builder is None:
        raise UserError(f"model.backbone._target_={target!r} is not one of {sorted(BUILDERS)}")
    return builder(**config)


#: ``_target_`` -> head builder (``models/heads.py``); a checkpoint's ``head`` hparam names one of these.
HEADS: dict[str, Callable[..., Head]] = {LINEAR: linear_head, MLP: mlp_head}


def rebuild_head(config: Mapping[str, Any], *, source: str = "model.head") -> Head:
    """The head ``config`` describes (its ``_target_`` and plain arguments), through an allow-listed builder only."""
    spec = dict(config)
    target = str(spec.pop("_target_", LINEAR))
    builder = HEADS.get(target)
    if builder is None:
        raise UserError(
            f"{source} names the head builder {target!r}, which is not one of {sorted(HEADS)}: only those are called "
            "to rebuild a model read from disk. Add yours to image_finetune.models.registry.HEADS."
        )
    return builder(**spec)
