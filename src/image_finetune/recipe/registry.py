"""The allow-lists: the backbone and head builders a checkpoint or an export JSON may name.

Training instantiates whatever ``_target_`` the config gives (configs are code, written by the user). A checkpoint is
data, possibly from elsewhere: rebuilding one (``eval.py``, ``predict.py``, exports, ``Classifier``) calls only the
builders listed here, never an import of a name read from disk. Add your builder here so its checkpoints reload:
the key is its ``_target_`` as your config writes it.
"""

from __future__ import annotations

from collections.abc import Callable

from image_finetune.models.backbone import Backbone
from image_finetune.recipe.backbones import TORCHVISION_BUILDER, torchvision_backbone
from image_finetune.recipe.heads import LINEAR, MLP, Head, linear_head, mlp_head
from image_finetune.recipe.timm_backbone import TIMM_BUILDER, timm_backbone

#: ``_target_`` -> backbone builder. Each takes ``name`` and ``weights`` (None: random init, nothing downloaded).
BUILDERS: dict[str, Callable[..., Backbone]] = {
    TORCHVISION_BUILDER: torchvision_backbone,
    TIMM_BUILDER: timm_backbone,
}
#: ``_target_`` -> head builder (``recipe/heads.py``); a checkpoint's ``head`` hparam names one of these.
HEADS: dict[str, Callable[..., Head]] = {LINEAR: linear_head, MLP: mlp_head}
