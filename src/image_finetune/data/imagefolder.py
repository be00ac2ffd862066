"""A data module for a folder of labelled images, in either of the two layouts people actually have.

* ``root/train/<class>/...``, ``root/val/<class>/...`` and optionally ``root/test/<class>/...``; a missing ``val/`` is
  split off ``train/``.
* ``root/<class>/...``: one pool, split into train/val(/test) by fractions, stratified by class, with a fixed seed.

With ``folds``/``fold`` (k-fold cross-validation, ``data/folds.py``) the validation split is fold ``fold`` of the pool
left once the test split is held out, instead of ``val_fraction`` of it.

The split is written to ``manifest_path`` (in the run dir) and read back from there when the run is resumed, so a
resumed run trains and validates on exactly the same files even if the folder gained images meanwhile.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from image_finetune.core.config_checks import check_folds
from image_finetune.core.errors import ConfigError, DataError
from image_finetune.data.base import ClassificationDataModule
from image_finetune.data.cache import ResizedCache
from image_finetune.data.contract import ImageName
from image_finetune.data.decode import stored_short_side
from image_finetune.data.device_decode import (
    DeviceCrops,
    DeviceJpegLoader,
    EncodedBatch,
    EncodedImageDataset,
    require_gpu,
)
from image_finetune.data.files import ImageFileDataset, ImageLoader
from image_finetune.data.folds import fold_split
from image_finetune.data.manifest import read_manifest, write_manifest
from image_finetune.data.preprocessing import Preprocessing
from image_finetune.data.scan import FolderScan, scan_image_folder, summarize, write_scan_report
from image_finetune.data.transforms import Augmentation

log = logging.getLogger(__name__)

Samples = list[tuple[str, int]]
SPLIT_DIRS = ("train", "val", "test")
CacheMode = Literal["auto", "resized"] | None
CACHE_MODES: tuple[CacheMode, ...] = (None, "auto", "resized")
DecodeMode = Literal["cpu", "gpu"]
# data.cache=auto keeps resized copies when the median training image is at least this many times (per side) what
# training reads: a 1600x1200 photo cached at 256 px decodes ~6x faster; a 500x375 one would gain nothing.
AUTO_CACHE_MIN_SHRINK = 2
AUTO_CACHE_PROBE = 32  # training images whose headers decide data.cache=auto
# data.test_fraction=auto holds out this fraction of each class as a test split when every class of the pool being split
# has at least AUTO_TEST_MIN_IMAGES images (then each class keeps >= 2 test, >= 2 val and >= 6 training images);
# otherwise there is no test split, and the run says so instead of reporting the validation split as "test".
AUTO_TEST_FRACTION = 0.15
AUTO_TEST_MIN_IMAGES = 10
TestFraction = float | Literal["auto"]
# The per-class counts of a split are logged in full up to this many classes; beyond, summarised (split_summary).
MAX_CLASSES_LISTED = 20


#: How a pool is split: ``stratified_split``'s positional arguments (samples, fractions, names, classes, seed, folds);
#: ``data=csv`` multi-label data brings its own (``multilabel_split.multilabel_split``).
SplitRule = Callable[[Samples, list[float], list[str], list[str], int, "tuple[int, int] | None"], dict[str, Samples]]


class LabelledFiles(NamedTuple):
    """Where a data module's labelled files come from (``ImageFolderDataModule._labelled_files``)."""

    classes: list[str]
    scans: dict[str, FolderScan]
    """What was kept and left out, by split or ``"all"``: the report and the summary lines."""
    splits: dict[str, Samples] | None
    """The splits the data gives (``train`` and any of ``val``, ``test``; train gives up the missing ones), or None:
    one pool, split by ``data.val_fraction`` and ``data.test_fraction``."""
    where: str
    """How the "no test split" warning names the pool it splits."""


