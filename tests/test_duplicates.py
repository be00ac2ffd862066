"""Near duplicates by perceptual hash: a resized, a re-encoded and a mirrored copy of a photo filed in another split
are grouped with it (a leak); different photos, and different parts of one photo, are not. In-process, on scikit-learn's
sample photographs (shipped with the package, no download); the entry is covered by tests/test_find_issues.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_image

from image_finetune.core.errors import ConfigError
from image_finetune.data.preprocessing import eval_transform
from image_finetune.inference.data_issues import near_duplicate_bits
from image_finetune.inference.duplicates import connected_groups, near_duplicate_pairs, perceptual_hashes

SIDE = 64  # eval_transform(64): Resize(73) + CenterCrop(64), an odd margin: a mirrored file comes out shifted 1 px


def as_network_sees(image: Image.Image) -> torch.Tensor:
    return eval_transform(SIDE)(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_altered_copies_across_splits_are_one_leaking_group_and_different_pictures_are_apart():
    china, flower = Image.fromarray(load_sample_image("china.jpg")), Image.fromarray(load_sample_image("flower.jpg"))
    original = china.crop((100, 100, 292, 292))
    files = {  # name -> (picture, split)
        "original": (original, "train"),
        "resized": (original.resize((120, 120), Image.Resampling.BICUBIC), "test"),
        "jpeg": (jpeg(original, 60), "val"),
        "mirrored": (ImageOps.mirror(original), "test"),
        "other_part": (china.crop((300, 200, 492, 392)), "test"),
        "other_photo": (flower.crop((100, 100, 292, 292)), "test"),
    }
    names = list(files)
    hashes = perceptual_hashes(torch.stack([as_network_sees(files[n][0]) for n in names])).numpy()
    groups = connected_groups(len(names), near_duplicate_pairs(hashes, near_duplicate_bits(OmegaConf.create({}))))
    assert [[names[i] for i in g] for g in groups] == [["original", "resized", "jpeg", "mirrored"]]
    assert len({files[names[i]][1] for i in groups[0]}) > 1  # across splits: what write_near_duplicates calls a leak


def test_identical_hashes_only_at_zero_bits_and_a_bad_setting_is_one_line():
    picture = as_network_sees(Image.fromarray(load_sample_image("flower.jpg")))
    hashes = perceptual_hashes(torch.stack([picture, picture.flip(-1), picture.roll(40, dims=-2)])).numpy()
    assert near_duplicate_pairs(hashes, 0) == [(0, 1)]  # the mirror image hashes as the image itself
    with pytest.raises(ConfigError, match=r"^near_duplicate_bits=65: give a whole number of bits from 0 to 64"):
        near_duplicate_bits(OmegaConf.create({"near_duplicate_bits": 65}))
    assert near_duplicate_bits(OmegaConf.create({"near_duplicate_bits": None})) is None
