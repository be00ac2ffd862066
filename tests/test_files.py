"""ImageFileDataset: augmentation depends on (seed, index) only; a file that breaks mid-run costs one warning."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from messy_folder import photo, save
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from image_finetune.core.errors import DataError
from image_finetune.data.files import ImageFileDataset, ImageLoader
from image_finetune.data.scan import scan_image_folder

AUGMENT = v2.Compose([v2.RandomResizedCrop(24, antialias=True), v2.RandomHorizontalFlip()])


@pytest.fixture
def samples(tmp_path: Path) -> list[tuple[str, int]]:
    """Six distinct photo crops in two classes, as the scan returns them."""
    full = photo()
    for i in range(6):
        save(full.crop((i * 60, 0, i * 60 + 96, 64)), tmp_path / "data" / f"c{i % 2}" / f"{i}.png")
    return scan_image_folder(tmp_path / "data").samples


def truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def test_items_are_uint8_chw_with_labels(samples: list[tuple[str, int]]) -> None:
    ds = ImageFileDataset(samples, transform=None, loader=ImageLoader())
    image, label = ds[3]
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 96) and image.is_contiguous()
    assert label == samples[3][1]
    cropped = ImageFileDataset(samples, transform=v2.CenterCrop(32), loader=ImageLoader())[(3, 0)][0]
    assert cropped.shape == (3, 32, 32) and cropped.is_contiguous()
    assert torch.equal(cropped, image[:, 16:48, 32:64])


def test_broken_file_is_replaced_by_the_next_and_recorded(
    samples: list[tuple[str, int]], caplog: pytest.LogCaptureFixture
) -> None:
    ds = ImageFileDataset(samples, transform=None, loader=ImageLoader())
    expected = [ds[i] for i in range(len(ds))]
    truncate(samples[1][0])  # the file breaks after the scan
    truncate(samples[-1][0])  # and the last one, so the search has to wrap round
    caplog.set_level(logging.WARNING)
    for _ in range(2):  # two epochs: still one warning per file
        got = [(img[0], int(label[0])) for img, label in DataLoader(ds, batch_size=1, num_workers=0)]
        assert len(got) == len(samples)
        for i, j in [(0, 0), (1, 2), (2, 2), (5, 0)]:
            assert torch.equal(got[i][0], expected[j][0]) and got[i][1] == expected[j][1]
    assert ds.failures == [(samples[1][0], "truncated"), (samples[-1][0], "truncated")]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and samples[1][0] in warnings[0].getMessage()


def test_nothing_loads(samples: list[tuple[str, int]]) -> None:
    for path, _ in samples:
        Path(path).write_text("gone")
    with pytest.raises(DataError, match="None of the 6 images could be loaded"):
        ImageFileDataset(samples, transform=None, loader=ImageLoader())[0]


def test_seeded_augmentation_is_repeatable_and_leaves_global_rng_alone(samples: list[tuple[str, int]]) -> None:
    ds = ImageFileDataset(samples, transform=AUGMENT, loader=ImageLoader())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    a, b, c = ds[(2, 123)][0], ds[(2, 123)][0], ds[(2, 124)][0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), states[0])  # the training loop's own random stream is untouched
    assert random.getstate() == states[1]
    assert (np.random.get_state()[1] == states[2]).all()


def test_augmentation_does_not_depend_on_worker_count(samples: list[tuple[str, int]]) -> None:
    ds = ImageFileDataset(samples, transform=AUGMENT, loader=ImageLoader())
    keyed = [(i, 1000 + i) for i in range(len(ds))]

    def run(workers: int) -> torch.Tensor:
        batches = DataLoader(ds, sampler=keyed, batch_size=2, num_workers=workers)
        return torch.cat([images for images, _ in batches])

    serial = run(0)
    assert torch.equal(serial, run(2))