class ImageFolderDataModule(ClassificationDataModule):
    """Image classification data from folders of files, scanned once, split reproducibly, decoded robustly."""

    #: Subclasses that write their folder in ``prepare_data`` set this, so a missing root is not an error at init.
    root_created_by_prepare_data = False
    #: Labels (and given splits) are folder names, which ``data_split.json`` is checked against on resume; a source
    #: that lists its files elsewhere (``data=csv``) sets False and the manifest is checked against its labels.
    labels_from_folders = True

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int | None = None,
        batch_size: int = 64,
        num_workers: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: TestFraction = "auto",
        seed: int = 42,
        crop_scale: Sequence[float] = (0.08, 1.0),
        crop_ratio: float | None = None,
        hflip: bool = True,
        augment: Augmentation | None = None,
        balance: bool = False,
        cache: CacheMode = "auto",
        cache_dir: str | os.PathLike | None = None,
        manifest_path: str | os.PathLike | None = None,
        report_path: str | os.PathLike | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        preprocessing: Preprocessing | Mapping[str, Any] | None = None,
        min_steps_per_epoch: int = 4,
        decode: DecodeMode = "cpu",
        folds: int | None = None,
        fold: int | None = None,
    ) -> None:
        """``preprocessing`` is the backbone's (``train`` hands it over); ``image_size``/``crop_ratio`` override it.
        ``folds``/``fold``: validate on fold ``fold`` of ``folds`` (stratified) instead of ``val_fraction``."""
        super().__init__(batch_size, num_workers, seed, pin_memory, persistent_workers, min_steps_per_epoch)
        check_fractions(val_fraction, test_fraction)
        if cache not in CACHE_MODES:
            raise ConfigError(
                f"data.cache={cache!r}: use auto (keep resized copies when the images are large), resized (always) "
                "or null (read the original files every epoch)"
            )
        if decode not in ("cpu", "gpu"):
            raise ConfigError(
                f"data.decode={decode!r}: use cpu (decode in the loader workers) or gpu (nvJPEG on the training GPU)"
            )
        if decode == "gpu":
            require_gpu()
            if augment is not None and augment.ops:
                raise ConfigError(
                    f"data.decode=gpu crops and flips on the GPU, but augment={augment.name} also has ops that run on "
                    "CPU images: use augment=none|light|standard with data.decode=gpu, or data.decode=cpu"
                )
        self.decode = decode
        backbone_preprocessing = Preprocessing.coerce(preprocessing) or Preprocessing()
        self.preprocessing = backbone_preprocessing.override(size=image_size, crop_ratio=crop_ratio)
        self.image_size, self.crop_ratio = self.preprocessing.size, self.preprocessing.crop_ratio
        self.save_hyperparameters(
            {
                "root": str(root),
                "image_size": self.image_size,
                "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "seed": seed,
                "folds": folds,
                "fold": fold,
            }
        )
        check_folds(folds, fold)
        self.folds, self.fold = folds, fold
        self.root = Path(root).expanduser()
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.crop_scale, self.hflip = tuple(crop_scale), hflip
        self.augment = augment  # the preset (augment=...); None: random resized crop at crop_scale + hflip
        self.balance = balance
        # Scan results and resized images are keyed by source path, so one cache dir serves every dataset.
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "image_finetune").expanduser()
        self.cache = cache
        self.manifest_path = Path(manifest_path) if manifest_path else None
        self.report_path = Path(report_path) if report_path else None
        self.splits: dict[str, Samples] = {}
        if not self.root_created_by_prepare_data:
            self._check_root()  # fail before anything slow (weight download, worker start-up) happens
            if self.folds is not None and (self.root / "train").is_dir() and (self.root / "val").is_dir():
                raise self._nothing_to_fold(f"{self.root / 'val'} is the validation split")

    # ---- discovery ------------------------------------------------------------------------------------------------
    def _scan(self, folder: Path) -> FolderScan:
        return scan_image_folder(folder, cache_dir=self.cache_dir / "scan")

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise DataError(
                f"data.root={str(self.root)!r} does not exist or is not a folder. Point data.root at a folder of class folders."
            )

    def _labelled_files(self) -> LabelledFiles:
        """The labelled files, from the class folders under data.root (and its train/ val/ test/ folders, if any).
        The one place that knows where labels come from: ``data=csv`` (``csvfile.py``) reads a labels file instead."""
        self._check_root()
        if (self.root / "train").is_dir():
            for split in SPLIT_DIRS[1:]:
                folder = self.root / split
                if folder.is_dir() and not any(folder.iterdir()):
                    raise DataError(
                        f"{folder} is empty: put the {split} images in class folders there (as in train/), or remove "
                        f"the empty folder to hold the {split} split out of train/ (data.{split}_fraction)."
                    )
            scans = {split: self._scan(self.root / split) for split in SPLIT_DIRS if (self.root / split).is_dir()}
            classes = scans["train"].classes
            for split, scan in scans.items():
                if scan.classes != classes:
                    missing, extra = sorted(set(classes) - set(scan.classes)), sorted(set(scan.classes) - set(classes))
                    raise DataError(
                        f"{self.root / split} has different classes than {self.root / 'train'}: missing {missing}, extra {extra}. "
                        "Every split needs the same class folders."
                    )
            return LabelledFiles(classes, scans, {split: list(scan.samples) for split, scan in scans.items()}, "train/")
        scan = self._scan(self.root)
        return LabelledFiles(scan.classes, {"all": scan}, None, "data.root")

    def _discover(self) -> tuple[list[str], dict[str, Samples], dict[str, FolderScan]]:
        """Find the labelled files and split; returns class names, samples per split, and the scans (for the report)."""
        classes, scans, given, where = self._labelled_files()
        folds = None if self.folds is None or self.fold is None else (self.folds, self.fold)
        if given is None:
            pool = [sample for scan in scans.values() for sample in scan.samples]
            fractions = [self.val_fraction, resolve_test_fraction(self.test_fraction, pool, classes, where)]
            splits = self._split_rule()(pool, fractions, ["val", "test"], classes, self.seed, folds)
        else:
            if folds is not None and "val" in given:
                raise self._nothing_to_fold(f"{self.source} gives a validation split of its own")
            splits = hold_out_missing_splits(
                dict(given), classes, self.val_fraction, self.test_fraction, self.seed, where, folds, self._split_rule()
            )
        return classes, splits, scans

    def _split_rule(self) -> SplitRule:
        """How the pool is split and folded: by class (``stratified_split``); ``data=csv`` multi-label data splits by
        every label a row holds (``multilabel_split.py``)."""
        return stratified_split

    def _nothing_to_fold(self, why: str) -> ConfigError:
        return ConfigError(
            f"data.folds={self.folds} cuts the training images into folds to validate on, but {why}: drop data.folds "
            "and data.fold to validate on it, or merge it into the training images to cross-validate"
        )

    # ---- manifest -------------------------------------------------------------------------------------------------
    def _read_manifest(self, classes: list[str], scans: Mapping[str, FolderScan]) -> dict[str, Samples] | None:
        """The splits of the run being resumed (``manifest_path``), checked against what the scan found now."""
        if self.manifest_path is None or not self.manifest_path.is_file():
            return None
        usable = {path: label for scan in scans.values() for path, label in scan.samples}
        left_out = {path: reason for scan in scans.values() for path, reason in scan.skipped}
        split_folders = self.labels_from_folders and "all" not in scans
        splits = read_manifest(
            self.manifest_path,
            self.root,
            classes,
            split_folders,
            usable,
            left_out,
            self.labels_from_folders,
            folds=self.fold_record(),
        )
        log.info("Reusing the data split in %s", self.manifest_path)
        return splits

    # ---- Lightning hooks ------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        classes, splits, scans = self._discover()
        self.class_names = classes
        reused = self._read_manifest(classes, scans)
        self.splits = reused or splits
        rank_zero = self.trainer is None or self.trainer.is_global_zero
        if rank_zero:
            if self.manifest_path is not None and reused is None:  # a reused file stays the record of the split
                write_manifest(self.manifest_path, self.root, self.class_names, self.splits, self.fold_record())
            if self.report_path is not None:
                write_scan_report(scans, self.report_path)
            for scan in scans.values():
                log.info("%s: %s", scan.root, summarize(scan, self.report_path))
            for split, items in self.splits.items():
                log.info("%s", split_summary(split, self.split_counts(items), len(items)))
        self._build_datasets(verbose=rank_zero)

    def _build_datasets(self, verbose: bool) -> None:
        # Decode (and cache) at the eval resize size, so neither pipeline ever upsamples a reduced decode.
        short_side = round(self.image_size / self.crop_ratio)
        original = ImageLoader(min_size=short_side)
        cache = self._resized_cache(short_side, verbose) if self.decode == "cpu" else None
        # The cache serves the splits read every epoch. The test split is read from the original files, so its
        # numbers are exactly what eval.py, predict.py and the exported models compute.
        loaders = {"train": ImageLoader(min_size=short_side, cache=cache) if cache else original}
        loaders["val"] = loaders["train"]
        self.geometry = (self.augment or Augmentation()).geometry(self.preprocessing, self.crop_scale, self.hflip)
        train_tf = self.geometry.transform()
        eval_tf = self.preprocessing.transform
        self.datasets = {
            split: ImageFileDataset(items, train_tf if split == "train" else eval_tf, loaders.get(split, original))
            for split, items in self.splits.items()
        }
        if self.decode == "gpu":
            self._decode_on_device(short_side, verbose)
        if self.balance:
            self.sample_weights = balanced_weights(self.train_labels(), len(self.class_names))

    def _decode_on_device(self, short_side: int, verbose: bool) -> None:
        """``data.decode=gpu``: the train and val splits read JPEG bytes, decoded and cropped on the device (see
        ``on_before_batch_transfer``). The test split keeps the CPU path, so its numbers are what eval.py computes."""
        self.device_crops = DeviceCrops(self.geometry, min_size=short_side)
        loader = DeviceJpegLoader(min_size=short_side)
        for split in ("train", "val"):
            if split in self.splits:
                self.datasets[split] = EncodedImageDataset(self.splits[split], loader)
        if verbose:
            log.info(
                "data.decode=gpu: train and val JPEGs are decoded and cropped on the training device (nvJPEG); other "
                "files are decoded in the workers. data.cache is not used."
            )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """``data.decode=gpu``: an ``EncodedBatch`` becomes ``(uint8 NCHW images, labels)`` on the training device."""
        if not isinstance(batch, EncodedBatch):
            return batch
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        training = self.trainer is not None and self.trainer.training
        return self.device_crops(batch, device, train=training)

    def _resized_cache(self, short_side: int, verbose: bool) -> ResizedCache | None:
        """The cache for ``data.cache``; ``auto`` decides from the headers of a seeded sample of training images."""
        if self.cache is None:
            return None
        cache = ResizedCache(self.cache_dir / "resized", short_side, self.preprocessing.interpolation)
        if self.cache == "resized":
            return cache
        large, median = auto_cache_pays([path for path, _ in self.splits["train"]], short_side, self.seed)
        if verbose:
            if large:
                log.info(
                    "data.cache=auto: the images are large (median short side %d px, training reads %d px), so the first "
                    "epoch keeps resized copies in %s and later epochs and runs read those (data.cache=null: never)",
                    median, short_side, cache.cache_dir,
                )  # fmt: skip
            else:
                log.info(
                    "data.cache=auto: reading the original files (median short side %s px, training reads %d px)",
                    median,
                    short_side,
                )
        return cache if large else None

    def split_counts(self, items: Samples) -> dict[str, int]:
        """Images per class of a split, for its log line (``data=csv`` multi-label: images holding each label)."""
        counts = Counter(label for _, label in items)
        return {name: counts[i] for i, name in enumerate(self.class_names)}

    # ---- what eval reads (data.contract.ClassificationData) -------------------------------------------------------
    @property
    def source(self) -> str:
        return f"data.root={str(self.root)!r}"

    def train_labels(self) -> list[int]:
        return [label for _, label in self.splits["train"]]

    def fold_record(self) -> dict[str, int] | None:
        """``{"folds": K, "fold": i}`` with k-fold (``data_split.json`` records it), else None."""
        return None if self.folds is None or self.fold is None else {"folds": self.folds, "fold": self.fold}

    def all_images(self) -> ImageFileDataset:
        """Every image of every split, sorted by path, read from the original files at the eval transform."""
        return self.split_images(*self.splits)

    def image_names(self) -> list[ImageName]:
        """``all_images``' files by path, with their split and label."""
        split_of = {path: split for split, items in self.splits.items() for path, _ in items}
        return [ImageName(split_of[path], path, label, True) for path, label in sorted_samples(self.splits.values())]

    def held_out_fold(self) -> ImageFileDataset | None:
        """With ``data.folds``, the validation split is the held-out fold: its images, from their files."""
        return self.split_images("val") if self.fold_record() is not None else None

    def split_images(self, *splits: str) -> ImageFileDataset:
        """The images of ``splits``, sorted by path, read from the original files at the eval transform."""
        samples = sorted_samples(self.splits[split] for split in splits)
        return ImageFileDataset(samples, self.preprocessing.transform, ImageLoader(min_size=self.preprocessing.resize))


