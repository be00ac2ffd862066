"""``data=hf``: a Hugging Face dataset from local parquet files trains and reports its bad row, offline.

One training run (module-scoped) serves the script test (every entry script on a hf checkpoint: test_entry_matrix.py); the column, ClassLabel, split and extra handling is tested
on the data module directly.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pytest
from hf_parquet import CORRUPT_ROW, DIGIT_NAMES, write_digits_parquet

from image_finetune.core.errors import ConfigError, UserError
from image_finetune.data import HFDataModule
from image_finetune.data.imagefolder import stratified_split

REPO = Path(__file__).resolve().parents[1]
TINY = ["trainer=cpu", "data.image_size=32", "model.backbone.weights=null", "data.num_workers=0", "logger=csv"]
TRAIN_ROWS, TEST_ROWS = 240, 60


def run_script(*args: str, hf_home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


class Runs:
    """The parquet folder and one training run on it (every entry script on a hf checkpoint: test_entry_matrix.py)."""

    def __init__(self, root: Path) -> None:
        self.data = write_digits_parquet(root / "parquet", TRAIN_ROWS, TEST_ROWS)
        self.hf_home, self.run_dir = root / "hf_home", root / "train"
        self.train = run_script(
            "train.py", "data=hf", f"data.path={self.data}", *TINY, f"paths.data_dir={root / 'data'}",
            f"hydra.run.dir={self.run_dir}", "trainer.max_epochs=1", "finetune=full", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1", "test=false", hf_home=self.hf_home,
        )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("hf"))


def test_training_on_parquet_files_reports_the_bad_row_and_goes_on(runs: Runs):
    result = runs.train
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    output = result.stdout + result.stderr
    assert f"skipping row {CORRUPT_ROW} of data.path='{runs.data}' split 'train': not an image" in output
    assert (
        f"data.path='{runs.data}' split 'train': kept {TRAIN_ROWS - 1} images in 10 classes; left out 1 (1 not an image)"
    ) in output
    with open(runs.run_dir / "data_report.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows == [["split", "path", "reason"], ["train", f"train/{CORRUPT_ROW}", "not an image"]]
    assert (runs.run_dir / "checkpoints" / "last.ckpt").is_file()


# ---- the data module, in process ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits_parquet(tmp_path_factory.mktemp("hf_unit") / "parquet", 120, 30)


def module(path: Path, tmp_path: Path, **kwargs: object) -> HFDataModule:
    return HFDataModule(path=path, image_size=32, num_workers=0, hf_cache_dir=tmp_path / "hf_cache", **kwargs)


def test_classlabel_names_the_classes_and_val_is_held_out_of_train_by_the_image_folder_rule(parquet, tmp_path):
    dm = module(parquet, tmp_path, val_fraction=0.2)
    dm.setup("fit")
    assert dm.class_names == DIGIT_NAMES
    assert sorted(dm.datasets) == ["test", "train", "val"]  # test as given; val split off train
    table = datasets.load_dataset("parquet", data_dir=str(parquet), cache_dir=str(tmp_path / "hf_cache"))
    labels = table["train"]["label"]
    pool = [(f"train/{row}", label) for row, label in enumerate(labels) if row != CORRUPT_ROW]
    assert dm.splits["val"] == stratified_split(pool, [0.2], ["val"], DIGIT_NAMES, dm.seed)["val"]
    assert dm.splits["test"] == [(f"test/{row}", label) for row, label in enumerate(table["test"]["label"])]
    image, label = dm.datasets["val"][0]
    assert tuple(image.shape) == (3, 32, 32) and str(image.dtype) == "torch.uint8"
    assert label == dict(dm.splits["val"])[dm.splits["val"][0][0]]


def test_other_label_values_become_sorted_classes_and_unlabelled_rows_are_left_out(parquet, tmp_path):
    """A save_to_disk folder with splits train/dev and string labels; rows without a label are left out."""
    source = datasets.load_dataset("parquet", data_dir=str(parquet), cache_dir=str(tmp_path / "hf_cache"))
    names = ["zebra", "apple", "mango"]

    def relabel(split: datasets.Dataset, unlabelled: set[int]) -> datasets.Dataset:
        words = [None if i in unlabelled else names[v % 3] for i, v in enumerate(split["label"])]
        return split.remove_columns("label").add_column("fruit", words)

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": relabel(source["train"], {3}), "dev": relabel(source["test"], set())}).save_to_disk(
        str(saved)
    )
    dm = module(saved, tmp_path, label_column="fruit", test_fraction=0)
    dm.setup("fit")
    assert dm.class_names == ["apple", "mango", "zebra"]
    assert sorted(dm.datasets) == ["train", "val"]  # dev is the validation split, used as given
    assert {key for key, _ in dm.splits["val"]} == {f"dev/{row}" for row in range(30)}
    kept = {key for key, _ in dm.splits["train"]}
    assert "train/3" not in kept and f"train/{CORRUPT_ROW}" not in kept and len(kept) == 118
    counts = Counter(label for _, label in dm.splits["train"])
    assert set(counts) == {0, 1, 2}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"image_column": "img"},
            "data.image_column='img': data.path='{path}' split 'train' has no such column; its columns are "
            "['image', 'label']. Set data.image_column to the column that holds the images.",
        ),
        (
            {"label_column": "target"},
            "data.label_column='target': data.path='{path}' split 'train' has no such column; its columns are "
            "['image', 'label']. Set data.label_column to the column that holds the labels.",
        ),
        (
            {"image_column": "label"},
            "data.image_column='label' holds ClassLabel(names=" + repr(DIGIT_NAMES) + "), not images, in "
            "data.path='{path}' split 'train': set data.image_column to a column of images (an Image feature or "
            "bytes); columns: ['image', 'label']",
        ),
    ],
)
def test_a_wrong_column_is_one_line_naming_the_key(parquet, tmp_path, override, message):
    dm = module(parquet, tmp_path, **override)
    with pytest.raises(ConfigError) as error:
        dm.setup("fit")
    assert str(error.value) == message.format(path=parquet)


def test_without_the_extra_the_error_names_it(parquet, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ModuleNotFoundError
    with pytest.raises(UserError) as error:
        module(parquet, tmp_path)
    assert str(error.value) == (
        "data=hf needs the Hugging Face datasets package (datasets is not installed): pip install 'image-finetune[hf]'"
    )
