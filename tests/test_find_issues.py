"""`python find_issues.py`: planted wrong labels and a cross-split copy are reported, the files have their columns, the
summary is one line, and the data folder is never changed. Uses the session's shared `trained` model (no training here).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from support import make_image_folder

from image_finetune.core.cli import user_errors
from image_finetune.core.errors import DataError
from image_finetune.inference.data_issues import Images, find_issues, stored_out_of_fold
from image_finetune.inference.duplicates import connected_groups, sets_to_pairs

pytest_plugins = ["trained"]  # the shared `trained` fixture: trained once per session

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(
    r"^label issues: (\d+) of (\d+) images \(([^)]*)\); near-duplicate groups: (\d+) \((\d+) cross splits: leak\); "
    r"outliers: (\d+) -> (.+)$"
)


def run_find_issues(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "find_issues.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def folder_digest(root: Path) -> str:
    """Every file's relative path, size and bytes, and every folder: any change to the tree changes the digest."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def planted_folder(root: Path) -> tuple[str, str]:
    """train/ and test/ class folders of the `trained` model's colours; three red images filed under class_1 (wrong
    labels; recall is the benchmark's business, not asserted here) and a byte copy of a training image in test/ (a
    leak). Returns the original and the copy."""
    make_image_folder(root / "train", classes=3, per_class=16)
    make_image_folder(root / "test", classes=3, per_class=5, seed=1)
    for i in range(3):
        (root / "train" / "class_0" / f"img_{2 * i:03d}.jpg").rename(root / "train" / "class_1" / f"wrong_{i}.jpg")
    original, copy = root / "train" / "class_2" / "img_004.jpg", root / "test" / "class_2" / "copy.jpg"
    shutil.copy(original, copy)
    return str(original), str(copy)


def test_planted_problems_are_reported_and_the_folder_is_left_alone(trained, tmp_path):
    root = tmp_path / "images"
    original, copy = planted_folder(root)
    before = folder_digest(root)
    out = tmp_path / "issues"
    result = run_find_issues(
        f"ckpt_path={trained.checkpoint}", "data=imagefolder", f"data.root={root}", "data.num_workers=0",
        f"hydra.run.dir={out}", f"paths.data_dir={tmp_path / 'data'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert folder_digest(root) == before  # nothing in the user's folder changed, added or removed

    lines = [line for line in result.stdout.splitlines() if line.startswith("label issues:")]
    assert len(lines) == 1, result.stdout
    match = SUMMARY.match(lines[0])
    assert match, lines[0]
    n_label, n_images, per_split, n_groups, n_leaks, n_outliers, where = match.groups()
    assert int(n_images) == 3 * 16 + 3 * 5 + 1 and Path(where) == out
    assert re.fullmatch(r"train \d+, val \d+, test \d+", per_split)

    columns, label_rows = read_csv(out / "label_issues.csv")
    assert columns == ["path", "split", "given_label", "suggested_label", "label_quality"]
    assert len(label_rows) == int(n_label)
    qualities = [float(row["label_quality"]) for row in label_rows]
    assert qualities == sorted(qualities)  # ranked: the most suspicious first
    assert all(row["given_label"] != row["suggested_label"] for row in label_rows)
    assert {row["path"] for row in label_rows} <= {str(p) for p in root.rglob("*") if p.is_file()}

    columns, duplicates = read_csv(out / "near_duplicates.csv")
    assert columns == ["group", "path", "split", "label", "leak", "identical"]
    groups = {row["group"] for row in duplicates}
    assert len(groups) == int(n_groups)
    pair = {row["path"]: row for row in duplicates if row["path"] in (original, copy)}
    assert set(pair) == {original, copy}, duplicates
    assert pair[original]["group"] == pair[copy]["group"]
    assert {pair[original]["split"], pair[copy]["split"]} == {"train", "test"}
    assert pair[copy]["leak"] == "True" and pair[copy]["identical"] == "True"
    assert int(n_leaks) >= 1

    columns, outliers = read_csv(out / "outliers.csv")
    assert columns == ["path", "split", "label", "outlier_score"]
    assert len(outliers) == int(n_outliers)
    assert (out / "label_issues.png").stat().st_size > 0
    saved = json.loads((out / "issues.json").read_text())
    assert saved["pred_probs"].startswith("5-fold stratified logistic regression")
    assert saved["label_issues"] == int(n_label) and saved["leaking_groups"] == int(n_leaks)


def test_out_of_fold_probabilities_replace_the_cross_validation(trained, compose_cfg, tmp_path, capsys):
    """In-process (the subprocess path is tested above): the checkpoint's own data and split (no data=...), and
    pred_probs=PATH, in which one image is confidently another class."""
    before = folder_digest(trained.images)
    files = sorted(str(p) for p in trained.images.rglob("*") if p.is_file())
    suspect = files[0]  # class_0's first file
    oof = tmp_path / "oof.csv"
    with oof.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "prob_class_0", "prob_class_1", "prob_class_2"])  # as a k-fold sweep writes
        for path in files:
            given = int(Path(path).parent.name.removeprefix("class_"))
            probs = [0.01, 0.01, 0.01]
            probs[2 if path == suspect else given] = 0.98
            writer.writerow([path, *probs])
    out = tmp_path / "issues"
    cfg = compose_cfg(f"ckpt_path={trained.checkpoint}", f"pred_probs={oof}", config_name="find_issues", output_dir=out)
    saved = find_issues(cfg)
    assert folder_digest(trained.images) == before
    assert saved == json.loads((out / "issues.json").read_text())
    assert saved["pred_probs"] == f"out-of-fold probabilities from {oof}"
    manifest = json.loads((trained.checkpoint.parents[1] / "data_split.json").read_text())
    assert saved["splits"] == {split: len(items) for split, items in manifest["splits"].items()}  # training's split
    _, label_rows = read_csv(out / "label_issues.csv")
    assert label_rows[0]["path"] == suspect
    assert (label_rows[0]["given_label"], label_rows[0]["suggested_label"]) == ("class_0", "class_2")
    printed = capsys.readouterr().out.strip().splitlines()
    assert SUMMARY.match(printed[-1]) and printed[-1].startswith(f"label issues: {saved['label_issues']} of 48 images")


