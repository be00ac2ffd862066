"""Training throughput of any experiment: steady-state images/s per fine-tuning phase.

    python benchmarks/train_throughput.py experiment=cifar10 trainer.max_epochs=2 trainer.limit_train_batches=100
    python benchmarks/train_throughput.py experiment=cifar10 compile=true ...
    python benchmarks/train_throughput.py --baseline --modes eager compiled --repeats 2 experiment=cifar10 ...

``--baseline`` also trains a plain PyTorch loop (``plain_loop``) on the same model, precision, memory format, batch,
data and augmentation, alternated with the template in this process (ABBA: template then plain, plain then template,
... for each of ``--modes``), and prints template/plain per phase (frozen, unfrozen): the ratio is measured in one run,
on one machine, under the same load.

On a machine without internet, ``--fake-data`` writes CIFAR-10-shaped batches of random pixels and ``--fake-weights``
seeds the torch hub cache with randomly initialised weights under the official file names (shared/GUIDE.md s.7):
the numbers measure speed only, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from hydra.utils import instantiate
from omegaconf import DictConfig

from image_finetune.core.cli import compose_config
from image_finetune.data.cifar10 import TensorImageDataset, random_crop_flip
from image_finetune.training import finetune
from image_finetune.training.train import build

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class SteadyClock:
    """Wall and CPU time of steady-state training steps, for the template and the plain loop alike.

    Steps are timed in spans of consecutive steps (``start`` .. ``pause``, with a device sync at each end). A span in
    which ``torch.compile`` traced or compiled a graph is dropped whole: with ``compile=true`` a new input shape (the
    last partial batch of an epoch) or the first backward compiles for seconds, a one-off cost that is not
    throughput, and where it lands in the timed steps would otherwise decide the ratio (on this CPU one such round
    read 0.13). ``dropped`` counts them.
    """

    def __init__(self) -> None:
        self.steps, self.images, self.elapsed, self.cpu, self.dropped = 0, 0, 0.0, 0.0, 0
        self._start: float | None = None
        self._cpu_start, self._span_steps, self._span_images, self._compiles = 0.0, 0, 0, 0

    @property
    def running(self) -> bool:
        return self._start is not None

    @property
    def counted(self) -> int:
        """Steps timed so far, the running span's included."""
        return self.steps + self._span_steps

    def start(self) -> None:
        _sync()
        self._start, self._cpu_start = time.perf_counter(), time.process_time()
        self._span_steps, self._span_images, self._compiles = 0, 0, _compiles()

    def step(self, images: int) -> None:
        if self._start is None:
            return
        if _compiles() != self._compiles:
            self._start, self.dropped = None, self.dropped + 1
            return
        self._span_steps += 1
        self._span_images += images

    def pause(self) -> None:
        if self._start is None:
            return
        _sync()
        self.elapsed += time.perf_counter() - self._start
        self.cpu += time.process_time() - self._cpu_start
        self.steps += self._span_steps
        self.images += self._span_images
        self._start = None

    def figures(self) -> dict[str, float]:
        return {
            "steps_timed": self.steps,
            "seconds_timed": self.elapsed,
            "images_per_s": self.images / self.elapsed if self.images else float("nan"),
            "cpu_ms_per_step": 1e3 * self.cpu / self.steps if self.steps else float("nan"),
            "compile_spans_dropped": self.dropped,
        }


