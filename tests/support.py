"""Shared test settings and data builders (fixtures live in conftest.py)."""

from __future__ import annotations

import csv
import pickle
from collections import Counter
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

# Fast settings for every composed run: tiny images, few batches, no worker processes.
FAST = [
    "trainer=cpu",
    "trainer.log_every_n_steps=1",
    "data.num_workers=0",
    "data.image_size=32",
    "data.batch_size=16",
    "++trainer.enable_model_summary=false",
    "++trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
]


def make_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 24, seed: int = 0) -> Path:
    """Small, learnable JPEG/PNG class folders: each class is a different colour with noise."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array([255 * (c == k % 3) for k in range(3)], dtype=np.float64) * 0.7 + 40 * (c // 3)
        for i in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(pixels).save(folder / f"img_{i:03d}{suffix}")
    return root


def write_digits(folder: Path, per_class: int, classes: int = 3) -> list[tuple[str, str]]:
    """sklearn's handwritten digits 0..classes-1 (0-2) as one flat folder of PNG and JPEG files; (file name, digit) of each."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    folder.mkdir(parents=True)
    written: list[tuple[str, str]] = []
    seen: Counter[int] = Counter()
    for index, (image, digit) in enumerate(zip(pixels, digits.target)):
        if digit >= classes or seen[digit] >= per_class:
            continue
        seen[digit] += 1
        name = f"d{index:04d}{'.png' if len(written) % 2 else '.jpg'}"
        Image.fromarray(image, mode="L").save(folder / name)
        written.append((name, str(digit)))
    return written


def write_table(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    """A CSV file of ``header`` and ``rows`` (``data=csv``'s tables)."""
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_fake_cifar(root: Path) -> Path:
    """Tiny CIFAR-10 batches in the real format (100 training, 30 test images); torchvision accepts them once its
    integrity check is stood in for (``cifar_root`` in conftest.py; ``CIFAR_STANDIN`` for a subprocess)."""
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", 20) for i in range(1, 6)), ("test_batch", 30)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(n)]}
        with open(batches / name, "wb") as f:
            pickle.dump(batch, f)
    with open(batches / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES}, f)
    return root


#: A ``sitecustomize.py`` that does in a subprocess what ``cifar_root`` does in the test's process: the fake batches
#: pass torchvision's integrity check, so ``CIFAR10(root, download=True)`` uses them and never downloads.
CIFAR_STANDIN = """import torchvision.datasets.cifar

torchvision.datasets.cifar.check_integrity = lambda *args, **kwargs: True
"""


#: A tiny timm model (99k parameters, BatchNormAct2d norm layers) with real pretrained weights on the hub.
TIMM_MODEL = "test_efficientnet.r160_in1k"


def seed_hf_cache(cache: Path, model_name: str = TIMM_MODEL) -> Path:
    """Write randomly initialised weights of ``model_name`` where timm's hub loader finds them offline.

    The layout is huggingface_hub's cache (what ``hf_hub_download`` reads with ``HF_HUB_OFFLINE=1``):
    ``models--timm--<name>/refs/main`` holds a commit id, ``snapshots/<commit>/model.safetensors`` the weights
    (timm asks for ``model.safetensors`` first, see ``timm.models._hub.load_state_dict_from_hf``).
    """
    import timm
    from safetensors.torch import save_file

    repo = timm.create_model(model_name, pretrained=False).pretrained_cfg["hf_hub_id"]
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = timm.create_model(model_name, pretrained=False).state_dict()  # with its classifier, as published
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return cache


class FakeFlowers102(torch.utils.data.Dataset):
    """Stands in for ``torchvision.datasets.Flowers102`` (same arguments, PIL images of assorted sizes) offline.

    A subprocess names it on the command line (``data.train._target_=support.FakeFlowers102``, tests/ on PYTHONPATH).
    """

    classes: ClassVar[list[str]] = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]

    def __init__(self, root: str, split: str = "train", transform=None, target_transform=None, download=False) -> None:
        self.split, self.transform = split, transform
        self.n = {"train": 12, "val": 6, "test": 6}[split]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[object, int]:
        generator = torch.Generator().manual_seed(100 * len(self.split) + index)
        size = (300 + 10 * index, 260)
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy()
        image = Image.fromarray(pixels)
        return (self.transform(image) if self.transform else image), index % len(self.classes)


# ---- multi-label: pairs of digits in a data=csv table ----------------------------------------------------------------
LABELS = ["0", "1", "2", "3", "4"]
PAIRS = 110


def write_pairs(root: Path) -> Path:
    """``images/pNNN.png``: two digits side by side, 32x32; ``labels.csv``: ``path,label`` with both digits
    space-separated, a missing file (row 7), a non-image (row 11) and an image with an empty label cell (last row)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    pool = [i for i, digit in enumerate(digits.target) if digit < len(LABELS)]
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for n in range(PAIRS):
        a, b = rng.choice(pool, 2, replace=False)
        tile = np.zeros((16, 16), np.uint8)
        tile[4:12, :8], tile[4:12, 8:] = pixels[a], pixels[b]
        Image.fromarray(tile).resize((32, 32), Image.NEAREST).save(images / f"p{n:03d}.png")
        rows.append([f"images/p{n:03d}.png", " ".join(sorted({str(digits.target[a]), str(digits.target[b])}))])
    rows.insert(5, ["images/gone.png", "1 2"])
    (images / "bad.png").write_bytes(b"not an image")
    rows.insert(9, ["images/bad.png", "3"])
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(images / "blank.png")
    rows.append(["images/blank.png", ""])
    table = root / "labels.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], *rows])
    return table
