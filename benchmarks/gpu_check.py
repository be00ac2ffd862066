"""One-command check for a lent GPU (issue 13): prints ONE markdown table to paste into benchmarks/README.md.

    PYTHONPATH=src python benchmarks/gpu_check.py                    # on the GPU machine, < 5 minutes
    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu --tiny  # the same script, end to end, on a CPU

Parts, each in its own process with its own timeout (a part that fails or hangs becomes a row saying so; the others
still run), all within ``--budget`` seconds:

1. throughput, eager: ``train_throughput.py --baseline`` (template vs plain PyTorch loop, alternated, 2 rounds),
   ResNet-50 at 160 px (``model.upsample_to``), batch 256, bf16-mixed, channels_last, fake CIFAR data, fake weights;
   frozen and unfrozen phase; peak GPU memory.
2. throughput, compiled: the same, 1 round, unfrozen phase only (``finetune=full``; compiling costs the most time).
3. the CIFAR-10 experiment (``experiment=cifar10``, ``train(cfg)``) for a few epochs on generated, learnable
   CIFAR-shaped batches with seeded weights: accuracy, seconds per epoch, GPU->host syncs per training step.
4. image-folder decoding: generated JPEGs, CPU path (our ImageLoader + v2, DataLoader workers) vs nvJPEG
   (``data/device_decode.py``), img/s.

With ``$OUT`` set, the table is also written to ``$OUT/gpu_check.md`` and each part's log to ``$OUT/<part>.log``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# What the issue asks to measure on the GPU, and a tiny CPU stand-in that runs the same code paths.
GPU = {
    "model": ["experiment=cifar10"],  # resnet50 IMAGENET1K_V2, upsample_to=160, batch 256, bf16-mixed, channels_last
    "fake_train": 50_000, "steps": 50, "warmup": 10, "epochs": 3, "jpegs": 768, "jpeg_batch": 64, "workers": [4, 8, 15],
}  # fmt: skip
TINY = {
    "model": [
        "experiment=cifar10", "trainer=cpu", "trainer.precision=32-true", "channels_last=false", "model.backbone.name=resnet18",
        "model.backbone.weights=IMAGENET1K_V1", "model.upsample_to=null", "data.batch_size=16", "data.val_size=64",
    ],
    "fake_train": 160, "steps": 3, "warmup": 1, "epochs": 2, "jpegs": 64, "jpeg_batch": 16, "workers": [0, 1],
}  # fmt: skip


# Seconds of a 280 s budget per part (scaled with --budget), estimated for an H200 from the CPU dry run's steps; the
# last part gets whatever is left. Compiling ResNet-50 (template: train + val graphs, plain loop: train) costs most.
SHARES = {"eager": 95.0, "compiled": 110.0, "cifar": 50.0, "decode": 25.0}


# ---- the parent: runs each part in a child process with a timeout, then prints the table ---------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a dry run of every part on a CPU)")
    parser.add_argument("--budget", type=float, default=280.0, help="seconds for all parts together")
    parser.add_argument("--parts", nargs="+", default=list(SHARES))
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = TINY if args.tiny else GPU
    if args.part:
        result = PARTS[args.part](settings, args.device)
        args.result.write_text(json.dumps(result))
        return

    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    deadline = time.monotonic() + args.budget
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name in args.parts:
            left = deadline - time.monotonic()
            share = SHARES[name] * args.budget / sum(SHARES[p] for p in args.parts)
            timeout = max(10.0, left if name == args.parts[-1] else min(share, left))
            results[name] = run_part(name, args, Path(tmp), timeout, out)
    table = render(results, args)
    print(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.md").write_text(table + "\n")


def run_part(name: str, args: argparse.Namespace, tmp: Path, timeout: float, out: Path | None) -> dict[str, Any]:
    result_file = tmp / f"{name}.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--part",
        name,
        "--result",
        str(result_file),
        "--device",
        args.device,
    ]
    command += ["--tiny"] if args.tiny else []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    started = time.monotonic()
    log = (out / f"{name}.log") if out is not None else tmp / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log, "w") as f:
            proc = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        if proc.returncode != 0:
            return {"error": f"exit {proc.returncode}: {_last_line(log)}", "seconds": time.monotonic() - started}
        return {**json.loads(result_file.read_text()), "seconds": time.monotonic() - started}
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "seconds": time.monotonic() - started}
    except Exception as err:  # the check must print its table whatever one part does
        return {"error": f"{type(err).__name__}: {err}", "seconds": time.monotonic() - started}


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:200].replace("|", "/")


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    import torch

    device = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    head = (
        f"GPU check {datetime.date.today().isoformat()}: {device}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs{' (tiny CPU dry run)' if args.tiny else ''}"
    )
    rows = [f"| check ({head}) | setting | figure | template / plain |", "| --- | --- | --- | ---: |"]
    for name in ("eager", "compiled"):
        r = results.get(name)
        if r is None:
            continue
        if "error" in r:
            rows.append(f"| throughput {name} | | {r['error']} | |")
            continue
        for line in r["table"][2:]:
            if not line.startswith("|"):  # ratio_table's note on spans left out for compiling, if any
                if line:
                    rows.append(f"| throughput {name} | | {line} | |")
                continue
            cells = [c.strip() for c in line.strip("|").split("|")]
            mode, phase, template, plain, ratio, spread, cpu = cells
            rows.append(
                f"| throughput {mode} | {phase} | template {template} img/s, plain {plain} img/s (rounds {spread}; "
                f"host CPU ms/step {cpu}) | {ratio.split()[-1]} |"
            )
        memory = r.get("peak_gpu_memory_gib")
        if memory:
            rows.append(f"| peak GPU memory {name} | template, both phases | {memory:.1f} GiB | |")
        rows.append(f"| throughput {name} | wall time of the part | {r['seconds']:.0f} s | |")
    r = results.get("cifar")
    if r is not None:
        if "error" in r:
            rows.append(f"| CIFAR-10 experiment | | {r['error']} | |")
        else:
            rows.append(
                f"| CIFAR-10 experiment | {r['epochs']} epochs, generated learnable data, seeded weights | val/acc {r['val_acc']:.3f}, "
                f"test/acc {r['test_acc']:.3f}, {r['seconds_per_epoch']:.1f} s/epoch (incl. start-up and test), "
                f"GPU->host syncs per training step (frozen phase, default callbacks): {r['syncs_per_step']} | |"
            )
    r = results.get("decode")
    if r is not None:
        if "error" in r:
            rows.append(f"| JPEG decode | | {r['error']} | |")
        else:
            for row in r["rows"]:
                rows.append(f"| JPEG decode {row['path']} | {row['setting']} | {row['images_per_s']:,.0f} img/s | |")
    return "\n".join(rows)


# ---- the parts (each runs in its own child process) -----------------------------------------------------------------
def part_throughput(settings: dict[str, Any], device: str, mode: str) -> dict[str, Any]:
    from train_throughput import compare

    # Eager: a frozen and an unfrozen epoch. Compiled: the unfrozen phase only (finetune=full): each phase compiles
    # its own graphs, and the compiled targets are about the unfrozen phase.
    phases = (
        ["trainer.max_epochs=2", "finetune.freeze_epochs=1"]
        if mode == "eager"
        else ["trainer.max_epochs=1", "finetune=full"]
    )
    overrides = [
        *settings["model"], *phases, f"trainer.limit_train_batches={settings['steps']}", "trainer.limit_val_batches=1",
        "++trainer.num_sanity_val_steps=0",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        rounds = 2 if mode == "eager" else 1
        result = compare(
            Path(tmp), settings["warmup"], overrides, True, True, [mode], rounds, True, settings["fake_train"]
        )
    memories = [e["template"].get("peak_gpu_memory_gib") for e in result["rounds"]]
    return {"table": result["table"], "peak_gpu_memory_gib": max((m for m in memories if m), default=None)}


class SyncCounter(L.Callback):
    """Counts the GPU->host synchronisations of ``steps`` training steps (after ``warmup``), with torch's sync debug
    mode: each synchronising CUDA call warns once, wherever it comes from (model, metrics, Lightning, callbacks)."""

    counts: list[float] = []  # read by the part after the run (the instance lives inside train())

    def __init__(self, warmup: int = 5, steps: int = 10) -> None:
        self.warmup, self.steps, self.seen, self._recorder = warmup, steps, 0, None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        import warnings

        import torch

        if not torch.cuda.is_available() or trainer.current_epoch != 0:
            return
        if self.seen == self.warmup:
            self._context = warnings.catch_warnings(record=True)
            self._recorder = self._context.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif self.seen == self.warmup + self.steps and self._recorder is not None:
            torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message) for w in self._recorder)
            self._context.__exit__(None, None, None)
            self._recorder = None
            SyncCounter.counts.append(syncs / self.steps)
        self.seen += 1


def part_cifar(settings: dict[str, Any], device: str) -> dict[str, Any]:
    import torch
    import torchvision
    from train_throughput import CONFIGS, seed_fake_weights, write_fake_cifar

    from image_finetune.core.cli import compose_config
    from image_finetune.training.train import train

    with tempfile.TemporaryDirectory(prefix="cifar-") as tmp:
        root = Path(tmp)
        write_fake_cifar(root / "cifar", settings["fake_train"], max(100, settings["fake_train"] // 5), learnable=True)
        overrides = [
            *settings["model"], f"trainer.max_epochs={settings['epochs']}", f"data.data_dir={root / 'cifar'}", "logger=csv",
            "+callbacks.sync_counter._target_=gpu_check.SyncCounter",
        ]  # fmt: skip
        cfg = compose_config(CONFIGS, "train", overrides, root / "run")
        seed_fake_weights(root / "torch_home", cfg.model.backbone.name, cfg.model.backbone.weights)
        assert torchvision.datasets.cifar.check_integrity("") is True  # patched: the generated files pass
        started = time.perf_counter()
        metrics = train(cfg)
        seconds = time.perf_counter() - started
    counts = sys.modules["gpu_check"].SyncCounter.counts if "gpu_check" in sys.modules else []
    return {
        "epochs": settings["epochs"],
        "val_acc": float(metrics.get("val/acc", float("nan"))),
        "test_acc": float(metrics.get("test/acc", float("nan"))),
        "seconds_per_epoch": seconds / settings["epochs"],
        "syncs_per_step": f"{counts[0]:.1f}"
        if counts
        else ("n/a on CPU" if not torch.cuda.is_available() else "not counted"),
    }


def part_decode(settings: dict[str, Any], device: str) -> dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader
    from torchvision.io import read_file
    from torchvision.transforms import v2

    from image_finetune.data.device_decode import DeviceCrops, DeviceJpegLoader, EncodedImageDataset, decode_crop_batch
    from image_finetune.data.files import ImageFileDataset, ImageLoader
    from image_finetune.data.transforms import Geometry

    size, batch = 224, settings["jpeg_batch"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="jpegs-") as tmp:
        rng = np.random.default_rng(0)
        samples = []
        base = rng.integers(
            0, 256, (24, 32, 3), dtype=np.uint8
        )  # smooth content (upscaled) + noise: photo-like entropy
        for i in range(settings["jpegs"]):
            pixels = np.asarray(
                Image.fromarray(np.roll(base, i, axis=1)).resize((500, 375), Image.Resampling.BICUBIC), dtype=np.int16
            )
            pixels = np.clip(pixels + rng.integers(-4, 5, pixels.shape), 0, 255).astype(np.uint8)
            path = Path(tmp) / f"img_{i:05d}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            samples.append((str(path), i % 10))
        keys = [(i, 1000 + i) for i in range(len(samples))]
        tf = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
        for workers in settings["workers"]:
            dataset = ImageFileDataset(samples, tf, ImageLoader(min_size=256))
            loader = DataLoader(dataset, batch_size=batch, sampler=keys, num_workers=workers)
            it = iter(loader)
            next(it)  # worker start-up is not throughput
            started, count = time.perf_counter(), 0
            for images, _ in it:
                images = images.to(device, non_blocking=True)
                count += len(images)
            _sync(device)
            rows.append(
                {
                    "path": "CPU (ImageLoader + v2)",
                    "setting": f"{workers} workers, 500x375 -> {size}",
                    "images_per_s": count / (time.perf_counter() - started),
                }
            )
            # data.decode=gpu as ImageFolderDataModule runs it: workers read bytes, the device decodes and crops.
            encoded = EncodedImageDataset(samples, DeviceJpegLoader(min_size=256))
            loader = DataLoader(
                encoded, batch_size=batch, sampler=keys, num_workers=workers, collate_fn=encoded.collate_fn
            )
            crops = DeviceCrops(Geometry(size, crop_scale=(0.08, 1.0)))
            it = iter(loader)
            crops(next(it), torch.device(device), train=True)  # worker start-up and nvJPEG's first call
            started, count = time.perf_counter(), 0
            for encoded_batch in it:
                count += len(crops(encoded_batch, torch.device(device), train=True)[0])
            _sync(device)
            rows.append(
                {
                    "path": f"data.decode=gpu ({'nvJPEG' if device == 'cuda' else 'CPU decode_jpeg standing in'})",
                    "setting": f"{workers} workers, 500x375 -> {size}",
                    "images_per_s": count / (time.perf_counter() - started),
                }
            )
        files = [read_file(path) for path, _ in samples]  # bytes in memory: the decoder alone, an upper bound
        for _ in range(2):  # the first pass warms up nvJPEG and the kernels
            started, count = time.perf_counter(), 0
            for b in range(0, len(files), batch):
                out = decode_crop_batch(
                    files[b : b + batch], size, device, train=True, seeds=[k for _, k in keys[b : b + batch]]
                )
                count += len(out)
            _sync(device)
        rows.append(
            {
                "path": f"{'nvJPEG' if device == 'cuda' else 'CPU decode_jpeg'} (data/device_decode.py)",
                "setting": f"batch {batch}, bytes in memory, 500x375 -> {size}",
                "images_per_s": count / (time.perf_counter() - started),
            }
        )
        del torch
    return {"rows": rows}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


PARTS = {
    "eager": lambda s, d: part_throughput(s, d, "eager"),
    "compiled": lambda s, d: part_throughput(s, d, "compiled"),
    "cifar": part_cifar,
    "decode": part_decode,
}

if __name__ == "__main__":
    main()
