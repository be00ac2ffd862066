"""Classify images with an exported ONNX model using only onnxruntime, numpy and Pillow: no torch, no project code.

    python export.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt format=onnx
    python examples/onnx_classify.py logs/export/runs/<run>/model.onnx photo.jpg [more.jpg|folder ...] [--top-k 3]
        [--batch-size 64] [--json]

Everything it needs is in ``model.onnx.json``, written beside the model: the class names and the preprocessing.
The preprocessing repeats the project's eval transform: decode (JPEGs at reduced scale, as training decodes them;
EXIF orientation applied; transparency composited on white), resize the short side to ``resize`` (with the JSON's
``interpolation``, antialiased), centre-crop ``crop`` x ``crop``, scale to [0, 1]. Mean/std are applied inside the model.

Pillow's bilinear resize and torchvision's (which the project uses) round differently, so a pixel may differ by a
grey level or so and probabilities by a little (the project's tests measure it: see tests/test_export.py). 16-bit
images are not rescaled here as the project does; convert them to 8 bits first.

A file that cannot be read (truncated, not an image, ...) gets a reason, in predict.py's words, and the rest are
classified: ``path: cannot classify (truncated)``, or with ``--json`` empty labels and a ``reason`` (``null`` for
the files that were classified). As with predict.py, the exit code is 0 when the run went through, whether or not
some files had to be left out (their count goes to stderr); 2 for a usage error such as no images found. Images are
decoded and classified ``--batch-size`` at a time (default 64), so memory stays bounded however many there are.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image, ImageOps, UnidentifiedImageError


def load_rgb(path: str | Path, min_size: int) -> Image.Image:
    """8-bit RGB as the project decodes it (JPEGs at 1/2, 1/4 or 1/8 scale with both sides >= min_size)."""
    with open(path, "rb") as f:
        im = Image.open(f)
        im.draft("RGB", (min_size, min_size))
        im.load()
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def preprocess(path: str | Path, resize: int, crop: int, interpolation: str = "bilinear") -> np.ndarray:
    """float32 CHW in [0, 1]: short side to ``resize`` (sizes rounded as torchvision does), centre crop ``crop``."""
    im = load_rgb(path, resize)
    w, h = im.size
    long_side = int(resize * max(w, h) / min(w, h))
    resample = RESAMPLE[interpolation.split(",")[0]]  # antialiased when shrinking, as torchvision's
    im = im.resize((resize, long_side) if w <= h else (long_side, resize), resample)
    w, h = im.size
    top, left = round((h - crop) / 2), round((w - crop) / 2)  # Python rounding, as torchvision's CenterCrop
    im = im.crop((left, top, left + crop, top + crop))
    return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0


#: The extensions the project's folder scan accepts (a folder's other files are skipped, as predict.py lists them).
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif"}


def expand(paths: list[str]) -> list[str]:
    """Images as given, and every image under a given folder (recursively, sorted; hidden files and folders skipped)."""
    found: list[str] = []
    for path in map(Path, paths):
        if not path.is_dir():
            found.append(str(path))
            continue
        for item in sorted(path.rglob("*")):
            hidden = any(part.startswith(".") for part in item.relative_to(path).parts)
            if item.is_file() and not hidden and item.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(str(item))
    return found


def failure_reason(exc: BaseException) -> str:
    """Why a file could not be read, in the words of predict.py's reason column."""
    if isinstance(exc, Image.DecompressionBombError):
        return "too large (decompression bomb)"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return "truncated"
    detail = str(exc).strip() or type(exc).__name__
    return f"unreadable: {' '.join(detail.split())}"


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def classify_batches(
    model_path: str | Path, image_paths: list[str], top_k: int = 5, batch_size: int = 64
) -> Iterator[dict]:
    """``{"path", "labels", "probabilities", "reason"}`` per image, in order, most likely class first; an image that
    cannot be read has no labels and a ``reason``. Only ``batch_size`` images are in memory at a time."""
    meta = json.loads(Path(f"{model_path}.json").read_text())
    prep, names = meta["preprocessing"], meta["class_names"]
    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    interpolation = prep.get("interpolation", "bilinear")
    k = min(top_k, len(names))
    for start in range(0, len(image_paths), batch_size):
        chunk = image_paths[start : start + batch_size]
        results: list[dict] = [{"path": p, "labels": [], "probabilities": [], "reason": None} for p in chunk]
        loaded: list[tuple[int, np.ndarray]] = []
        for i, path in enumerate(chunk):
            try:
                loaded.append((i, preprocess(path, prep["resize"], prep["crop"], interpolation)))
            except Exception as exc:  # whatever the decoder raised, the file gets a reason and the run goes on
                results[i]["reason"] = failure_reason(exc)
        if loaded:
            batch = np.stack([pixels for _, pixels in loaded])
            logits = session.run([meta["output_name"]], {meta["input_name"]: batch})[0]
            for (i, _), probs in zip(loaded, softmax(logits)):
                best = np.argsort(-probs, kind="stable")[:k]
                results[i]["labels"] = [names[j] for j in best]
                results[i]["probabilities"] = [float(probs[j]) for j in best]
        yield from results


def classify(model_path: str | Path, image_paths: list[str], top_k: int = 5, batch_size: int = 64) -> list[dict]:
    """``classify_batches`` as a list."""
    return list(classify_batches(model_path, image_paths, top_k, batch_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="model.onnx written by export.py (model.onnx.json must be beside it)")
    parser.add_argument("images", nargs="+", help="image files and/or folders of images (searched recursively)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="images decoded and classified at a time")
    parser.add_argument("--json", action="store_true", help="print JSON instead of one line per image")
    args = parser.parse_args()
    if args.top_k < 1 or args.batch_size < 1:
        parser.error(f"--top-k {args.top_k} and --batch-size {args.batch_size} must be at least 1")
    images = expand(args.images)
    if not images:
        parser.error(f"no images found in {args.images}")
    results, failed = [], 0
    for r in classify_batches(args.model, images, args.top_k, args.batch_size):
        failed += r["reason"] is not None
        if args.json:
            results.append(r)  # a few labels per image: small however many images
        elif r["reason"] is not None:
            print(f"{r['path']}: cannot classify ({r['reason']})")
        else:
            print(f"{r['path']}: " + ", ".join(f"{label} {p:.3f}" for label, p in zip(r["labels"], r["probabilities"])))
    if args.json:
        print(json.dumps(results))
    if failed:
        print(f"{failed} of {len(images)} file(s) could not be classified; see their reason", file=sys.stderr)


if __name__ == "__main__":
    main()
