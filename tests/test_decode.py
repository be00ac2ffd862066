"""load_rgb must show the picture a person would see, whatever odd mode or orientation the file is stored in."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from messy_folder import (
    BLUE,
    GREEN,
    RED,
    exif_rotated_jpeg,
    gradient16,
    palette_png,
    photo,
    rgba_png,
    save,
    truncated_jpeg,
    two_frame_gif,
)
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from image_finetune.data import decode
from image_finetune.data.cache import ResizedCache
from image_finetune.data.decode import BACKGROUND, decode_rgb, load_rgb, to_rgb, to_uint8_tensor
from image_finetune.data.files import ImageLoader


def pixels(path: Path, **kwargs: object) -> np.ndarray:
    im = load_rgb(path, **kwargs)
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


@pytest.mark.parametrize(("fmt", "suffix"), [("PNG", ".png"), ("WEBP", ".webp"), ("BMP", ".bmp"), ("TIFF", ".tif")])
def test_lossless_formats_decode_exactly(tmp_path: Path, fmt: str, suffix: str) -> None:
    src = photo().resize((40, 30))
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    out = pixels(save(src, tmp_path / f"x{suffix}", fmt, **kwargs))
    np.testing.assert_array_equal(out, np.asarray(src))


@pytest.mark.parametrize("suffix", [".jpg", ".JPG", ".Jpeg"])
def test_jpeg_any_extension_case(tmp_path: Path, suffix: str) -> None:
    src = photo().resize((64, 48))
    out = pixels(save(src, tmp_path / f"x{suffix}", "JPEG", quality=95))
    assert out.shape == (48, 64, 3)
    assert np.abs(out - np.asarray(src)).mean() < 4


def test_grayscale_becomes_equal_channels(tmp_path: Path) -> None:
    out = pixels(save(Image.new("L", (8, 8), 77), tmp_path / "g.png"))
    assert (out == 77).all()


def test_cmyk_jpeg_keeps_its_colour(tmp_path: Path) -> None:
    out = pixels(save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "c.jpg", "JPEG", quality=95))
    assert np.abs(out - RED).max() <= 3


def test_rgba_is_composited_on_background_not_hidden_colour(tmp_path: Path) -> None:
    out = pixels(rgba_png(tmp_path / "a.png"))
    assert (out[1:, :10] == GREEN).all()
    assert (out[:, 10:] == (255, 255, 255)).all()  # white, not the red stored under alpha 0 that nobody ever saw
    half = np.array(BACKGROUND) * (1 - 128 / 255)
    assert np.abs(out[0, 0] - half).max() <= 1


def test_palette_with_transparency(tmp_path: Path) -> None:
    out = pixels(palette_png(tmp_path / "p.png"))
    assert (out[:, :10] == BLUE).all()
    assert (out[:, 10:] == BACKGROUND).all()


def test_palette_without_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (4, 4), 1)
    im.putpalette([*RED, *BLUE] + [0] * 762)
    assert (pixels(save(im, tmp_path / "p.bmp", "BMP")) == BLUE).all()


@pytest.mark.parametrize(("suffix", "top"), [(".png", 4095), (".png", 65535), (".tif", 65535), (".tif", 4095)])
def test_16_bit_scaled_by_bit_depth(tmp_path: Path, suffix: str, top: int) -> None:
    values = gradient16(tmp_path / f"deep{suffix}", top)
    with Image.open(tmp_path / f"deep{suffix}") as stored:
        assert stored.mode.startswith("I;16")
    out = pixels(tmp_path / f"deep{suffix}")
    expected = np.rint(values.astype(float) * 255 / top)
    assert (out == expected[..., None]).all()
    assert (out == 255).mean() < 0.01  # the failure this guards against: Pillow's convert("RGB") clips to all white


def test_16_bit_dark_image_is_not_stretched_beyond_its_depth(tmp_path: Path) -> None:
    save(Image.fromarray(np.full((4, 4), 3000, np.uint16)), tmp_path / "d.png")  # 12-bit data: 3000/4095
    assert (pixels(tmp_path / "d.png") == round(3000 * 255 / 4095)).all()


def test_float_tiff_in_unit_range(tmp_path: Path) -> None:
    save(Image.fromarray(np.full((4, 4), 0.5, np.float32), "F"), tmp_path / "f.tif")
    assert (pixels(tmp_path / "f.tif") == 128).all()


def test_exif_orientation_applied(tmp_path: Path) -> None:
    out = pixels(exif_rotated_jpeg(tmp_path / "r.jpg", size=(60, 40), orientation=6))
    assert out.shape == (60, 40, 3)  # 60 wide x 40 high on disk, displayed 40 wide x 60 high
    # Orientation 6 means "rotate 90 degrees clockwise to display": the stored top-left lands top-right.
    assert np.abs(out[3, 36] - RED).max() < 40
    assert np.abs(out[3, 3] - (128, 128, 128)).max() < 40
    assert np.abs(out[56, 3] - (128, 128, 128)).max() < 40


def test_gif_first_frame(tmp_path: Path) -> None:
    assert (pixels(two_frame_gif(tmp_path / "a.gif")) == RED).all()


def test_draft_keeps_short_side_at_least_min_size(tmp_path: Path) -> None:
    path = save(photo().resize((1600, 1200)), tmp_path / "camera.jpg", "JPEG", quality=90)
    assert load_rgb(path).size == (1600, 1200)
    assert load_rgb(path, min_size=224).size == (400, 300)  # 1/4 scale: 1/8 would give 150 < 224
    assert load_rgb(path, min_size=300).size == (400, 300)
    assert load_rgb(path, min_size=301).size == (800, 600)
    assert load_rgb(path, min_size=2000).size == (1600, 1200)  # never upscaled
    reduced, full = pixels(path, min_size=224), np.asarray(load_rgb(path).resize((400, 300), Image.Resampling.BOX))
    assert np.abs(reduced - full).mean() < 4  # the same picture, not a crop or a corrupted decode


@pytest.fixture
def fast_path_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records the (height, width) of every decode that took the libjpeg-turbo fast path."""
    calls: list[tuple[int, int]] = []
    real = decode.simplejpeg.decode_jpeg

    def spy(*args: object, **kwargs: object) -> np.ndarray:
        out = real(*args, **kwargs)
        calls.append(out.shape[:2])
        return out

    monkeypatch.setattr(decode.simplejpeg, "decode_jpeg", spy)
    return calls


