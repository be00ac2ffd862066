"""How evenly multi-label splits spread each label: the old rule (stratify by each row's rarest label) vs iterative
stratification (what ``data=csv`` multi-label data uses now, ``data/multilabel_split.py``).

A synthetic table: ``--rows`` rows, ``--labels`` labels with a long-tailed frequency (label ``l`` is held by each row
with probability ``0.6 / (l + 1) ** 1.3``, at least ``--folds`` rows each), several labels per row, some rows without any.
For 5-fold cross-validation and for the default hold-out split (val 0.15, test 0.15) it prints, averaged over
``--seeds`` tables: the mean over labels of the standard deviation of the label's share per subset (lower: the
subsets hold each label more evenly; for the hold-out split, of ``share / fraction`` so every subset counts alike),
the worst label's, the (label, subset) pairs with no row of the label, and those more than one row away from the
label's rows times the subset's share. Runs in seconds on a CPU (most of it importing the package).

    python benchmarks/multilabel_split.py
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from image_finetune.data.imagefolder import stratified_split
from image_finetune.data.multilabel_split import multilabel_split

Split = dict[str, list[tuple[str, int]]]


def table(rows: int, labels: int, folds: int, seed: int) -> dict[str, list[int]]:
    """path -> label indices: long-tailed, several per row, every label on at least ``folds`` rows."""
    rng = np.random.default_rng(seed)
    p = 0.6 / np.arange(1, labels + 1) ** 1.3
    held = rng.random((rows, labels)) < p
    for label in range(labels):
        short = folds - held[:, label].sum()
        if short > 0:
            held[rng.choice(np.flatnonzero(~held[:, label]), short, replace=False), label] = True
    return {f"img/{i:04d}.jpg": np.flatnonzero(row).tolist() for i, row in enumerate(held)}


def rarest(labels: dict[str, list[int]]) -> dict[str, int]:
    """The old rule's one label per row: its rarest (ties by index), the commonest for a row without labels."""
    counts = Counter(label for held in labels.values() for label in held)
    rank = sorted(counts, key=lambda label: (counts[label], label))
    return {path: min(held, key=rank.index) if held else rank[-1] for path, held in labels.items()}


def splits(labels: dict[str, list[int]], rule: str, folds: int, seed: int, names: list[str]) -> list[Split]:
    """The 5 folds' splits (``folds`` > 0) or the one hold-out split, by ``rule`` (old or iterative)."""
    strata = rarest(labels)
    samples = sorted(strata.items())
    fractions = [0.0, 0.0] if folds else [0.15, 0.15]
    runs = [(folds, fold) for fold in range(folds)] if folds else [None]
    if rule == "old":
        return [stratified_split(samples, fractions, ["val", "test"], names, seed, f) for f in runs]
    return [multilabel_split(samples, fractions, ["val", "test"], names, seed, f, labels=labels) for f in runs]


def counts(labels: dict[str, list[int]], parts: list[list[tuple[str, int]]]) -> np.ndarray:
    """label x subset: the label's rows in the subset."""
    num = 1 + max(label for held in labels.values() for label in held)
    count = np.zeros((num, len(parts)))
    for j, part in enumerate(parts):
        for path, _ in part:
            count[labels[path], j] += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--labels", type=int, default=15)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    print(f"{args.rows} rows, {args.labels} labels (long-tailed), mean over {args.seeds} tables\n")
    print("| split | rule | mean std of label share | worst label's std | (label, subset) pairs with no row "
          "| (label, subset) pairs > 1 row off |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for split, folds in ((f"{args.folds}-fold", args.folds), ("hold-out 0.7/0.15/0.15", 0)):
        for rule in ("old", "iterative"):
            mean, worst, empty, off = [], [], [], []
            for seed in range(args.seeds):
                labels = table(args.rows, args.labels, args.folds, seed)
                names = [f"l{i}" for i in range(args.labels)]
                made = splits(labels, rule, folds, seed, names)
                if folds:
                    parts, shares = [m["val"] for m in made], [1 / folds] * folds
                else:
                    parts, shares = [made[0][s] for s in ("train", "val", "test")], [0.7, 0.15, 0.15]
                count = counts(labels, parts)
                total = count.sum(1, keepdims=True)
                std = (count / total / np.asarray(shares) * (1 / folds if folds else 1)).std(1)
                mean.append(std.mean())
                worst.append(std.max())
                empty.append(int((count == 0).sum()))
                off.append(int((abs(count - total * np.asarray(shares)) > 1).sum()))
            name = "rarest label (old)" if rule == "old" else "iterative"
            print(f"| {split} | {name} | {np.mean(mean):.4f} | {np.mean(worst):.4f} | {np.mean(empty):.1f} "
                  f"| {np.mean(off):.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
