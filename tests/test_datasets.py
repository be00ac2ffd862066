"""Any dataset, wrapped in one line, keeps the data-module contract: (index, seed) keys, uint8 CHW, exact epochs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torchvision.transforms import v2

from image_finetune.core.errors import ConfigError, DataError
from image_finetune.data import EpochSampler
from image_finetune.recipe.datasets import DatasetDataModule, SeededDataset


def fake(size: int = 20, transform=None) -> torchvision.datasets.FakeData:
    augment = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(16, scale=(0.2, 1.0)), v2.RandomHorizontalFlip()])
    return torchvision.datasets.FakeData(
        size, (3, 24, 24), num_classes=3, transform=transform or augment, random_offset=7
    )


def test_a_torchvision_dataset_augments_as_a_function_of_the_sample_seed_alone():
    ds = SeededDataset(fake())
    torch.manual_seed(0)
    first = ds[(3, 1234)][0]
    torch.manual_seed(99)  # the caller's RNG state must not matter...
    again = ds[(3, 1234)][0]
    assert torch.equal(first, again) and first.dtype == torch.uint8 and first.shape == (3, 16, 16)
    assert not torch.equal(first, ds[(3, 4321)][0])  # ...but the seed does
    before = torch.get_rng_state()
    ds[(4, 1)]
    assert torch.equal(before, torch.get_rng_state())  # and the caller's stream is left as it was


def test_an_epoch_of_batches_is_the_same_whatever_came_before():
    sampler = EpochSampler(20, seed=5, epoch=2)
    ds = SeededDataset(fake())
    batches = [torch.stack([ds[key][0] for key in sampler]) for _ in range(2)]
    assert torch.equal(*batches)


def test_float_images_are_an_error_that_names_the_fix():
    ds = SeededDataset(fake(transform=v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True)])))
    with pytest.raises(DataError, match=r"FakeData returned a Tensor of torch.float32 image; .*v2\.PILToTensor\(\)"):
        ds[0]


def test_pil_grayscale_and_numpy_images_become_uint8_rgb_chw():
    gray = torchvision.datasets.FakeData(2, (1, 8, 8), num_classes=2, transform=v2.Grayscale())
    assert SeededDataset(gray)[0][0].shape == (3, 8, 8)
    arrays = [(np.zeros((8, 8, 3), np.uint8), 1)]
    assert SeededDataset(arrays)[0][0].shape == (3, 8, 8)  # type: ignore[arg-type]


def test_class_names_come_from_the_dataset_or_the_config():
    with_classes = fake()
    with_classes.classes = ["x", "y", "z"]  # as torchvision's real datasets (CIFAR10, Flowers102, ...) have them
    assert DatasetDataModule(train=with_classes, val=fake(8)).class_names == ["x", "y", "z"]
    with pytest.raises(ConfigError, match=r"data\.class_names is not set and FakeData has no `classes` attribute"):
        DatasetDataModule(train=fake(), val=fake(8))
    module = DatasetDataModule(train=fake(), val=fake(8), class_names=["a", "b", "c"])
    assert module.class_names == ["a", "b", "c"] and set(module.datasets) == {"train", "val"}