@pytest.mark.parametrize("min_size", [None, 224, 301])
def test_jpeg_fast_path_gives_pillows_pixels(tmp_path: Path, min_size: int | None, fast_path_calls: list) -> None:
    """The fast path is only faster: same scale and the very same pixels as Pillow's (draft) decode."""
    path = save(photo().resize((1600, 1200)), tmp_path / "camera.jpg", "JPEG", quality=90)
    fast = decode_rgb(path, min_size=min_size)
    assert fast_path_calls == [fast.shape[:2]]
    assert fast.flags.writeable and fast.dtype == np.uint8
    with Image.open(path) as im:
        np.testing.assert_array_equal(fast, np.asarray(to_rgb(im, min_size=min_size)))


@pytest.mark.parametrize(
    ("kind", "fmt", "kwargs"),
    [
        ("progressive", "JPEG", {"progressive": True}),
        ("grayscale", "JPEG", {}),
        ("4:4:4", "JPEG", {"subsampling": 0}),
        ("phone MPO", "MPO", {"save_all": True}),
    ],
)
def test_fast_path_covers_the_jpegs_phones_and_tools_write(
    tmp_path: Path, kind: str, fmt: str, kwargs: dict, fast_path_calls: list
) -> None:
    src = photo().resize((1600, 1200))
    if kind == "grayscale":
        src = src.convert("L")
    if kind == "phone MPO":
        kwargs = {**kwargs, "append_images": [src.resize((800, 600))]}  # a second, smaller picture (the preview)
    path = save(src, tmp_path / "x.jpg", fmt, quality=90, **kwargs)
    fast = decode_rgb(path, min_size=256)
    assert fast_path_calls == [(300, 400)]
    with Image.open(path) as im:
        assert im.format == fmt
        np.testing.assert_array_equal(fast, np.asarray(to_rgb(im, min_size=256)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_path_applies_every_exif_orientation(tmp_path: Path, orientation: int, fast_path_calls: list) -> None:
    path = exif_rotated_jpeg(tmp_path / "r.jpg", size=(60, 40), orientation=orientation)
    fast = decode_rgb(path)
    assert len(fast_path_calls) == 1
    with Image.open(path) as im:
        upright = ImageOps.exif_transpose(im)
    np.testing.assert_array_equal(fast, np.asarray(upright))
    assert fast.shape[:2] == ((40, 60) if orientation < 5 else (60, 40))


def test_cmyk_and_damaged_jpegs_go_through_pillow(tmp_path: Path, fast_path_calls: list) -> None:
    cmyk = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "c.jpg", "JPEG", quality=95)
    assert np.abs(decode_rgb(cmyk).astype(int) - RED).max() <= 3
    assert fast_path_calls == []  # libjpeg-turbo's RGB output cannot convert CMYK; Pillow can
    with pytest.raises(OSError, match="truncated"):  # refused by the fast path, explained by Pillow
        decode_rgb(truncated_jpeg(tmp_path / "cut.jpg"))


def test_draft_with_exif_rotation(tmp_path: Path) -> None:
    path = exif_rotated_jpeg(tmp_path / "r.jpg", size=(1600, 1200), orientation=6)
    assert load_rgb(path, min_size=224).size == (300, 400)


def test_draft_ignored_for_non_jpeg(tmp_path: Path) -> None:
    path = save(photo().resize((800, 600)), tmp_path / "big.png")
    assert load_rgb(path, min_size=100).size == (800, 600)


def test_unreadable_files_raise(tmp_path: Path) -> None:
    (tmp_path / "fake.jpg").write_text("not a jpeg")
    with pytest.raises(UnidentifiedImageError):
        load_rgb(tmp_path / "fake.jpg")
    with pytest.raises(OSError, match="truncated"):
        load_rgb(truncated_jpeg(tmp_path / "cut.jpg"))
    with pytest.raises(ValueError, match="min_size"):
        load_rgb(save(photo(), tmp_path / "ok.jpg"), min_size=0)


def test_to_uint8_tensor() -> None:
    im = photo().resize((30, 20))
    t = to_uint8_tensor(im)
    assert t.dtype == torch.uint8 and t.shape == (3, 20, 30) and t.is_contiguous()
    np.testing.assert_array_equal(t.permute(1, 2, 0).numpy(), np.asarray(im))
    assert to_uint8_tensor(Image.new("L", (5, 4), 9)).shape == (1, 4, 5)


def test_channels_last_view_gives_the_same_augmented_pixels() -> None:
    im = photo().resize((400, 300))
    view = to_uint8_tensor(im, channels_last=True)
    assert view.shape == (3, 300, 400) and not view.is_contiguous()
    augment = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(), v2.Resize(100)])
    for seed in range(5):
        torch.manual_seed(seed)
        expected = augment(to_uint8_tensor(im))
        torch.manual_seed(seed)
        assert torch.equal(augment(view), expected)


def test_image_loader_pickles_and_loads(tmp_path: Path) -> None:
    path = str(save(photo().resize((1600, 1200)), tmp_path / "camera.jpg", "JPEG"))
    loader = pickle.loads(pickle.dumps(ImageLoader(min_size=224)))
    assert loader(path).shape == (300, 400, 3)
    cached = pickle.loads(pickle.dumps(ImageLoader(cache=ResizedCache(tmp_path / "cache", short_side=150))))
    assert cached(path).shape == (150, 200, 3)
    assert len(list((tmp_path / "cache").rglob("*.jpg"))) == 1
