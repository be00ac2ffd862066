"""Every entry script on every data module the repo ships, run as a user runs them (subprocesses).

``python train.py`` once per data module (image folder, CIFAR-10, digits, ``DatasetDataModule`` with the flowers102
config, a CSV file of labels, a Hugging Face dataset from local parquet files), then ``eval.py``, ``predict.py``,
``export.py format=onnx``, ``find_issues.py`` and ``serve.py`` on its checkpoint, and ``lr_find.py`` on the same data.
Offline stand-ins as elsewhere in the suite: fake CIFAR-10 batches whose integrity check passes (a ``sitecustomize``
does in the subprocess what conftest's ``cifar_root`` does in-process), ``support.FakeFlowers102`` named on the command
line, sklearn's digits as files or parquet rows. Runs are tiny: 32 px, random init, a few batches, one compute thread
per process.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hf_parquet import CORRUPT_ROW, DIGIT_NAMES, write_digits_parquet
from shared_runs import once_per_session
from support import (
    CIFAR_CLASSES,
    CIFAR_STANDIN,
    FakeFlowers102,
    make_fake_cifar,
    make_image_folder,
    write_digits,
    write_table,
)

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "benchmarks"))  # serve.py's process and request helpers (test_serve.py's too)
from load_test import ServerProcess, post  # noqa: E402

pytestmark = pytest.mark.slow  # 42 subprocesses, each mostly importing torch and Lightning (~10 s of CPU)

MODULES = ["imagefolder", "cifar10", "digits", "dataset", "csv", "hf"]
#: data=hf: parquet rows of sklearn's digits (train row CORRUPT_ROW does not decode), no val split (held out of train)
HF_TRAIN_ROWS, HF_TEST_ROWS = 60, 20
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
    ids: set[str] = field(default_factory=set)
    """Every image's name in reports (find_issues.py): its file path, or ``<split>/<index>``."""


@dataclass
class Trained:
    """One data module's training run."""

    data: Data
    root: Path
    checkpoint: Path
    name: str = ""
    """The data module's row in ``MODULES``."""


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
        return Data(args, [], script_env(), ["class_0", "class_1", "class_2"], files(images))
    if name == "digits":
        data_dir = request.getfixturevalue("digits_data_dir")
        args = ["data=digits", f"paths.data_dir={data_dir}"]
        return Data(args, [], script_env(), [str(digit) for digit in range(10)], files(data_dir / "digits"))
    if name == "csv":
        # sklearn's digits 0-2 as files, 12 each (a test split is held out), listed in a CSV file by name
        images, table = root / "images", root / "labels.csv"
        if write:
            write_table(table, ["path", "label"], [[name, digit] for name, digit in write_digits(images, 12)])
        args = ["data=csv", f"data.file={table}", f"data.image_dir={images}", "data.image_size=32"]
        return Data(args, [], script_env(), ["0", "1", "2"], files(images))
    if name == "hf":
        parquet = root / "parquet"
        if write:
            write_digits_parquet(parquet, HF_TRAIN_ROWS, HF_TEST_ROWS)
        env = {**script_env(), "HF_HOME": str(root / "hf_home"), "HF_DATASETS_OFFLINE": "1"}
        rows = {f"train/{i}" for i in range(HF_TRAIN_ROWS) if i != CORRUPT_ROW} | {
            f"test/{i}" for i in range(HF_TEST_ROWS)
        }
        return Data(["data=hf", f"data.path={parquet}", "data.image_size=32"], [], env, list(DIGIT_NAMES), rows)
    if name == "cifar10":
        standin, cifar = root / "standin", root / "cifar"
        if write:
            standin.mkdir()
            (standin / "sitecustomize.py").write_text(CIFAR_STANDIN)
            make_fake_cifar(cifar)
        # the experiment as shipped (device pad-crop + flip, upsampling in the network), at a CPU test's size
        args = ["experiment=cifar10", f"data.data_dir={cifar}", "data.val_size=20", "data.batch_size=16",
                "model.backbone.name=resnet18", "model.upsample_to=48", "channels_last=false"]  # fmt: skip
        # named by their place in CIFAR-10's own sets (make_fake_cifar: 100 training, 30 test images)
        ids = {f"train/{i}" for i in range(100)} | {f"test/{i}" for i in range(30)}
        return Data(args, [], script_env(standin), CIFAR_CLASSES, ids)
    # DatasetDataModule: configs/data/flowers102.yaml with the stand-in dataset named on the command line, 32 px
    args = ["data=flowers102", "data.batch_size=4"]
    for split in ("train", "val", "test"):
        args += [f"data.{split}._target_=support.FakeFlowers102", f"data.{split}.transform.transforms.1.size=36",
                 f"data.{split}.transform.transforms.2.size=32"]  # fmt: skip
    # A checkpoint may not choose code (a dataset class is code), so eval.py is told the data, as a user would be.
    sizes = {split: len(FakeFlowers102("", split)) for split in ("train", "val", "test")}
    ids = {f"{split}/{i}" for split, n in sizes.items() for i in range(n)}
    return Data(args, [*args, "data.num_workers=0"], script_env(TESTS), FakeFlowers102.classes, ids)


def files(root: Path) -> set[str]:
    """The image files under ``root``, as reports name them."""
    return {str(p) for p in root.rglob("*") if p.suffix in (".png", ".jpg")}


@pytest.fixture(scope="module", params=MODULES)
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """``python train.py`` once per data module (and session: both workers share it); every script below runs on its
    checkpoint and writes under its own folder."""

    root = train_once(request.param, request, tmp_path_factory)
    out = tmp_path_factory.mktemp(f"matrix-{request.param}")
    checkpoint = root / "train" / "checkpoints" / "last.ckpt"
    return Trained(data_for(request.param, root, request, write=False), out, checkpoint, request.param)


