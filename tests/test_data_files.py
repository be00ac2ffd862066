"""Every file read back from a run dir or the data folder is checked: a damaged or edited ``data_split.json`` stops a
resumed run in one line (exit 2, no traceback) that names the file, the first bad entry and the fix; nothing listed
is dropped without a word; ``data.val_fraction=0`` is one line; hidden class folders and large class counts are
reported readably."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf
from support import FAST, make_image_folder

from image_finetune.core.config_checks import check_config
from image_finetune.core.errors import ConfigError, DataError
from image_finetune.data import ImageFolderDataModule
from image_finetune.data.imagefolder import split_summary
from image_finetune.data.scan import _ScanCache, scan_image_folder, summarize

REPO = Path(__file__).resolve().parents[1]
SPLIT_FILE = "data_split.json"
FIX = "Delete it to split the data afresh (files added since may then enter the splits), or restore it from a backup."


def train_py(run_dir: Path, images: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "train.py", "data=imagefolder", f"data.root={images}", "model.backbone.weights=null",
        "finetune=full", "trainer.max_epochs=1", "test=false", "logger=csv", f"paths.data_dir={run_dir.parent / 'data'}",
        f"hydra.run.dir={run_dir}", *FAST, *overrides,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run dir, image folder) of one finished one-epoch run on a 3-class pool (train, val and test splits)."""
    base = tmp_path_factory.mktemp("trained")
    images = make_image_folder(base / "images", per_class=12)
    run_dir = base / "run"
    result = train_py(run_dir, images)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / SPLIT_FILE).is_file()
    return run_dir, images


def add_test_files_to_train(m: dict[str, Any]) -> None:
    m["splits"]["train"].extend(m["splits"]["test"])


def copy_val_file_to_test(m: dict[str, Any]) -> None:
    m["splits"]["test"].append(m["splits"]["val"][0])


def label_99(m: dict[str, Any]) -> None:
    m["splits"]["train"][0][1] = 99


def outside_root(m: dict[str, Any]) -> None:
    m["splits"]["train"].append(["../../../etc/passwd", 0])


EDITS: dict[str, tuple[Callable[[dict[str, Any]], None] | str, str]] = {
    # name: (edit of the parsed file, or the new text with {text} = the old one; what the line must say)
    "label 99": (label_99, r"'train' entry \[\"class_0/[^\"]+\", 99\] has label 99, not a class index \(0-2\)\. "),
    "test files in train": (
        add_test_files_to_train,
        r"'test' entry \[\"class_0/[^\"]+\", 0\] is also listed in the 'train' split \(6 bad entries in all\)\. ",
    ),
    "outside data.root": (outside_root, r"'train' entry \[\"\.\./\.\./\.\./etc/passwd\", 0\] is outside data\.root "),
    "in two splits": (
        copy_val_file_to_test,
        r"'test' entry \[\"class_0/[^\"]+\", 0\] is also listed in the 'val' split\. ",
    ),
    "truncated": ("{text:.300}", r" is not valid JSON \(.* at line \d+ column \d+; cut short\?\)\. "),
    "empty": ("", r" is empty\. "),
}


@pytest.mark.parametrize("case", EDITS)
def test_a_damaged_split_file_stops_the_resume_in_one_line(trained: tuple[Path, Path], tmp_path: Path, case: str):
    run_dir, images = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("tensorboard"))
    split_file = copy / SPLIT_FILE
    edit, expected = EDITS[case]
    text = split_file.read_text()
    if callable(edit):
        manifest = json.loads(text)
        edit(manifest)
        split_file.write_text(json.dumps(manifest, indent=1))
    else:
        split_file.write_text(edit.format(text=text))
    # one more epoch: the run finished, and a resume of a finished run with its own max_epochs is refused first
    result = train_py(copy, images, "ckpt_path=last", "trainer.max_epochs=2")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: {split_file} ")
    assert errors[0].endswith(FIX)

    assert re.search(expected, errors[0]), errors[0]


def test_val_fraction_0_is_one_line(tmp_path: Path):
    result = train_py(tmp_path / "run", make_image_folder(tmp_path / "images"), "data.val_fraction=0")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: data.val_fraction=0 leaves no validation split, which training needs (it picks the best checkpoint): "
        "hold out a little, e.g. data.val_fraction=0.05, or give data.root a val/ folder of class folders"
    )


# ---- in process: the same reader, cases that need no training run -------------------------------------------------


