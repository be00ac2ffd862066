"""``data=csv``: the labels of a folder of images listed in a CSV file (or a pandas DataFrame), not in folder names.

The table is one more source of labelled files for ``ImageFolderDataModule``; everything after it is the image-folder
path: the scan that leaves out missing and broken files with a reason, the decode and the resized cache, the
stratified split (or the table's split column), ``data_split.json`` and exact resume. What is here: reading the table,
finding each row's file under ``data.image_dir`` (Kaggle's ``id,label`` tables name files without their extension),
and naming the row of every file left out.

Multi-label (``data.task``): a label cell holding several labels (``data.label_separator``, a space by default) makes
the task multi-label (``auto``: any such row; ``multilabel``: always). The classes are then the labels, each image's
target is a multi-hot vector (an empty cell: an image with no labels), and the hold-out split and the k-fold folds
stratify by every label a row holds (iterative stratification, ``multilabel_split.py``). ``data_split.json`` records
one label per file, the row's rarest (the label held by the fewest rows of the table; ties by name; a row without
labels counts as the commonest label), so a resume checks it as it checks a single label.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from image_finetune.core.errors import ConfigError, DataError
from image_finetune.data.files import ImageFileDataset
from image_finetune.data.imagefolder import ImageFolderDataModule, LabelledFiles, SplitRule
from image_finetune.data.multilabel_split import multilabel_split
from image_finetune.data.scan import IMAGE_EXTENSIONS, FolderScan, scan_image_files, walk_files

log = logging.getLogger(__name__)

SPLIT_VALUES = ("train", "val", "test")
TASKS = ("auto", "multiclass", "multilabel")
MAX_ROWS_LISTED = 5  # left-out rows named in the warning; data_report.tsv lists every one
Cells = dict[str, str]  # option name (path_column, label_column, split_column) -> the cell's text


@dataclass(frozen=True)
class LabelRow:
    """One row of the table, as the data module uses it."""

    row: str
    """How the user finds the row: its line in the file (the header is row 1), or a DataFrame's index label."""
    path: str
    """The absolute path of its image (normalised, under data.image_dir)."""
    labels: tuple[str, ...]
    """The labels in its cell: one for single-label data, any number (none included) for multi-label data."""
    split: str | None

    @property
    def label(self) -> str:
        """The class of a single-label row."""
        return self.labels[0]


def parse_label(cell: str, where: str, column: str, separator: str | None = None) -> list[str]:
    """The labels in a label cell, in order, each once: split at ``separator`` (``data.label_separator``); one
    label when ``separator`` is None. Every cell is read here. An empty cell is an empty list (a multi-label image
    without labels; single-label data refuses it, see ``require_label``)."""
    text = cell.strip()
    if separator is None:
        return [text] if text else []
    labels = (part.strip() for part in (text.split(separator) if separator.strip() else text.split()))
    return list(dict.fromkeys(label for label in labels if label))


def require_label(labels: list[str], where: str, column: str) -> None:
    """Single-label data: a row without a class is an error naming the row."""
    if not labels:
        raise DataError(f"{where}: the {column!r} column is empty; write the image's class there or drop the row")


def read_csv_rows(file: Path, columns: Mapping[str, str]) -> list[tuple[str, Cells]]:
    """``(row number, cells)`` of every non-blank row of ``file``, for the ``columns`` (option -> column name)."""
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:  # -sig: Excel starts its UTF-8 files with a BOM
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or not any(cell.strip() for cell in header):
                raise DataError(
                    f"{file} is empty: expected a header row naming the columns ({_names(columns)}) and one row per image"
                )
            index = _column_index(str(file), [cell.strip() for cell in header], columns, prefix="data.")
            rows = [
                (str(reader.line_num), {key: cells[i] if i < len(cells) else "" for key, i in index.items()})
                for cells in reader
                if any(cell.strip() for cell in cells)
            ]
    except UnicodeDecodeError as e:
        raise DataError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start}): save it as CSV UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{file} is not a readable CSV file ({e}): save it as comma-separated values") from None
    except OSError as e:
        raise DataError(f"{file} cannot be read ({e.strerror or e}): point data.file at a readable CSV file") from None
    if not rows:
        raise DataError(f"{file} has a header but no rows: add one row per image ({_names(columns)})")
    return rows


def frame_rows(frame: Any, columns: Mapping[str, str]) -> list[tuple[str, Cells]]:
    """``(index label, cells)`` of every row of a pandas DataFrame (or anything with ``columns``, ``index`` and
    ``frame[column]`` sequences), for the ``columns`` (option -> column name). Missing cells (NaN, None) read as empty."""
    names = [str(name) for name in frame.columns]
    index = _column_index("the data frame", names, columns, prefix="")
    values = {key: list(frame[frame.columns[i]]) for key, i in index.items()}
    rows = [(str(label), {key: _cell(values[key][n]) for key in index}) for n, label in enumerate(frame.index)]
    if not rows:
        raise DataError(f"the data frame has no rows: give it one row per image ({_names(columns)})")
    return rows


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _names(columns: Mapping[str, str]) -> str:
    return ", ".join(repr(name) for name in columns.values())


