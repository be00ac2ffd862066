"""Pay for decoding big photos once: keep a copy of each image already shrunk to the size training needs.

Worth it when the source images are much larger than the crops (camera photos, 12+ MP) and the dataset is read for
many epochs; the first epoch fills the cache, later ones decode small files.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image
from torchvision.transforms.v2 import functional as F

from image_finetune.core.atomic import atomic_path
from image_finetune.data.decode import decode_rgb, stored_short_side, to_uint8_tensor

log = logging.getLogger(__name__)

JPEG_QUALITY = 93
# Below this many pixels a picture is stored losslessly: JPEG's 8x8 blocks and chroma subsampling are a visible share
# of a tiny image, and a tiny PNG costs little disk.
PNG_MAX_PIXELS = 128 * 128
# Part of every key: bump it whenever entries are made differently (resize kernel, encoder), so no run ever reads
# copies made the old way.
FORMAT_VERSION = 2
# ".orig" is an empty marker for an image already no larger than short_side: a copy would only lose quality (JPEG)
# or read no faster (same pixel count), so the original is decoded instead.
_SUFFIXES = (".jpg", ".png", ".orig")


class ResizedCache:
    """Images resized so their short side is `short_side` (never upscaled), one file per (source version, short_side).

    The key hashes the resolved source path, its size and mtime_ns, short_side and ``FORMAT_VERSION``: an edited
    source or a new short_side simply gets a new entry and the stale one is never read again (delete the folder to
    reclaim space). Entries are written to a temp file and renamed, so DataLoader workers racing on one image never
    read half a file. Every read of an entry, the one that fills it included, returns the same pixels, so an epoch
    does not depend on whether the cache was warm.
    """

    def __init__(self, cache_dir: str | Path, short_side: int, interpolation: str = "bilinear") -> None:
        if short_side < 1:
            raise ValueError(f"short_side must be a positive number of pixels, got {short_side}")
        self.cache_dir = Path(cache_dir).expanduser()
        self.short_side = short_side
        self.interpolation = interpolation  # the backbone's resize kernel (timm's are mostly bicubic)
        self._write_failed = False
        self._read_failed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.cache_dir)!r}, short_side={self.short_side})"

    def entry_stem(self, path: str | Path) -> Path:
        """Cache path of `path` without its suffix (.jpg, .png or the .orig marker, chosen when the entry is written)."""
        real = os.path.realpath(path)
        st = os.stat(real)
        fields: tuple[object, ...] = (FORMAT_VERSION, real, st.st_size, st.st_mtime_ns, self.short_side)
        if self.interpolation != "bilinear":  # bilinear entries keep the keys they had before kernels were a choice
            fields += (self.interpolation,)
        key = hashlib.sha256("\0".join(map(str, fields)).encode()).hexdigest()[:32]
        return self.cache_dir / key[:2] / key

    def load(self, path: str | Path) -> np.ndarray:
        """HxWx3 uint8 RGB pixels from the cache, decoding and storing the source on a miss or an unreadable entry."""
        stem = self.entry_stem(path)
        for suffix in _SUFFIXES:
            entry = stem.with_suffix(suffix)
            try:
                data = entry.read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                return self._refill(path, stem, entry, e)
            if suffix == ".orig":  # the marker: read the source, whose errors are its own
                return decode_rgb(path, min_size=self.short_side)
            try:
                return _decode_entry(data, suffix)
            except Exception as e:  # a damaged entry is a miss, not a training crash
                return self._refill(path, stem, entry, e)
        return self._fill(path, stem)

    def _refill(self, path: str | Path, stem: Path, entry: Path, error: Exception) -> np.ndarray:
        if not self._read_failed:  # once per worker: an unreadable cache folder would say it for every image
            log.warning("re-creating unreadable cache entry %s (%s)", entry, error)
            self._read_failed = True
        return self._fill(path, stem)

    def _fill(self, path: str | Path, stem: Path) -> np.ndarray:
        """Decode the source, shrink and store it, and return exactly what later reads of the entry will return.

        A fill costs about what one uncached read does: decoding the source dominates; encoding the copy and decoding
        it back (so this epoch sees the stored pixels, not the pre-encoding ones) costs ~1 ms at 256 px.
        """
        decoded = decode_rgb(path, min_size=self.short_side)
        pixels = shrink(decoded, self.short_side, self.interpolation)
        if pixels is decoded and stored_short_side(path) <= self.short_side:
            # Not larger than the copy would be (not even before a reduced-scale JPEG decode): read the original.
            self._store(b"", stem.with_suffix(".orig"))
            return pixels
        height, width = pixels.shape[:2]
        suffix = ".png" if width * height <= PNG_MAX_PIXELS else ".jpg"
        try:
            data = _encode_entry(pixels, suffix)
        except ValueError as e:  # what libjpeg-turbo cannot encode (a side over 65,535 px) is read from its source
            log.debug("not caching %s: %s", path, e)
            self._store(b"", stem.with_suffix(".orig"))
            return decoded
        self._store(data, stem.with_suffix(suffix))
        return _decode_entry(data, suffix)

    def _store(self, data: bytes, entry: Path) -> None:
        try:
            with atomic_path(entry) as tmp:
                tmp.write_bytes(data)
        except OSError as e:  # a full or read-only disk slows training down; it must not stop it
            if not self._write_failed:
                log.warning("cannot write to image cache %s (%s); decoding from source instead", self.cache_dir, e)
                self._write_failed = True


def _encode_entry(pixels: np.ndarray, suffix: str) -> bytes:
    if suffix == ".png":
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        return buffer.getvalue()
    return simplejpeg.encode_jpeg(pixels, quality=JPEG_QUALITY, colorspace="RGB", colorsubsampling="444")


def _decode_entry(data: bytes, suffix: str) -> np.ndarray:
    """An entry's pixels. Entries are our own plain RGB files (no EXIF, no alpha), so no need for ``decode_rgb``'s
    header parsing (a sixth of the read time of a 45 KB copy); the one decoder for fills and reads alike."""
    if suffix == ".jpg":
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


def shrink(pixels: np.ndarray, short_side: int, interpolation: str = "bilinear") -> np.ndarray:
    """Resize HxWx3 pixels so the short side is `short_side` (never upscaling), with the eval transform's resize.

    The same kernel (torchvision's antialiased ``interpolation`` on uint8) as ``eval_transform``'s ``Resize``, so a
    cached copy differs from what evaluation computes from the original only by the JPEG re-encoding.
    """
    if min(pixels.shape[:2]) <= short_side:
        return pixels
    mode = F.InterpolationMode(interpolation)
    resized = F.resize(to_uint8_tensor(pixels, channels_last=True), [short_side], interpolation=mode, antialias=True)
    return resized.permute(1, 2, 0).contiguous().numpy()
