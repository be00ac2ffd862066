"""The offline default: scikit-learn's 1,797 real 8x8 scans of handwritten digits, written once as an image folder.

Going through ``ImageFolderDataModule`` means the offline demo exercises exactly the code a user's own folder does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from image_finetune.data.imagefolder import ImageFolderDataModule


def write_digits_folder(root: str | os.PathLike) -> Path:
    """Write ``root/<digit>/<index>.png`` once; the folder appears atomically, so a killed run never leaves half of it."""
    from sklearn.datasets import load_digits  # test/offline dependency, imported only when the demo data is needed

    root = Path(root).expanduser()
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=root.parent))
    try:
        pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 17 grey levels -> 8 bit
        for index, (image, label) in enumerate(zip(pixels, digits.target)):
            folder = staging / str(label)
            folder.mkdir(exist_ok=True)
            Image.fromarray(image, mode="L").save(folder / f"{index:04d}.png")
        os.replace(staging, root)
    except OSError:
        if root.is_dir():  # another process won the race; its copy is identical
            return root
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


class DigitsDataModule(ImageFolderDataModule):
    """``ImageFolderDataModule`` over the digits folder, which it writes in ``prepare_data`` (once, on one process)."""

    root_created_by_prepare_data = True

    def prepare_data(self) -> None:
        write_digits_folder(self.root)
