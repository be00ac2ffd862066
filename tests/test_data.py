"""Data modules: both folder layouts, reproducible splits that survive a resume, sampling, CIFAR-10 offline, errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from support import make_image_folder

from image_finetune.core.errors import ConfigError, DataError
from image_finetune.data import CIFAR10DataModule, DigitsDataModule, EpochSampler, ImageFolderDataModule
from image_finetune.data.base import train_batching
from image_finetune.data.cifar10 import random_crop_flip
from image_finetune.data.imagefolder import balanced_weights
from image_finetune.recipe.backbones import build_backbone


def folder_module(root: Path, tmp_path: Path, **kwargs: object) -> ImageFolderDataModule:
    defaults = dict(
        image_size=16,
        batch_size=4,
        num_workers=0,
        cache_dir=tmp_path / "cache",
        manifest_path=tmp_path / "run" / "split.json",
    )
    return ImageFolderDataModule(root, **{**defaults, **kwargs})


def test_pool_layout_is_split_stratified_and_reproducibly(image_folder, tmp_path):
    dm = folder_module(image_folder, tmp_path, val_fraction=0.25, test_fraction=0.25)
    dm.setup("fit")
    assert dm.class_names == ["class_0", "class_1", "class_2"]
    sizes = {split: len(items) for split, items in dm.splits.items()}
    assert sizes == {"train": 18, "val": 9, "test": 9}
    for split in ("val", "test"):
        labels = [label for _, label in dm.splits[split]]
        assert sorted(labels) == [0] * 3 + [1] * 3 + [2] * 3, "each class held out in proportion"
    all_paths = [p for items in dm.splits.values() for p, _ in items]
    assert len(all_paths) == len(set(all_paths)) == 36
    again = folder_module(image_folder, tmp_path / "other", val_fraction=0.25, test_fraction=0.25)
    again.setup("fit")
    assert again.splits == dm.splits


def test_split_layout_uses_the_given_folders_and_splits_val_off_train_when_missing(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root / "train", per_class=10)
    make_image_folder(root / "test", per_class=2, seed=1)
    dm = folder_module(root, tmp_path, val_fraction=0.2, min_steps_per_epoch=1)  # batches of exactly data.batch_size
    dm.setup("fit")
    assert {split: len(items) for split, items in dm.splits.items()} == {"train": 24, "val": 6, "test": 6}
    assert all("/test/" in path for path, _ in dm.splits["test"])
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 16, 16) and labels.dtype == torch.int64


def test_the_split_manifest_is_reused_on_resume(image_folder, tmp_path):
    dm = folder_module(image_folder, tmp_path)
    dm.setup("fit")
    manifest = json.loads((tmp_path / "run" / "split.json").read_text())
    assert manifest["classes"] == dm.class_names
    # Images added after the run started must not leak into the resumed run's splits.
    shutil.copy(dm.splits["train"][0][0], image_folder / "class_0" / "new_image.png")
    resumed = folder_module(image_folder, tmp_path)
    resumed.setup("fit")
    assert resumed.splits == dm.splits
    fresh = folder_module(image_folder, tmp_path, manifest_path=tmp_path / "fresh" / "split.json")
    fresh.setup("fit")
    assert sum(map(len, fresh.splits.values())) == sum(map(len, dm.splits.values())) + 1


def test_val_classes_must_match_train(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root / "train", classes=3)
    make_image_folder(root / "val", classes=2)
    with pytest.raises(DataError, match=r"val has different classes than .*train: missing \['class_2'\]"):
        folder_module(root, tmp_path).setup("fit")


def test_missing_root_is_reported_at_construction(tmp_path):
    with pytest.raises(DataError, match=r"data.root='.*nowhere' does not exist"):
        folder_module(tmp_path / "nowhere", tmp_path)


def test_too_few_images_for_the_split_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=2)
    with pytest.raises(DataError, match=r"class 'class_0' has 2 usable image\(s\): too few"):
        folder_module(root, tmp_path, val_fraction=0.3, test_fraction=0.3).setup("fit")


def test_sampler_is_a_function_of_seed_and_epoch_and_shards_ranks():
    first = list(EpochSampler(10, seed=1, epoch=3))
    assert first == list(EpochSampler(10, seed=1, epoch=3))
    assert first != list(EpochSampler(10, seed=1, epoch=4))
    later = EpochSampler(10, seed=1)
    later.set_epoch(3)
    assert list(later) == first
    assert sorted(index for index, _ in first) == list(range(10))
    ranks = [list(EpochSampler(10, seed=1, epoch=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    assert sorted(i for shard in ranks for i, _ in shard) == list(range(10))


def test_balanced_sampling_draws_classes_equally_often():
    labels = [0] * 90 + [1] * 10
    sampler = EpochSampler(100, seed=0, weights=balanced_weights(labels, 2))
    counts = torch.bincount(
        torch.tensor([labels[i] for epoch in range(20) for i, _ in (sampler.set_epoch(epoch) or sampler)])
    )
    assert abs(counts[0].item() / counts.sum().item() - 0.5) < 0.05


def test_digits_are_written_once_as_an_image_folder(tmp_path):
    dm = DigitsDataModule(
        tmp_path / "digits", image_size=16, num_workers=0, cache_dir=tmp_path / "cache", test_fraction=0.15
    )
    dm.prepare_data()
    dm.setup("fit")
    assert dm.class_names == [str(d) for d in range(10)]
    assert sum(map(len, dm.splits.values())) == 1797
    stamp = (tmp_path / "digits" / "0").stat().st_mtime_ns
    dm.prepare_data()
    assert (tmp_path / "digits" / "0").stat().st_mtime_ns == stamp


def test_cifar10_downloads_through_torchvision_and_splits(cifar_root):
    dm = CIFAR10DataModule(cifar_root, batch_size=8, num_workers=0, val_size=20)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.class_names[:2] == ["airplane", "automobile"]
    assert {split: len(ds) for split, ds in dm.datasets.items()} == {"train": 80, "val": 20, "test": 30}
    images, _ = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)


def test_cifar_sizes_that_cannot_work_are_config_errors(cifar_root):
    with pytest.raises(
        ConfigError, match=r"data\.image_size=160: CIFAR-10 images are 32x32.*set model\.upsample_to=160"
    ):
        CIFAR10DataModule(cifar_root, image_size=160)
    dm = CIFAR10DataModule(cifar_root, num_workers=0)  # val_size 5000 of the fixture's 100 training images
    with pytest.raises(ConfigError, match=r"data\.val_size=5000: the CIFAR-10 training set in .* has 100 images"):
        dm.setup("fit")


def test_cifar_device_augmentation_is_the_reflect_pad_crop_flip_each_sample_seed_names():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    seeds = torch.randint(0, 2**62, (64,), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    out = random_crop_flip(images, seeds)
    torch.manual_seed(2)
    assert torch.equal(random_crop_flip(images, seeds), out)  # the seeds decide, not the global RNG
    padded = torch.nn.functional.pad(images.float(), (4,) * 4, mode="reflect").to(torch.uint8)
    for i, seed in enumerate(seeds.tolist()):
        dy, dx, flip = seed % 9, (seed // 9) % 9, (seed // 81) % 2
        expected = padded[i, :, dy : dy + 32, dx : dx + 32]
        assert torch.equal(out[i], expected.flip(-1) if flip else expected), i
    assert len({(s % 9, (s // 9) % 9, (s // 81) % 2) for s in seeds.tolist()}) > 20  # offsets and flips really vary


def test_cifar_training_batches_live_on_the_device_and_depend_on_seed_and_epoch_only(cifar_root):
    """Resident batches: the same (seed, epoch) gives the same batches (exact resume), another epoch others; no
    worker, no collation, the labels travel with their images."""
    dm = CIFAR10DataModule(cifar_root, batch_size=8, num_workers=0, val_size=20)
    dm.setup("fit")

    def epoch_batches(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)  # what Lightning calls at each epoch start
        torch.manual_seed(epoch + 100)  # the global RNG must not matter
        return list(loader)

    first, again, other = epoch_batches(3), epoch_batches(3), epoch_batches(4)
    assert len(first) == 80 // 8 and all(
        images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32) for images, _ in first
    )
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    train = dm.datasets["train"]
    order, seeds = dm.train_sampler().draw()  # epoch 0 (no trainer)
    images, labels = next(iter(dm.train_dataloader()))
    assert torch.equal(labels, train.labels[order[:8]])
    assert torch.equal(images, random_crop_flip(train.images[order[:8]], seeds[:8]))
    val = list(dm.val_dataloader())  # in order, all 20, last batch partial
    assert torch.equal(torch.cat([images for images, _ in val]), dm.datasets["val"].images)


@pytest.mark.parametrize(
    ("name", "weights", "message"),
    [
        ("resnet51", "DEFAULT", r"'resnet51' is not a torchvision classification model\. Did you mean resnet50"),
        (
            "resnet18",
            "IMAGENET1K_V9",
            r"'IMAGENET1K_V9' is not a weights name for resnet18\. Choose one of \['DEFAULT', 'IMAGENET1K_V1'\]",
        ),
        ("resnet18", "/no/such/file.pth", r"no such file"),
    ],
)
def test_unknown_backbone_or_weights_names_are_clear_errors(name, weights, message):
    with pytest.raises(ConfigError, match=message):
        build_backbone(name, weights)


def test_weights_from_a_local_file(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "mine.pth")
    backbone = build_backbone("resnet18", str(tmp_path / "mine.pth"))
    assert backbone.pretrained and backbone.num_features == 512
    assert torch.equal(backbone.module.conv1.weight, reference.conv1.weight)


def test_a_messy_folder_trains_on_exactly_its_good_images_and_reports_the_rest(tmp_path):
    """The data module over every kind of junk: the train split is the good files, the report the bad ones, and a
    file that breaks after the scan costs one sample, not the epoch."""
    from messy_folder import make_messy_folder

    messy = make_messy_folder(tmp_path)
    report = tmp_path / "run" / "data_report.tsv"
    dm = folder_module(messy.root, tmp_path, val_fraction=0.0, report_path=report, batch_size=5)
    dm.setup("fit")
    assert dm.splits.keys() == {"train"}
    assert {path: dm.class_names[label] for path, label in dm.splits["train"]} == messy.kept
    rows = list(csv.DictReader(report.open(), delimiter="\t"))
    assert {row["path"] for row in rows} == set(messy.skipped)
    assert all(row["reason"] for row in rows)

    victim = dm.splits["train"][0][0]
    Path(victim).write_bytes(Path(victim).read_bytes()[:40])  # truncated after the scan
    seen = sum(labels.numel() for _, labels in dm.train_dataloader())
    size, drop_last = train_batching(len(messy.kept), 5, dm.min_steps_per_epoch)
    assert seen == (len(messy.kept) // size * size if drop_last else len(messy.kept))  # none lost to the broken file
    assert [path for path, _ in dm.datasets["train"].failures] == [victim]


def cache_entries(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache" / "resized").rglob("*") if p.is_file())


def test_auto_cache_keeps_small_copies_of_large_images_for_train_and_val(tmp_path):
    large = make_image_folder(tmp_path / "large", size=48)  # training reads 16 / 0.875 = 18 px: 48 is over twice that
    dm = folder_module(large, tmp_path, val_fraction=0.25, test_fraction=0.25)  # data.cache defaults to auto
    dm.setup("fit")
    for i in range(len(dm.datasets["test"])):
        dm.datasets["test"][i]
    assert cache_entries(tmp_path) == [], "the test split reads the original files, as eval.py and predict.py do"
    for split in ("train", "val"):
        for i in range(len(dm.datasets[split])):
            dm.datasets[split][i]
    entries = cache_entries(tmp_path)
    assert len(entries) == len(dm.splits["train"]) + len(dm.splits["val"])
    with Image.open(entries[0]) as entry:
        assert entry.size == (18, 18)


def test_auto_cache_reads_small_images_directly(image_folder, tmp_path):
    dm = folder_module(image_folder, tmp_path)  # 24 px images: a copy at 18 px would save nothing
    dm.setup("fit")
    for i in range(len(dm.datasets["train"])):
        dm.datasets["train"][i]
    assert cache_entries(tmp_path) == []


def test_resized_cache_serves_small_copies(image_folder, tmp_path):
    dm = folder_module(image_folder, tmp_path, cache="resized", image_size=8)
    dm.setup("fit")
    batch, _ = next(iter(dm.val_dataloader()))
    cached = list((tmp_path / "cache" / "resized").rglob("*.*"))
    assert batch.shape[-2:] == (8, 8) and len(cached) == len(batch)


def test_test_fraction_auto_holds_out_a_test_split_when_every_class_has_10_images(image_folder, tmp_path):
    dm = folder_module(image_folder, tmp_path)  # 12 images per class; data.test_fraction defaults to auto
    dm.setup("fit")
    assert {split: len(items) for split, items in dm.splits.items()} == {"train": 24, "val": 6, "test": 6}
    assert dm.has_split("test")


def test_test_fraction_auto_says_plainly_there_is_no_test_split_when_a_class_is_small(tmp_path, caplog):
    root = make_image_folder(tmp_path / "data", per_class=12)
    for extra in sorted((root / "class_1").iterdir())[9:]:
        extra.unlink()  # class_1 keeps 9 images
    dm = folder_module(root, tmp_path)
    dm.setup("fit")
    assert set(dm.splits) == {"train", "val"} and not dm.has_split("test")
    assert "no test split: class 'class_1' in data.root has only 9 image(s)" in caplog.text
    with pytest.raises(RuntimeError, match="no 'test' split"):  # never the val split under the name test
        dm.test_dataloader()
    explicit = folder_module(root, tmp_path / "explicit", test_fraction=0.15, manifest_path=None)
    explicit.setup("fit")
    assert len(explicit.splits["test"]) == 2 + 1 + 2  # a number is honoured as given (15% of 12, 9, 12)


def test_train_folder_without_test_folder_gives_up_a_test_split_too(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root / "train", per_class=20)
    make_image_folder(root / "val", per_class=3, seed=1)
    dm = folder_module(root, tmp_path)
    dm.setup("fit")
    assert {split: len(items) for split, items in dm.splits.items()} == {"train": 51, "val": 9, "test": 9}
    assert all("/train/" in path for path, _ in dm.splits["test"]) and all(
        "/val/" in path for path, _ in dm.splits["val"]
    )


def test_test_fraction_must_be_auto_or_a_fraction(image_folder, tmp_path):
    with pytest.raises(ConfigError, match=r"data.test_fraction='most': use auto or a fraction"):
        folder_module(image_folder, tmp_path, test_fraction="most")
