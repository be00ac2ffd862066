"""Builders for image files and a class folder holding one of each bad and odd case users have on disk."""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sklearn.datasets
from PIL import Image

PHOTOS = Path(sklearn.datasets.__file__).parent / "images"  # china.jpg and flower.jpg, 427x640 real photos
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def photo(name: str = "china") -> Image.Image:
    with Image.open(PHOTOS / f"{name}.jpg") as im:
        return im.convert("RGB")


def save(im: Image.Image, path: Path, fmt: str | None = None, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kwargs)
    return path


def gradient16(path: Path, top: int) -> np.ndarray:
    """A 16-bit greyscale gradient from 0 to `top` (4095 for 12-bit data, 65535 for full 16-bit); returns the values."""
    values = np.linspace(0, top, 64 * 32).round().astype(np.uint16).reshape(32, 64)
    save(Image.fromarray(values), path)
    return values


def exif_rotated_jpeg(path: Path, size: tuple[int, int] = (60, 40), orientation: int = 6) -> Path:
    """A grey JPEG stored with a red 10x10 block in its top-left corner and an EXIF orientation tag."""
    im = Image.new("RGB", size, (128, 128, 128))
    im.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(im, path, "JPEG", quality=95, exif=exif.tobytes())


def rgba_png(path: Path) -> Path:
    """Left half opaque green, right half fully transparent red (nobody should see it), one half-alpha black pixel."""
    arr = np.zeros((20, 20, 4), np.uint8)
    arr[:, :10] = (*GREEN, 255)
    arr[:, 10:] = (*RED, 0)
    arr[0, 0] = (0, 0, 0, 128)
    return save(Image.fromarray(arr, "RGBA"), path)


def palette_png(path: Path) -> Path:
    """Palette image: index 0 transparent, index 1 blue (left half)."""
    im = Image.new("P", (20, 20), 0)
    im.putpalette([*RED, *BLUE] + [0] * 762)
    im.paste(1, (0, 0, 10, 20))
    return save(im, path, transparency=0)


def two_frame_gif(path: Path) -> Path:
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    return save(frames[0], path, save_all=True, append_images=frames[1:], duration=100)


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A valid PNG header claiming side x side pixels: far past Pillow's decompression-bomb limit, tiny on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def truncated_jpeg(path: Path) -> Path:
    data = (PHOTOS / "china.jpg").read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def jpeg_bytes(im: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


@dataclass
class MessyFolder:
    root: Path
    kept: dict[str, str] = field(default_factory=dict)  # path -> class name
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason kind

    def good(self, path: Path, cls: str) -> None:
        self.kept[str(path)] = cls

    def bad(self, path: Path, kind: str) -> None:
        self.skipped[str(path)] = kind


def make_messy_folder(base: Path) -> MessyFolder:
    """`base/data` with classes cats, dogs and birds (a symlinked folder), plus every kind of junk beside them."""
    root = base / "data"
    m = MessyFolder(root)
    cats, dogs = root / "cats", root / "dogs"
    small = photo().resize((64, 43))

    cats.mkdir(parents=True)
    shutil.copy(PHOTOS / "china.jpg", cats / "china.jpg")  # real camera-encoder bytes, not a Pillow re-encode
    m.good(cats / "china.jpg", "cats")
    m.good(save(small, cats / "upper.JPG", "JPEG"), "cats")
    m.good(save(small, cats / "mixed.Jpeg", "JPEG"), "cats")
    m.good(save(Image.new("L", (20, 20), 77), cats / "gray.png"), "cats")
    m.good(palette_png(cats / "palette.png"), "cats")
    m.good(save(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), cats / "cmyk.jpg", "JPEG"), "cats")
    m.good(rgba_png(cats / "rgba.png"), "cats")
    gradient16(cats / "deep16.png", 4095)
    m.good(cats / "deep16.png", "cats")
    gradient16(cats / "deep16.tif", 65535)
    m.good(cats / "deep16.tif", "cats")
    m.good(exif_rotated_jpeg(cats / "rotated.jpg"), "cats")
    m.good(save(small, cats / "photo.webp", "WEBP"), "cats")
    m.good(save(small, cats / "photo.bmp", "BMP"), "cats")
    m.good(save(small, cats / "photo.tiff", "TIFF"), "cats")
    m.good(two_frame_gif(cats / "anim.gif"), "cats")
    m.good(save(small, cats / "nested" / "deeper.png"), "cats")

    m.bad(save(small, cats / ".hidden.jpg", "JPEG"), "hidden")
    (cats / "._china.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 64)
    m.bad(cats / "._china.jpg", "hidden")
    (cats / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 64)
    m.bad(cats / ".DS_Store", "hidden")
    (cats / "notes.txt").write_text("labelled by Bob\n")
    m.bad(cats / "notes.txt", "unsupported extension")
    (cats / "fake.jpg").write_text("this is not a JPEG\n")
    m.bad(cats / "fake.jpg", "not an image")
    (cats / "empty.png").write_bytes(b"")
    m.bad(cats / "empty.png", "empty file")
    m.bad(truncated_jpeg(cats / "cut.jpg"), "truncated")
    webp = save(photo(), cats / "cut.webp", "WEBP").read_bytes()
    (cats / "cut.webp").write_bytes(webp[: len(webp) // 2])
    m.bad(cats / "cut.webp", "truncated")
    m.bad(bomb_png(cats / "bomb.png"), "too large (decompression bomb)")
    m.bad(save(small, cats / "icon.png", "ICO"), "unsupported format")
    os.symlink(root / "nowhere.jpg", cats / "dangling.jpg")
    m.bad(cats / "dangling.jpg", "broken symlink")

    m.good(save(photo("flower"), dogs / "flower.jpg", "JPEG", quality=90), "dogs")
    os.symlink(dogs / "flower.jpg", cats / "flower-link.jpg")  # the same real file reached twice
    m.bad(cats / "flower-link.jpg", "duplicate")
    outside = save(small, base / "elsewhere" / "shared.png")
    os.symlink(outside, dogs / "shared-link.png")  # a symlinked file whose target is outside the tree
    m.good(dogs / "shared-link.png", "dogs")

    birds_real = base / "external" / "birds"
    save(small, birds_real / "bird.jpg", "JPEG")
    os.symlink(birds_real, root / "birds", target_is_directory=True)
    m.good(root / "birds" / "bird.jpg", "birds")

    save(small, root / ".ipynb_checkpoints" / "china-checkpoint.jpg", "JPEG")
    m.bad(root / ".ipynb_checkpoints", "hidden")
    save(small, root / "__MACOSX" / "cats" / "._china.jpg", "JPEG")
    m.bad(root / "__MACOSX", "hidden")
    m.bad(save(small, root / "stray.jpg", "JPEG"), "not in a class folder")
    return m
