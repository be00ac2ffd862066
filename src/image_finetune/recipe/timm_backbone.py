"""``timm_backbone``: any timm model as a ``Backbone`` (``model=timm model.backbone.name=convnext_nano.in12k``).
Edit here to change how a timm network is built; the engine expects what ``backbones.py`` says.

Everything comes from timm itself: ``timm.create_model(name, pretrained=..., num_classes=0)`` gives the pooled-feature
network and loads the weights through timm's own loader (the Hugging Face hub and its cache, or a local file via
``pretrained_cfg_overlay=dict(file=PATH)``); ``timm.data.resolve_data_config`` the preprocessing the weights were
trained with; ``model.group_matcher(coarse=True)`` the stages. timm is imported only when this builder runs, so it
stays an optional dependency (the ``timm`` extra).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from image_finetune.core.errors import ConfigError
from image_finetune.data.preprocessing import Preprocessing
from image_finetune.models.backbone import Backbone, local_weights_file, looks_like_path, no_weights
from image_finetune.models.stages import Stages, torchvision_stages

log = logging.getLogger(__name__)

TIMM_BUILDER = "image_finetune.recipe.timm_backbone.timm_backbone"
#: ``weights`` values that mean "the pretrained weights of the name's tag" (timm's ``pretrained=True``).
_REGISTRY_WEIGHTS = {"default", "true", "pretrained"}


def _import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ConfigError("model=timm needs the timm package: pip install 'image-finetune[timm]'") from None
    return timm


def timm_backbone(
    name: str,
    weights: str | bool | None = "DEFAULT",
    *,
    allow_random_init: bool = False,
    drop_path_rate: float | None = None,
) -> Backbone:
    """Build a headless timm model.

    ``weights``: ``DEFAULT`` (or true) for the pretrained weights of the name's tag (``resnet50.a1_in1k``; the tag
    picks them), a path to a ``.safetensors``/``.pth`` state dict of that architecture, or null for random init.
    ``allow_random_init`` is the offline demo's loud fallback, as for torchvision. ``drop_path_rate``: timm's
    stochastic depth (None keeps the model's default).
    """
    timm = _import_timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:3]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"model.backbone.name={name!r} is not a timm model.{hint} List them with timm.list_models('*pattern*'), "
            "e.g. resnet50.a1_in1k, convnext_nano.in12k, efficientnet_b0.ra_in1k."
        )
    kwargs: dict[str, Any] = {"num_classes": 0}
    extra = {} if drop_path_rate is None else {"drop_path_rate": float(drop_path_rate)}
    kwargs.update(extra)
    if no_weights(weights):
        source = None
    elif isinstance(weights, str) and looks_like_path(weights):
        source = local_weights_file(weights)
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(source)})
    elif weights is True or str(weights).strip().lower() in _REGISTRY_WEIGHTS:
        source = "registry"
        kwargs["pretrained"] = True
    else:
        raise ConfigError(
            f"model.backbone.weights={weights!r}: for a timm model use DEFAULT (the weights of the name's tag, e.g. "
            f"{name.split('.')[0]}.<tag>), a path to a .safetensors/.pth file, or null for random initialisation."
        )
    try:
        with _missing_keys_reported() as missing:
            model = timm.create_model(name, **kwargs)
        if missing:  # timm loads with strict=False once the classifier is dropped, and only logs what was missing
            raise RuntimeError(missing[0])
    except RuntimeError as err:
        if "Invalid pretrained tag" in str(err) or "No pretrained weights" in str(err):
            tags = timm.list_pretrained(f"{name.split('.')[0]}.*")[:5]
            raise ConfigError(f"model.backbone.name={name!r}: {err} Pretrained tags: {tags or 'none'}.") from None
        if source == "registry" and _looks_offline(err):
            model = _offline(timm, name, err, allow_random_init, extra)
            source = None
        else:
            if isinstance(source, Path):
                raise _does_not_fit(name, weights, err) from None
            raise
    except OSError as err:  # not in the Hugging Face cache and no network (huggingface_hub's errors are OSErrors)
        if source != "registry":
            raise
        model = _offline(timm, name, err, allow_random_init, extra)
        source = None
    config = {
        "_target_": TIMM_BUILDER,
        "name": name,
        "weights": None if no_weights(weights) else str(weights),
        "allow_random_init": bool(allow_random_init),
        **({} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}),  # rebuilt with the same depth
    }
    return Backbone(
        model,
        int(model.num_features),
        timm_preprocessing(timm, model),
        pretrained=source is not None,
        stages=timm_stages(timm, model),
        config=config,
    )


@contextlib.contextmanager
def _missing_keys_reported() -> Iterator[list[str]]:
    """Collect timm's own "Missing keys ..." report while it loads pretrained weights (it logs it at INFO level)."""
    logger = logging.getLogger("timm.models._builder")
    reports: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Missing keys"):
                reports.append(record.getMessage())

    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield reports
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _looks_offline(err: BaseException) -> bool:
    return any(word in str(err).lower() for word in ("connection", "offline", "resolve", "network", "download"))


def _does_not_fit(name: str, weights: object, err: BaseException) -> ConfigError:
    return ConfigError(
        f"model.backbone.weights={str(weights)!r} does not fit timm's {name}: {str(err).splitlines()[0][:300]}. "
        "The file must be a state dict of the same architecture."
    )


def _offline(timm: Any, name: str, err: BaseException, allow_random_init: bool, extra: dict[str, Any]) -> nn.Module:
    """The weights could not be had: a one-line error naming where they go, or (offline demo only) random init."""
    reason = str(err).splitlines()[0][:200]
    message = f"could not load pretrained weights for timm's {name} ({reason}). " + _where(timm, name)
    if not allow_random_init:
        raise ConfigError(message) from err
    log.warning("!" * 80 + "\n%s\nTRAINING FROM RANDOM INITIALISATION INSTEAD.\n" + "!" * 80, message)
    return timm.create_model(name, pretrained=False, num_classes=0, **extra)


def _where(timm: Any, name: str) -> str:
    """Where timm looks for the weights of ``name``, and the other ways to run offline."""
    cfg = timm.create_model(name, pretrained=False, num_classes=0).pretrained_cfg
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import constants

        repo, _, revision = hub_id.partition("@")
        folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        where = (
            f"If this machine is offline, download https://huggingface.co/{repo} elsewhere (hf download {repo}) and "
            f"copy its cache folder to {folder} (snapshots/<commit>/model.safetensors and refs/{revision or 'main'}; "
            "or set HF_HUB_CACHE), then run with HF_HUB_OFFLINE=1"
        )
    else:
        where = f"If this machine is offline, download {cfg.get('url')} elsewhere"
    return (
        f"{where}; or pass model.backbone.weights=/path/to/model.safetensors (timm's pretrained_cfg_overlay file), "
        "or model.backbone.weights=null to train from random initialisation."
    )


def timm_preprocessing(timm: Any, model: nn.Module) -> Preprocessing:
    """What the weights were evaluated with, from timm's resolver (input size, crop_pct, mean/std, interpolation)."""
    cfg = timm.data.resolve_data_config({}, model=model)
    interpolation = cfg.get("interpolation", "bilinear")
    if interpolation not in ("bilinear", "bicubic", "nearest"):  # e.g. "random" (training-time) or "lanczos"
        interpolation = "bicubic"
    return Preprocessing(
        size=cfg["input_size"][-1],
        crop_ratio=min(1.0, float(cfg.get("crop_pct") or 0.875)),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=interpolation,
    )


def timm_stages(timm: Any, model: nn.Module) -> Stages:
    """Stages from timm's coarse group matcher (what ``timm.optim``'s layer decay uses): stem, each stage, the rest.

    timm groups parameter names by regex; each group becomes the shortest module prefixes whose parameters all fall in
    it (e.g. ``("conv_stem.", "bn1.")``, ``("blocks.0.",)``). A model without a matcher splits by top-level children.
    """
    try:
        matcher = model.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError):
        return torchvision_stages(model)
    groups = timm.models.group_parameters(model, matcher)
    group_of = {name: gid for gid, names in groups.items() for name in names}
    order = list(groups)
    stages: list[list[str]] = [[] for _ in order]
    for name, gid in group_of.items():
        prefix = name
        parts = name.split(".")
        # climb to the widest module whose parameters all belong to this group
        for depth in range(1, len(parts)):
            candidate = ".".join(parts[:depth]) + "."
            if all(g == gid for n, g in group_of.items() if n.startswith(candidate)):
                prefix = candidate
                break
        stage = stages[order.index(gid)]
        if prefix not in stage:
            stage.append(prefix)
    return tuple(tuple(stage) for stage in stages if stage)
