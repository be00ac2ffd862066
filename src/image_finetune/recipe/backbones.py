"""The torchvision backbone builder: ``model=torchvision`` (the default), any ``torchvision.models.get_model`` name.

Edit here to change how a torchvision network becomes a headless feature extractor; add a builder of your own next to
it (a function returning ``models.backbone.Backbone``) and list it in ``registry.BUILDERS`` so its checkpoints reload.
The engine expects: ``module`` maps normalised images to ``num_features`` pooled features; ``preprocessing`` is what the
weights expect; ``stages`` groups parameter names from stem to output; ``config`` is this call as plain values.

The last ``nn.Linear`` of a torchvision classifier (``fc`` in ResNets, ``classifier[-1]`` in EfficientNets,
``heads.head`` in ViTs) is the ImageNet classifier: it is replaced with ``nn.Identity`` so the network outputs features.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from image_finetune.core.errors import ConfigError
from image_finetune.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from image_finetune.models.backbone import Backbone, local_weights_file, looks_like_path, no_weights
from image_finetune.models.stages import torchvision_stages

log = logging.getLogger(__name__)

__all__ = ["Backbone", "build_backbone", "torchvision_backbone"]

TORCHVISION_BUILDER = "image_finetune.recipe.backbones.torchvision_backbone"


def classification_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _check_name(name: str) -> None:
    known = classification_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"model.backbone.name={name!r} is not a torchvision classification model.{hint} "
            f"Choose one of torchvision.models.list_models(module=torchvision.models), e.g. resnet18, resnet50."
        )


def resolve_weights(name: str, weights: str | None) -> WeightsEnum | Path | None:
    """Map the config value to a torchvision weights enum, a local file, or None (random init)."""
    if no_weights(weights):
        return None
    weights = str(weights)
    if looks_like_path(weights):
        return local_weights_file(weights)
    enum = torchvision.models.get_model_weights(name)
    try:
        return enum[weights]
    except KeyError:
        choices = ["DEFAULT", *(m for m in enum.__members__ if m != "DEFAULT")]
        raise ConfigError(
            f"model.backbone.weights={weights!r} is not a weights name for {name}. "
            f"Choose one of {choices}, a path to a .pth file, or null for random initialisation."
        ) from None


def _replace_classifier(model: nn.Module) -> tuple[str, int]:
    """Swap the last Linear layer for Identity; return its qualified name and input width."""
    linears = [(qualname, m) for qualname, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(
            f"{type(model).__name__} has no nn.Linear classifier to replace; choose a model with a linear head (e.g. resnet50)."
        )
    qualname, linear = linears[-1]
    parent_name, _, attr = qualname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Identity())
    return qualname, linear.in_features


def stochastic_depth_kwargs(name: str, drop_path_rate: float | None) -> dict[str, float]:
    """``{"stochastic_depth_prob": rate}`` when a rate is set (None: the architecture's default, no kwarg)."""
    if drop_path_rate is None:
        return {}
    if not 0 <= drop_path_rate < 1:
        raise ConfigError(
            f"model.backbone.drop_path_rate={drop_path_rate} must be in [0, 1), or null for the architecture's default"
        )
    return {"stochastic_depth_prob": drop_path_rate}


def _get_model(name: str, weights: WeightsEnum | None, kwargs: dict[str, float]) -> nn.Module:
    """``get_model``; a model that takes no stochastic depth is a config error (builders pass **kwargs on blindly)."""
    try:
        return torchvision.models.get_model(name, weights=weights, **kwargs)
    except TypeError as err:
        if "stochastic_depth_prob" not in str(err):
            raise
        raise ConfigError(
            f"model.backbone.drop_path_rate={kwargs['stochastic_depth_prob']}: {name} has no stochastic depth "
            "(torchvision's EfficientNet, ConvNeXt, Swin and MaxViT have). Set model.backbone.drop_path_rate=null"
        ) from None


def _hub_file(weights: WeightsEnum) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _load_local(model: nn.Module, path: Path, classifier: str) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"model.backbone.weights={str(path)!r} does not fit {type(model).__name__}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}. "
            "The file must be a state_dict of the same architecture."
        )


def _preprocessing(name: str, weights: WeightsEnum | None) -> Preprocessing:
    """The weights' own eval transform (the model's default weights' for a local file or random init)."""
    if weights is None:
        try:
            weights = torchvision.models.get_model_weights(name).DEFAULT
        except (ValueError, AttributeError, KeyError):  # a model without published weights
            return Preprocessing()
    preset = weights.transforms()
    crop, resize = getattr(preset, "crop_size", [224])[0], getattr(preset, "resize_size", [256])[0]
    interpolation = getattr(preset, "interpolation", None)
    return Preprocessing(
        size=crop,
        crop_ratio=min(1.0, crop / resize),
        mean=tuple(getattr(preset, "mean", IMAGENET_MEAN)),
        std=tuple(getattr(preset, "std", IMAGENET_STD)),
        interpolation=getattr(interpolation, "value", "bilinear"),
    )


def torchvision_backbone(
    name: str, weights: str | None = "DEFAULT", *, allow_random_init: bool = False, drop_path_rate: float | None = None
) -> Backbone:
    """Build a headless torchvision model (``model=torchvision``; any ``torchvision.models.get_model`` name).

    ``weights``: a weights name of the model (``DEFAULT``, ``IMAGENET1K_V1``, ...), a path to a state_dict, or null.
    ``allow_random_init`` is for the offline demo only: when pretrained weights cannot be downloaded it trains from
    random initialisation with a loud warning instead of stopping. Everywhere else a missing download is an error that
    says where to put the file, because silently fine-tuning random weights wastes a user's GPU day.
    ``drop_path_rate`` is torchvision's ``stochastic_depth_prob`` (EfficientNet, ConvNeXt, Swin, MaxViT); None keeps
    the architecture's own default.
    """
    _check_name(name)
    resolved = resolve_weights(name, weights)
    enum = resolved if isinstance(resolved, WeightsEnum) else None
    kwargs = stochastic_depth_kwargs(name, drop_path_rate)
    try:
        model = _get_model(name, enum, kwargs)
    except (URLError, OSError, RuntimeError) as err:
        assert enum is not None  # without weights nothing is downloaded
        target = _hub_file(enum)
        message = (
            f"could not load pretrained weights {name}/{enum.name} ({err}). If this machine is offline, either "
            f"download {enum.url} elsewhere and put it at {target} (or pass the file: model.backbone.weights=PATH), "
            "or train from random initialisation with model.backbone.weights=null."
        )
        if not allow_random_init:
            raise ConfigError(message) from err
        log.warning("!" * 80 + "\n%s\nTRAINING FROM RANDOM INITIALISATION INSTEAD.\n" + "!" * 80, message)
        model = _get_model(name, None, kwargs)
        resolved = None
    classifier, num_features = _replace_classifier(model)
    if isinstance(resolved, Path):
        _load_local(model, resolved, classifier)
    config = {
        "_target_": TORCHVISION_BUILDER,
        "name": name,
        "weights": None if no_weights(weights) else str(weights),
        "allow_random_init": bool(allow_random_init),
        **({} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}),  # rebuilt with the same depth
    }
    return Backbone(
        model,
        num_features,
        _preprocessing(name, enum),
        pretrained=resolved is not None,
        stages=torchvision_stages(model),
        config=config,
    )


#: The name this builder had before backbones became Hydra targets.
build_backbone = torchvision_backbone
