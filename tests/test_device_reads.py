"""A training or validation step never waits for the device (issue 13): no value is read back to the host.

Checked on a CPU by ``device_reads.DeviceReads`` (see its docstring for what counts), through ``train(cfg)`` with the
experiment's own callbacks, logger and progress bar, in the frozen and the unfrozen phase.
"""

from __future__ import annotations

from collections import Counter

import pytest
from device_reads import DeviceReads

from image_finetune.training.train import train

# The counted training steps are batches 2..7 (from 0) of each epoch; Lightning reads the logged values back on its logging steps
# (every ``trainer.log_every_n_steps``), which must fall outside them: that read is Lightning's, once per 10 steps.
COMMON = ["trainer=cpu", "trainer.max_epochs=2", "trainer.limit_train_batches=10", "trainer.log_every_n_steps=1000",
          "trainer.limit_val_batches=4", "trainer.limit_test_batches=1", "++trainer.num_sanity_val_steps=0",
          "+callbacks.device_reads._target_=device_reads.DeviceReads"]  # fmt: skip
EXPERIMENTS = {
    # the image-folder path: decoding and augmentation in a worker process, uint8 -> float on the device
    "digits": ["data.num_workers=1", "data.batch_size=16"],
    # CIFAR-10 resident on the device: gathers, seeded crops and flips on the device, bf16 autocast as on a GPU
    "cifar10": ["experiment=cifar10", "model.backbone.name=resnet18", "model.backbone.weights=IMAGENET1K_V1",
                "model.upsample_to=null", "data.batch_size=4", "data.val_size=20", "trainer.precision=bf16-mixed"],
}  # fmt: skip


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> list[DeviceReads]:
    """The ``DeviceReads`` instance that ``train`` builds from the config."""
    made: list[DeviceReads] = []
    original = DeviceReads.__init__

    def init(self: DeviceReads, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(DeviceReads, "__init__", init)
    return made


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_training_and_validation_steps_read_nothing_back_from_the_device(
    compose_cfg, pretrained, cifar_root, counter, experiment
):
    where = [f"data.data_dir={cifar_root}"] if experiment == "cifar10" else []
    cfg = compose_cfg(*COMMON, *EXPERIMENTS[experiment], *where)
    train(cfg)
    (reads,) = counter
    assert set(reads.reads) == {(stage, epoch) for stage in ("train", "val") for epoch in (0, 1)}, reads.reads
    found = {key: dict(count) for key, count in reads.reads.items() if count}
    assert not found, "reads back from the device per step:\n" + "\n".join(
        f"{key}: {n} x {where}" for key, count in found.items() for where, n in count.items()
    )


def test_the_counter_sees_item_bool_nonzero_and_host_copies():
    """The check above cannot pass by seeing nothing: each kind of read it claims to find is found."""
    import torch

    reads = DeviceReads()
    x = torch.arange(6.0)
    reads._start(("train", 0))
    try:
        x.sum().item(), float(x[0]), bool(x[1]), x[x > 2], x.nonzero(), x.cpu(), x.tolist(), x.numpy()
        x[x > 4] = 0.0
        x[torch.tensor([0, 1])] = 1.0  # integer indices: no read
    finally:
        reads._stop()
    x.cpu(), x.sum().item()  # after the window: not counted
    counts = Counter()
    for where, n in reads.reads[("train", 0)].items():
        counts[where.split(" at\n")[0]] += n
    assert counts == {
        "aten._local_scalar_dense.default": 3,
        "aten.index.Tensor with a boolean mask": 1,
        "aten.index_put_.default with a boolean mask": 1,
        "aten.nonzero.default": 1,
        "Tensor.cpu": 1,
        "Tensor.tolist": 1,
        "Tensor.numpy": 1,
    }, counts
