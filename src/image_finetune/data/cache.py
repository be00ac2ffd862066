"""Pay for decoding big photos once: keep a copy of each image already shrunk to the size training needs.

Worth it when the source images are much larger than the crops (camera photos, 12+ MP) and the dataset is read for
many epochs; the first epoch fills the cache, later ones decode small files.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from PIL import Image

from image_finetune.atomic import atomic_path
from image_finetune.data.decode import load_rgb

log = logging.getLogger(__name__)

JPEG_QUALITY = 93
# Below this many pixels a picture is stored losslessly: JPEG's 8x8 blocks and chroma subsampling are a visible share
# of a tiny image, and a tiny PNG costs little disk.
PNG_MAX_PIXELS = 128 * 128
_SUFFIXES = (".jpg", ".png")


class ResizedCache:
    """Images resized so their short side is `short_side` (never upscaled), one file per (source version, short_side).

    The key hashes the resolved source path, its size and mtime_ns, and short_side: an edited source or a new
    short_side simply gets a new entry and the stale one is never read again (delete the folder to reclaim space).
    Entries are written to a temp file and renamed, so DataLoader workers racing on one image never read half a file.
    """

    def __init__(self, cache_dir: str | Path, short_side: int) -> None:
        if short_side < 1:
            raise ValueError(f"short_side must be a positive number of pixels, got {short_side}")
        self.cache_dir = Path(cache_dir).expanduser()
        self.short_side = short_side
        self._write_failed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.cache_dir)!r}, short_side={self.short_side})"

    def entry_stem(self, path: str | Path) -> Path:
        """Cache path of `path` without its suffix (.jpg or .png, chosen when the entry is written)."""
        real = os.path.realpath(path)
        st = os.stat(real)
        key = hashlib.sha256(f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{self.short_side}".encode()).hexdigest()[:32]
        return self.cache_dir / key[:2] / key

    def load(self, path: str | Path) -> Image.Image:
        """RGB image from the cache, decoding and storing the source on a miss or an unreadable entry."""
        stem = self.entry_stem(path)
        for suffix in _SUFFIXES:
            entry = stem.with_suffix(suffix)
            try:
                with open(entry, "rb") as f:
                    im = Image.open(f)
                    im.load()
                return im if im.mode == "RGB" else im.convert("RGB")
            except (FileNotFoundError, NotADirectoryError):
                continue
            except Exception as e:  # a damaged entry is a miss, not a training crash
                log.warning("re-creating unreadable cache entry %s (%s)", entry, e)
                break
        im = self._resize(load_rgb(path, min_size=self.short_side))
        self._store(im, stem)
        return im

    def _resize(self, im: Image.Image) -> Image.Image:
        w, h = im.size
        short = min(w, h)
        if short <= self.short_side:
            return im
        if w <= h:
            size = (self.short_side, max(1, round(h * self.short_side / w)))
        else:
            size = (max(1, round(w * self.short_side / h)), self.short_side)
        return im.resize(size, Image.Resampling.LANCZOS)

    def _store(self, im: Image.Image, stem: Path) -> None:
        small = im.width * im.height <= PNG_MAX_PIXELS
        entry = stem.with_suffix(".png" if small else ".jpg")
        try:
            with atomic_path(entry) as tmp:
                if small:
                    im.save(tmp, "PNG")
                else:
                    im.save(tmp, "JPEG", quality=JPEG_QUALITY, subsampling="4:4:4")
        except OSError as e:  # a full or read-only disk slows training down; it must not stop it
            if not self._write_failed:
                log.warning("cannot write to image cache %s (%s); decoding from source instead", self.cache_dir, e)
                self._write_failed = True
