"""Counts, on a CPU, what would make a GPU training step wait for the device: values read back to the host.

On a GPU the host queues kernels ahead of the device; anything that needs a value *from* the device (``.item()``,
``bool(t)``, ``float(t)``, ``.cpu()``, ``.tolist()``, ``.numpy()``, or an op whose output size depends on data:
``nonzero``, boolean-mask indexing, ``unique``, ``bincount``, ...) makes it wait for every queued kernel, and the step
stops overlapping with the next one. ``torch.cuda.set_sync_debug_mode`` finds these on a GPU (``gpu_check.py`` counts
them there); this finds the same calls on any device, at the two levels they happen: the aten op (through a
``TorchDispatchMode``: ``.item()``, ``bool()`` and ``float()`` all dispatch ``aten._local_scalar_dense``) and the
``Tensor`` methods that copy to the host without dispatching on a CPU tensor (``cpu``, ``numpy``, ``tolist``).

On a CPU every tensor is a host tensor, so one read is excluded by where it happens: ``torch.optim``'s
``_get_value``, which reads the optimizers' step counters. PyTorch keeps those on the host unless ``capturable`` or
``fused`` is set, on a GPU too, so reading them costs no sync there.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: aten ops that wait for the device on CUDA: a scalar read, or an output whose size depends on the data.
SYNCING_OPS = frozenset(
    {
        "aten._local_scalar_dense.default",
        "aten.is_nonzero.default",
        "aten.equal.default",
        "aten.nonzero.default",
        "aten.nonzero_static.default",
        "aten.masked_select.default",
        "aten.bincount.default",
        "aten._unique2.default",
        "aten.unique_dim.default",
        "aten.unique_consecutive.default",
        "aten.repeat_interleave.Tensor",
    }
)
#: Indexing ops that wait for the device when an index is a boolean mask (it becomes ``nonzero`` inside the kernel,
#: below where a dispatch mode sees it).
MASK_INDEXING = frozenset({"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default",
                           "aten._index_put_impl_.default"})  # fmt: skip
#: Tensor methods that copy to the host; on a CPU tensor they return without dispatching anything.
HOST_COPIES = ("cpu", "numpy", "tolist")
#: Reads that are host-only on a GPU as well (see the module docstring).
HOST_ONLY = ("torch/optim/optimizer.py", "_get_value")


def _is_mask(index: object) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _where() -> str:
    """The innermost seven calling frames (this module's own left out), for the failure message."""
    frames = traceback.extract_stack()[:-2]
    return "".join(traceback.format_list(frames[-7:]))


class _Mode(TorchDispatchMode):
    def __init__(self, record: Callable[[str], None]) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func)
        if name in SYNCING_OPS or (name in MASK_INDEXING and any(_is_mask(i) for i in args[1])):
            self.record(name + " with a boolean mask" if name in MASK_INDEXING else name)
        return func(*args, **(kwargs or {}))


class DeviceReads(L.Callback):
    """Records every read back from the device in training batches ``warmup``..``warmup + steps`` of each epoch
    (the whole cycle from one batch's start to the next's: fetch, transfer, step, logging, every callback) and in
    every validation batch but the first. ``reads[(stage, epoch)]`` counts them by op and call site."""

    def __init__(self, warmup: int = 2, steps: int = 6) -> None:
        self.warmup, self.steps = warmup, steps
        self.reads: dict[tuple[str, int], Counter[str]] = {}
        self._mode: _Mode | None = None
        self._saved: dict[str, Any] = {}
        self._key: tuple[str, int] | None = None

    def _record(self, what: str) -> None:
        where = _where()
        if HOST_ONLY[0] in where and f"in {HOST_ONLY[1]}" in where:
            return
        assert self._key is not None
        self.reads[self._key][f"{what} at\n{where}"] += 1  # _start made the entry

    def _start(self, key: tuple[str, int]) -> None:
        self._stop()
        self._key = key
        self.reads.setdefault(key, Counter())
        self._mode = _Mode(self._record)
        self._mode.__enter__()
        for name in HOST_COPIES:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def copy(tensor: torch.Tensor, *args: Any, _original: Any = original, _name: str = name, **kwargs: Any):
                self._record(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, copy)

    def _stop(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
            for name, original in self._saved.items():
                setattr(torch.Tensor, name, original)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.warmup:
            self._start(("train", trainer.current_epoch))
        elif batch_idx == self.warmup + self.steps:
            self._stop()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx > 0 and not trainer.sanity_checking:
            self._start(("val", trainer.current_epoch))

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._stop()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop()
