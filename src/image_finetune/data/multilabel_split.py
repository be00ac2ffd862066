"""Multi-label splits and folds (``data=csv`` with several labels per row): iterative stratification.

Sechidis, Tsoumakas & Vlahavas (2011), "On the stratification of multi-label data": take the label with the fewest
rows still unassigned, give each of its rows to the subset that still wants that label most (ties: the subset that
wants the most rows, then the seeded generator), repeat; rows without labels go to the subset that wants the most
rows. Unlike stratifying by one label per row, every label, not only each row's rarest, lands in each subset in
proportion (``benchmarks/multilabel_split.py`` measures the difference).

Implemented here rather than imported: ``iterative-stratification`` (``MultilabelStratifiedKFold``) is not a
dependency, and it offers only K equal folds or one shuffle split, while the hold-out split needs unequal fractions
(train, val 0.15, test 0.15) and both need the project's guarantees: deterministic for a seed whatever order the rows
come in, at least one row of each label in every subset, and a one-line error naming a label with too few rows.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np

from image_finetune.core.errors import DataError
from image_finetune.data.imagefolder import SPLIT_DIRS, Samples, split_sizes

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)


def iterative_stratification(rows: Mapping[K, Collection[int]], fractions: Sequence[float], seed: int) -> dict[K, int]:
    """The subset (index into ``fractions``) of each row (key -> its label indices), by iterative stratification.

    Each label wants ``max(1, rows holding it * fraction)`` rows in each subset, so a label held by at least
    ``len(fractions)`` rows is in every subset (rows are swapped between subsets afterwards where the greedy pass left
    a gap and a swap can fill it). The keys are sorted before the seeded shuffle: same seed, same rows -> same split."""
    keys = sorted(rows)  # type: ignore[type-var]
    rng = np.random.default_rng(seed % 2**32)
    keys = [keys[i] for i in rng.permutation(len(keys))]
    num_labels = 1 + max((label for key in keys for label in rows[key]), default=-1)
    y = np.zeros((len(keys), num_labels), dtype=bool)
    for i, key in enumerate(keys):
        y[i, list(rows[key])] = True
    share = np.asarray(fractions, dtype=float) / sum(fractions)
    held = y.sum(0)
    wants = np.maximum(np.outer(held, share), (held > 0)[:, None])  # label x subset: rows of the label still wanted
    room = len(keys) * share  # rows still wanted per subset
    left = held.copy()  # rows of each label not yet assigned
    subset = np.full(len(keys), -1)
    while (subset < 0).any():
        live = np.flatnonzero(left > 0)
        label = live[np.argmin(left[live])] if live.size else None  # the rarest label left; ties: the first
        members = np.flatnonzero((subset < 0) & (y[:, label] if label is not None else ~y.any(1)))
        for i in members:
            best = (
                np.flatnonzero(np.isclose(wants[label], wants[label].max()))
                if label is not None
                else np.arange(len(share))
            )
            best = best[np.isclose(room[best], room[best].max())]
            j = best[0] if best.size == 1 else rng.choice(best)
            subset[i], room[j] = j, room[j] - 1
            wants[y[i], j] -= 1
            left[y[i]] -= 1
    _fill_gaps(y, subset, len(share))
    return {key: int(j) for key, j in zip(keys, subset)}


def _fill_gaps(y: np.ndarray, subset: np.ndarray, k: int) -> None:
    """Where a label held by >= ``k`` rows has none in a subset, swap one of its rows in from a subset holding several,
    for a row of the gap's subset whose labels stay present there; subset sizes do not change, and no swap opens a new
    gap (the rare case no such pair exists is left as it is)."""
    count = np.stack([y[subset == j].sum(0) for j in range(k)])  # subset x label
    spare = y.sum(0) < k  # labels too rare to be everywhere: never a gap, never kept
    for gap, label in zip(*np.nonzero((count == 0) & ~spare)):  # by subset, then label
        if count[gap, label]:
            continue  # an earlier swap filled it
        for i in np.flatnonzero(y[:, label] & (subset != gap)):
            source = subset[i]
            if not np.all((count[source] >= 2) | spare | ~y[i]):
                continue  # its source would lose the last row of one of its labels
            after = count[gap] + y[i]
            swap = [o for o in np.flatnonzero(subset == gap) if np.all((after - y[o] >= 1) | spare | ~y[o])]
            if swap:
                o = swap[0]
                subset[i], subset[o] = gap, source
                count[source] += y[o].astype(int) - y[i]
                count[gap] += y[i].astype(int) - y[o]
                break


def multilabel_split(
    samples: Samples,
    fractions: list[float],
    names: list[str],
    classes: list[str],
    seed: int,
    folds: tuple[int, int] | None = None,
    *,
    labels: Mapping[str, Collection[int]],
) -> dict[str, Samples]:
    """``imagefolder.stratified_split`` for multi-label samples (``labels``: path -> its label indices): hold out
    ``fractions`` of the rows of each label as ``names`` by iterative stratification, the rest is ``train``; at least
    one row of each label per held-out split. ``folds=(K, i)``: ``val`` is fold ``i`` of ``K`` of what is left once
    the other splits are held out. A sample's own label (its rarest, which ``data_split.json`` records) is kept."""
    if folds is not None and "val" in names:
        rest = [i for i, name in enumerate(names) if name != "val"]
        out = multilabel_split(samples, [fractions[i] for i in rest], [names[i] for i in rest], classes, seed,
                               labels=labels)  # fmt: skip
        out["train"], out["val"] = multilabel_fold(out["train"], *folds, seed, classes, labels)
        return {name: sorted(out[name]) for name in SPLIT_DIRS if name in out}
    kept = [(name, fraction) for name, fraction in zip(names, fractions) if fraction > 0]
    shares = [fraction for _, fraction in kept]
    for label, n in sorted(_label_counts(samples, labels).items()):
        if sum(split_sizes(n, shares)) >= n:
            raise DataError(
                f"label {classes[label]!r} is held by {n} usable image(s): too few to hold out "
                f"{dict(zip(names, fractions))} and keep one for training. Add images of it or lower the fractions."
            )
    subsets = ["train", *(name for name, _ in kept)]
    of = iterative_stratification({path: labels[path] for path, _ in samples}, [1 - sum(shares), *shares], seed)
    out: dict[str, Samples] = {name: [] for name in subsets}
    for sample in samples:
        out[subsets[of[sample[0]]]].append(sample)
    _warn_gaps(out, labels, classes)
    return {name: sorted(items) for name, items in out.items()}