def sorted_samples(splits: Iterable[Samples]) -> Samples:
    """The samples of ``splits`` as one list sorted by path (``all_images``' order)."""
    return sorted(sample for items in splits for sample in items)


def split_summary(split: str, counts: Mapping[str, int], total: int | None = None) -> str:
    """One log line for a split: every class's count up to MAX_CLASSES_LISTED classes, else the range, the median
    and the smallest classes (the full counts are in data_split.json). ``total``: the images, where they are not the
    sum of the counts (multi-label images count once per label they hold)."""
    total = sum(counts.values()) if total is None else total
    if len(counts) <= MAX_CLASSES_LISTED:
        return f"{split}: {total:,} images, per class {dict(sorted(counts.items()))}"
    sizes = sorted(counts.values())
    line = f"{split}: {total:,} images in {len(counts):,} classes, "
    if sizes[0] == sizes[-1]:
        return line + f"{sizes[0]:,} per class"
    smallest = sorted(counts.items(), key=lambda item: (item[1], item[0]))[:3]
    return line + (
        f"{sizes[0]:,}-{sizes[-1]:,} per class (median {statistics.median(sizes):g}); "
        f"smallest: {', '.join(f'{name} {n:,}' for name, n in smallest)}"
    )


def check_fractions(val_fraction: float, test_fraction: TestFraction) -> None:
    """Refuse ``data.val_fraction``/``data.test_fraction`` that cannot hold out what they say (before any work)."""
    if isinstance(test_fraction, str) and test_fraction != "auto":
        raise ConfigError(
            f"data.test_fraction={test_fraction!r}: use auto or a fraction in [0, 1), e.g. 0.15 (0: no test split)"
        )
    largest_test = AUTO_TEST_FRACTION if test_fraction == "auto" else float(test_fraction)
    if not 0 <= val_fraction < 1 or not 0 <= largest_test < 1 or val_fraction + largest_test >= 1:
        raise ConfigError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be in [0, 1) and sum to < 1"
        )


