"""``data=csv``: labels in a CSV file (or a DataFrame) train through the image-folder machinery, rows whose file is
missing or broken are named by their row and left out, a Ctrl-C'd run resumes bitwise, and a bad table is one line
naming the file and the column. Every entry script on a csv checkpoint: test_entry_matrix.py's csv row.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image
from support import write_digits, write_table
from test_entry_matrix import COMMON, Data, Trained, script_env
from test_interrupts import IN_EPOCH_2, LINE, ctrl_c, run
from test_resume import assert_bitwise_equal, weights

from image_finetune.core.errors import ConfigError, DataError
from image_finetune.data import CsvDataModule

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["0", "1", "2"]


def module(file: Path | None = None, **options: object) -> CsvDataModule:
    """A CsvDataModule as train.py builds one, at test size, writing nothing outside ``file``'s folder."""
    folder = file.parent if file is not None else Path(str(options["image_dir"]))
    defaults = {"image_size": 32, "num_workers": 0, "cache": None, "cache_dir": folder / "cache"}
    return CsvDataModule(file, **{**defaults, **options})


# ---- the shared run: a Kaggle-style table with three bad rows, trained, Ctrl-C'd and resumed ------------------------
def bad_rows(images: Path) -> dict[int, tuple[str, str]]:
    """Rows (by their position among the data rows) whose file is missing, not an image, and a cut-off JPEG."""
    (images / "notimage.png").write_bytes(b"not an image")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(images / "cut.jpg", quality=90)
    data = (images / "cut.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(data[: len(data) // 2])
    return {3: ("gone", "1"), 8: ("notimage", "2"), 20: ("cut", "0")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """``train.py data=csv`` on ``id,label`` (ids without their extension, as Kaggle writes them) with 3 bad rows:
    uninterrupted; Ctrl-C'd after epoch 2's second batch; then resumed with ``ckpt_path=last``."""
    root = tmp_path_factory.mktemp("csv-runs")
    images = root / "images"
    rows = [[Path(name).stem, digit] for name, digit in write_digits(images, per_class=14)]
    for position, row in sorted(bad_rows(images).items()):
        rows.insert(position, list(row))
    table = write_table(root / "labels.csv", ["id", "label"], rows)
    args = ["data=csv", f"data.file={table}", f"data.image_dir={images}", "data.path_column=id", "data.image_size=32"]
    env = script_env()

    def train(run_dir: Path, *extra: str) -> list[str]:
        return [sys.executable, "train.py", *args, *COMMON, "finetune=linear_probe", "trainer.max_epochs=2",
                "data.batch_size=8", f"hydra.run.dir={run_dir}", *extra]  # fmt: skip

    done = {
        "full": run(train(root / "train"), env),
        "stopped": run(ctrl_c(train(root / "stopped"), IN_EPOCH_2), env),
    }
    done["resumed"] = run(train(root / "stopped", "ckpt_path=last"), env)
    data = Data(args, [], env, CLASSES)
    return {"root": root, "table": table, "images": images, "data": data, **done}


@pytest.fixture(scope="module")
def trained(runs: dict[str, object]) -> Trained:
    """The uninterrupted run, as test_entry_matrix.py's tests read one."""
    root = Path(str(runs["root"]))
    assert runs["full"].returncode == 0, runs["full"].stderr[-3000:]  # type: ignore[attr-defined]
    return Trained(runs["data"], root, root / "train" / "checkpoints" / "last.ckpt")  # type: ignore[arg-type]


@pytest.mark.slow
def test_rows_whose_file_is_missing_or_broken_are_named_by_row_and_left_out(runs, trained):
    root, table = Path(str(runs["root"])), runs["table"]
    output = runs["full"].stdout + runs["full"].stderr  # type: ignore[attr-defined]
    assert "Traceback" not in output
    # rows as a spreadsheet numbers them: the header is row 1, so data row i (from 0) is row i + 2
    assert (
        f"{table}: left out 3 row(s) whose image is missing or unusable (row 5: gone: unreadable: no such file; "
        f"row 10: notimage.png: not an image; row 22: cut.jpg: truncated) - see {root / 'train' / 'data_report.tsv'}"
    ) in output
    with open(root / "train" / "data_report.tsv", newline="") as f:
        report = {(row["path"], row["reason"], row["row"]) for row in csv.DictReader(f, delimiter="\t")}
    images = runs["images"]
    assert report == {
        (f"{images}/gone", "unreadable: no such file", "5"),
        (f"{images}/notimage.png", "not an image", "10"),
        (f"{images}/cut.jpg", "truncated", "22"),
    }
    split = json.loads((root / "train" / "data_split.json").read_text())
    assert split["classes"] == CLASSES and set(split["splits"]) == {"train", "val", "test"}
    names = [name for items in split["splits"].values() for name, _ in items]
    assert len(set(names)) == len(names) == 42  # every good row, once, by its file's real name
    assert all(name.startswith("d") and name.endswith((".png", ".jpg")) for name in names)


@pytest.mark.slow
def test_a_run_ctrl_cd_mid_epoch_resumes_to_the_uninterrupted_weights(runs, trained):
    root, stopped, resumed = Path(str(runs["root"])), runs["stopped"], runs["resumed"]
    assert stopped.returncode == 130, stopped.stderr[-3000:]  # type: ignore[attr-defined]
    assert stopped.stderr.splitlines()[-1] == LINE.format(when="during training", run_dir=root / "stopped")  # type: ignore[attr-defined]
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]  # type: ignore[attr-defined]
    assert "Reusing the data split in" in resumed.stdout + resumed.stderr  # type: ignore[attr-defined]
    assert_bitwise_equal(
        weights(root / "stopped" / "checkpoints" / "last.ckpt"),
        weights(trained.checkpoint),
        "data=csv resumed after Ctrl-C",
    )


# ---- in-process: the table, its paths, its splits ----------------------------------------------------------------
def test_the_csv_config_has_the_image_folder_options_and_defaults():
    """Everything after the table is the image-folder path, so its options must not drift apart."""
    folder = OmegaConf.load(REPO / "configs" / "data" / "imagefolder.yaml")
    table = OmegaConf.load(REPO / "configs" / "data" / "csv.yaml")
    csv_only = {
        "_target_",
        "file",
        "image_dir",
        "path_column",
        "label_column",
        "split_column",
        "task",
        "label_separator",
    }
    shared = [key for key in table if key not in csv_only]
    assert shared == [key for key in folder if key not in {"_target_", "root"}]
    assert OmegaConf.masked_copy(table, shared) == OmegaConf.masked_copy(folder, shared)


@pytest.fixture
def digits_table(tmp_path: Path) -> tuple[Path, list[tuple[str, str]]]:
    """12 digits of each of 3 classes in ``images/``, listed in ``labels.csv`` beside it (path,label)."""
    written = write_digits(tmp_path / "images", per_class=12)
    write_table(tmp_path / "labels.csv", ["path", "label"], [[f"images/{name}", digit] for name, digit in written])
    return tmp_path / "labels.csv", written


def test_the_rows_become_the_image_folder_splits_and_data_split_json(digits_table, tmp_path):
    file, written = digits_table
    data = module(file, manifest_path=tmp_path / "split.json", test_fraction=0.2)
    data.setup("fit")
    assert data.class_names == CLASSES and data.source == f"data.file={str(file)!r}"
    listed = sorted((str(tmp_path / "images" / name), CLASSES.index(digit)) for name, digit in written)
    assert sorted(s for items in data.splits.values() for s in items) == listed
    assert {split: len(items) for split, items in data.splits.items()} == {"train": 24, "val": 6, "test": 6}
    again = module(file, manifest_path=tmp_path / "split.json", test_fraction=0.2, seed=7)
    again.setup("fit")
    assert again.splits == data.splits, "a resumed run reads its data_split.json, whatever the seed now"


def test_a_dataframe_gives_the_splits_its_csv_file_gives_and_names_rows_by_index(digits_table, tmp_path, caplog):
    file, _ = digits_table
    from_file = module(file)
    from_file.setup("fit")
    frame = pd.read_csv(file)
    frame.loc[len(frame)] = ["images/gone.png", 1]  # index label 36
    from_frame = module(frame=frame, image_dir=tmp_path)
    from_frame.setup("fit")
    assert from_frame.splits == from_file.splits and from_frame.source == "the data frame"
    assert (
        "the data frame: left out 1 row(s) whose image is missing or unusable (row 36: images/gone.png: " in caplog.text
    )


def test_the_split_column_decides_each_rows_split(digits_table, tmp_path):
    _, written = digits_table
    splits = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
    rows = [[f"images/{name}", digit, splits[i // 3]] for i, (name, digit) in enumerate(written)]
    file = write_table(tmp_path / "split.csv", ["path", "label", "fold"], rows)
    data = module(file, split_column="fold")
    data.setup("fit")
    for split in ("train", "val", "test"):
        expected = sorted((str(tmp_path / row[0]), CLASSES.index(row[1])) for row in rows if row[2] == split)
        assert data.splits[split] == expected


def test_a_path_without_its_extension_finds_its_file_and_an_ambiguous_one_is_one_line(tmp_path):
    images = tmp_path / "images"
    written = write_digits(images, per_class=4)
    rows = [[Path(name).stem, digit] for name, digit in written]
    data = module(write_table(tmp_path / "ids.csv", ["id", "label"], rows), image_dir=images, path_column="id")
    assert [r.path for r in data.rows()] == [str(images / name) for name, _ in written]
    (images / "d0000.json").write_text("{}")  # not an image: still only one candidate image
    assert data.rows()[0].path == str(images / "d0000.jpg")
    Image.open(images / "d0000.jpg").save(images / "d0000.png")
    with pytest.raises(DataError) as error:
        data.rows()
    assert str(error.value) == (
        f"{tmp_path / 'ids.csv'} row 2: 'd0000' could be any of 2 files (d0000.jpg, d0000.png); write the extension "
        "in the 'id' column"
    )


BAD_TABLES = {
    "no column": (
        ["name", "label"],
        [["a.png", "0"]],
        "{file} has no column 'path' (data.path_column); its columns are ['name', 'label']: set data.path_column to the column that holds it",
    ),
    "no label column": (
        ["path", "class"],
        [["a.png", "0"]],
        "{file} has no column 'label' (data.label_column); its columns are ['path', 'class']: set data.label_column to the column that holds it",
    ),
    "header only": (["path", "label"], [], "{file} has a header but no rows: add one row per image ('path', 'label')"),
    "empty label": (
        ["path", "label"],
        [["a.png", "0"], ["b.png", " "]],
        "{file} row 3: the 'label' column is empty; write the image's class there or drop the row",
    ),
    "empty path": (
        ["path", "label"],
        [["", "0"]],
        "{file} row 2: the 'path' column is empty; name the image file or drop the row",
    ),
    "twice": (
        ["path", "label"],
        [["a.png", "0"], ["./a.png", "1"]],
        "{file} rows 2 and 3 both name a.png: list each image once",
    ),
    "outside": (
        ["path", "label"],
        [["../a.png", "0"]],
        "{file} row 2: '../a.png' is outside data.image_dir='{dir}'; paths in the 'path' column are relative to it: point data.image_dir at a folder that holds every image",
    ),
}


@pytest.mark.parametrize("case", BAD_TABLES)
def test_a_bad_table_is_one_line_naming_the_file_row_and_column(case, tmp_path):
    header, rows, message = BAD_TABLES[case]
    (tmp_path / "images").mkdir()
    file = write_table(tmp_path / "labels.csv", header, rows)
    with pytest.raises(DataError) as error:
        module(file, image_dir=tmp_path / "images").rows()
    assert str(error.value) == message.format(file=file, dir=tmp_path / "images")


def test_a_missing_or_empty_file_and_a_bad_split_value_are_one_line(digits_table, tmp_path):
    with pytest.raises(DataError) as error:
        module(tmp_path / "nope.csv")
    assert str(error.value) == (
        f"data.file={str(tmp_path / 'nope.csv')!r} does not exist: point data.file at the CSV file that lists the images"
    )
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(DataError) as error:
        module(tmp_path / "empty.csv").rows()
    assert str(error.value) == (
        f"{tmp_path / 'empty.csv'} is empty: expected a header row naming the columns ('path', 'label') and one row "
        "per image"
    )
    file = write_table(tmp_path / "s.csv", ["path", "label", "split"], [["images/d0000.jpg", "0", "valid"]])
    with pytest.raises(DataError) as error:
        module(file, split_column="split").rows()
    assert str(error.value) == f"{file} row 2: the 'split' column holds 'valid'; use one of train, val, test"
    with pytest.raises(ConfigError, match=r"data=csv reads one table: set data\.file=LABELS\.csv"):
        CsvDataModule(digits_table[0], frame=pd.DataFrame())


def test_a_class_whose_every_file_is_broken_is_one_line_not_a_missing_class(digits_table, tmp_path):
    file, written = digits_table
    for name, digit in written:
        if digit == "2":
            (tmp_path / "images" / name).write_bytes(b"")
    first = next(i for i, (_, digit) in enumerate(written) if digit == "2") + 2
    with pytest.raises(DataError) as error:
        module(file).setup("fit")
    assert str(error.value) == (
        f"{file}: every row of class '2' was left out (e.g. row {first}: images/{written[first - 2][0]}: empty file); "
        "replace those files or drop the class's rows"
    )


def test_a_resume_whose_table_relabelled_a_file_is_one_line(digits_table, tmp_path):
    """data_split.json pins the labels too: a row edited since is named, never trained on with either label."""
    file, _ = digits_table
    module(file, manifest_path=tmp_path / "split.json").setup("fit")
    lines = file.read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ",1"  # row 2: a 0 relabelled as 1
    file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"entry \[\"images/d0000.jpg\", 0\] has label 0 \('0'\) but the labels file now says '1'"):  # fmt: skip
        module(file, manifest_path=tmp_path / "split.json").setup("fit")
