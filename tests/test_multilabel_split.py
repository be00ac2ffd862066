"""Multi-label splits and folds (``data/multilabel_split.py``): iterative stratification partitions the rows, is the
same for a seed whatever order the rows come in, gives each subset its share of every label to within one row, puts
every label held by >= K rows in every fold, and refuses a label too rare for the fractions or folds in one line; and
``train.py data=csv data.folds=3 data.fold=0`` on a multi-label table validates on exactly that fold, which a resume
reuses and another fold is refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from support import LABELS, write_pairs
from test_entry_matrix import COMMON, TRAIN, run, script_env

import image_finetune.data.multilabel_split as module
from image_finetune.core.errors import DataError
from image_finetune.data import CsvDataModule
from image_finetune.data.csvfile import parse_label
from image_finetune.data.multilabel_split import iterative_stratification, multilabel_fold, multilabel_split

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from multilabel_split import table  # noqa: E402  (the benchmark's long-tailed table: one generator for both)

FOLDS = 5
HOLD_OUT = [0.7, 0.15, 0.15]


def per_subset(rows: dict[str, list[int]], of: dict[str, int], subsets: int) -> np.ndarray:
    """label x subset: rows of the label in the subset."""
    count = np.zeros((1 + max(label for held in rows.values() for label in held), subsets), dtype=int)
    for key, held in rows.items():
        count[held, of[key]] += 1
    return count


@pytest.mark.parametrize("fractions", [[1.0] * FOLDS, HOLD_OUT], ids=["5 folds", "hold-out"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_label_gets_its_share_to_within_a_row_in_every_subset(seed, fractions):
    rows = table(400, 15, FOLDS, seed)
    of = iterative_stratification(rows, fractions, seed)
    assert set(of) == set(rows) and set(of.values()) == set(range(len(fractions)))  # a partition into every subset
    sizes = np.bincount(list(of.values()))
    share = np.asarray(fractions) / sum(fractions)
    assert np.all(abs(sizes - len(rows) * share) <= 1), sizes
    count = per_subset(rows, of, len(fractions))
    wanted = count.sum(1, keepdims=True) * share
    assert np.all(abs(count - wanted) <= 1), count  # the rarest-label rule was off by more on 19 pairs (README)
    assert np.all(count > 0), "every label (each held by >= 5 rows here) is in every subset"


def test_the_same_seed_and_rows_in_any_order_give_the_same_split():
    rows = table(300, 12, FOLDS, 3)
    split = iterative_stratification(rows, HOLD_OUT, seed=7)
    shuffled = dict(sorted(rows.items(), key=lambda item: hash(item[0]) % 1000))
    assert list(shuffled) != list(rows)
    assert iterative_stratification(shuffled, HOLD_OUT, seed=7) == split
    assert iterative_stratification(dict(reversed(rows.items())), HOLD_OUT, seed=7) == split
    assert iterative_stratification(rows, HOLD_OUT, seed=8) != split


def test_rows_without_labels_go_where_the_most_rows_are_wanted():
    rows = {f"r{i}": [] for i in range(20)}
    of = iterative_stratification(rows, [0.5, 0.25, 0.25], seed=0)
    assert sorted(np.bincount(list(of.values())).tolist()) == [5, 5, 10]


def test_a_gap_the_greedy_pass_leaves_is_filled_by_a_swap(monkeypatch):
    """Labels 0 (4 rows) and 2 (3 rows) share rows; the greedy pass leaves one of them out of a fold (seen with the
    swap turned off), the swap afterwards fills it without emptying another."""
    rows = {"r0": [0], "r1": [0, 2], "r2": [0, 2], "r3": [0, 1], "r4": [], "r5": [1], "r6": [], "r7": [2]}
    with monkeypatch.context() as m:
        m.setattr(module, "_fill_gaps", lambda *args: None)
        greedy = iterative_stratification(rows, [1.0] * 3, 0)
    assert np.any(per_subset(rows, greedy, 3)[[0, 2]] == 0), "the case exercises the swap"
    swapped = iterative_stratification(rows, [1.0] * 3, 0)
    assert np.all(per_subset(rows, swapped, 3)[[0, 2]] > 0)
    assert np.bincount(list(swapped.values())).tolist() == np.bincount(list(greedy.values())).tolist()


def samples_of(rows: dict[str, list[int]]) -> list[tuple[str, int]]:
    return sorted((key, held[0] if held else 0) for key, held in rows.items())


def test_a_label_no_split_can_put_in_every_fold_is_one_warning(caplog):
    """Labels 0, 1, 2 each on 3 rows, pairwise sharing rows: no 3 folds hold all three each (r3 must leave r1's and
    r5's folds, so it joins r0's, which label 2 forbids); the fold that lacks one says so."""
    rows = {"r0": [0, 2], "r1": [0, 1], "r2": [], "r3": [1, 2], "r4": [2], "r5": [0, 1], "r6": []}
    names = ["a", "b", "c"]
    lacking = []
    for fold in range(3):
        caplog.clear()
        _, held_out = multilabel_fold(samples_of(rows), 3, fold, 0, names, rows)
        if {label for path, _ in held_out for label in rows[path]} != {0, 1, 2}:
            lacking.append(fold)
            assert "is in none of the held-out fold" in caplog.text and caplog.text.count("label '") == 1
        else:
            assert "is in none" not in caplog.text
    assert lacking


def test_a_label_too_rare_for_the_fractions_or_the_folds_is_one_line():
    rows = {f"r{i}": [0] for i in range(30)} | {"x": [0, 1], "y": [1]}
    with pytest.raises(DataError) as error:
        multilabel_split(samples_of(rows), [0.15, 0.15], ["val", "test"], ["a", "b"], 0, labels=rows)
    assert str(error.value) == (
        "label 'b' is held by 2 usable image(s): too few to hold out {'val': 0.15, 'test': 0.15} and keep one for "
        "training. Add images of it or lower the fractions."
    )
    with pytest.raises(DataError) as error:
        multilabel_fold(samples_of(rows), 3, 0, 0, ["a", "b"], rows)
    assert str(error.value) == (
        "label 'b' is held by 2 image(s) in the pool being folded: too few for data.folds=3 (every fold validates on "
        "at least one image of each label). Lower data.folds or add images of it."
    )


@pytest.fixture(scope="module")
def fold_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """``train.py data=csv data.folds=3 data.fold=0`` on test_multilabel.py's table of digit pairs (no test split)."""
    root = tmp_path_factory.mktemp("multilabel-folds")
    table = write_pairs(root)
    args = ["data=csv", f"data.file={table}", "data.image_size=32", "loss=bce", "data.test_fraction=0",
            "data.batch_size=16", "data.seed=5", "data.folds=3", "data.fold=0"]  # fmt: skip
    run("train.py", *args, *COMMON, *TRAIN, f"hydra.run.dir={root / 'run'}", env=script_env())
    return {"table": table, "manifest": root / "run" / "data_split.json"}