def resolve_test_fraction(test_fraction: TestFraction, pool: Samples, classes: list[str], where: str) -> float:
    """``data.test_fraction``, with ``auto`` resolved for ``pool``: AUTO_TEST_FRACTION when every class has at
    least AUTO_TEST_MIN_IMAGES images, else 0, logged plainly (the run then has no test split and reports none)."""
    if test_fraction != "auto":
        return float(test_fraction)
    counts = Counter(label for _, label in pool)
    smallest = min(range(len(classes)), key=lambda label: counts[label], default=None)
    if smallest is None or counts[smallest] >= AUTO_TEST_MIN_IMAGES:
        return AUTO_TEST_FRACTION
    log.warning(
        "no test split: class %r in %s has only %d image(s) (data.test_fraction=auto holds out %d%% of each class "
        "for testing when every class has at least %d). The run reports validation metrics only; add a test/ "
        "folder or set data.test_fraction to hold one out anyway.",
        classes[smallest], where, counts[smallest], round(AUTO_TEST_FRACTION * 100), AUTO_TEST_MIN_IMAGES,
    )  # fmt: skip
    return 0.0


def hold_out_missing_splits(
    splits: dict[str, Samples],
    classes: list[str],
    val_fraction: float,
    test_fraction: TestFraction,
    seed: int,
    where: str,
    folds: tuple[int, int] | None = None,
    rule: SplitRule | None = None,
) -> dict[str, Samples]:
    """``splits`` with what ``train`` must give up held out of it (by ``rule``, default ``stratified_split``): val
    when there is no val split, test (``resolve_test_fraction``) when there is no test split. ``where`` names the
    train pool in messages."""
    names = [name for name in ("val", "test") if name not in splits]
    fractions = [
        val_fraction if name == "val" else resolve_test_fraction(test_fraction, splits["train"], classes, where)
        for name in names
    ]
    if any(fraction > 0 for fraction in fractions) or (folds is not None and "val" in names):
        splits = {**splits, **(rule or stratified_split)(splits["train"], fractions, names, classes, seed, folds)}
    return splits


