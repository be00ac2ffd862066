"""Issue 18, items 3, 7, 8, run as a user runs them: eval.py on a folder holding some of the checkpoint's classes
averages macro F1 over those; an output that cannot be written is one line; the ONNX example reports a file it cannot
read and classifies the rest, in bounded batches."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score
from torchmetrics.functional.classification import multiclass_f1_score

from image_finetune.inference.export import export_classifier

pytest_plugins = ["trained"]  # the shared `trained` fixture: trained once per session

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "onnx_classify.py"


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ}
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def copy_images(sources: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        shutil.copy(source, folder / f"{source.parent.name}_{source.name}")


def test_eval_on_a_folder_with_some_classes_averages_macro_f1_over_those(trained, tmp_path):
    images = {c: sorted((trained.images / c).iterdir()) for c in ("class_0", "class_1", "class_2")}
    data = tmp_path / "two_classes"
    copy_images(images["class_0"][:6], data / "class_0")
    # class_2's images filed as class_1: the model predicts the class the folder lacks, which the old macro F1
    # (torchmetrics' average="macro") counted as a class with F1 0.
    copy_images(images["class_1"][:6] + images["class_2"][:4], data / "class_1")
    out = tmp_path / "eval"
    result = run_script(
        "eval.py", f"ckpt_path={trained.checkpoint}", "data=imagefolder", f"data.root={data}", "data.num_workers=0",
        "trainer=cpu", f"paths.data_dir={tmp_path}", f"hydra.run.dir={out}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert (
        f"data.root='{data}' (all split) has no images of ['class_2']: per_class_metrics.csv lists them with support 0, "
        "and macro F1 averages over the 2 of 3 classes present"
    ) in result.stdout + result.stderr

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["macro_over_classes"] == "2 of 3 present"
    rows = read_csv(out / "predictions.csv")
    assert len(rows) == saved["num_samples"] == 16
    names = ["class_0", "class_1", "class_2"]
    y_true, y_pred = [names.index(r["target"]) for r in rows], [names.index(r["label_1"]) for r in rows]
    assert 2 in y_pred, "the test needs predictions of the absent class, or old and new macro F1 agree"
    assert saved["all/f1"] == pytest.approx(f1_score(y_true, y_pred, labels=[0, 1], average="macro"), abs=1e-6)
    assert saved["all/acc"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-6)
    over_all = multiclass_f1_score(torch.tensor(y_pred), torch.tensor(y_true), 3, average="macro").item()
    assert saved["all/f1"] > over_all + 0.05  # what eval reported before (absent class averaged in as 0)

    per_class = {r["class"]: r for r in read_csv(out / "per_class_metrics.csv")}
    assert list(per_class) == names and [int(per_class[n]["support"]) for n in names] == [6, 10, 0]
    f1s = f1_score(y_true, y_pred, labels=[0, 1, 2], average=None, zero_division=0)
    assert [float(per_class[n]["f1"]) for n in names] == pytest.approx(list(f1s), abs=1e-6)


@pytest.mark.parametrize("case", ["output is a folder", "output under a file", "run dir is a file"])
def test_an_output_that_cannot_be_written_is_one_line(trained, tmp_path, case):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("")
    args = [f"ckpt_path={trained.checkpoint}", f"input={trained.images / 'class_0'}", "num_workers=0", "device=cpu"]
    if case == "output is a folder":
        script, extra = "predict.py", [f"output={tmp_path / 'folder'}", f"hydra.run.dir={tmp_path / 'run'}"]
        expected = (
            f"error: output='{tmp_path / 'folder'}' is a folder; give a file path, "
            f"e.g. output={tmp_path / 'folder' / 'predictions.csv'}"
        )
    elif case == "output under a file":
        script, extra = "predict.py", [f"output={tmp_path / 'a_file' / 'p.csv'}", f"hydra.run.dir={tmp_path / 'run'}"]
        expected = (
            f"error: output='{tmp_path / 'a_file' / 'p.csv'}': cannot write there ({tmp_path / 'a_file'} is a file, "
            "not a folder); choose a writable output=PATH"
        )
    else:  # eval.py's output is its run dir; Hydra creates it before any of the project's code runs
        script, args = "eval.py", [f"ckpt_path={trained.checkpoint}", "trainer=cpu"]
        extra = [f"hydra.run.dir={tmp_path / 'a_file' / 'eval'}"]
        expected = (
            f"error: hydra.run.dir='{tmp_path / 'a_file' / 'eval'}': cannot write there ({tmp_path / 'a_file'} is a "
            "file, not a folder); choose a writable hydra.run.dir=PATH"
        )
    result = run_script(script, *args, *extra)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [expected]
    assert not (tmp_path / "run" / "predictions.csv").exists()
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == []  # no probe or temporary file left


_ONNX: list[Path] = []


@pytest.fixture
def onnx_model(trained, tmp_path_factory) -> Path:
    """The shared model exported once to ONNX for this module's tests."""
    if not _ONNX:
        folder = tmp_path_factory.mktemp("onnx")
        _ONNX.append(export_classifier(trained.classifier, "onnx", folder / "model.onnx", source="x", verify=False))
    return _ONNX[0]


def classify(model: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, dict]]:
    """The example as a user runs it (--json); its results by file name."""
    result = run_script(EXAMPLE, model, *args, "--json", "--top-k", "3")
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    return result, {Path(r["path"]).name: r for r in json.loads(result.stdout)}


def good_images(trained, folder: Path) -> Path:
    """Five images of the 3 classes, JPEG and PNG."""
    picks = [("class_0", 0), ("class_0", 1), ("class_1", 2), ("class_2", 3), ("class_2", 4)]
    copy_images([sorted((trained.images / c).iterdir())[i] for c, i in picks], folder)
    return folder


def test_onnx_example_reports_a_truncated_image_and_classifies_the_rest(trained, onnx_model, tmp_path):
    clean = good_images(trained, tmp_path / "clean")
    damaged = shutil.copytree(clean, tmp_path / "damaged")
    jpeg = next(p for p in sorted(clean.iterdir()) if p.suffix == ".jpg")
    (damaged / "cut.jpg").write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])

    _, expected = classify(onnx_model, str(clean))
    result, got = classify(onnx_model, str(damaged))
    assert got.pop("cut.jpg") == {"path": str(damaged / "cut.jpg"), "labels": [], "probabilities": [],
                                  "reason": "truncated"}  # fmt: skip
    assert result.stderr.strip() == "1 of 6 file(s) could not be classified; see their reason"
    assert len(got) == 5 and all(r["reason"] is None and len(r["labels"]) == 3 for r in got.values())
    for name, r in got.items():
        assert (r["labels"], r["probabilities"]) == (expected[name]["labels"], expected[name]["probabilities"])

    text = run_script(EXAMPLE, onnx_model, damaged)  # the plain-text output names the file and its reason
    assert text.returncode == 0 and "Traceback" not in text.stderr
    assert f"{damaged / 'cut.jpg'}: cannot classify (truncated)" in text.stdout.splitlines()
    assert len(text.stdout.splitlines()) == 6


def test_onnx_example_in_batches_of_two_equals_one_batch(trained, onnx_model, tmp_path):
    folder = good_images(trained, tmp_path / "images")
    _, in_one = classify(onnx_model, str(folder), "--batch-size", "64")
    _, in_twos = classify(onnx_model, str(folder), "--batch-size", "2")
    assert list(in_twos) == list(in_one) and len(in_one) == 5
    for name, r in in_twos.items():
        assert r["labels"] == in_one[name]["labels"]
        assert r["probabilities"] == pytest.approx(in_one[name]["probabilities"], abs=1e-6)