def multilabel_fold(
    samples: Samples, folds: int, fold: int, seed: int, classes: Sequence[str], labels: Mapping[str, Collection[int]]
) -> tuple[Samples, Samples]:
    """``(train, held_out)`` of fold ``fold`` of ``folds`` (``folds.fold_split`` for multi-label samples): K equal
    parts by iterative stratification, so every label held by >= K rows is in every held-out fold."""
    counts = _label_counts(samples, labels)
    label, smallest = min(counts.items(), key=lambda item: (item[1], item[0]), default=(None, folds))
    if label is not None and smallest < folds:
        raise DataError(
            f"label {classes[label]!r} is held by {smallest} image(s) in the pool being folded: too few for "
            f"data.folds={folds} (every fold validates on at least one image of each label). Lower data.folds or add "
            "images of it."
        )
    of = iterative_stratification({path: labels[path] for path, _ in samples}, [1.0] * folds, seed)
    ordered = sorted(samples)
    train, held_out = [s for s in ordered if of[s[0]] != fold], [s for s in ordered if of[s[0]] == fold]
    _warn_gaps({f"held-out fold {fold}": held_out}, labels, classes, needed=folds, pool=ordered)
    return train, held_out


def _warn_gaps(
    parts: Mapping[str, Samples],
    labels: Mapping[str, Collection[int]],
    classes: Sequence[str],
    needed: int | None = None,
    pool: Samples | None = None,
) -> None:
    """One warning when a label held by >= ``needed`` rows of ``pool`` (default: as many as ``parts``, of them all) is
    in none of a part's rows: rare, where its rows also hold other labels so that no split puts each everywhere."""
    total = _label_counts(pool if pool is not None else [s for part in parts.values() for s in part], labels)
    for name, part in parts.items():
        missing = sorted(set(total) - set(_label_counts(part, labels)))
        missing = [label for label in missing if total[label] >= (needed or len(parts))]
        if missing:
            log.warning(
                "label %r (held by %d images) is in none of the %s images: its images share other labels in a way "
                "the split could not put every label in every part; its metrics there are missing. Add images of it",
                classes[missing[0]], total[missing[0]], name,
            )  # fmt: skip
            return


def _label_counts(samples: Samples, labels: Mapping[str, Collection[int]]) -> Counter[int]:
    return Counter(label for path, _ in samples for label in labels[path])