def stratified_split(
    samples: Samples,
    fractions: list[float],
    names: list[str],
    classes: list[str],
    seed: int,
    folds: tuple[int, int] | None = None,
) -> dict[str, Samples]:
    """Hold out ``fractions`` of each class as the splits ``names`` (at least one image per class per held-out
    split), seeded by ``seed``; the rest is ``train``. Every data module that splits a pool uses this one rule.

    ``folds=(K, i)``: ``val`` is fold ``i`` of ``K`` (stratified) of what is left once the other splits are held out."""
    if folds is not None and "val" in names:
        rest = [i for i, name in enumerate(names) if name != "val"]
        out = stratified_split(samples, [fractions[i] for i in rest], [names[i] for i in rest], classes, seed)
        out["train"], out["val"] = fold_split(out["train"], *folds, seed, classes)
        return {name: sorted(out[name]) for name in SPLIT_DIRS if name in out}
    rng = random.Random(seed)
    by_class: dict[int, Samples] = {}
    for sample in sorted(samples):
        by_class.setdefault(sample[1], []).append(sample)
    out: dict[str, Samples] = {
        name: [] for name in ["train", *names] if name == "train" or fractions[names.index(name)] > 0
    }
    for label, items in sorted(by_class.items()):
        rng.shuffle(items)
        sizes = split_sizes(len(items), fractions)
        if sum(sizes) >= len(items):
            raise DataError(
                f"class {classes[label]!r} has {len(items)} usable image(s): too few to hold out "
                f"{dict(zip(names, fractions))} and keep one for training. Add images or lower the fractions."
            )
        start = 0
        for name, size in zip(names, sizes):
            if size:
                out[name].extend(items[start : start + size])
            start += size
        out["train"].extend(items[start:])
    return {name: sorted(items) for name, items in out.items()}


