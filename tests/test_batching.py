"""The small-data batch rule: a tiny dataset gets enough optimizer steps per epoch and never loses most of an epoch."""

from __future__ import annotations

import math

import pytest
import torch
from support import FAST, make_image_folder

from image_finetune.data import EpochSampler, ImageFolderDataModule
from image_finetune.data.base import train_batching
from image_finetune.training.train import train


def steps_and_dropped(n: int, batch_size: int, min_steps: int = 8) -> tuple[int, int, int]:
    size, drop_last = train_batching(n, batch_size, min_steps)
    return size, (n // size if drop_last else math.ceil(n / size)), (n % size if drop_last else 0)


@pytest.mark.parametrize(
    ("n", "batch_size", "expected"),
    [
        (100, 64, (12, 9, 0)),  # issue 10: was one step of 64 with 36 images dropped, every epoch
        (50, 64, (6, 9, 0)),  # 8 batches of 6 and one of 2
        (1400, 64, (64, 22, 0)),  # large data keeps the configured batch size; the last batch of 56 is kept
        (1030, 64, (64, 16, 6)),  # a last batch of 6 (under a quarter of 64) is dropped
        (45000, 256, (256, 176, 0)),
    ],
)
def test_small_datasets_get_smaller_batches_and_large_ones_keep_theirs(n, batch_size, expected):
    assert steps_and_dropped(n, batch_size) == expected


@pytest.mark.parametrize("n", [2, 3, 7, 9, 16, 17, 50, 99, 100, 101, 250, 333, 1000, 1400, 4097])
@pytest.mark.parametrize("batch_size", [2, 16, 32, 64, 256])
def test_every_epoch_has_min_steps_and_drops_at_most_a_sliver(n, batch_size):
    size, steps, dropped = steps_and_dropped(n, batch_size)
    assert 2 <= size <= batch_size
    assert steps >= min(8, n // 2), "a small dataset still gets min_steps_per_epoch optimizer steps"
    assert dropped <= max(1, size // 4), "only a tiny last batch is ever dropped"
    assert n - dropped - (steps - 1) * size >= min(2, n), (
        "never a last batch of one image (BatchNorm cannot train on it)"
    )


def test_ddp_ranks_take_the_same_number_of_steps():
    for world in (2, 3, 4):
        counts = set()
        for rank in range(world):
            sampler = EpochSampler(101, seed=0, num_replicas=world, rank=rank)
            counts.add(steps_and_dropped(len(sampler), 64)[1])
        assert len(counts) == 1 and counts.pop() >= 8


def test_the_loader_of_a_100_image_folder_at_batch_64_has_4_or_more_batches_covering_every_image(tmp_path):
    make_image_folder(tmp_path / "data" / "train", classes=5, per_class=20, size=16)
    make_image_folder(tmp_path / "data" / "val", classes=5, per_class=2, size=16)
    dm = ImageFolderDataModule(
        tmp_path / "data",
        image_size=16,
        batch_size=64,
        num_workers=0,
        cache=None,
        cache_dir=tmp_path / "cache",
        test_fraction=0,
    )  # fmt: skip  (all 100 images train)
    dm.setup("fit")
    batches = [labels.numel() for _, labels in dm.train_dataloader()]
    assert len(batches) >= 4 and sum(batches) == 100  # the default data.min_steps_per_epoch


def test_training_100_images_at_batch_64_takes_4_or_more_optimizer_steps_per_epoch(pretrained, compose_cfg, tmp_path):
    make_image_folder(tmp_path / "images" / "train", classes=5, per_class=20, size=16)
    make_image_folder(tmp_path / "images" / "val", classes=5, per_class=2, size=16)
    cfg = compose_cfg("data=imagefolder", f"data.root={tmp_path / 'images'}", *FAST, "data.batch_size=64", "data.cache=null",
                      "trainer.max_epochs=1", "finetune.freeze_epochs=1", "test=false", "data.test_fraction=0")  # fmt: skip
    train(cfg)
    last = torch.load(
        tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )  # end of epoch 1, the run's only epoch
    assert last["epoch"] == 0 and last["global_step"] >= 4, f"{last['global_step']} optimizer step(s) in the epoch"
