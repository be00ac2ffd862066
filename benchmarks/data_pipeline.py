"""Images/s of our data pipeline against torchvision's ImageFolder, on realistic JPEG folders built offline.

Photos are random crops of sklearn's two sample photos, resized to camera size (1600x1200) and ImageNet size
(500x375), with mild sensor-like noise so files have the entropy (and decode cost) of real photos, saved at JPEG
quality 90. Both pipelines read the same files in the same order with batch size 64; the first batches are not timed.

    python benchmarks/data_pipeline.py                      # defaults take a few minutes on 2 cores
    python benchmarks/data_pipeline.py --n 500 --batches 3  # a quick look

Ours: scan once, ImageFileDataset + ImageLoader (libjpeg-turbo at reduced scale) + torchvision v2 transforms on uint8
tensors, collated as uint8 (normalising belongs on the accelerator, inside the model); without the resized cache, and,
where data.cache=auto (the default) would keep resized copies, in the first epoch (filling the cache) and in later
ones (reading it). Baseline: ImageFolder with PIL loading and the classic v1 transforms (ToTensor + Normalize on the
CPU, float32 batches).

With a GPU (or ``--device-decode cuda``), a second table times ``data.decode=gpu`` on training crops against our CPU
path, per worker count: workers only read the bytes, nvJPEG decodes, crops and flips on the device
(``--device-decode cpu`` runs the same path with the CPU decoder standing in, to check it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import sklearn.datasets
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision import transforms as v1
from torchvision.transforms import v2

from image_finetune.data.cache import ResizedCache
from image_finetune.data.device_decode import DeviceCrops, DeviceJpegLoader, EncodedImageDataset
from image_finetune.data.files import ImageFileDataset, ImageLoader
from image_finetune.data.imagefolder import auto_cache_pays
from image_finetune.data.scan import scan_image_folder
from image_finetune.data.transforms import Geometry

SIZES = {"camera": (1600, 1200), "imagenet": (500, 375)}
CLASSES = 10
JPEG_QUALITY = 90
NOISE = 4  # +-4 grey levels, uniform: raises a smooth upscaled crop to the file size of a real photo
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CROP, RESIZE = 224, 256


def _make_photos(args: tuple[Path, tuple[int, int], list[int]]) -> None:
    folder, size, indices = args
    photos_dir = Path(sklearn.datasets.__file__).parent / "images"
    photos = [Image.open(photos_dir / name).convert("RGB") for name in ("china.jpg", "flower.jpg")]
    # One noise field per process, read at a random offset per image: drawing fresh noise would double the build time.
    margin = 64
    field = np.random.default_rng(indices[0]).integers(-NOISE, NOISE + 1, (size[1] + margin, size[0] + margin, 3))
    field = field.astype(np.int16)
    for i in indices:
        rng = np.random.default_rng(i)
        src = photos[i % 2]
        h = int(src.height * rng.uniform(0.5, 1.0))
        w = min(src.width, h * size[0] // size[1])
        x, y = int(rng.integers(0, src.width - w + 1)), int(rng.integers(0, src.height - h + 1))
        im = src.crop((x, y, x + w, y + h)).resize(size, Image.Resampling.BICUBIC)
        dx, dy = (int(v) for v in rng.integers(0, margin, 2))
        pixels = np.asarray(im, dtype=np.int16) + field[dy : dy + size[1], dx : dx + size[0]]
        pixels = np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)
        out = folder / f"class_{i % CLASSES}" / f"img_{i:05d}.jpg"
        Image.fromarray(pixels).save(out, "JPEG", quality=JPEG_QUALITY)


def build_folder(root: Path, name: str, n: int) -> Path:
    """`root/name/class_k/img_i.jpg`; reused when a previous run built it with the same settings."""
    folder, size = root / name, SIZES[name]
    marker = root / f"{name}.json"
    settings = {"size": size, "n": n, "classes": CLASSES, "quality": JPEG_QUALITY, "noise": NOISE}
    if marker.exists() and json.loads(marker.read_text()) == json.loads(json.dumps(settings)):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for k in range(CLASSES):
        (folder / f"class_{k}").mkdir(parents=True)
    started = time.perf_counter()
    workers = os.cpu_count() or 1
    chunks = [(folder, size, list(range(n))[j::workers]) for j in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_make_photos, chunks))
    marker.write_text(json.dumps(settings))
    print(f"built {n:,} {size[0]}x{size[1]} JPEGs in {folder} ({time.perf_counter() - started:.0f} s)")
    return folder


def baseline(folder: Path, train: bool) -> Dataset:
    if train:
        tf = v1.Compose([v1.RandomResizedCrop(CROP), v1.RandomHorizontalFlip(), v1.ToTensor(), v1.Normalize(MEAN, STD)])
    else:
        tf = v1.Compose([v1.Resize(RESIZE), v1.CenterCrop(CROP), v1.ToTensor(), v1.Normalize(MEAN, STD)])
    return datasets.ImageFolder(str(folder), transform=tf)


def ours(samples: Sequence[tuple[str, int]], train: bool, cache: ResizedCache | None = None) -> ImageFileDataset:
    if train:
        tf = v2.Compose([v2.RandomResizedCrop(CROP, antialias=True), v2.RandomHorizontalFlip()])
    else:
        tf = v2.Compose([v2.Resize(RESIZE, antialias=True), v2.CenterCrop(CROP)])
    # As ImageFolderDataModule: both pipelines decode at the eval resize, so neither upsamples a reduced decode.
    return ImageFileDataset(samples, tf, ImageLoader(min_size=RESIZE, cache=cache))


def schedule(workers: int, warmup: int, batches: int) -> tuple[int, int]:
    """(untimed, timed) batches for `workers` DataLoader workers.

    Workers finish batches in rounds (each makes one batch in about the same time), so every worker delivers its first
    batch before the clock starts and the clock covers whole rounds; otherwise batches prefetched during start-up, or
    a round cut in half, would be counted as throughput.
    """
    per_round = max(workers, 1)
    return max(warmup, per_round), -(-batches // per_round) * per_round


def images_per_second(
    ds: Dataset,
    keys: list,
    workers: int,
    batch_size: int,
    warmup: int,
    batches: int,
    device_step: Callable[[Any], int] | None = None,
) -> float:
    """Images/s of a loader over ``ds``; ``device_step`` (``data.decode=gpu``) finishes each batch and counts it."""
    untimed, timed = schedule(workers, warmup, batches)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        sampler=keys[: (untimed + timed) * batch_size],
        num_workers=workers,
        collate_fn=getattr(ds, "collate_fn", None),
    )
    finish = device_step or (lambda batch: len(batch[1]))
    it = iter(loader)
    for _ in range(untimed):
        finish(next(it))
    started = time.perf_counter()
    count = sum(finish(batch) for batch in it)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    assert count == timed * batch_size
    return count / (time.perf_counter() - started)


def device_decoded(samples: Sequence[tuple[str, int]], device: torch.device) -> tuple[Dataset, Callable[[Any], int]]:
    """``data.decode=gpu`` as ``ImageFolderDataModule`` runs it for training: workers read the bytes, ``device``
    decodes, crops (random resized, at 224) and flips."""
    crops = DeviceCrops(Geometry(CROP, crop_scale=(0.08, 1.0)), min_size=RESIZE)
    return EncodedImageDataset(samples, DeviceJpegLoader(min_size=RESIZE)), lambda b: len(crops(b, device, True)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/bench-data"))
    parser.add_argument("--n", type=int, default=2000, help="JPEGs per image size")
    parser.add_argument(
        "--batches", type=int, default=6, help="timed batches per measurement (rounded up to whole rounds)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first, at least one per worker")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per measurement; the best counts")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["camera", "imagenet"])
    parser.add_argument(
        "--device-decode",
        choices=["cuda", "cpu", "none"],
        default="cuda" if torch.cuda.is_available() else "none",
        help="also time data.decode=gpu on training crops (cpu: the CPU decoder stands in; default: cuda if present)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # both pipelines get one core per process; PIL is single-threaded anyway

    per_run = sum(schedule(max(args.workers), args.warmup, args.batches)) * args.batch_size
    if per_run > args.n:
        parser.error(
            f"--n {args.n} is smaller than the {per_run} images one measurement with {max(args.workers)} workers reads"
        )
    keys = [(int(i), 1_000 + int(i)) for i in np.random.default_rng(0).permutation(args.n)[:per_run]]
    indices = [i for i, _ in keys]

    rows, device_rows = [], []
    for name in args.sizes:
        folder = build_folder(args.root, name, args.n)
        scan_cache = args.root / "scan-cache" / name
        shutil.rmtree(scan_cache, ignore_errors=True)  # time the first scan of the folder, not a cached one
        started = time.perf_counter()
        scan = scan_image_folder(folder, cache_dir=scan_cache)
        first = time.perf_counter() - started
        started = time.perf_counter()
        scan_image_folder(folder, cache_dir=scan_cache)
        again = time.perf_counter() - started
        print(f"{name}: scan of {len(scan.samples):,} files {first:.1f} s, again with the cache {again:.2f} s")
        assert len(scan.samples) == args.n, "the benchmark folder should hold only good images"
        # What data.cache=auto (the default) decides for this folder, by the data module's own rule.
        cached, median = auto_cache_pays([path for path, _ in scan.samples], RESIZE, seed=0)
        print(
            f"{name}: data.cache=auto {'keeps resized copies' if cached else 'reads the originals'} (median short side {median} px)"
        )
        cache_dir = args.root / "resized-cache" / name

        def filling(train: bool) -> ImageFileDataset:
            shutil.rmtree(cache_dir, ignore_errors=True)  # the first epoch: every read is a miss that fills the cache
            return ours(scan.samples, train, ResizedCache(cache_dir, short_side=RESIZE))

        def filled(train: bool) -> ImageFileDataset:
            cache = ResizedCache(cache_dir, short_side=RESIZE)
            for path, _ in (scan.samples[i] for i in indices):
                cache.load(path)
            return ours(scan.samples, train, cache)

        for train in (True, False):
            for workers in args.workers:
                runs: list[tuple[Callable[[bool], Dataset], list]] = [
                    (lambda t: baseline(folder, t), indices),
                    (lambda t: ours(scan.samples, t), keys),
                ]
                if cached:
                    runs += [(filling, keys), (filled, keys)]
                # Best of several interleaved runs: other load on the machine only ever makes a run slower.
                rates = [0.0] * len(runs)
                for _ in range(args.repeats):
                    for j, (make, sampler) in enumerate(runs):
                        rate = images_per_second(
                            make(train), sampler, workers, args.batch_size, args.warmup, args.batches
                        )
                        rates[j] = max(rates[j], rate)
                row = [name, "train" if train else "eval", workers, *rates]
                rows.append(row)
                print("  ", _format(row), flush=True)
        if args.device_decode != "none":  # training crops: the CPU path as above vs the device path, interleaved
            dataset, step = device_decoded(scan.samples, torch.device(args.device_decode))
            for workers in args.workers:
                rates = [0.0, 0.0]
                for _ in range(args.repeats):
                    rates[0] = max(
                        rates[0],
                        images_per_second(
                            ours(scan.samples, True), keys, workers, args.batch_size, args.warmup, args.batches
                        ),
                    )
                    rates[1] = max(
                        rates[1],
                        images_per_second(dataset, keys, workers, args.batch_size, args.warmup, args.batches, step),
                    )
                device_rows.append(
                    f"| {name} {'x'.join(map(str, SIZES[name]))} | train | {workers} | {rates[0]:,.0f} | {rates[1]:,.0f} | {rates[1] / rates[0]:.2f}x |"
                )
                print("  ", device_rows[-1], flush=True)

    print(
        f"\n{os.cpu_count()} CPUs, batch size {args.batch_size}, best of {args.repeats} interleaved runs of at least "
        f"{args.batches} timed batches (whole rounds of the workers) after at least {args.warmup} untimed"
    )
    print(
        "| images | pipeline | workers | ImageFolder img/s | ours, data.cache=null | ratio "
        "| ours, data.cache=auto: first epoch | ratio | later epochs | ratio |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(_format(row))
    if device_rows:
        standing_in = " (the CPU decoder standing in for nvJPEG)" if args.device_decode == "cpu" else ""
        print(f"\ndata.decode=gpu on {args.device_decode}{standing_in}, training crops, best of {args.repeats}:")
        print("| images | pipeline | workers | ours, data.decode=cpu | ours, data.decode=gpu | ratio |")
        print("|---|---|---:|---:|---:|---:|")
        print("\n".join(device_rows))


def _format(row: list) -> str:
    name, mode, workers, base, *mine = row
    size = "x".join(map(str, SIZES[name]))
    cells = [f"{name} {size}", mode, str(workers), f"{base:,.0f}"]
    cells += [c for v in mine for c in (f"{v:,.0f}", f"{v / base:.2f}x")]
    if len(mine) == 1:
        cells += ["not cached (small images)", "", "", ""]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
