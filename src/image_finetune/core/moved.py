"""Names that moved: the ``_target_`` an older run config or checkpoint wrote -> where the same code lives now.

Read by the resume guard (a resume across the move is no change) and by the recipe's allow-lists (an older
checkpoint's builder name still rebuilds its network). Only renames go here, never a change of behaviour.
"""

from __future__ import annotations

MOVED: dict[str, str] = {
    "image_finetune.checkpoint_io.AtomicCheckpointIO": "image_finetune.checkpoints.io.AtomicCheckpointIO",
    # the recipe/engine split: the edit surface moved to recipe/, the engine into folders by layer
    "image_finetune.models.ImageClassifier": "image_finetune.models.classifier.ImageClassifier",
    "image_finetune.models.backbones.torchvision_backbone": "image_finetune.recipe.backbones.torchvision_backbone",
    "image_finetune.models.timm_backbone.timm_backbone": "image_finetune.recipe.timm_backbone.timm_backbone",
    "image_finetune.models.heads.linear_head": "image_finetune.recipe.heads.linear_head",
    "image_finetune.models.heads.mlp_head": "image_finetune.recipe.heads.mlp_head",
    "image_finetune.models.losses.cross_entropy": "image_finetune.recipe.losses.cross_entropy",
    "image_finetune.models.losses.focal": "image_finetune.recipe.losses.focal",
    "image_finetune.models.metrics.classification_metrics": "image_finetune.recipe.metrics.classification_metrics",
    "image_finetune.models.schedulers.cosine_with_warmup": "image_finetune.recipe.schedulers.cosine_with_warmup",
    "image_finetune.data.DatasetDataModule": "image_finetune.recipe.datasets.DatasetDataModule",
    "image_finetune.loggers.mlflow_logger": "image_finetune.ops.loggers.mlflow_logger",
    "image_finetune.loggers.wandb_logger": "image_finetune.ops.loggers.wandb_logger",
    "image_finetune.multirun.FinishTrackers": "image_finetune.ops.multirun.FinishTrackers",
    "image_finetune.multirun.MultirunSummary": "image_finetune.ops.multirun.MultirunSummary",
    "image_finetune.sweep.optuna_pruning": "image_finetune.ops.sweep.optuna_pruning",
    "image_finetune.cli.RunDirCheck": "image_finetune.core.cli.RunDirCheck",
}


def current(target: str) -> str:
    """Where ``target`` lives now (itself when it never moved)."""
    return MOVED.get(target, target)