def auto_cache_pays(paths: Sequence[str], short_side: int, seed: int) -> tuple[bool, int | None]:
    """``data.cache=auto``'s rule: whether resized copies pay for ``paths`` read at ``short_side``, and the median."""
    median = median_short_side(paths, AUTO_CACHE_PROBE, seed)
    return median is not None and median >= AUTO_CACHE_MIN_SHRINK * short_side, median


def median_short_side(paths: Sequence[str], probe: int, seed: int) -> int | None:
    """Median short side of up to ``probe`` of ``paths`` (seeded sample), from the file headers; None if none opens."""
    sides = []
    for path in random.Random(seed).sample(list(paths), min(probe, len(paths))):
        try:
            sides.append(stored_short_side(path))
        except (
            Exception
        ):  # a file that broke after the scan (or became a decompression bomb); the loader will report it
            continue
    return round(statistics.median(sides)) if sides else None


def balanced_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Per-sample weights ``1 / count(class)``: every class is drawn equally often in expectation."""
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).clamp(min=1).double()
    return 1.0 / counts[torch.as_tensor(labels)]


def split_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """Sizes of the held-out parts of ``n`` items (rounded, at least 1 each when the fraction is positive)."""
    return [max(1, round(n * f)) if f > 0 else 0 for f in fractions]
