"""Shared test settings and data builders (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