def _column_index(table: str, header: list[str], columns: Mapping[str, str], prefix: str) -> dict[str, int]:
    """Where each wanted column is in ``header``; a missing one is a one-line error naming the option that names it."""
    index = {}
    for key, name in columns.items():
        if name not in header:
            raise DataError(
                f"{table} has no column {name!r} ({prefix}{key}); its columns are {header}: set {prefix}{key} to the "
                "column that holds it"
            )
        index[key] = header.index(name)
    return index


class PathResolver:
    """A path cell -> the absolute path of its file under ``image_dir``. A cell without an image extension that names
    no file is matched to the one file that differs from it only by its extension (Kaggle's ``id`` column); the folder
    is listed once, and only when such a cell comes up."""

    def __init__(self, image_dir: Path, column: str) -> None:
        self.image_dir = os.path.abspath(image_dir)
        self.column = column
        self._by_stem: dict[str, list[str]] | None = None

    def __call__(self, cell: str, where: str) -> str:
        name = cell.strip()
        if not name:
            raise DataError(f"{where}: the {self.column!r} column is empty; name the image file or drop the row")
        path = os.path.normpath(os.path.join(self.image_dir, os.path.expanduser(name)))
        if not path.startswith(self.image_dir + os.sep):
            raise DataError(
                f"{where}: {name!r} is outside data.image_dir={self.image_dir!r}; paths in the {self.column!r} column "
                "are relative to it: point data.image_dir at a folder that holds every image"
            )
        if os.path.lexists(path) or os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
            return path
        files = self._stems().get(path, [])
        matches = [f for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS] or files
        if len(matches) > 1:
            names = ", ".join(os.path.basename(m) for m in matches)
            raise DataError(
                f"{where}: {name!r} could be any of {len(matches)} files ({names}); write the extension in the "
                f"{self.column!r} column"
            )
        return matches[0] if matches else path

    def _stems(self) -> dict[str, list[str]]:
        if self._by_stem is None:
            self._by_stem = {}
            for found in walk_files(self.image_dir):
                if found.kind == "file":
                    self._by_stem.setdefault(os.path.splitext(found.path)[0], []).append(found.path)
        return self._by_stem