def _compiles() -> int:
    """How many frames torch.compile has traced and graphs it has compiled or loaded, so far in this process."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return counters["frames"]["total"] + inductor["fxgraph_cache_miss"] + inductor["fxgraph_cache_hit"]


class Throughput(L.Callback):
    """Images/s over training steps, skipping the first ``warmup`` steps of each fit (compilation, worker start).

    The clock stops while validation runs (with ``compile=true`` validation compiles graphs of its own: no grad, the
    last partial batch; that is not training throughput) and restarts at the next training batch. Only steps that
    ran entirely on the clock count, and no span in which a graph was compiled (``SteadyClock``).
    """

    def __init__(self, warmup: int = 10) -> None:
        self.warmup = warmup
        self.phases: list[dict[str, float]] = []
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self.clock = SteadyClock()
        self.fit_start = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Per fit: each fine-tuning phase is one (the sanity-check validation runs before the first batch)."""
        self._reset()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.clock.running and self.steps >= self.warmup:
            self.clock.start()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.steps += 1
        self.clock.step(batch[1].shape[0])

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock.pause()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock.pause()
        self.phases.append(
            {
                "backbone_frozen": getattr(pl_module, "trainable_stages", None) == 0,
                **self.clock.figures(),
                "fit_seconds": time.perf_counter() - self.fit_start,
            }
        )


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_fake_cifar(root: Path, train: int = 50_000, test: int = 10_000, learnable: bool = False) -> None:
    """CIFAR-10's on-disk format with random pixels, and an integrity check that accepts it.

    ``learnable``: each class gets its own mean colour under the noise, so a working pipeline learns it quickly (an
    end-to-end check of data, augmentation and training on a new machine, not a measure of accuracy on CIFAR).
    """
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 216, (10, 3))
    for name, n in [*((f"data_batch_{i}", train // 5) for i in range(1, 6)), ("test_batch", test)]:
        labels = np.arange(n) % 10
        if learnable:
            pixels = colours[labels][:, :, None] + rng.integers(-40, 41, (n, 3, 1024))
            data = np.clip(pixels, 0, 255).astype(np.uint8).reshape(n, 3072)
        else:
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(batches / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels.tolist()}, f)
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
    parser.add_argument("--baseline", action="store_true", help="also time a plain PyTorch loop; print template/plain")
    parser.add_argument(
        "--modes", nargs="+", choices=["eager", "compiled"], help="compile settings to run (default: the config's)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="alternated template/plain rounds per mode (medians reported)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args, overrides = parser.parse_known_args()

    # Removed at the end: fake CIFAR, seeded weights and the run's checkpoints come to over 1 GB for ResNet-50.
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        if args.baseline or args.modes:
            result = compare(
                Path(tmp),
                args.warmup,
                overrides,
                args.fake_data,
                args.fake_weights,
                args.modes,
                args.repeats,
                args.baseline,
            )
        else:
            result = measure(Path(tmp), args.warmup, overrides, args.fake_data, args.fake_weights)
    text = json.dumps(result, indent=2)
    print(text)
    if "table" in result:
        print("\n".join(result["table"]))
    if args.json:
        args.json.write_text(text)


def _prepare(
    scratch: Path, overrides: list[str], fake_data: bool, fake_weights: bool, fake_train: int = 50_000
) -> list[str]:
    """Fake data/weights once per process; returns the overrides that point the config at them."""
    if fake_data and not (scratch / "cifar").exists():
        write_fake_cifar(scratch / "cifar", fake_train, max(100, fake_train // 5))
    if fake_data:
        overrides = [*overrides, f"data.data_dir={scratch / 'cifar'}"]
    if fake_weights:
        cfg = compose_config(CONFIGS, "train", overrides, scratch / "probe")
        seed_fake_weights(scratch / "torch_home", cfg.model.backbone.name, cfg.model.backbone.weights)
    return overrides


def measure(scratch: Path, warmup: int, overrides: list[str], fake_data: bool, fake_weights: bool) -> dict[str, Any]:
    """Fit the composed run (both phases) with a ``Throughput`` meter; the results as JSON-ready data."""
    overrides = _prepare(scratch, overrides, fake_data, fake_weights)
    result, _, _ = _template(scratch / "run", warmup, overrides)
    return result


def _build(run_dir: Path, overrides: list[str]) -> tuple[Any, DictConfig]:
    """The run as ``train.py`` builds it, without the test split's evaluation and with a CSV logger."""
    cfg = compose_config(CONFIGS, "train", [*overrides, "test=false", "logger=csv"], run_dir)
    return build(cfg), cfg


def _template(run_dir: Path, warmup: int, overrides: list[str]) -> tuple[dict[str, Any], Any, DictConfig]:
    _reset_peak_memory()
    run, cfg = _build(run_dir, overrides)
    meter = Throughput(warmup)
    run.trainer.callbacks.append(meter)
    started = time.perf_counter()
    finetune.fit(run.trainer, run.model, run.datamodule, run.schedule)
    result = {
        "overrides": overrides,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "phases": meter.phases,
        "total_seconds": time.perf_counter() - started,
        "final_val_acc": float(run.trainer.callback_metrics.get("val/acc", float("nan"))),
        "peak_gpu_memory_gib": _peak_memory_gib(),
    }
    return result, run, cfg


def compare(
    scratch: Path,
    warmup: int,
    overrides: list[str],
    fake_data: bool,
    fake_weights: bool,
    modes: list[str] | None,
    repeats: int,
    baseline: bool,
    fake_train: int = 50_000,
) -> dict[str, Any]:
    """Template (and, with ``baseline``, the plain loop) for each mode, ``repeats`` rounds in ABBA order.

    Round 0 runs the template first (its phases give the step counts), round 1 the plain loop first, and so on: on a
    shared machine whose speed drifts during a run, a fixed order would favour whichever loop runs second.
    """
    overrides = _prepare(scratch, overrides, fake_data, fake_weights, fake_train)
    if not modes:
        modes = ["compiled" if compose_config(CONFIGS, "train", overrides, scratch / "probe").compile else "eager"]
    rounds: list[dict[str, Any]] = []
    steps: dict[str, list[tuple[bool, int]]] = {}  # per mode: (frozen, timed steps) of each phase, from round 0
    for r in range(repeats):
        for mode in modes:
            mode_overrides = [*overrides, f"compile={mode == 'compiled'}"]
            compiled = mode == "compiled"
            plain_first = baseline and r % 2 == 1 and mode in steps
            entry: dict[str, Any] = {
                "round": r,
                "mode": mode,
                "order": "plain first" if plain_first else "template first",
            }
            if plain_first:
                run, cfg = _build(scratch / f"plain_{mode}_{r}", mode_overrides)
                run.datamodule.setup("fit")  # the splits and datasets the plain loop reads
                entry["plain"] = plain_loop(cfg, run, steps[mode], warmup, compiled=compiled)
                del run
            template, run, cfg = _template(scratch / f"run_{mode}_{r}", warmup, mode_overrides)
            entry["template"] = template
            steps.setdefault(mode, [(p["backbone_frozen"], p["steps_timed"]) for p in template["phases"]])
            if baseline and not plain_first:
                run.model.cpu()  # the plain loop's own model takes its place on the device
                entry["plain"] = plain_loop(cfg, run, steps[mode], warmup, compiled=compiled)
            rounds.append(entry)
            del run
    return {
        "modes": modes,
        "repeats": repeats,
        "rounds": rounds,
        **({"table": ratio_table(rounds)} if baseline else {}),
    }


SIDES = ("template", "plain")


def ratio_table(rounds: list[dict[str, Any]]) -> list[str]:
    """Markdown: per mode and phase, median img/s of template and plain loop, the median and range of the per-round
    ratios, and the training process's CPU time per step (its host work, whatever the machine's other load does to
    the wall clock; data loader workers are other processes)."""
    lines = [
        "| mode | phase | template img/s | plain img/s | template/plain | rounds' ratios | CPU ms/step, template / plain |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    keys = dict.fromkeys((e["mode"], p["backbone_frozen"]) for e in rounds for p in e["template"]["phases"])
    for mode, frozen in keys:
        pairs = [
            (t, p)
            for e in rounds if e["mode"] == mode
            for t, p in zip(e["template"]["phases"], e["plain"]["phases"]) if t["backbone_frozen"] == frozen
        ]  # fmt: skip
        if not pairs:
            continue
        ratios = [t["images_per_s"] / p["images_per_s"] for t, p in pairs]
        rates = [statistics.median(phase[side]["images_per_s"] for phase in pairs) for side in (0, 1)]
        cpu = [
            statistics.median(phase[side].get("cpu_ms_per_step", float("nan")) for phase in pairs) for side in (0, 1)
        ]
        lines.append(
            f"| {mode} | {'frozen' if frozen else 'unfrozen'} | {rates[0]:,.1f} | {rates[1]:,.1f} "
            f"| ratio {statistics.median(ratios):.3f} | {min(ratios):.3f}-{max(ratios):.3f} | {cpu[0]:,.1f} / {cpu[1]:,.1f} |"
        )
    dropped = [sum(p.get("compile_spans_dropped", 0) for e in rounds for p in e[side]["phases"]) for side in SIDES]
    if any(dropped):
        lines += ["", f"Spans of steps left out because torch.compile compiled in them: template {dropped[0]}, "
                      f"plain {dropped[1]} (SteadyClock)."]  # fmt: skip
    return lines


# ---- the plain loop ---------------------------------------------------------------------------------------------------
def plain_loop(
    cfg: DictConfig, run: Any, phases: list[tuple[bool, int]], warmup: int, compiled: bool
) -> dict[str, Any]:
    """What a hand-written PyTorch loop does with the same model, precision, memory format, batch, data and augmentation.

    A fresh model from the same config (same weights), frozen exactly as the template freezes it, AdamW with the
    same groups and schedule, autocast for the config's precision, and data as the template's data module serves it.
    For in-memory CIFAR the loop indexes the uint8 training set on the device itself (what a hand-written loop
    does); for other data it iterates the data module's own training loader. No validation, logging or callbacks.
    """
    trainer = run.trainer
    device = trainer.strategy.root_device
    datamodule = run.datamodule
    model = instantiate(cfg.model, class_names=datamodule.class_names).to(device)
    net = model.net
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    precision = str(cfg.trainer.precision)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    smoothing = float(cfg.model.loss.get("label_smoothing", 0.0))  # loss=cross_entropy (the default)
    optimizer = model.optimizer_factory(model.param_groups())
    total = sum(warmup + 4 * steps for _, steps in phases)  # the loop's bound on steps (see below)
    scheduler = model.scheduler_factory(optimizer, total_steps=total) if model.scheduler_factory is not None else None
    batches = _plain_batches(datamodule, device)
    _reset_peak_memory()
    results = []
    for frozen, steps in phases:
        model.set_trainable_stages(0 if frozen else None)  # as finetune.fit sets it for a frozen / unfrozen phase
        model._apply_freeze()  # the same parameters and layers frozen as in the template's phase
        model.train()
        forward = net
        if compiled:
            torch._dynamo.reset()
            forward = torch.compile(net)
        clock = SteadyClock()
        step = 0
        # as many timed steps as the template's; a span dropped for compiling is made up, within a bound
        while clock.counted < steps and step < warmup + 4 * steps:
            if step >= warmup and not clock.running:
                clock.start()
            images, labels = next(batches)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(forward(images), labels, label_smoothing=smoothing)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            clock.step(labels.shape[0])
            step += 1
        clock.pause()
        results.append({"backbone_frozen": frozen, **clock.figures()})
    return {"phases": results, "peak_gpu_memory_gib": _peak_memory_gib()}


def _plain_batches(datamodule: Any, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless training batches (float images in [0, 1], labels) on ``device``, augmented as the template's."""
    train = datamodule.datasets["train"]
    batch_size = datamodule.batch_size
    if isinstance(train, TensorImageDataset):
        images, labels = train.images.to(device), train.labels.to(device)
        n = len(labels)
        while True:
            order = torch.randperm(n, device=device)
            seeds = torch.randint(0, 2**62, (n,), device=device)
            for start in range(0, n - batch_size + 1, batch_size):
                index = order[start : start + batch_size]
                yield (
                    random_crop_flip(images[index], seeds[start : start + batch_size]).float().div_(255),
                    labels[index],
                )
    loader = datamodule.train_dataloader()  # once, as a hand-written loop does: its persistent workers stay up
    while True:
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            yield datamodule.device_transform(images.float().div_(255), train=True), labels


def _reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


if __name__ == "__main__":
    sys.exit(main())