def test_missing_cleanlab_is_one_line_naming_the_extra(monkeypatch, capsys):
    """``user_errors`` (what find_issues.py runs in) turns it into this line and exit code 2."""
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # `import cleanlab` now raises ImportError
    with pytest.raises(SystemExit) as exit_info, user_errors():
        find_issues(OmegaConf.create({"ckpt_path": "x.ckpt"}))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: find_issues.py needs cleanlab, which is not installed: pip install 'image-finetune[issues]'\n"
    )


def test_near_duplicate_sets_merge_into_groups():
    sets = [[1], [0, 2], [1], [], [5], [4], []]
    assert connected_groups(len(sets), sets_to_pairs(sets)) == [[0, 1, 2], [4, 5]]


def test_an_out_of_fold_file_covers_what_it_lists_and_one_that_fits_nothing_is_refused(tmp_path):
    images = Images(["a.png", "b.png"], ["train", "test"], np.array([0, 1]), ["cat", "dog"])
    assert stored_out_of_fold(tmp_path / "none.csv", images) is None
    partial = tmp_path / "oof.csv"
    partial.write_text("path,prob_cat,prob_dog\na.png,0.9,0.1\n")  # a k-fold sweep's pool, not its test split
    probs = stored_out_of_fold(partial, images)
    assert probs[0].tolist() == pytest.approx([0.9, 0.1]) and np.isnan(probs[1]).all()
    for text, message in (
        ("path,cat,dog\na.png,0.9,0.1\n", r"missing class columns \['prob_cat', 'prob_dog'\]"),
        ("path,prob_cat,prob_dog\nz.png,0.9,0.1\n", r"0 of 2 images with a row"),
    ):
        partial.write_text(text)
        with pytest.raises(DataError, match=message):
            stored_out_of_fold(partial, images)
