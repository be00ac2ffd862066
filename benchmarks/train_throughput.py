"""Training throughput of any experiment: steady-state images/s per fine-tuning phase.

    python benchmarks/train_throughput.py experiment=cifar10 trainer.max_epochs=2 trainer.limit_train_batches=100
    python benchmarks/train_throughput.py experiment=cifar10 compile=true ...

On a machine without internet, ``--fake-data`` writes CIFAR-10-shaped batches of random pixels and ``--fake-weights``
seeds the torch hub cache with randomly initialised weights under the official file names (shared/GUIDE.md s.7):
the numbers measure speed only, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torchvision

from image_finetune.cli import compose_config
from image_finetune import finetune
from image_finetune.train import build

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class Throughput(L.Callback):
    """Images/s over training steps, skipping the first ``warmup`` steps of each fit (compilation, worker start).

    The clock stops while validation runs (with ``compile=true`` validation compiles graphs of its own: no grad, the
    last partial batch; that is not training throughput) and restarts at the next training batch. Only steps that
    ran entirely on the clock count.
    """

    def __init__(self, warmup: int = 10) -> None:
        self.warmup = warmup
        self.phases: list[dict[str, float]] = []
        self._reset()

    def _reset(self) -> None:
        self.steps, self.timed_steps, self.images, self.elapsed = 0, 0, 0, 0.0
        self.start: float | None = None
        self.fit_start = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Per fit: each fine-tuning phase is one (the sanity-check validation runs before the first batch)."""
        self._reset()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.start is None and self.steps >= self.warmup:
            _sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps += 1
        if self.start is not None:
            self.timed_steps += 1
            self.images += batch[1].shape[0]

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()
        self.phases.append(
            {
                "backbone_frozen": getattr(pl_module, "trainable_stages", None) == 0,
                "steps_timed": self.timed_steps,
                "seconds_timed": self.elapsed,
                "images_per_s": self.images / self.elapsed if self.images else float("nan"),
                "fit_seconds": time.perf_counter() - self.fit_start,
            }
        )

    def _pause(self) -> None:
        if self.start is not None:
            _sync()
            self.elapsed += time.perf_counter() - self.start
            self.start = None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_fake_cifar(root: Path, train: int = 50_000, test: int = 10_000) -> None:
    """CIFAR-10's on-disk format with random pixels, and an integrity check that accepts it."""
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", train // 5) for i in range(1, 6)), ("test_batch", test)]:
        with open(batches / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": (np.arange(n) % 10).tolist()}, f)
    with open(batches / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    torchvision.datasets.cifar.check_integrity = lambda *args, **kwargs: True


def seed_fake_weights(torch_home: Path, backbone: str, weights: str) -> None:
    enum = torchvision.models.get_model_weights(backbone)[weights]
    target = torch_home / "hub" / "checkpoints" / os.path.basename(enum.url)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.get_model(backbone).state_dict(), target)
    os.environ["TORCH_HOME"] = str(torch_home)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fake-data", action="store_true", help="random CIFAR-10-shaped data (no download)")
    parser.add_argument("--fake-weights", action="store_true", help="random weights under the official file name")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args, overrides = parser.parse_known_args()

    # Removed at the end: fake CIFAR, seeded weights and the run's checkpoints come to over 1 GB for ResNet-50.
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        result = measure(Path(tmp), args.warmup, overrides, args.fake_data, args.fake_weights)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


def measure(scratch: Path, warmup: int, overrides: list[str], fake_data: bool, fake_weights: bool) -> dict[str, Any]:
    """Fit the composed run (both phases) with a ``Throughput`` meter; the results as JSON-ready data."""
    if fake_data:
        write_fake_cifar(scratch / "cifar")
        overrides = [*overrides, f"data.data_dir={scratch / 'cifar'}"]
    cfg = compose_config(CONFIGS, "train", [*overrides, "test=false", "logger=csv"], scratch / "run")
    if fake_weights:
        seed_fake_weights(scratch / "torch_home", cfg.model.backbone.name, cfg.model.backbone.weights)

    run = build(cfg)
    meter = Throughput(warmup)
    run.trainer.callbacks.append(meter)
    started = time.perf_counter()
    finetune.fit(run.trainer, run.model, run.datamodule, run.schedule)
    return {
        "overrides": overrides,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "phases": meter.phases,
        "total_seconds": time.perf_counter() - started,
        "final_val_acc": float(run.trainer.callback_metrics.get("val/acc", float("nan"))),
    }


if __name__ == "__main__":
    sys.exit(main())
