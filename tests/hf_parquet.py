"""A small Hugging Face dataset on disk for ``data=hf`` tests: parquet files of real digit scans, written offline."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_NAMES = [f"digit_{d}" for d in range(10)]
CORRUPT_ROW = 7  # the train split's row whose image bytes do not decode


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_digits_parquet(folder: Path, train_rows: int = 240, test_rows: int = 60) -> Path:
    """``folder/train-00000-of-00001.parquet`` and ``test-...``: PNG bytes of sklearn digits in an ``Image`` column,
    a ``ClassLabel`` ``label`` column named ``digit_0..9``, and train row ``CORRUPT_ROW`` holding bytes that are no
    image. No validation split: it is held out of train."""
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGIT_NAMES)})
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, rows in (("train", train_rows), ("test", test_rows)):
        images = [{"bytes": png_bytes(p), "path": None} for p in pixels[start : start + rows]]
        if split == "train":
            images[CORRUPT_ROW] = {"bytes": b"these bytes are not an image", "path": None}
        labels = digits.target[start : start + rows].tolist()
        table = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        table.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
        start += rows
    return folder
