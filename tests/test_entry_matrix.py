"""Every entry script on every data module the repo ships, run as a user runs them (subprocesses).

``python train.py`` once per data module (image folder, CIFAR-10, digits, ``DatasetDataModule`` with the flowers102
config), then ``eval.py``, ``predict.py`` and ``export.py format=onnx`` on its checkpoint, and ``lr_find.py`` on the same
data. Offline stand-ins as elsewhere in the suite: fake CIFAR-10 batches whose integrity check passes (a
``sitecustomize`` does in the subprocess what conftest's ``cifar_root`` does in-process) and ``support.FakeFlowers102``
named on the command line. Runs are tiny: 32 px, random init, a few batches, one compute thread per process.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from shared_runs import once_per_session
from support import CIFAR_CLASSES, CIFAR_STANDIN, FakeFlowers102, make_fake_cifar, make_image_folder

pytestmark = pytest.mark.slow  # 20 subprocesses, each mostly importing torch and Lightning (~10 s of CPU)

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MODULES = ["imagefolder", "cifar10", "digits", "dataset"]
#: What every run shares: CPU, no pretrained weights (nothing to download), no worker processes, a CSV logger.
COMMON = ["trainer=cpu", "model.backbone.weights=null", "data.num_workers=0", "logger=csv"]
#: The least training that leaves a checkpoint and test metrics: one frozen epoch of two batches.
TRAIN = ["finetune=linear_probe", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
         "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]  # fmt: skip
PREDICT_IMAGES = 5


@dataclass
class Data:
    """A data module as the command line names it, offline."""

    args: list[str]
    """The overrides that select it (train.py, lr_find.py)."""
    eval_args: list[str]
    """What eval.py needs besides the checkpoint (nothing: it rebuilds the data the checkpoint stored)."""
    env: dict[str, str]
    class_names: list[str]


@dataclass
class Trained:
    """One data module's training run."""

    data: Data
    root: Path
    checkpoint: Path