class CsvDataModule(ImageFolderDataModule):
    """``ImageFolderDataModule`` whose files and labels (and optionally splits) are the rows of a table.

    ``file``: a CSV file with a header row; or ``frame``: a pandas DataFrame (from Python). ``image_dir``: the folder
    the paths are relative to (default: the CSV file's folder). ``split_column``: a column of train/val/test per row;
    without it the rows are split as one folder is (``data.val_fraction``, ``data.test_fraction``). Every other
    option is ``ImageFolderDataModule``'s.
    """

    labels_from_folders = False

    def __init__(
        self,
        file: str | os.PathLike | None = None,
        image_dir: str | os.PathLike | None = None,
        *,
        frame: Any = None,
        path_column: str = "path",
        label_column: str = "label",
        split_column: str | None = None,
        task: str = "auto",
        label_separator: str = " ",
        **options: Any,
    ) -> None:
        if (file is None) == (frame is None):
            raise ConfigError(
                "data=csv reads one table: set data.file=LABELS.csv (from Python: CsvDataModule(file=...) or "
                "CsvDataModule(frame=a_dataframe, image_dir=...)), not both and not neither"
            )
        self.file = Path(file).expanduser() if file is not None else None
        if image_dir is None:
            if self.file is None:
                raise ConfigError(
                    "CsvDataModule(frame=...) needs image_dir=: the folder the frame's paths are relative to"
                )
            image_dir = self.file.parent
        if task not in TASKS:
            raise ConfigError(
                f"data.task={task!r}: use auto (multi-label when a label cell holds several labels), multiclass or "
                "multilabel"
            )
        if not label_separator:
            raise ConfigError("data.label_separator is empty: set the text between labels in a cell, e.g. ' ' or ';'")
        self.task_option, self.label_separator = task, label_separator
        self.task = "multilabel" if task == "multilabel" else "multiclass"  # auto: decided when the table is read
        self.targets: dict[str, torch.Tensor] = {}  # multi-label: path -> multi-hot target
        self.frame = frame
        self.table = str(self.file) if self.file is not None else "the data frame"
        self.columns = {"path_column": path_column, "label_column": label_column}
        if split_column:
            self.columns["split_column"] = split_column
        super().__init__(image_dir, **options)

    @property
    def source(self) -> str:
        return f"data.file={str(self.file)!r}" if self.file is not None else "the data frame"

    def _check_root(self) -> None:
        for key, path, ok, what in (
            ("file", self.file, self.file is None or self.file.is_file(), "the CSV file that lists the images"),
            ("image_dir", self.root, self.root.is_dir(), f"the folder that the paths in {self.table} are relative to"),
        ):
            if not ok:
                where = "" if Path(str(path)).is_absolute() else f" (relative to the working directory {os.getcwd()})"
                raise DataError(f"data.{key}={str(path)!r} does not exist{where}: point data.{key} at {what}")

    # ---- the table as labelled files ---------------------------------------------------------------------------------
    def rows(self) -> list[LabelRow]:
        """The table's rows, each resolved to its file; one-line errors for what no row-skipping can fix. Decides
        ``task`` (``data.task=auto``: multi-label when a cell holds several labels) and says which."""
        table = (
            read_csv_rows(self.file, self.columns) if self.file is not None else frame_rows(self.frame, self.columns)
        )
        resolve = PathResolver(self.root, self.columns["path_column"])
        rows: list[LabelRow] = []
        first: dict[str, str] = {}  # path -> the row that named it first
        for row, cells in table:
            where = f"{self.table} row {row}"
            path = resolve(cells["path_column"], where)
            if path in first:
                raise DataError(
                    f"{self.table} rows {first[path]} and {row} both name {os.path.relpath(path, self.root)}: list "
                    "each image once"
                )
            first[path] = row
            separator = None if self.task_option == "multiclass" else self.label_separator
            labels = parse_label(cells["label_column"], where, self.columns["label_column"], separator)
            rows.append(LabelRow(row, path, tuple(labels), self._split(cells.get("split_column"), where)))
        several = next((r for r in rows if len(r.labels) > 1), None)
        if self.task_option == "auto":
            self.task = "multilabel" if several is not None else "multiclass"
            if several is not None:
                log.info(
                    "data.task=auto: multi-label (%s row %s holds %d labels: %s); set data.task=multiclass if the "
                    "separator %r is part of class names",
                    self.table, several.row, len(several.labels), " ".join(several.labels), self.label_separator,
                )  # fmt: skip
            else:
                log.info("data.task=auto: single-label (every row holds one label)")
        if self.task == "multiclass":
            for r in rows:
                require_label(list(r.labels), f"{self.table} row {r.row}", self.columns["label_column"])
        elif self.decode == "gpu":
            raise ConfigError("data.decode=gpu reads single-label batches: use data.decode=cpu with multi-label data")
        return rows

    def _strata(self, rows: list[LabelRow]) -> tuple[list[str], dict[str, str]]:
        """Multi-label: the labels (sorted), and each row's one label as ``data_split.json`` records it: its rarest
        (the fewest rows of the table hold it; ties by name), the commonest label for a row without labels."""
        counts = Counter(label for r in rows for label in r.labels)
        if not counts:
            raise DataError(f"{self.table}: no row has a label; write each image's labels in the label column")
        by_rarity = sorted(counts, key=lambda label: (counts[label], label))
        rank = {label: i for i, label in enumerate(by_rarity)}
        strata = {r.path: min(r.labels, key=rank.__getitem__) if r.labels else by_rarity[-1] for r in rows}
        return sorted(counts), strata

    def _split(self, cell: str | None, where: str) -> str | None:
        if cell is None:
            return None
        split = cell.strip().lower()
        if split not in SPLIT_VALUES:
            raise DataError(
                f"{where}: the {self.columns['split_column']!r} column holds {cell!r}; use one of {', '.join(SPLIT_VALUES)}"
            )
        return split

    def _labelled_files(self) -> LabelledFiles:
        self._check_root()
        rows = self.rows()
        if self.task == "multilabel":
            labels, strata = self._strata(rows)
            scan = scan_image_files(
                self.root, [(r.path, strata[r.path]) for r in rows], cache_dir=self.cache_dir / "scan"
            )
            index = {label: i for i, label in enumerate(labels)}  # the scan's classes are the strata: relabel
            samples = [(path, index[scan.classes[stratum]]) for path, stratum in scan.samples]
            scan = replace(scan, classes=labels, samples=samples, rows={r.path: r.row for r in rows})
            self.targets = {r.path: multi_hot([index[label] for label in r.labels], len(labels)) for r in rows}
        else:
            scan = scan_image_files(self.root, [(r.path, r.label) for r in rows], cache_dir=self.cache_dir / "scan")
            scan = replace(scan, rows={r.path: r.row for r in rows})
        self._check_every_class_kept(rows, scan)
        if self.trainer is None or self.trainer.is_global_zero:
            self._warn_left_out(rows, scan)
        if "split_column" not in self.columns:
            return LabelledFiles(scan.classes, {"all": scan}, None, self.table)
        split_of = {r.path: r.split for r in rows}
        splits = {name: [s for s in scan.samples if split_of[s[0]] == name] for name in SPLIT_VALUES}
        column = self.columns["split_column"]
        trained = {label for sample in splits["train"] for label in self._sample_labels(sample)}
        untrained = [name for i, name in enumerate(scan.classes) if i not in trained]
        if untrained:
            raise DataError(
                f"{self.table}: class {untrained[0]!r} has no usable 'train' row ({column!r} column), so the model "
                f"could not learn it; add train rows of it or drop its rows"
            )
        if not splits["val"] and self.val_fraction == 0:
            raise DataError(
                f"{self.table} has no usable 'val' row ({column!r} column) and data.val_fraction=0 leaves no "
                "validation split, which training needs: mark some rows val, or hold out e.g. data.val_fraction=0.1"
            )
        given = {name: samples for name, samples in splits.items() if samples}
        return LabelledFiles(scan.classes, {"all": scan}, given, f"the train rows of {self.table}")

    def _split_rule(self) -> SplitRule:
        """Multi-label: split and fold by every label a row holds (iterative stratification)."""
        if self.task != "multilabel":
            return super()._split_rule()
        labels = {path: target.nonzero().flatten().tolist() for path, target in self.targets.items()}
        return partial(multilabel_split, labels=labels)

    def _sample_labels(self, sample: tuple[str, int]) -> list[int]:
        """The labels of a kept file, as indices: its class, or (multi-label) every label it holds."""
        if self.task == "multilabel":
            return self.targets[sample[0]].nonzero().flatten().tolist()
        return [sample[1]]

    def _check_every_class_kept(self, rows: Iterable[LabelRow], scan: FolderScan) -> None:
        """A class whose every row was left out is an error, not a class the model silently lacks."""
        reasons = dict(scan.skipped)
        kept = {path for path, _ in scan.samples}
        held = {label for r in rows if r.path in kept for label in r.labels}
        for r in rows:
            missing = [label for label in r.labels if label not in held]
            if missing:
                label = missing[0]
                raise DataError(
                    f"{self.table}: every row of class {label!r} was left out (e.g. row {r.row}: "
                    f"{os.path.relpath(r.path, self.root)}: {reasons.get(r.path, 'left out')}); replace those files "
                    "or drop the class's rows"
                )

    def _warn_left_out(self, rows: list[LabelRow], scan: FolderScan) -> None:
        """One warning naming the rows whose files were left out (every one is in data_report.tsv)."""
        reasons = dict(scan.skipped)
        left = [(r.row, os.path.relpath(r.path, self.root), reasons[r.path]) for r in rows if r.path in reasons]
        if not left:
            return
        listed = "; ".join(f"row {row}: {path}: {reason}" for row, path, reason in left[:MAX_ROWS_LISTED])
        more = f"; and {len(left) - MAX_ROWS_LISTED} more" if len(left) > MAX_ROWS_LISTED else ""
        where = f" - see {self.report_path}" if self.report_path is not None else ""
        log.warning(
            "%s: left out %d row(s) whose image is missing or unusable (%s%s)%s",
            self.table, len(left), listed, more, where,
        )  # fmt: skip

    # ---- multi-label targets -------------------------------------------------------------------------------------
    def _build_datasets(self, verbose: bool) -> None:
        super()._build_datasets(verbose)
        if self.task == "multilabel":
            for dataset in self.datasets.values():
                self._with_targets(dataset)

    def _with_targets(self, dataset: Dataset) -> Dataset:
        """Multi-label: the dataset's items carry each file's multi-hot target instead of its stratum."""
        if isinstance(dataset, ImageFileDataset):
            dataset.targets = self.targets
        return dataset

    def split_images(self, *splits: str) -> ImageFileDataset:
        """Multi-label: with each file's target, for every reader (``all_images``, ``held_out_fold``: out-of-fold)."""
        dataset = super().split_images(*splits)
        if self.task == "multilabel":
            self._with_targets(dataset)
        return dataset

    def split_counts(self, items: list[tuple[str, int]]) -> dict[str, int]:
        if self.task != "multilabel":
            return super().split_counts(items)
        totals = torch.stack([self.targets[path] for path, _ in items]).sum(0).long().tolist() if items else []
        return dict(zip(self.class_names, totals or [0] * len(self.class_names)))

    def class_counts(self) -> list[int]:
        """The training split's images per class; multi-label: the training images holding each label."""
        if self.task != "multilabel":
            return super().class_counts()
        return torch.stack([self.targets[path] for path, _ in self.splits["train"]]).sum(0).long().tolist()


def multi_hot(indices: list[int], num_labels: int) -> torch.Tensor:
    """The float target of an image holding the labels ``indices``."""
    target = torch.zeros(num_labels)
    target[indices] = 1.0
    return target
