"""k-fold cross-validation (``data.folds=K data.fold=i``): which part of the training pool fold ``i`` validates on.

The pool is cut into K stratified parts with scikit-learn's ``StratifiedKFold`` (shuffled with the data seed); fold
``i`` validates on part ``i`` and trains on the rest, so the K runs of ``-m data.folds=K data.fold='range(K)'`` each
validate on different images and together on every image once. A test split is held out before the folds are cut,
so every fold tests on the same images.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TypeVar

from image_finetune.core.errors import DataError

T = TypeVar("T")


def fold_indices(
    labels: Sequence[int], folds: int, fold: int, seed: int, class_names: Sequence[str] | None = None
) -> tuple[list[int], list[int]]:
    """``(train, held_out)`` positions into ``labels`` for fold ``fold`` of ``folds``, stratified by label.

    ``DataError`` when a class has fewer images than folds (some fold would validate on none of it)."""
    from sklearn.model_selection import StratifiedKFold  # a main dependency, imported when a run uses folds

    counts = Counter(labels)
    label, smallest = min(counts.items(), key=lambda item: (item[1], item[0]))
    if smallest < folds:
        name = repr(class_names[label]) if class_names is not None else str(label)
        raise DataError(
            f"class {name} has {smallest} image(s) in the pool being folded: too few for data.folds={folds} (every "
            "fold validates on at least one image of each class). Lower data.folds or add images."
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed % 2**32)
    train, held_out = list(splitter.split(list(labels), list(labels)))[fold]
    return train.tolist(), held_out.tolist()


def fold_split(
    samples: Sequence[tuple[T, int]], folds: int, fold: int, seed: int, class_names: Sequence[str] | None = None
) -> tuple[list[tuple[T, int]], list[tuple[T, int]]]:
    """``(train, held_out)`` samples (``(item, label)`` pairs) of fold ``fold``; the same whatever order they come in."""
    ordered = sorted(samples)
    train, held_out = fold_indices([label for _, label in ordered], folds, fold, seed, class_names)
    return [ordered[i] for i in train], [ordered[i] for i in held_out]
