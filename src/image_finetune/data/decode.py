"""Turn any image file a user is likely to have into the 8-bit RGB picture a person would see.

torchvision's default loader (`Image.open(f).convert("RGB")`) gets several common files wrong without a
word: 16-bit PNGs come out all white, transparent pixels take whatever colour hides under the alpha,
EXIF orientation is ignored, and every JPEG is decoded at full size even when the model sees 224 px.

JPEGs, nearly every photo a user has, take a fast path: libjpeg-turbo through simplejpeg, at reduced scale, straight
into a numpy array. Everything else, and any JPEG that path refuses (CMYK/YCCK, damaged), goes through Pillow, which
decodes it or raises the error the folder scan reports.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import simplejpeg
import torch
from PIL import ExifTags, Image

log = logging.getLogger(__name__)

# Transparent pixels are composited onto white: images with alpha are nearly always cut-outs, logos and
# icons made to be shown on a white page, so white reproduces what the person who labelled them saw.
# (Mid-grey would sit nearer the normalisation mean but shows the object on a background nobody saw.)
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

# Modes whose samples do not fit in 8 bits; Pillow's convert("RGB") clips them to 255 (all white).
HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# JPEGs whose pixels libjpeg-turbo can hand over as RGB itself (YCbCr, RGB, grayscale); CMYK/YCCK go through Pillow.
FAST_JPEG_MODES = frozenset({"RGB", "L"})

# EXIF orientation -> the transpose that displays the image upright (the table of Pillow's ImageOps.exif_transpose).
ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def decode_rgb(path: str | Path, *, min_size: int | None = None, data: bytes | None = None) -> np.ndarray:
    """Decode `path` to an HxWx3 uint8 RGB array; with `min_size`, JPEGs decode at 1/2, 1/4 or 1/8 scale, short side >= min_size.

    Reduced-scale decoding skips most of the IDCT, upsampling and colour conversion (a third of the decode time of a
    1600x1200 photo here; reading every Huffman-coded byte remains), and leaves far fewer pixels for the resize after.
    The scale is the one Pillow's ``draft`` picks, and the pixels are Pillow's too (tests/test_decode.py checks).
    Raises OSError / PIL errors on unreadable files; the array is writable and owns its memory. ``data``: the file's
    bytes, when the caller has read them already.
    """
    data = Path(path).read_bytes() if data is None else data
    im = Image.open(io.BytesIO(data))  # reads the headers only: format, mode, size, EXIF; refuses decompression bombs
    _draft(im, min_size)  # sets im.size to the drafted scale, which either decoder below then produces
    if im.format in ("JPEG", "MPO") and im.mode in FAST_JPEG_MODES:
        pixels = _decode_jpeg(data, im.size)
        if pixels is not None:
            transpose = exif_transpose_method(im, source=path)
            return pixels if transpose is None else np.array(Image.fromarray(pixels).transpose(transpose))
    return np.array(to_rgb(im, source=path))


def _draft(im: Image.Image, min_size: int | None) -> None:
    """Only JPEG/MPO implement draft. It decodes nothing: it picks the largest of 1/2, 1/4, 1/8 scale keeping both
    sides >= min_size. Pillow ignores a second draft, so an image keeps the scale it was first drafted to."""
    if min_size is None:
        return
    if min_size < 1:
        raise ValueError(f"min_size must be a positive number of pixels, got {min_size}")
    im.draft("RGB", (min_size, min_size))


def stored_short_side(path: str | Path) -> int:
    """The short side of the image as stored in the file, from its header (nothing is decoded)."""
    with Image.open(path) as im:
        return min(im.size)


def load_rgb(path: str | Path, *, min_size: int | None = None) -> Image.Image:
    """`decode_rgb` as a PIL image, for code that works on PIL images (notebooks, tests)."""
    return Image.fromarray(decode_rgb(path, min_size=min_size))


def _decode_jpeg(data: bytes, size: tuple[int, int]) -> np.ndarray | None:
    """libjpeg-turbo's decode at `size` (a drafted one); None when it refuses the file (Pillow then decodes or explains).

    simplejpeg is strict: data libjpeg would merely warn about ("extraneous bytes", a truncated tail) is refused here,
    so such files decode exactly as the folder scan (Pillow) accepted them.
    """
    width, height = size
    try:
        # simplejpeg picks the smallest libjpeg-turbo scale (n/8) with both sides >= these: exactly the drafted 1/2^k.
        # (Only powers of two: libjpeg-turbo's other n/8 scales skip its SIMD IDCT and decode slower than full size.)
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=height, min_width=width)
    except ValueError as e:
        log.debug("libjpeg-turbo refused a JPEG (%s); decoding it with Pillow", e)
        return None


def exif_transpose_method(im: Image.Image, source: str | Path | None = None) -> Image.Transpose | None:
    """The transpose that shows `im` upright (EXIF or XMP orientation), None when it already is or EXIF is unreadable.

    ``source`` names the file in the log when `im` was opened from memory."""
    try:
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as e:  # a malformed EXIF block should not cost the user a good picture
        log.debug("ignoring unreadable EXIF orientation in %s: %s", source or getattr(im, "filename", None) or "?", e)
        return None
    return ORIENTATION_TRANSPOSE.get(orientation)


def to_rgb(im: Image.Image, *, min_size: int | None = None, source: str | Path | None = None) -> Image.Image:
    """Load an opened (not yet loaded) image with Pillow and convert it to upright RGB; used by the folder scan too.

    An image already drafted (``decode_rgb``) keeps its scale: Pillow ignores a second ``draft``.
    """
    _draft(im, min_size)
    im.load()
    transpose = exif_transpose_method(im, source)
    if transpose is not None:
        im = im.transpose(transpose)
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in HIGH_BIT_MODES:
        return _high_bit_to_8bit(im).convert("RGB")
    if im.mode in ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def _high_bit_to_8bit(im: Image.Image) -> Image.Image:
    """Scale a 16/32-bit or float single-channel image to 8 bits by its bit depth.

    Files rarely say how many bits are real (a 12-bit sensor stored in a 16-bit PNG holds 0..4095), so the depth is
    the smallest even number of bits >= 8 that holds the brightest pixel: 4095 -> 12 bits, 65535 -> 16 bits. Scaling
    by 65535 would make 12-bit data nearly black; clipping (Pillow's convert) makes everything above 255 white.
    Floats in [0, 1] are taken as already normalised.
    """
    arr = np.nan_to_num(np.asarray(im, dtype=np.float32))
    hi = float(arr.max(initial=0.0))
    if im.mode == "F" and hi <= 1.0:
        full_scale = 1.0
    else:
        bits = max(8, int(hi).bit_length())
        bits += bits % 2
        full_scale = float(2**bits - 1)
    out = np.clip(np.rint(arr * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def to_uint8_tensor(image: np.ndarray | Image.Image, *, channels_last: bool = False) -> torch.Tensor:
    """CHW uint8 tensor of an HWC (or HW) array or PIL image, so torchvision v2 transforms run their uint8 kernels.

    Contiguous by default. channels_last=True skips the transposing copy and returns the CHW-shaped view of the HWC
    pixels: torch's antialiased uint8 resize is about twice as fast on that layout (0.3 vs 0.7 ms per resize here).
    """
    # np.array copies a PIL image (or a read-only array): torch.from_numpy warns on read-only memory.
    arr = image if isinstance(image, np.ndarray) and image.flags.writeable else np.array(image, dtype=np.uint8)
    t = torch.from_numpy(arr)
    if t.ndim == 2:
        return t.unsqueeze(0)
    t = t.permute(2, 0, 1)
    return t if channels_last else t.contiguous()