def module(root: Path, tmp_path: Path, **kwargs: Any) -> ImageFolderDataModule:
    defaults: dict[str, Any] = dict(
        image_size=16, batch_size=4, num_workers=0, cache=None, cache_dir=tmp_path / "cache",
        manifest_path=tmp_path / "run" / SPLIT_FILE,
    )  # fmt: skip
    return ImageFolderDataModule(root, **{**defaults, **kwargs})


def edited(tmp_path: Path, images: Path, edit: Callable[[dict[str, Any]], None]) -> ImageFolderDataModule:
    """A data module resuming from a split file that ``edit`` changed (written by a first setup)."""
    module(images, tmp_path).setup("fit")
    path = tmp_path / "run" / SPLIT_FILE
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return module(images, tmp_path)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda m: m["splits"]["train"].append(m["splits"]["train"][0]), r"is listed twice in that split\. "),
        (
            lambda m: m["splits"]["train"][0].__setitem__(1, 1),
            r"has label 1 \('class_1'\) but is not in that class folder",
        ),
        (
            lambda m: m["splits"]["train"].append(["x.png"]),
            r"'train' entry \[\"x.png\"\] is not a \[path, label\] pair\. ",
        ),
        (lambda m: m["splits"]["train"][0].__setitem__(1, True), r"is not a \[path, label\] pair"),
        (lambda m: m.__setitem__("splits", {"val": []}), r"'splits' is not an object with a 'train' list\. "),
        (lambda m: m["splits"].__setitem__("holdout", []), r"'splits' has a split named 'holdout'"),
        (lambda m: m.__setitem__("extra", 1), r"has keys \['classes', 'extra', 'root', 'splits'\], expected"),
        (
            lambda m: m.__setitem__("classes", ["class_0", "class_1", "cat"]),
            r"missing now: \['cat'\]; new: \['class_2'\]",
        ),
        (lambda m: m["splits"]["train"].append([f"{m['root']}/class_0/img_000.jpg", 0]), r"is outside data\.root"),
    ],
)
def test_schema_labels_paths_and_duplicates_are_checked(tmp_path: Path, edit: Callable, expected: str):
    images = make_image_folder(tmp_path / "images")
    with pytest.raises(DataError, match=expected):
        edited(tmp_path, images, edit).setup("fit")


def test_a_file_under_test_in_the_train_split_is_refused(tmp_path: Path):
    """train/ val/ test/ layout: a file of the test/ folder may only be in the test split."""
    root = tmp_path / "data"
    make_image_folder(root / "train", per_class=6)
    make_image_folder(root / "val", per_class=2, seed=1)
    make_image_folder(root / "test", per_class=2, seed=2)

    def move_test_file_to_train(m: dict[str, Any]) -> None:
        m["splits"]["train"].append(m["splits"]["test"].pop())

    with pytest.raises(DataError, match=r"is in the test/ folder, which is not part of the 'train' split"):
        edited(tmp_path, root, move_test_file_to_train).setup("fit")


def test_listed_files_that_are_gone_are_left_out_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    images = make_image_folder(tmp_path / "images")
    first = module(images, tmp_path)
    first.setup("fit")
    gone, broken = first.splits["train"][0][0], first.splits["train"][1][0]
    os.remove(gone)
    Path(broken).write_bytes(b"not an image")
    resumed = module(images, tmp_path)
    with caplog.at_level(logging.WARNING):
        resumed.setup("fit")
    assert resumed.splits["train"] == first.splits["train"][2:]
    assert resumed.splits["val"] == first.splits["val"]
    warnings = [r.getMessage() for r in caplog.records if SPLIT_FILE in r.getMessage()]
    assert warnings == [
        f"{tmp_path / 'run' / SPLIT_FILE} lists 2 file(s) that data.root no longer has or that no longer decode "
        f"(first: {gone}: no such file); the run goes on without them"
    ]


def test_a_split_that_lost_every_file_is_an_error_and_a_moved_folder_resumes(tmp_path: Path):
    images = make_image_folder(tmp_path / "images")
    first = module(images, tmp_path)
    first.setup("fit")
    moved = tmp_path / "moved"
    images.rename(moved)
    resumed = module(moved, tmp_path)
    resumed.setup("fit")  # paths are relative to data.root: the moved folder resumes on the same files
    assert resumed.splits == {
        split: [(str(moved / Path(p).relative_to(images)), label) for p, label in items]
        for split, items in first.splits.items()
    }
    for path, _ in resumed.splits["val"]:
        os.remove(path)
    with pytest.raises(
        DataError, match=r"none of the files .* lists for the 'val' split is usable now .* is data\.root"
    ):
        module(moved, tmp_path).setup("fit")