def run(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python <script> args...`` in the repo, as a user runs it; it must exit 0 without a traceback."""
    result = subprocess.run(
        [sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, f"{script} exited {result.returncode}:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def script_env(*paths: Path) -> dict[str, str]:
    """This environment with ``paths`` first on PYTHONPATH and one compute thread (2 cores, other tests beside)."""
    pythonpath = [str(p) for p in paths] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def data_for(name: str, root: Path, request: pytest.FixtureRequest, write: bool = True) -> Data:
    """The data module ``name`` with its files under ``root``, written there if ``write``."""
    if name == "imagefolder":
        # 3 classes x 12: test_fraction=auto holds a test split out
        images = make_image_folder(root / "images") if write else root / "images"
        args = ["data=imagefolder", f"data.root={images}", "data.image_size=32"]
        return Data(args, [], script_env(), ["class_0", "class_1", "class_2"])
    if name == "digits":
        args = ["data=digits", f"paths.data_dir={request.getfixturevalue('digits_data_dir')}"]
        return Data(args, [], script_env(), [str(digit) for digit in range(10)])
    if name == "cifar10":
        standin, cifar = root / "standin", root / "cifar"
        if write:
            standin.mkdir()
            (standin / "sitecustomize.py").write_text(CIFAR_STANDIN)
            make_fake_cifar(cifar)
        # the experiment as shipped (device pad-crop + flip, upsampling in the network), at a CPU test's size
        args = ["experiment=cifar10", f"data.data_dir={cifar}", "data.val_size=20", "data.batch_size=16",
                "model.backbone.name=resnet18", "model.upsample_to=48", "channels_last=false"]  # fmt: skip
        return Data(args, [], script_env(standin), CIFAR_CLASSES)
    # DatasetDataModule: configs/data/flowers102.yaml with the stand-in dataset named on the command line, 32 px
    args = ["data=flowers102", "data.batch_size=4"]
    for split in ("train", "val", "test"):
        args += [f"data.{split}._target_=support.FakeFlowers102", f"data.{split}.transform.transforms.1.size=36",
                 f"data.{split}.transform.transforms.2.size=32"]  # fmt: skip
    # A checkpoint may not choose code (a dataset class is code), so eval.py is told the data, as a user would be.
    return Data(args, [*args, "data.num_workers=0"], script_env(TESTS), FakeFlowers102.classes)


@pytest.fixture(scope="module", params=MODULES)
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """``python train.py`` once per data module (and session: both workers share it); every script below runs on its
    checkpoint and writes under its own folder."""

    def build(root: Path) -> None:
        data = data_for(request.param, root, request)
        run("train.py", *data.args, *COMMON, *TRAIN, f"hydra.run.dir={root / 'train'}", env=data.env)

    root = once_per_session(tmp_path_factory, f"matrix-{request.param}", build)
    out = tmp_path_factory.mktemp(f"matrix-{request.param}")
    return Trained(
        data_for(request.param, root, request, write=False), out, root / "train" / "checkpoints" / "last.ckpt"
    )


def test_train_py_leaves_a_checkpoint_and_test_metrics(trained):
    metrics = json.loads((trained.checkpoint.parents[1] / "metrics.json").read_text())
    assert trained.checkpoint.is_file()
    assert 0.0 <= metrics["test"]["acc"] <= 1.0, metrics


def test_eval_py_tests_the_checkpoint_with_test_time_augmentation(trained):
    out = trained.root / "eval"
    run("eval.py", f"ckpt_path={trained.checkpoint}", *trained.data.eval_args, "trainer=cpu",
        "trainer.limit_test_batches=1", "tta=five_crop", f"hydra.run.dir={out}", env=trained.data.env)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["tta"] == "five_crop"
    assert 0.0 <= metrics["test/acc"] <= 1.0 and 0.0 <= metrics["tta/test/acc"] <= 1.0, metrics
    assert sorted(metrics["per_class"]) == sorted(trained.data.class_names)  # metrics.json sorts its keys
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["num_samples"] > 0
    assert {row["target"] for row in rows} <= set(trained.data.class_names)


def test_predict_py_classifies_a_folder_with_the_checkpoint(trained):
    images = make_image_folder(trained.root / "to_predict", classes=1, per_class=PREDICT_IMAGES, size=40)
    out = trained.root / "predict"
    run("predict.py", f"ckpt_path={trained.checkpoint}", f"input={images}", "device=cpu", "num_workers=0",
        "progress=false", f"hydra.run.dir={out}", env=trained.data.env)  # fmt: skip
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(row["path"]).name for row in rows) == sorted(p.name for p in images.rglob("img_*"))
    assert all(row["label_1"] in trained.data.class_names and not row["reason"] for row in rows), rows


def test_export_py_writes_onnx_and_its_json(trained):
    out = trained.root / "export"
    run("export.py", f"ckpt_path={trained.checkpoint}", "format=onnx", f"hydra.run.dir={out}", env=trained.data.env)
    sidecar = json.loads((out / "model.onnx.json").read_text())
    assert (out / "model.onnx").stat().st_size > 0
    assert sidecar["class_names"] == trained.data.class_names and sidecar["preprocessing"]["crop"] > 0, sidecar


def test_lr_find_py_sweeps_on_the_data_module(trained):
    out = trained.root / "lr_find"
    run("lr_find.py", *trained.data.args, *COMMON, "trainer.limit_train_batches=2", "lr_find.num_steps=10",
        f"hydra.run.dir={out}", env=trained.data.env)  # fmt: skip
    result = json.loads((out / "lr_find.json").read_text())
    assert 0 < len(result["frozen"]["lrs"]) <= 10 and 0 < len(result["unfrozen"]["lrs"]) <= 10, result
    assert set(result["suggested"]) == {"model.optimizer.lr", "finetune.backbone_lr_ratio"}
