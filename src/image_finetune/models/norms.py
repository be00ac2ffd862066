"""Which layers are normalisation layers, for any backbone: what ``finetune.train_bn`` keeps training while frozen."""

from __future__ import annotations

from torch import nn

#: torch's own norm layers. ``_NormBase`` covers every BatchNorm (1d/2d/3d, Sync, and timm's ``BatchNormAct2d`` and
#: friends, which subclass them) and InstanceNorm; timm's ``LayerNorm2d``/``GroupNormAct`` subclass LayerNorm/GroupNorm.
TORCH_NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
#: Modules whose layers are all norm layers (timm's EvoNorm, RmsNorm, SimpleNorm... subclass nn.Module directly).
#: Checked by name so that recognising them needs no timm import.
NORM_MODULES = frozenset({"timm.layers.norm", "timm.layers.norm_act", "timm.layers.evo_norm"})


def is_norm_layer(module: nn.Module) -> bool:
    """BatchNorm/GroupNorm/LayerNorm/InstanceNorm/RMSNorm of torch and timm (frozen BatchNorms hold no parameters)."""
    return isinstance(module, TORCH_NORMS) or type(module).__module__ in NORM_MODULES
