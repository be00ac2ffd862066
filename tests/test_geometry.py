"""One geometry for augmentation: every path draws the crops it drew before, from the same per-sample seeds.

The boxes and flips below were recorded from the code before the paths shared one description (``data/transforms.py``);
a refactor that moves a single draw changes them, and with them what a resumed run sees.
"""

from __future__ import annotations

import pytest
import torch
from support import make_image_folder
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from image_finetune.data import CIFAR10DataModule
from image_finetune.data.base import seeded_rngs
from image_finetune.data.device_decode import center_box, crop_resize, decode_crop_batch, random_resized_box
from image_finetune.data.imagefolder import ImageFolderDataModule
from image_finetune.data.preprocessing import Preprocessing
from image_finetune.data.transforms import Augmentation, Geometry, train_transform
from image_finetune.recipe.datasets import DatasetDataModule

SEEDS = (0, 2, 3, 5, 7, 2**40 + 3)
# (top, left, height, width), flip: torchvision's RandomResizedCrop + RandomHorizontalFlip under seeded_rngs(seed)
CPU_60x80 = {  # scale (0.5, 1.0)
    0: ((5, 0, 55, 65), True),
    2: ((5, 15, 51, 65), False),
    3: ((1, 17, 55, 44), True),
    5: ((0, 4, 49, 57), False),
    7: ((0, 12, 60, 66), True),
    2**40 + 3: ((1, 17, 55, 44), True),
}
CPU_10x200 = {seed: ((0, 93, 10, 13), seed == 2) for seed in SEEDS}  # scale (0.9, 1): ten misses, central fallback
# data.decode=gpu: the same math drawn from random.Random(seed), whose first draw is the flip coin; scale (0.35, 1.0)
DEVICE_300x400 = {
    0: ((25, 77, 249, 250), False),
    2: ((94, 78, 200, 243), False),
    3: ((1, 77, 288, 309), True),
    5: ((10, 33, 290, 344), False),
    7: ((9, 137, 222, 242), True),
    2**40 + 3: ((8, 85, 273, 313), True),
}