def train_once(name: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's shared ``train.py`` run on data module ``name``: its folder (``train/`` the run dir,
    ``train.log`` what it printed; test_hf_data.py reads the hf one's)."""

    def build(root: Path) -> None:
        data = data_for(name, root, request)
        result = run("train.py", *data.args, *COMMON, *TRAIN, f"hydra.run.dir={root / 'train'}", env=data.env)
        (root / "train.log").write_text(result.stdout + result.stderr)

    return once_per_session(tmp_path_factory, f"matrix-{name}", build)


@dataclass
class Predicted:
    """predict.py's answers for a folder of images, by path: ``label_i``/``probability_i`` of each row."""

    images: Path
    rows: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def predicted(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Predicted:
    """``python predict.py`` on a folder of images, once per data module and session (serve.py is compared to it)."""

    def build(root: Path) -> None:
        images = make_image_folder(root / "to_predict", classes=1, per_class=PREDICT_IMAGES, size=40)
        run("predict.py", f"ckpt_path={trained.checkpoint}", f"input={images}", "device=cpu", "num_workers=0",
            "progress=false", f"hydra.run.dir={root / 'predict'}", env=trained.data.env)  # fmt: skip

    root = once_per_session(tmp_path_factory, f"matrix-{trained.name}-predict", build)
    with open(root / "predict" / "predictions.csv", newline="") as f:
        return Predicted(root / "to_predict", {row["path"]: row for row in csv.DictReader(f)})


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
    if trained.name == "hf":  # the dataset's own test split, whole, its rows named <split>/<row>
        assert [row["path"] for row in rows] == [f"test/{i}" for i in range(HF_TEST_ROWS)]


def test_predict_py_classifies_a_folder_with_the_checkpoint(trained, predicted):
    rows = list(predicted.rows.values())
    assert sorted(Path(row["path"]).name for row in rows) == sorted(p.name for p in predicted.images.rglob("img_*"))
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


def test_find_issues_py_names_every_image_by_its_path_or_split_and_index(trained):
    """Out-of-fold probabilities (as a k-fold sweep writes them) for every image but one, by the names the data
    module should give them: all but that one match, and the cross-validation predicts it."""
    out, names = trained.root / "find_issues", sorted(trained.data.ids)
    k = len(trained.data.class_names)
    oof = write_table(trained.root / "oof.csv", ["path", *(f"prob_{c}" for c in trained.data.class_names)],
                      [[name, *[str(1 / k)] * k] for name in names[1:]])  # fmt: skip
    result = run("find_issues.py", f"ckpt_path={trained.checkpoint}", *trained.data.eval_args, f"pred_probs={oof}",
                 "folds=2", "device=cpu", "num_workers=0", f"hydra.run.dir={out}", env=trained.data.env)  # fmt: skip
    summary = json.loads((out / "issues.json").read_text())
    assert summary["images"] == len(names)  # every image of the data, read at the eval transform
    assert summary["pred_probs"] == (
        f"out-of-fold probabilities from {oof} for {len(names) - 1} images; 2-fold stratified logistic regression on "
        "the checkpoint's embeddings for the other 1"
    )
    assert [line for line in result.stdout.splitlines() if line.startswith("label issues: ")] == [
        f"label issues: {summary['label_issues']} of {len(trained.data.ids)} images "
        f"({', '.join(f'{s} {n}' for s, n in issue_splits(out).items())}); "
        f"near-duplicate groups: {summary['near_duplicate_groups']} ({summary['leaking_groups']} cross splits: leak); "
        f"outliers: {summary['outliers']} -> {out}"
    ]
    reports = {name: read_rows(out / f"{name}.csv") for name in ("label_issues", "near_duplicates", "outliers")}
    flagged = [row["path"] for row in reports["label_issues"]]
    assert len(flagged) == len(set(flagged)) == summary["label_issues"]  # one row per flagged image
    assert len(reports["outliers"]) == summary["outliers"]
    named = {row["path"] for rows in reports.values() for row in rows}
    assert named <= trained.data.ids, sorted(named - trained.data.ids)[:5]


def issue_splits(out: Path) -> dict[str, int]:
    """label_issues.csv's rows per split, in the summary line's order (every split of the data, 0 where none)."""
    splits = json.loads((out / "issues.json").read_text())["splits"]
    counts = {split: 0 for split in ("train", "val", "test") if split in splits}
    for row in read_rows(out / "label_issues.csv"):
        counts[row["split"]] += 1
    return counts


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_serve_py_answers_as_predict_py(trained, predicted):
    image = predicted.images / "class_0" / "img_000.jpg"
    out = trained.root / "serve"
    server = ServerProcess(f"ckpt_path={trained.checkpoint}", "accelerator=cpu", "access_log=false",
                           f"hydra.run.dir={out}", log_path=trained.root / "serve.log", env=trained.data.env)  # fmt: skip
    try:
        server.wait_healthy(deadline_s=240)
        status, answer = post(server.url, image.read_bytes(), "image/jpeg")
    finally:
        code = server.stop()
    log = server.log_path.read_text(errors="replace")
    assert code == 0 and "Traceback" not in log, log[-3000:]  # SIGTERM: a clean shutdown, its workers with it
    assert status == 200, answer
    expected = predicted.rows[str(image)]
    assert answer["labels"] == [expected[f"label_{i}"] for i in range(1, len(answer["labels"]) + 1)]
    probabilities = [float(expected[f"probability_{i}"]) for i in range(1, len(answer["labels"]) + 1)]
    assert max(abs(a - b) for a, b in zip(answer["probabilities"], probabilities)) <= 1e-5, (answer, expected)
