"""Split a torchvision backbone into stages, input to output, for discriminative LRs and gradual unfreezing.

A stage is a tuple of parameter-name prefixes relative to the backbone module (``("layer4.",)``); every parameter
belongs to exactly one stage. ResNets split as fastai and timm do (stem, layer1..layer4); networks built around a
sequential trunk (``features``, ``layers``, ``blocks``, ``trunk_output``, a ViT's encoder layers) split into its
blocks; anything else into its top-level children that hold parameters.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

Stages = tuple[tuple[str, ...], ...]

_TRUNKS = ("features", "layers", "blocks", "trunk_output")
# Families whose trunk alternates downsampling layers and stages: a downsampling layer joins the stage after it.
_DOWNSAMPLE_PAIRS = ("ConvNeXt", "SwinTransformer")


def torchvision_stages(module: nn.Module) -> Stages:
    """Stages of a headless torchvision classifier (its classifier replaced by ``nn.Identity``)."""
    if type(module).__name__ == "VisionTransformer":
        layers = [f"encoder.layers.{name}." for name, _ in module.encoder.layers.named_children()]
        stem = ("conv_proj.", "class_token", "encoder.pos_embedding")
        stages: list[tuple[str, ...]] = [stem, *((p,) for p in layers)]
    else:
        stages = []
        after_trunk = False
        for name, child in module.named_children():
            if name in _TRUNKS and isinstance(child, (nn.Sequential, nn.ModuleList)):
                blocks = _blocks(f"{name}.", child.named_children())
                if type(module).__name__ in _DOWNSAMPLE_PAIRS:  # stem, stage 1, then (downsampling, stage) pairs
                    blocks = blocks[:2] + [blocks[i] + blocks[i + 1] for i in range(2, len(blocks) - 1, 2)]
                stages += blocks
                after_trunk = True
            elif _has_params(child):
                # A final norm or projection after the trunk belongs to the last stage.
                stages += [(f"{name}.",)] if not after_trunk else []
                stages[-1] += (f"{name}.",) if after_trunk else ()
        stages = _merge_norms(module, stages)
    return complete_stages(module, stages)


def complete_stages(module: nn.Module, stages: Iterable[tuple[str, ...]]) -> Stages:
    """Drop stages that match no parameter; parameters in no stage (a final norm, a root-level token) join the last
    stage, or the first when they come before it, so every parameter belongs to exactly one stage."""
    stages = [s for s in stages if any(_owner(name, [s]) is not None for name, _ in module.named_parameters())]
    if not stages:
        return (("",),) if _has_params(module) else ()
    names = [name for name, _ in module.named_parameters()]
    first_stage = min(i for i, name in enumerate(names) if _owner(name, stages) is not None)
    extra: tuple[list[str], list[str]] = ([], [])
    for i, name in enumerate(names):
        if _owner(name, stages) is None:
            extra[i > first_stage].append(name)
    stages[0] = (*extra[0], *stages[0])
    stages[-1] = (*stages[-1], *extra[1])
    return tuple(stages)


def stage_of(name: str, stages: Stages) -> int | None:
    """Index of the stage a parameter (or, given ``qualname + "."``, a module) belongs to, or None."""
    return _owner(name, stages)


def stage_names(stages: Stages) -> tuple[str, ...]:
    """Short readable names for param groups and logs: ``stem`` for a multi-part first stage, else the first prefix."""
    names: list[str] = []
    for i, prefixes in enumerate(stages):
        name = "stem" if i == 0 and len(prefixes) > 1 else prefixes[0].rstrip(".") or f"stage{i}"
        names.append(name if name not in names else f"stage{i}")
    return tuple(names)


def _blocks(prefix: str, children: Iterable[tuple[str, nn.Module]]) -> list[tuple[str, ...]]:
    return [(f"{prefix}{name}.",) for name, child in children if _has_params(child)]


def _merge_norms(module: nn.Module, stages: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """A norm layer right after a single conv/linear layer joins it (conv1 + bn1 is one stem, as in fastai and timm)."""
    merged: list[tuple[str, ...]] = []
    for stage in stages:
        first = module.get_submodule(stage[0].rstrip("."))
        previous = module.get_submodule(merged[-1][-1].rstrip(".")) if merged else None
        after_layer = previous is not None and _is_layer(previous) and not _is_norm(previous)
        if len(stage) == 1 and _is_norm(first) and after_layer:
            merged[-1] += stage
        else:
            merged.append(stage)
    return merged


def _owner(name: str, stages: Iterable[tuple[str, ...]]) -> int | None:
    for i, prefixes in enumerate(stages):
        if any(name.startswith(p) for p in prefixes):
            return i
    return None


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_layer(module: nn.Module) -> bool:
    """A single layer (conv, norm, linear), not a block of them."""
    return next(module.parameters(recurse=False), None) is not None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))
