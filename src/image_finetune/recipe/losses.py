"""Training losses (``configs/loss/*.yaml``). Add yours here: a function taking ``class_counts`` and plain arguments.

The engine calls the configured partial once per fit as ``loss(class_counts=...)`` (the training split's images per
class, in label order, from the data module's ``class_counts()``) and uses the module it returns as
``loss(logits, targets)``, where ``targets`` are class indices, or class probabilities (rows summing to one) after
mixup/cutmix. The loss is the training objective only: val/test report plain cross-entropy, so runs with different
losses stay comparable (and ``eval.py`` reports the same number from a checkpoint).

Multi-label data (README "Multi-label") trains with ``bce``: ``class_counts`` are then the training images holding
each label, the engine also passes ``num_images``, targets are multi-hot floats, and val/test report plain BCE.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from image_finetune.core.errors import ConfigError


def cross_entropy(
    class_counts: Sequence[int], label_smoothing: float = 0.0, weights: str | Sequence[float] | None = None
) -> nn.Module:
    """Cross-entropy with label smoothing (the default); ``weights``: null, ``balanced`` (from ``class_counts``) or
    one number per class, as ``focal`` takes them (torch's weighted mean: the batch's weights sum to one)."""
    if not 0 <= label_smoothing < 1:
        raise ConfigError(f"model.loss.label_smoothing={label_smoothing} must be in [0, 1)")
    loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    tensor = class_weights(weights, class_counts)
    if tensor is not None:
        loss.register_buffer("weight", tensor, persistent=False)  # checkpoints hold only the network
    return loss


def balanced_weights(class_counts: Sequence[int]) -> torch.Tensor:
    """``n / (k * n_c)`` per class (scikit-learn's "balanced"): each class weighs as much in total; 0 for an empty one."""
    counts = torch.as_tensor(list(class_counts), dtype=torch.float32)
    return torch.where(counts > 0, counts.sum() / (len(counts) * counts.clamp(min=1)), torch.zeros_like(counts))


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017) over softmax: ``-sum_c t_c w_c (1 - p_c)^gamma log p_c``, averaged over the batch.

    Written for soft targets ``t`` (mixup/cutmix); class indices are their one-hot case. ``gamma=0`` without weights is
    cross-entropy. ``weights`` is a non-persistent buffer: checkpoints hold only the network.
    """

    def __init__(self, gamma: float, weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.register_buffer("weights", weights, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1)
        if not targets.is_floating_point():
            targets = F.one_hot(targets, logits.shape[-1]).float()
        if self.label_smoothing:  # as nn.CrossEntropyLoss smooths: (1 - e) t + e / K
            targets = targets * (1 - self.label_smoothing) + self.label_smoothing / logits.shape[-1]
        terms = targets * (1 - log_p.exp()).pow(self.gamma) * log_p
        if self.weights is not None:
            terms = terms * self.weights
        return -terms.sum(dim=-1).mean()


def class_weights(weights: str | Sequence[float] | None, class_counts: Sequence[int]) -> torch.Tensor | None:
    """``model.loss.weights`` as a tensor: None for null, ``balanced_weights`` for ``balanced``, else the list."""
    if weights == "balanced":
        return balanced_weights(class_counts)
    if weights is None:
        return None
    if isinstance(weights, str) or len(weights) != len(class_counts):
        raise ConfigError(
            f"model.loss.weights={weights!r} must be null, balanced, or a list of {len(class_counts)} numbers "
            "(one per class, in label order)"
        )
    return torch.tensor([float(w) for w in weights])


def focal(
    class_counts: Sequence[int],
    gamma: float = 2.0,
    weights: str | Sequence[float] | None = None,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """Focal loss; ``weights``: null, ``balanced`` (from ``class_counts``) or one number per class; ``label_smoothing``
    as cross-entropy's (every loss takes it, so ``debug=overfit`` can turn it off whichever loss is chosen)."""
    if not 0 <= label_smoothing < 1:
        raise ConfigError(f"model.loss.label_smoothing={label_smoothing} must be in [0, 1)")
    if gamma < 0:
        raise ConfigError(f"model.loss.gamma={gamma} must be >= 0 (0 = cross-entropy)")
    return FocalLoss(gamma, class_weights(weights, class_counts), label_smoothing)


class MultiLabelBCE(nn.Module):
    """Binary cross-entropy on logits per label (multi-label: targets are multi-hot, or mixed by mixup/cutmix).

    ``pos_weight`` is a non-persistent buffer (as ``FocalLoss.weights``): checkpoints hold only the network.
    """

    def __init__(self, pos_weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.float()
        if self.label_smoothing:  # each label's 0/1 target towards 1/2
            targets = targets * (1 - self.label_smoothing) + self.label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=self.pos_weight)


def bce(
    class_counts: Sequence[int],
    num_images: int | None = None,
    pos_weight: str | Sequence[float] | None = None,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """Multi-label loss (``loss=bce``): ``class_counts`` are the training images holding each label, ``num_images``
    the training split's size (the engine passes it for multi-label data). ``pos_weight``: null, ``balanced``
    (negatives / positives per label, 1 for a label without positives) or one number per label; ``label_smoothing``
    moves each 0/1 target towards 1/2 (every loss takes it: ``debug=overfit`` turns it off)."""
    if not 0 <= label_smoothing < 1:
        raise ConfigError(f"model.loss.label_smoothing={label_smoothing} must be in [0, 1)")
    if pos_weight == "balanced":
        if num_images is None:
            raise ConfigError("model.loss.pos_weight=balanced needs multi-label data (the training split's size)")
        positives = torch.as_tensor(list(class_counts), dtype=torch.float32)
        tensor = torch.where(
            positives > 0, (num_images - positives) / positives.clamp(min=1), torch.ones_like(positives)
        )
    elif pos_weight is None:
        tensor = None
    elif isinstance(pos_weight, str) or len(pos_weight) != len(class_counts):
        raise ConfigError(
            f"model.loss.pos_weight={pos_weight!r} must be null, balanced, or a list of {len(class_counts)} numbers "
            "(one per label, in label order)"
        )
    else:
        tensor = torch.tensor([float(w) for w in pos_weight])
    return MultiLabelBCE(tensor, label_smoothing)
