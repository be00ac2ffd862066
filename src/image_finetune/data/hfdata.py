"""Hugging Face datasets as classification data: ``data=hf data.name=<hub name>`` or ``data.path=DIR`` of local files.

The dataset is read through ``datasets`` (an optional extra: ``pip install 'image-finetune[hf]'``), but its images are
not decoded by it: the image column is read as raw bytes (``datasets.Image(decode=False)``) and decoded by the image
folders' decoder (``data/decode.py``), so 16-bit PNGs, transparency, EXIF orientation and reduced-scale JPEG decoding,
the crops, the augmentation and the eval transform are exactly those of ``data=imagefolder``. Every row is decoded once
before training, as the folder scan decodes every file: an undecodable row is left out and reported by its row index
(``<split>/<row>``), never a crash mid-epoch. Splits are used as the dataset names them; val (and test, by
``data.test_fraction``) are held out of train by the image folders' stratified rule when the dataset has none.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from image_finetune.core.errors import ConfigError, DataError, UserError
from image_finetune.data.base import ClassificationDataModule
from image_finetune.data.contract import ImageName
from image_finetune.data.decode import decode_rgb
from image_finetune.data.files import ImageFileDataset
from image_finetune.data.imagefolder import (
    Samples,
    TestFraction,
    balanced_weights,
    check_fractions,
    hold_out_missing_splits,
    sorted_samples,
    split_summary,
)
from image_finetune.data.preprocessing import Preprocessing
from image_finetune.data.scan import EMPTY_FILE, FolderScan, check_image, summarize, write_scan_report
from image_finetune.data.transforms import Augmentation

log = logging.getLogger(__name__)

EXTRA = "pip install 'image-finetune[hf]'"
#: Our split -> the dataset split names taken for it, first found wins (those ``datasets`` infers from file names).
SPLIT_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "val": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing"),
}
NO_LABEL = "no label"  # a row whose label is missing (ClassLabel -1 or null): hub test splits often have none
MAX_ROWS_LISTED = 10  # left-out rows named one per line in the log; the report lists every one
BINARY_DTYPES = frozenset({"binary", "large_binary"})


def import_datasets() -> Any:
    """The ``datasets`` package, or one line naming the extra that installs it."""
    try:
        import datasets
    except ModuleNotFoundError as e:
        raise UserError(
            f"data=hf needs the Hugging Face datasets package ({e.name} is not installed): {EXTRA}"
        ) from None
    return datasets


def row_key(split: str, row: int) -> str:
    """How a row is named in samples, reports and predictions.csv: ``<split>/<row index in that split>``."""
    return f"{split}/{row}"


def image_bytes(cell: Any) -> tuple[bytes | None, str | None]:
    """An image cell read without decoding -> (its bytes, its file path); an ``Image`` feature stores either or both."""
    if isinstance(cell, Mapping):
        return cell.get("bytes"), cell.get("path")
    if cell is None or isinstance(cell, bytes):
        return cell, None
    raise TypeError(f"an image cell holds a {type(cell).__name__}, not bytes")


def check_cell(key: str, cell: Any) -> str | None:
    """None when the cell's image decodes as training would decode it, else the reason (the folder scan's words)."""
    data, path = image_bytes(cell)
    if data is None and not path:
        return EMPTY_FILE
    return check_image(path or key, data=data)


class RowImageLoader:
    """``"<split>/<row>"`` -> HxWx3 uint8 RGB array, decoded from the row's bytes by ``decode_rgb``.

    ``tables`` hold only the image column, undecoded; they are memory-mapped Arrow files, so the loader pickles cheaply
    into DataLoader workers.
    """

    def __init__(self, tables: Mapping[str, Any], column: str, min_size: int | None = None) -> None:
        self.tables, self.column, self.min_size = dict(tables), column, min_size

    def __call__(self, key: str) -> np.ndarray:
        split, row = key.rsplit("/", 1)
        data, path = image_bytes(self.tables[split][int(row)][self.column])
        if data is None and not path:
            raise OSError(f"row {key} holds no image")
        return decode_rgb(path or key, min_size=self.min_size, data=data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(splits={sorted(self.tables)}, column={self.column!r}, min_size={self.min_size})"


class HFDataModule(ClassificationDataModule):
    """Image classification data from a Hugging Face dataset (hub name or local parquet/arrow/``save_to_disk`` files)."""

    def __init__(
        self,
        name: str | None = None,
        path: str | os.PathLike | None = None,
        config_name: str | None = None,
        revision: str | None = None,
        splits: Mapping[str, str | None] | None = None,
        image_column: str = "image",
        label_column: str = "label",
        hf_cache_dir: str | os.PathLike | None = None,
        image_size: int | None = None,
        batch_size: int = 32,
        num_workers: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: TestFraction = "auto",
        seed: int = 42,
        crop_scale: Sequence[float] = (0.08, 1.0),
        crop_ratio: float | None = None,
        hflip: bool = True,
        augment: Augmentation | None = None,
        balance: bool = False,
        report_path: str | os.PathLike | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        preprocessing: Preprocessing | Mapping[str, Any] | None = None,
        min_steps_per_epoch: int = 4,
    ) -> None:
        """``preprocessing`` is the backbone's (``train`` hands it over); ``image_size``/``crop_ratio`` override it."""
        super().__init__(batch_size, num_workers, seed, pin_memory, persistent_workers, min_steps_per_epoch)
        if (name is None) == (path is None):
            raise ConfigError(
                "data=hf needs exactly one of data.name (a dataset on the Hugging Face hub, e.g. data.name=beans) and "
                "data.path (a folder of parquet/arrow files or a save_to_disk folder)"
            )
        check_fractions(val_fraction, test_fraction)
        unknown = sorted(set(splits or {}) - set(SPLIT_NAMES))
        if unknown:
            raise ConfigError(
                f"data.splits has unknown key(s) {unknown}: use {list(SPLIT_NAMES)} (values: split names)"
            )
        self.name, self.config_name, self.revision = name, config_name, revision
        self.path = Path(path).expanduser() if path is not None else None
        if self.path is not None and not self.path.exists():
            raise DataError(f"data.path={str(self.path)!r} does not exist: point it at a folder of parquet/arrow files")
        self.split_names = {split: (splits or {}).get(split) for split in SPLIT_NAMES}
        self.image_column, self.label_column = image_column, label_column
        self.hf_cache_dir = str(Path(hf_cache_dir).expanduser()) if hf_cache_dir is not None else None
        backbone_preprocessing = Preprocessing.coerce(preprocessing) or Preprocessing()
        self.preprocessing = backbone_preprocessing.override(size=image_size, crop_ratio=crop_ratio)
        self.image_size, self.crop_ratio = self.preprocessing.size, self.preprocessing.crop_ratio
        self.save_hyperparameters(
            {
                "name": name,
                "path": str(path) if path is not None else None,
                "image_size": self.image_size,
                "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "seed": seed,
            }
        )
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.crop_scale, self.hflip, self.augment, self.balance = tuple(crop_scale), hflip, augment, balance
        self.report_path = Path(report_path) if report_path else None
        self.splits: dict[str, Samples] = {}
        self.tables: dict[str, Any] = {}  # dataset split name -> its image column, undecoded
        import_datasets()  # fail before anything slow when the extra is missing

    # ---- loading --------------------------------------------------------------------------------------------------
    @property
    def source(self) -> str:
        return f"data.path={str(self.path)!r}" if self.path is not None else f"data.name={self.name!r}"

    def load(self) -> Mapping[str, Any]:
        """Every split of the dataset (``datasets.Dataset`` each), downloaded or converted to Arrow once and cached."""
        datasets = import_datasets()
        if self.path is None:
            try:
                loaded = datasets.load_dataset(
                    self.name, self.config_name, revision=self.revision, cache_dir=self.hf_cache_dir
                )
            except (FileNotFoundError, ConnectionError) as e:  # DatasetNotFoundError is a FileNotFoundError
                detail = " ".join(str(e).split())
                raise DataError(
                    f"{self.source} could not be loaded ({detail}); check the name on huggingface.co/datasets and the "
                    "network, or point data.path at local files"
                ) from None
        else:
            with quiet_progress(datasets):
                loaded = load_local(datasets, self.path, self.hf_cache_dir)
        return {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)

    def prepare_data(self) -> None:
        self.load()  # the download (or Arrow conversion) happens once, on one process; setup reads the cache

    # ---- Lightning hooks ------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        datasets = import_datasets()
        loaded = self.load()
        chosen = self._choose_splits(list(loaded))
        for split in chosen.values():
            self._check_columns(split, loaded[split])
        class_names, labels = self._labels({ours: loaded[split] for ours, split in chosen.items()})
        self.class_names = class_names
        scans: dict[str, FolderScan] = {}
        for ours, split in chosen.items():
            table = loaded[split].select_columns([self.image_column])
            if isinstance(table.features[self.image_column], datasets.Image):
                table = table.cast_column(self.image_column, datasets.Image(decode=False))
            self.tables[split] = table
            scans[ours] = self._scan(split, table, labels[ours])
        splits = {ours: scan.samples for ours, scan in scans.items() if scan.samples}
        if "train" not in splits:
            raise DataError(f"{self.source} split {chosen['train']!r} has no usable rows: {summarize(scans['train'])}")
        for ours in sorted(set(scans) - set(splits)):
            log.warning(
                "%s split %r has no usable rows (%s): not used", self.source, chosen[ours], summarize(scans[ours])
            )
        where = f"{self.source} split {chosen['train']!r}"
        self.splits = hold_out_missing_splits(
            splits, class_names, self.val_fraction, self.test_fraction, self.seed, where
        )
        rank_zero = self.trainer is None or self.trainer.is_global_zero
        if rank_zero:
            self._report(scans, chosen)
        self._build_datasets()

    def _choose_splits(self, available: list[str]) -> dict[str, str]:
        """Our split -> the dataset's: ``data.splits.<ours>`` where set, else the first of ``SPLIT_NAMES`` present."""
        chosen: dict[str, str] = {}
        for ours, names in SPLIT_NAMES.items():
            given = self.split_names[ours]
            if given is not None and given not in available:
                raise ConfigError(
                    f"data.splits.{ours}={given!r}: {self.source} has no such split; its splits are {available}"
                )
            found = given if given is not None else next((n for n in names if n in available), None)
            if found is not None:
                chosen[ours] = found
        if "train" not in chosen:
            raise ConfigError(
                f"{self.source} has no train split (its splits are {available}): name the one to train on, e.g. "
                f"data.splits.train={available[0]}"
            )
        unused = [name for name in available if name not in chosen.values()]
        if unused:
            log.info("%s: not using split(s) %s (data.splits.train/val/test choose)", self.source, unused)
        return chosen

    def _check_columns(self, split: str, table: Any) -> None:
        """One line naming the key when a configured column is missing or holds no images."""
        datasets = import_datasets()
        for key, column, what in (
            ("data.image_column", self.image_column, "images"),
            ("data.label_column", self.label_column, "labels"),
        ):
            if column not in table.column_names:
                raise ConfigError(
                    f"{key}={column!r}: {self.source} split {split!r} has no such column; its columns are "
                    f"{table.column_names}. Set {key} to the column that holds the {what}."
                )
        feature = table.features[self.image_column]
        is_binary = isinstance(feature, datasets.Value) and feature.dtype in BINARY_DTYPES
        if not isinstance(feature, datasets.Image) and not is_binary:
            raise ConfigError(
                f"data.image_column={self.image_column!r} holds {feature}, not images, in {self.source} split {split!r}: "
                f"set data.image_column to a column of images (an Image feature or bytes); columns: {table.column_names}"
            )

    def _labels(self, tables: Mapping[str, Any]) -> tuple[list[str], dict[str, list[int | None]]]:
        """The class names and each split's labels as indices (None: the row has no label).

        A ``ClassLabel`` feature names the classes (in its order); other values become classes in sorted order, from
        the train split: a value of another split that train lacks is an error, as a class folder train lacks is.
        """
        datasets = import_datasets()
        key = f"data.label_column={self.label_column!r}"
        feature = tables["train"].features[self.label_column]
        if isinstance(feature, datasets.ClassLabel):
            names = [str(name) for name in feature.names]
            labels: dict[str, list[int | None]] = {}
            for split, table in tables.items():
                other = table.features[self.label_column]
                if not isinstance(other, datasets.ClassLabel) or list(other.names) != list(feature.names):
                    raise DataError(f"{key}: the {split} split's classes differ from train's ({other} vs {feature})")
                labels[split] = [None if v is None or v < 0 else int(v) for v in table[self.label_column]]
            return names, labels
        values = {split: list(table[self.label_column]) for split, table in tables.items()}
        for split, column in values.items():
            bad = next((v for v in column if v is not None and not isinstance(v, (str, int))), None)
            if bad is not None:
                raise ConfigError(
                    f"{key} holds {type(bad).__name__} values ({bad!r}) in the {split} split: one class per row is "
                    "needed (a ClassLabel, an integer or a string)"
                )
        present = {v for v in values["train"] if v is not None}
        try:
            ordered = sorted(present)
        except TypeError:  # mixed ints and strings
            ordered = sorted(present, key=str)
        index = {value: i for i, value in enumerate(ordered)}
        for split, column in values.items():
            unknown = sorted({str(v) for v in column if v is not None and v not in index})
            if unknown:
                raise DataError(
                    f"{key}: the {split} split has classes the train split lacks: {unknown[:10]}. Every split needs "
                    "the same classes."
                )
        return [str(v) for v in ordered], {
            split: [None if v is None else index[v] for v in column] for split, column in values.items()
        }

    def _scan(self, split: str, table: Any, labels: list[int | None]) -> FolderScan:
        """Decode every row's image once; rows that fail (or have no label) are left out with the folder scan's reasons."""
        if len(table) >= 1000:
            log.info("decoding %d images of %s split %r once to find unusable rows", len(table), self.source, split)
        workers = min(32, (os.cpu_count() or 1) + 4)
        samples: Samples = []
        skipped: list[tuple[str, str]] = []
        row = 0
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hf-scan") as pool:
            for batch in table.iter(batch_size=256):
                cells = batch[self.image_column]
                keys = [row_key(split, row + i) for i in range(len(cells))]
                for key, reason, label in zip(keys, pool.map(check_cell, keys, cells), labels[row : row + len(cells)]):
                    reason = reason or (NO_LABEL if label is None else None)
                    if reason is None:
                        samples.append((key, label))  # type: ignore[arg-type]  # label is set when reason is None
                    else:
                        skipped.append((key, reason))
                row += len(cells)
        return FolderScan(Path(split), list(self.class_names), samples, skipped)

    def _report(self, scans: Mapping[str, FolderScan], chosen: Mapping[str, str]) -> None:
        """Log what each split kept and left out (every left-out row by index, up to a few) and write the report."""
        if self.report_path is not None:
            write_scan_report({chosen[ours]: scan for ours, scan in scans.items()}, self.report_path)
        for ours, scan in scans.items():
            log.info("%s split %r: %s", self.source, chosen[ours], summarize(scan, self.report_path))
            for key, reason in scan.skipped[:MAX_ROWS_LISTED]:
                split, row = key.rsplit("/", 1)
                log.warning("skipping row %s of %s split %r: %s", row, self.source, split, reason)
            if len(scan.skipped) > MAX_ROWS_LISTED:
                where = f" - see {self.report_path}" if self.report_path is not None else ""
                log.warning("... and %d more left-out rows%s", len(scan.skipped) - MAX_ROWS_LISTED, where)
        for split, items in self.splits.items():
            counts = [0] * len(self.class_names)
            for _, label in items:
                counts[label] += 1
            log.info("%s", split_summary(split, dict(zip(self.class_names, counts))))

    def _build_datasets(self) -> None:
        """The image folders' pipeline on rows: decode at the eval resize size, the preset's geometry for training."""
        loader = RowImageLoader(self.tables, self.image_column, min_size=self.preprocessing.resize)
        train_tf = (
            (self.augment or Augmentation()).geometry(self.preprocessing, self.crop_scale, self.hflip).transform()
        )
        self.datasets = {
            split: ImageFileDataset(items, train_tf if split == "train" else self.preprocessing.transform, loader)
            for split, items in self.splits.items()
        }
        if self.balance:
            self.sample_weights = balanced_weights(self.train_labels(), len(self.class_names))

    # ---- what eval reads (data.contract.ClassificationData) -------------------------------------------------------
    def train_labels(self) -> list[int]:
        return [label for _, label in self.splits["train"]]

    def all_images(self) -> ImageFileDataset:
        """Every usable row of every split used, at the eval transform (``eval.py split=all``)."""
        samples = sorted_samples(self.splits.values())
        loader = RowImageLoader(self.tables, self.image_column, min_size=self.preprocessing.resize)
        return ImageFileDataset(samples, self.preprocessing.transform, loader)

    def image_names(self) -> list[ImageName]:
        """``all_images``' rows as ``<split>/<row>`` (the dataset's split: a held-out val row keeps its train/ name)."""
        split_of = {key: split for split, items in self.splits.items() for key, _ in items}
        return [ImageName(split_of[key], key, label, False) for key, label in sorted_samples(self.splits.values())]


def load_local(datasets: Any, path: Path, cache_dir: str | None) -> Any:
    """``data.path``: a ``save_to_disk`` folder (``load_from_disk``), else parquet or arrow files (a file, or a folder
    whose file names say the split, as ``datasets`` infers it: ``train-*.parquet``, ``test/...``)."""
    if (path / datasets.config.DATASETDICT_JSON_FILENAME).is_file() or (
        path / datasets.config.DATASET_STATE_JSON_FILENAME
    ).is_file():
        return datasets.load_from_disk(str(path))
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    for suffix, builder in ((".parquet", "parquet"), (".arrow", "arrow")):
        if any(p.suffix == suffix for p in files):
            if path.is_file():
                return datasets.load_dataset(builder, data_files={"train": str(path)}, cache_dir=cache_dir)
            return datasets.load_dataset(builder, data_dir=str(path), cache_dir=cache_dir)
    raise DataError(
        f"data.path={str(path)!r} holds no .parquet or .arrow files and is not a save_to_disk folder: point it at "
        "the dataset's files (or use data.name for a dataset on the hub)"
    )


@contextmanager
def quiet_progress(datasets: Any) -> Iterator[None]:
    """No progress bars while local files are converted (a second or so); hub downloads keep theirs."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