def test_a_multilabel_fold_run_validates_on_the_iteratively_stratified_fold(fold_run):
    table, manifest = Path(str(fold_run["table"])), Path(str(fold_run["manifest"]))
    written = json.loads(manifest.read_text())
    assert (written["folds"], written["fold"]) == (3, 0)
    usable = [p.name for p in (table.parent / "images").iterdir() if p.name != "bad.png"]
    rows = {}
    for line in table.read_text().splitlines()[1:]:
        path, cell = line.split(",")
        if Path(path).name in usable:
            rows[path] = [LABELS.index(label) for label in parse_label(cell, "", "label", " ")]
    of = iterative_stratification(rows, [1.0] * 3, seed=5)  # the pool is every usable row: no test split
    val = sorted(path for path, _ in written["splits"]["val"])
    assert val == sorted(path for path, fold in of.items() if fold == 0)
    assert sorted(path for path, _ in written["splits"]["train"]) == sorted(set(rows) - set(val))
    assert all(any(label in rows[path] for path in val) for label in range(len(LABELS)))
    oof = (manifest.parent / "oof_predictions.csv").read_text().splitlines()  # multi-label targets, not strata
    assert len(oof) == 1 + len(val)


def test_a_resumed_fold_reuses_its_split_and_another_fold_is_refused(fold_run, tmp_path):
    table, manifest = Path(str(fold_run["table"])), Path(str(fold_run["manifest"]))
    options = {"image_size": 32, "num_workers": 0, "cache": None, "cache_dir": tmp_path, "test_fraction": 0}
    resumed = CsvDataModule(table, manifest_path=manifest, seed=6, folds=3, fold=0, **options)
    resumed.setup("fit")  # another seed would cut other folds: the split file decides
    written = json.loads(manifest.read_text())["splits"]
    assert {name: [(str(Path(p).relative_to(table.parent)), label) for p, label in items]
            for name, items in resumed.splits.items()} == {name: [tuple(e) for e in items]
                                                           for name, items in written.items()}  # fmt: skip
    other = CsvDataModule(table, manifest_path=manifest, seed=5, folds=3, fold=1, **options)
    with pytest.raises(
        DataError, match=r"holds the split of data.folds=3 data.fold=0, not of data.folds=3 data.fold=1"
    ):
        other.setup("fit")
