"""Drawing, in one place: image grids with captions, the confusion matrix, the LR finder's curves.

Pure functions from tensors and numbers to pictures (HWC uint8 arrays or matplotlib figures); the TensorBoard callbacks
(``callbacks/visuals.py``), ``eval.py``, ``lr_find.py`` and the notebooks all draw with these. matplotlib is imported on
first use, so importing this module stays light.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CAPTION_FONT_SIZE = 12
WRONG_COLOUR = (200, 30, 30)
TEXT_COLOUR = (20, 20, 20)


@functools.lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable font when Pillow has FreeType (>= 10.1)
    except (TypeError, OSError):
        return ImageFont.load_default()


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """NCHW float in [0, 1] (as the model sees it; normalisation is inside the network) or uint8 -> NHWC uint8 RGB."""
    images = images.detach().cpu()
    if images.is_floating_point():
        images = images.clamp(0, 1).mul(255).round().to(torch.uint8)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images[:, :3].permute(0, 2, 3, 1).contiguous().numpy()


def _fit_cell(image: Image.Image, cell: int) -> Image.Image:
    """Small images grow by a whole factor with nearest neighbour (pixels stay honest); large ones shrink to fit."""
    side = max(image.size)
    if side < cell:
        factor = cell // side
        return (
            image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
            if factor > 1
            else image
        )
    scale = cell / side
    return image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BILINEAR
    )


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int, font: Any) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def image_grid(
    images: torch.Tensor,
    captions: Sequence[str],
    *,
    columns: int = 8,
    cell: int = 128,
    caption_colours: Sequence[tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """A white-background grid (HWC uint8) with each image's caption (``\\n`` for more lines) drawn under it."""
    pictures = to_uint8_hwc(images)
    n = len(pictures)
    if n == 0:
        return message_image("no images")
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    font = _font(CAPTION_FONT_SIZE)
    line_height = CAPTION_FONT_SIZE + 4
    caption_height = line_height * max((c.count("\n") + 1 for c in captions), default=0) + 4
    pad = 4
    canvas = Image.new("RGB", (columns * (cell + pad) + pad, rows * (cell + caption_height + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, picture in enumerate(pictures):
        x0 = pad + (i % columns) * (cell + pad)
        y0 = pad + (i // columns) * (cell + caption_height + pad)
        tile = _fit_cell(Image.fromarray(picture), cell)
        canvas.paste(tile, (x0 + (cell - tile.width) // 2, y0 + (cell - tile.height) // 2))
        colour = caption_colours[i] if caption_colours is not None else TEXT_COLOUR
        for j, line in enumerate(captions[i].split("\n") if i < len(captions) else []):
            text = _fit_text(draw, line, cell, font)
            x = x0 + (cell - draw.textlength(text, font=font)) / 2
            draw.text((x, y0 + cell + 2 + j * line_height), text, fill=colour, font=font)
    return np.asarray(canvas)


def message_image(text: str, size: tuple[int, int] = (320, 40)) -> np.ndarray:
    """A small image that says something, so an image tag can state that there was nothing to show."""
    canvas = Image.new("RGB", size, "white")
    ImageDraw.Draw(canvas).text(
        (8, (size[1] - CAPTION_FONT_SIZE) // 2), text, fill=TEXT_COLOUR, font=_font(CAPTION_FONT_SIZE)
    )
    return np.asarray(canvas)


def confusion_matrix_figure(matrix: torch.Tensor | np.ndarray, class_names: Sequence[str], title: str = "") -> Figure:
    """Rows = true class, columns = predicted; colour is the row-normalised rate, numbers (up to 20 classes) are counts."""
    from matplotlib.figure import Figure  # imported on first use: keeps `import image_finetune` light

    counts = np.asarray(matrix.cpu() if isinstance(matrix, torch.Tensor) else matrix, dtype=np.int64)
    n = counts.shape[0]
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(max(4.0, 0.4 * n + 2.5), 20.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=80, layout="constrained")
    ax = fig.add_subplot()
    shown = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    names = [name if len(name) <= 14 else name[:13] + "…" for name in class_names]
    rotation = 0 if max(map(len, names), default=0) <= 3 else 90 if n > 10 else 45
    ax.set_xticks(range(n), names, rotation=rotation, ha="right" if rotation == 45 else "center", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if n <= 20:
        for (row, col), count in np.ndenumerate(counts):
            if count:
                colour = "white" if rates[row, col] > 0.5 else "black"
                ax.text(col, row, str(count), ha="center", va="center", fontsize=8, color=colour)
    return fig


def render_figure(fig: Figure) -> np.ndarray:
    """Draw a matplotlib figure with the Agg backend (no display needed) into an HWC uint8 array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def lr_find_figure(sweeps: Sequence[tuple[str, dict[str, Any]]]) -> Figure:
    """One panel per LR sweep (``(phase name, {"lrs", "losses", "suggestion"})``): loss against lr, the suggestion
    marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(sweeps), 4), layout="constrained")
    for i, (name, sweep) in enumerate(sweeps):
        ax = fig.add_subplot(1, len(sweeps), i + 1)
        ax.plot(sweep["lrs"], sweep["losses"])
        ax.set_xscale("log")
        ax.set_xlabel("backbone lr" if name == "unfrozen" else "head lr")
        ax.set_ylabel("training loss (smoothed)")
        ax.set_title(f"{name} phase")
        if sweep["suggestion"] is not None:
            ax.axvline(sweep["suggestion"], color="red", linestyle="--", label=f"suggestion {sweep['suggestion']:.2g}")
            ax.legend()
    return fig


def reliability_figure(
    lower: Sequence[float],
    accuracy: Sequence[float | None],
    confidence: Sequence[float | None],
    count: Sequence[int],
    title: str = "",
) -> Figure:
    """The reliability diagram of equal-width confidence bins (``interpretation.Calibration``): each bin's accuracy as
    a bar against the diagonal of perfect calibration, its mean confidence as a red tick; below, how many images each
    bin holds. Empty bins (``None``) draw nothing."""
    from matplotlib.figure import Figure

    width = 1.0 / len(lower)
    centres = [lo + width / 2 for lo in lower]
    fig = Figure(figsize=(5, 6), dpi=80, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    filled = [i for i, a in enumerate(accuracy) if a is not None]
    top.bar([centres[i] for i in filled], [accuracy[i] for i in filled], width=width, edgecolor="black",
            color="tab:blue", label="accuracy")  # fmt: skip
    top.scatter([centres[i] for i in filled], [confidence[i] for i in filled], marker="_", s=200, color="tab:red",
                label="mean confidence", zorder=3)  # fmt: skip
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    if title:
        top.set_title(title)
    bottom.bar(centres, count, width=width, edgecolor="black", color="tab:grey")
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("images")
    return fig