def test_val_fraction_0_needs_a_val_folder_and_an_empty_one_is_one_line(tmp_path: Path):
    root = tmp_path / "data"
    make_image_folder(root / "train", per_class=6)
    cfg = OmegaConf.create({"data": {"root": str(root), "val_fraction": 0}})
    with pytest.raises(ConfigError, match=r"^data\.val_fraction=0 leaves no validation split"):
        check_config(cfg)
    check_config(cfg, validates=False)  # lr_find.py's sweep never validates
    (root / "val").mkdir()
    check_config(cfg)  # the val/ folder is the validation split
    with pytest.raises(DataError, match=r"val is empty: put the val images in class folders there .* or remove"):
        module(root, tmp_path, val_fraction=0).setup("fit")
    make_image_folder(root / "val", per_class=2, seed=1)
    dm = module(root, tmp_path, val_fraction=0, test_fraction=0)
    dm.setup("fit")
    assert {split: len(items) for split, items in dm.splits.items()} == {"train": 18, "val": 6}
    assert all("/val/" in path for path, _ in dm.splits["val"])
    only_train = module(root / "train", tmp_path / "t", val_fraction=0, test_fraction=0)
    only_train.setup("fit")  # the data module itself allows "no val split" (an all-train pool)
    assert only_train.splits.keys() == {"train"}


# ---- other files read back, and the log lines ---------------------------------------------------------------------


def test_a_damaged_scan_cache_entry_is_a_miss(tmp_path: Path):
    images = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    scan_image_folder(images, cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").glob("scan-*.json")
    data = json.loads(cache_file.read_text())
    for entry in data["files"].values():
        entry[2] = 7  # not a reason
    cache_file.write_text(json.dumps(data))
    scan = scan_image_folder(images, cache_dir=tmp_path / "cache")
    assert len(scan.samples) == 4 and scan.skipped == []
    cache_file.write_text('{"meta": ')  # cut short: a warning and a full re-check, never a traceback
    assert len(scan_image_folder(images, cache_dir=tmp_path / "cache").samples) == 4
    assert _ScanCache(tmp_path / "cache", images).old != {}


def test_a_hidden_class_folder_is_named_with_its_image_count(tmp_path: Path):
    images = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    shutil.copytree(images / "class_0", images / ".x")
    (images / ".x" / "notes.txt").write_text("not an image")
    (images / ".DS_Store").write_bytes(b"\0")
    scan = scan_image_folder(images)
    assert dict(scan.skipped)[str(images / ".x")] == "hidden: class folder (2 images)"
    assert summarize(scan) == (
        "kept 4 images in 2 classes; left out 2 (2 hidden); class folder `.x` (2 images) skipped as hidden"
    )


def test_many_classes_are_summarised_few_are_listed():
    counts = {f"c{i:03d}": 12 + i % 29 for i in range(500)}
    counts["b"], counts["a"] = 13, 12
    line = split_summary("train", counts)
    assert line == (
        f"train: {sum(counts.values()):,} images in 502 classes, 12-40 per class (median 26); smallest: a 12, c000 12, "
        "c029 12"
    )
    few = {"cat": 3, "dog": 5}
    assert split_summary("val", few) == "val: 8 images, per class {'cat': 3, 'dog': 5}"
    assert split_summary("val", {f"c{i}": 2 for i in range(21)}) == "val: 42 images in 21 classes, 2 per class"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"format": "onnx"', r"cannot be read as JSON"),
        ("[]", r"holds a JSON list, not an object"),
        (
            '{"format": "onnx", "architecture": "resnet18", "class_names": [], "preprocessing": {}}',
            r"has 'class_names' that are not a list of names",
        ),
        ('{"format": "onnx", "architecture": "resnet18", "class_names": ["a"]}', r"has no dict 'preprocessing'"),
    ],
)
def test_a_damaged_export_sidecar_is_one_line(tmp_path: Path, text: str, expected: str):
    from image_finetune.core.errors import UserError
    from image_finetune.inference.classifier import read_sidecar

    (tmp_path / "model.onnx.json").write_text(text)
    with pytest.raises(
        UserError, match=rf"model\.onnx\.json {expected}.*: it describes .*model\.onnx\. Re-run export\.py"
    ):
        read_sidecar(tmp_path / "model.onnx")
