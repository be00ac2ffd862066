"""ResizedCache serves the right version of each image at the right size, and never a stale or half-written one."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from messy_folder import BLUE, RED, photo, save
from PIL import Image

from image_finetune.data.cache import ResizedCache


def size_on_disk(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.rglob("*") if p.is_file())


def size_of(pixels: np.ndarray) -> tuple[int, int]:
    """(width, height) of an HxWx3 RGB array, as PIL writes sizes."""
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    return pixels.shape[1], pixels.shape[0]


def assert_size(pixels: np.ndarray, expected: tuple[int, int]) -> None:
    """Short side exact; long side within a pixel (reduced-scale JPEG decoding rounds the source size up)."""
    width, height = size_of(pixels)
    assert min(width, height) == min(expected)
    assert abs(max(width, height) - max(expected)) <= 1 and (width >= height) == (expected[0] >= expected[1])


def assert_colour(pixels: np.ndarray, colour: tuple[int, int, int]) -> None:
    """A flat colour, within JPEG re-encoding's rounding (pure red comes back as 254, 0, 0)."""
    assert np.abs(pixels.astype(int) - np.array(colour)).max() <= 2


def forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the source was decoded although the cache holds it")

    monkeypatch.setattr(ResizedCache, "_fill", fail)


def test_miss_then_hit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = save(photo(), tmp_path / "china.jpg", "JPEG", quality=95)  # 640x427
    cache = ResizedCache(tmp_path / "cache", short_side=160)
    first = cache.load(src)
    assert_size(first, (240, 160))
    (entry,) = entries(tmp_path / "cache")
    assert entry.suffix == ".jpg" and size_on_disk(entry) == size_of(first)

    forbid_decoding(monkeypatch)
    again = cache.load(src)
    np.testing.assert_array_equal(again, first)  # the read that filled the entry saw the stored pixels too
    reference = np.asarray(photo().resize(size_of(first), Image.Resampling.LANCZOS), int)
    assert np.abs(again.astype(int) - reference).mean() < 8  # the whole picture (a crop or a shift scores ~75)


@pytest.mark.parametrize("size", [(50, 40), (1200, 250)])
def test_images_not_larger_than_the_short_side_are_read_from_the_original(
    tmp_path: Path, size: tuple[int, int]
) -> None:
    """Never upscaled, and never re-encoded: a copy would lose quality and read no faster."""
    image = photo().resize(size)
    src = save(image, tmp_path / "small.png")
    cache = ResizedCache(tmp_path / "cache", short_side=256)
    np.testing.assert_array_equal(cache.load(src), np.asarray(image))
    (entry,) = entries(tmp_path / "cache")
    assert entry.suffix == ".orig" and entry.stat().st_size == 0
    np.testing.assert_array_equal(cache.load(src), np.asarray(image))


def test_tiny_copies_are_stored_losslessly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = save(photo(), tmp_path / "china.jpg", "JPEG")
    cache = ResizedCache(tmp_path / "cache", short_side=32)
    first = cache.load(src)
    assert_size(first, (48, 32))
    (entry,) = entries(tmp_path / "cache")
    assert entry.suffix == ".png"
    forbid_decoding(monkeypatch)
    np.testing.assert_array_equal(cache.load(src), first)


def test_a_new_entry_format_never_reads_old_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = save(photo(), tmp_path / "china.jpg", "JPEG")
    cache = ResizedCache(tmp_path / "cache", short_side=200)
    old = cache.entry_stem(src)
    monkeypatch.setattr("image_finetune.data.cache.FORMAT_VERSION", 10**6)
    assert cache.entry_stem(src) != old


def test_changed_source_gets_a_new_entry(tmp_path: Path) -> None:
    src = save(Image.new("RGB", (300, 200), RED), tmp_path / "x.bmp")
    cache = ResizedCache(tmp_path / "cache", short_side=150)
    assert_colour(cache.load(src), RED)
    old = cache.entry_stem(src)

    size = src.stat().st_size
    save(Image.new("RGB", (300, 200), BLUE), src)  # same name, same size (BMP): only mtime tells them apart
    st = src.stat()
    assert st.st_size == size
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cache.entry_stem(src) != old
    assert_colour(cache.load(src), BLUE)
    assert len(entries(tmp_path / "cache")) == 2


def test_other_short_side_gets_a_new_entry(tmp_path: Path) -> None:
    src = save(photo(), tmp_path / "china.jpg", "JPEG")
    assert_size(ResizedCache(tmp_path / "cache", 200).load(src), (300, 200))
    assert_size(ResizedCache(tmp_path / "cache", 300).load(src), (450, 300))
    sizes = sorted(min(size_on_disk(p)) for p in entries(tmp_path / "cache"))
    assert sizes == [200, 300]


def test_symlink_and_target_share_an_entry(tmp_path: Path) -> None:
    src = save(photo(), tmp_path / "china.jpg", "JPEG")
    os.symlink(src, tmp_path / "link.jpg")
    cache = ResizedCache(tmp_path / "cache", 200)
    assert cache.entry_stem(src) == cache.entry_stem(tmp_path / "link.jpg")


def test_damaged_entry_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = save(photo(), tmp_path / "china.jpg", "JPEG")
    cache = ResizedCache(tmp_path / "cache", 200)
    cache.load(src)
    (entry,) = entries(tmp_path / "cache")
    entry.write_bytes(entry.read_bytes()[:100])
    assert_size(cache.load(src), (300, 200))
    assert "re-creating unreadable cache entry" in caplog.text
    assert min(size_on_disk(entry)) == 200
    assert [p.name for p in entries(tmp_path / "cache")] == [entry.name]  # no temp files left behind


def test_unwritable_cache_still_returns_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = save(photo(), tmp_path / "china.jpg", "JPEG")
    (tmp_path / "blocker").write_text("a file where the cache folder should be")
    cache = ResizedCache(tmp_path / "blocker", 200)
    assert_size(cache.load(src), (300, 200))
    assert_size(cache.load(src), (300, 200))
    assert "unreadable cache entry" not in caplog.text
    assert caplog.text.count("cannot write to image cache") == 1


def test_short_side_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="short_side"):
        ResizedCache(tmp_path, 0)
