"""A dataset over scanned (path, label) pairs that never lets one bad file end a training run, and its file reader
(the original file, or its resized copy in the cache)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from image_finetune.core.errors import DataError
from image_finetune.data.base import seeded_rngs
from image_finetune.data.cache import ResizedCache
from image_finetune.data.decode import decode_rgb, to_uint8_tensor
from image_finetune.data.scan import failure_reason

log = logging.getLogger(__name__)


class ImageLoader:
    """path -> HxWx3 uint8 RGB array for DataLoader workers; a plain class (not a closure) so it pickles under spawn."""

    def __init__(self, min_size: int | None = None, cache: ResizedCache | None = None) -> None:
        self.min_size = min_size
        self.cache = cache

    def __call__(self, path: str) -> np.ndarray:
        if self.cache is not None:
            return self.cache.load(path)
        return decode_rgb(path, min_size=self.min_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_size={self.min_size}, cache={self.cache!r})"


class ImageFileDataset(Dataset):
    """Map-style dataset: `ds[i]` or `ds[(i, seed)]` -> (uint8 CHW image after `transform`, label).

    With a seed, augmentation is a pure function of (seed, index) whatever the number of workers: the global torch,
    random and numpy generators are seeded just for the transform and restored afterwards, so the caller's own random
    stream (dropout, shuffling in the main process) is not disturbed. A file that stopped loading after the scan is
    logged once, recorded in `failures`, and replaced by the next index that loads (same seed).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable[[torch.Tensor], torch.Tensor] | None,
        loader: Callable[[str], np.ndarray | Image.Image | torch.Tensor],
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.loader = loader
        self.failures: list[tuple[str, str]] = []
        self._failed: set[str] = set()
        self.targets: Mapping[str, torch.Tensor] | None = None
        """Multi-label data (``data=csv``): path -> multi-hot target, returned instead of the sample's label."""

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int | torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        loaded, label, path = self.load(index)
        # A loader that returns a tensor has made its own layout (``data.decode=gpu``: JPEG bytes); arrays become CHW.
        image = loaded if isinstance(loaded, torch.Tensor) else to_uint8_tensor(loaded, channels_last=True)
        if self.transform is not None:
            image = self._transform(image, seed)
        return image.contiguous(), (label if self.targets is None else self.targets[path])

    def load(self, index: int) -> tuple[np.ndarray | Image.Image | torch.Tensor, int, str]:
        """What the loader makes of sample ``index`` (or of the next one that loads), its label and its path."""
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        for step in range(n):
            path, label = self.samples[(index + step) % n]
            try:
                return self.loader(path), label, path
            except Exception as e:  # whatever broke the file, the run goes on with the next sample
                self.record_failure(path, e)
        raise DataError(
            f"None of the {n:,} images could be loaded (first failure: {self.failures[0][0]}: {self.failures[0][1]}). "
            "The files changed since the scan; check that the data folder is still mounted and readable."
        )

    def _transform(self, image: torch.Tensor, seed: int | None) -> torch.Tensor:
        assert self.transform is not None
        if seed is None:
            return self.transform(image)
        with seeded_rngs(seed):
            return self.transform(image)

    def record_failure(self, path: str, error: Exception) -> None:
        if path in self._failed:
            return
        self._failed.add(path)
        reason = failure_reason(error)
        self.failures.append((path, reason))
        log.warning("skipping %s, which no longer loads (%s: %s); using the next image instead", path, reason, error)