def picture(height: int, width: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def cropped(image: torch.Tensor, box: tuple[int, int, int, int], size: list[int], flip: bool) -> torch.Tensor:
    out = TF.resized_crop(image, *box, size=size, antialias=True)
    return TF.horizontal_flip(out) if flip else out


def seeded(transform, image: torch.Tensor, seed: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with seeded_rngs(seed):
        return transform(image)


@pytest.mark.parametrize(
    ("shape", "scale", "pins"), [((60, 80), (0.5, 1.0), CPU_60x80), ((10, 200), (0.9, 1.0), CPU_10x200)]
)
def test_cpu_training_crops_are_the_pinned_boxes_of_each_sample_seed(shape, scale, pins):
    image = picture(*shape)
    flipping = train_transform(24, scale, True, Augmentation(name="standard"))
    vetoed = train_transform(24, scale, False, Augmentation(name="standard"))  # data.hflip=false: same boxes, no flip
    for seed, (box, flip) in pins.items():
        assert torch.equal(seeded(flipping, image, seed), cropped(image, box, [24, 24], flip)), seed
        assert torch.equal(seeded(vetoed, image, seed), cropped(image, box, [24, 24], False)), seed


def test_same_size_path_draws_the_cpu_boxes_at_the_images_own_size():
    image = picture(60, 80)

    def training_split(augment: Augmentation):  # type: ignore[no-untyped-def]
        module = DatasetDataModule(
            [(image, 0)], [(image, 0)], class_names=["a"], num_workers=0, augment=augment, crop_scale=(0.5, 1.0)
        )
        return module.datasets["train"]

    standard = training_split(Augmentation(name="standard"))
    for seed, (box, flip) in CPU_60x80.items():
        assert torch.equal(standard[(0, seed)][0], cropped(image, box, [60, 80], flip)), seed
    assert torch.equal(training_split(Augmentation(name="none", random_crop=False, hflip=False))[(0, 3)][0], image)


@pytest.mark.parametrize("hflip", [True, False])
def test_every_preset_draws_exactly_what_torchvision_draws_from_the_sample_seed(hflip):
    """The ops run after crop and flip on the same seeded stream, so they see the same random numbers as before too."""
    image = picture(60, 80)
    ops = [v2.TrivialAugmentWide(), v2.RandomErasing(p=0.25)]
    cases = [
        (Augmentation(name="strong", ops=ops), (0.5, 1.0), "bilinear"),
        (Augmentation(name="light", crop_scale=(0.35, 1.0)), (0.35, 1.0), "bicubic"),
    ]
    for augment, scale, interpolation in cases:
        ours = train_transform(24, (0.5, 1.0), hflip, augment, interpolation=interpolation)
        mode = v2.InterpolationMode(interpolation)
        flip = [v2.RandomHorizontalFlip()] if hflip else []
        stock = v2.Compose([v2.RandomResizedCrop(24, scale=scale, interpolation=mode), *flip, *augment.ops])
        for seed in SEEDS:
            assert torch.equal(seeded(ours, image, seed), seeded(stock, image, seed)), (augment.name, seed)
    for seed in SEEDS:  # augment=none: the eval crop, unflipped
        none = train_transform(24, (0.5, 1.0), hflip, Augmentation(name="none", random_crop=False, hflip=False))
        stock = v2.Compose([v2.Resize(round(24 / 0.875), antialias=True), v2.CenterCrop(24)])
        assert torch.equal(seeded(none, image, seed), stock(image))


def test_device_boxes_are_the_pinned_boxes_of_each_sample_seed():
    for seed, pinned in DEVICE_300x400.items():
        assert random_resized_box(300, 400, seed, (0.35, 1.0)) == pinned, seed
    assert [random_resized_box(10, 200, seed, (0.9, 1.0)) for seed in (0, 1)] == [
        ((0, 93, 10, 13), False),
        ((0, 93, 10, 13), True),
    ]


@pytest.mark.parametrize("hflip", [True, False])
def test_device_crops_cut_the_pinned_boxes(hflip):
    jpeg = encode_jpeg(picture(300, 400), quality=95)
    image = decode_jpeg(jpeg)
    seeds = list(DEVICE_300x400)
    batch = decode_crop_batch([jpeg] * len(seeds), 24, "cpu", train=True, seeds=seeds, scale=(0.35, 1.0), hflip=hflip)
    boxes = [box for box, _ in DEVICE_300x400.values()]
    flips = [flip and hflip for _, flip in DEVICE_300x400.values()]  # the coin is drawn either way: same boxes
    assert torch.equal(batch, crop_resize([image] * len(seeds), boxes, 24, flips))


@pytest.mark.parametrize("hflip", [True, False])
def test_decode_gpu_without_a_random_crop_flips_the_eval_crop_by_the_same_coin(tmp_path, monkeypatch, hflip):
    monkeypatch.setattr("image_finetune.data.imagefolder.require_gpu", lambda: torch.device("cpu"))
    root = make_image_folder(tmp_path / "images", classes=2, per_class=4)
    flip_only = Augmentation(name="flip", random_crop=False, hflip=True)
    module = ImageFolderDataModule(
        root, image_size=24, num_workers=0, test_fraction=0.0, cache=None, decode="gpu", augment=flip_only, hflip=hflip
    )
    module.setup()
    image = picture(300, 400)
    seeds = list(DEVICE_300x400)
    batch = module.device_crops.crop([image] * len(seeds), seeds, train=True)
    flips = [flip and hflip for _, flip in DEVICE_300x400.values()]
    assert torch.equal(batch, crop_resize([image] * len(seeds), [center_box(300, 400, 0.875)] * len(seeds), 24, flips))


def test_each_data_module_builds_one_geometry_and_every_path_reads_it(tmp_path, monkeypatch, cifar_root):
    monkeypatch.setattr("image_finetune.data.imagefolder.require_gpu", lambda: torch.device("cpu"))
    backbone = Preprocessing(size=24, crop_ratio=0.8, interpolation="bicubic")
    folder = ImageFolderDataModule(
        make_image_folder(tmp_path / "images", classes=2, per_class=4), num_workers=0, test_fraction=0.0, cache=None,
        preprocessing=backbone, crop_scale=(0.3, 1.0), hflip=False, augment=Augmentation(name="standard"), decode="gpu",
    )  # fmt: skip
    folder.setup()
    geometry = folder.geometry
    assert geometry == Geometry(24, (0.3, 1.0), crop_ratio=0.8, interpolation="bicubic", hflip=False)
    assert folder.device_crops.geometry is geometry
    cifar = CIFAR10DataModule(cifar_root, num_workers=0, augment=Augmentation(name="standard"))
    assert cifar.geometry == Geometry(32, None, crop_ratio=1.0, hflip=True, pad=4)  # CIFAR's pad-crop, not a resize
    none = CIFAR10DataModule(
        cifar_root, num_workers=0, augment=Augmentation(name="none", random_crop=False, hflip=False)
    )
    assert (none.geometry.pad, none.geometry.hflip) == (0, False)
    image = picture(20, 30)
    same_size = DatasetDataModule([(image, 0)], [(image, 0)], class_names=["a"], num_workers=0, augment=Augmentation())
    assert same_size.datasets["train"][(0, 5)][0].shape == (3, 20, 30)  # the preset at the image's own size
