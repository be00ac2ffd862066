"""`python eval.py`: the per-class report agrees with a direct count, splits are the right files, classes match by name."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from support import FAST

from image_finetune.checkpoints import run_config
from image_finetune.core.errors import DataError, UserError
from image_finetune.inference.evaluate import data_config, evaluate

pytest_plugins = ["trained"]  # the shared `trained` fixture


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_eval(compose_cfg, out: Path, *overrides: str) -> tuple[dict[str, float], dict]:
    metrics = evaluate(compose_cfg(*overrides, *FAST[:2], config_name="eval", output_dir=out))
    return metrics, json.loads((out / "metrics.json").read_text())


def manifest_split(trained, split: str) -> set[str]:
    manifest = json.loads((trained.checkpoint.parents[1] / "data_split.json").read_text())
    return {str(Path(manifest["root"]) / rel) for rel, _ in manifest["splits"][split]}


def test_per_class_report_agrees_with_a_direct_count(trained, compose_cfg, tmp_path):
    out = tmp_path / "eval"
    metrics, saved = run_eval(compose_cfg, out, f"ckpt_path={trained.checkpoint}")
    assert metrics == pytest.approx({k: v for k, v in trained.metrics.items() if k.startswith("test/")}, abs=1e-6)
    assert saved["split"] == "test"

    predictions = read_csv(out / "predictions.csv")
    assert {row["path"] for row in predictions} == manifest_split(trained, "test")  # the checkpoint's own test split
    names = ["class_0", "class_1", "class_2"]
    pairs = [(row["target"], row["label_1"]) for row in predictions]
    assert len(pairs) == saved["num_samples"] == 12

    confusion = {(t, p): sum(pair == (t, p) for pair in pairs) for t in names for p in names}
    assert 0 < sum(confusion[n, n] for n in names) < len(pairs), "want a model that is neither perfect nor useless"
    table = read_csv(out / "confusion_matrix.csv")
    assert [row["true \\ predicted"] for row in table] == names
    assert {(row["true \\ predicted"], p): int(row[p]) for row in table for p in names} == confusion

    per_class = {row["class"]: row for row in read_csv(out / "per_class_metrics.csv")}
    f1s = []
    for name in names:
        tp = confusion[name, name]
        predicted, actual = sum(confusion[t, name] for t in names), sum(confusion[name, p] for p in names)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1s.append(f1)
        row = per_class[name]
        assert (float(row["precision"]), float(row["recall"]), float(row["f1"])) == pytest.approx(
            (precision, recall, f1), abs=1e-6
        )
        assert int(row["support"]) == actual
        assert saved["per_class"][name]["f1"] == pytest.approx(f1, abs=1e-6)
    assert metrics["test/acc"] == pytest.approx(sum(confusion[n, n] for n in names) / len(pairs))
    assert metrics["test/f1"] == pytest.approx(sum(f1s) / len(f1s), abs=1e-6)  # macro F1
    with Image.open(out / "confusion_matrix.png") as png:
        assert png.format == "PNG" and min(png.size) > 100


def test_eval_reads_original_files_never_the_training_cache_and_decodes_them_on_the_cpu(trained, compose_cfg, tmp_path):
    """As predict.py and the exports read them; also, a checkpoint trained with data.decode=gpu evaluates anywhere."""
    assert run_config(trained.checkpoint)["data"]["cache"] == "auto"
    stored = compose_cfg(f"ckpt_path={trained.checkpoint}", config_name="eval", output_dir=tmp_path / "a")
    assert data_config(stored, str(trained.checkpoint)).cache is None
    assert data_config(stored, str(trained.checkpoint)).decode == "cpu"
    named = compose_cfg(
        "ckpt_path=x",
        "data=imagefolder",
        "data.root=.",
        "data.cache=resized",
        "data.decode=gpu",
        config_name="eval",
        output_dir=tmp_path / "b",
    )
    assert data_config(named, "x").cache is None
    assert data_config(named, "x").decode == "cpu"


def test_split_val_evaluates_the_val_files(trained, compose_cfg, tmp_path, caplog, monkeypatch):
    caplog.set_level("INFO")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        monkeypatch.setattr(logging.getLogger(name), "filters", [])  # as in a fresh `python eval.py` process
    _, saved = run_eval(compose_cfg, tmp_path / "eval", f"ckpt_path={trained.checkpoint}", "split=val")
    assert "Tip:" not in caplog.text, "Lightning's adverts are silenced in eval.py as in train.py"
    assert saved["split"] == "val"
    assert {row["path"] for row in read_csv(tmp_path / "eval" / "predictions.csv")} == manifest_split(trained, "val")


def test_any_folder_is_a_test_set_with_classes_matched_by_name(trained, compose_cfg, tmp_path):
    folder = tmp_path / "new"
    for name in ("class_0", "class_2"):  # a subset: class_2 is index 1 here but 2 in the checkpoint
        shutil.copytree(trained.images / name, folder / name)
    out = tmp_path / "eval"
    _, saved = run_eval(compose_cfg, out, f"ckpt_path={trained.checkpoint}", "data=imagefolder", f"data.root={folder}")
    assert saved["split"] == "all" and saved["num_samples"] == 32
    rows = read_csv(out / "predictions.csv")
    assert all(row["target"] == Path(row["path"]).parent.name for row in rows)
    assert saved["per_class"]["class_1"]["support"] == 0


def test_a_class_the_checkpoint_does_not_know_is_a_clear_error(trained, compose_cfg, tmp_path):
    folder = tmp_path / "new"
    shutil.copytree(trained.images / "class_0", folder / "class_0")
    shutil.copytree(trained.images / "class_1", folder / "zebra")
    with pytest.raises(
        DataError, match=r"classes the checkpoint was not trained on: \['zebra'\].*'class_0', 'class_1', 'class_2'"
    ):
        run_eval(
            compose_cfg, tmp_path / "eval", f"ckpt_path={trained.checkpoint}", "data=imagefolder", f"data.root={folder}"
        )


def with_stored_data(trained, tmp_path: Path, data: dict) -> Path:
    """A copy of the trained checkpoint whose stored run config names ``data``: loads fine with weights_only=True."""
    checkpoint = torch.load(trained.checkpoint, weights_only=True)
    checkpoint["run_config"]["data"] = data
    torch.save(checkpoint, path := tmp_path / "crafted.ckpt")
    return path


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # What once wrote a file: hydra's instantiate called Path.write_text with arguments from the checkpoint.
        ({"_target_": "pathlib.Path.write_text", "self": {"_target_": "pathlib.Path", "_args_": ["VICTIM"]}, "data": "x"},
         r"data\._target_='pathlib\.Path\.write_text' is not one of this project's classes: a checkpoint may not choose code"),
        # The project's own *functions* are not allowed either: called with a file's arguments, they would still act.
        ({"_target_": "image_finetune.core.atomic.atomic_write_text", "path": "VICTIM", "text": "x"},
         r"atomic_write_text' is not a ClassificationDataModule"),
        # A project class that is not a data module.
        ({"_target_": "image_finetune.callbacks.RunSummary"}, r"is not a ClassificationDataModule"),
        # A data module of ours, with code hidden in a nested node.
        ({"_target_": "image_finetune.data.ImageFolderDataModule", "root": {"_target_": "pathlib.Path.write_text",
          "self": {"_target_": "pathlib.Path", "_args_": ["VICTIM"]}, "data": "x"}},
         r"data\.root\._target_='pathlib\.Path\.write_text' is not one of this project's classes"),
        # Resolvers read the environment and files.
        ({"_target_": "image_finetune.data.ImageFolderDataModule", "root": "${oc.env:HOME}"}, r"holds an interpolation"),
        ({"root": "somewhere"}, r"names no _target_"),
    ],
    ids=["stdlib-function", "project-function", "project-class", "nested", "interpolation", "no-target"],
)  # fmt: skip
def test_a_checkpoint_cannot_choose_code_for_eval(trained, compose_cfg, tmp_path, data, message):
    victim = tmp_path / "written_by_the_checkpoint"
    crafted = with_stored_data(trained, tmp_path, json.loads(json.dumps(data).replace("VICTIM", str(victim))))
    with pytest.raises(UserError, match=message):
        run_eval(compose_cfg, tmp_path / "eval", f"ckpt_path={crafted}")
    assert not victim.exists()


def test_a_stored_target_is_checked_before_its_module_is_imported(trained, compose_cfg, tmp_path, monkeypatch):
    (tmp_path / "booby_trap.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\nclass Data: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    crafted = with_stored_data(trained, tmp_path, {"_target_": "booby_trap.Data"})
    with pytest.raises(UserError, match=r"'booby_trap\.Data' is not one of this project's classes"):
        run_eval(compose_cfg, tmp_path / "eval", f"ckpt_path={crafted}")
    assert not (tmp_path / "imported").exists()


def test_a_stored_data_config_writes_nothing_where_the_checkpoint_says(trained, compose_cfg, tmp_path):
    stored = run_config(trained.checkpoint)["data"]
    crafted = with_stored_data(
        trained, tmp_path, {**stored, "report_path": str(tmp_path / "r.tsv"), "cache_dir": str(tmp_path / "c")}
    )
    cfg = compose_cfg(f"ckpt_path={crafted}", config_name="eval", output_dir=tmp_path / "eval")
    data = data_config(cfg, str(crafted))
    assert data.report_path is None and data.cache_dir == cfg.paths.cache_dir and data.root == stored["root"]


def test_split_test_without_a_test_split_is_an_error_never_val_under_the_name_test(tmp_path):
    from support import make_image_folder

    from image_finetune.core.errors import ConfigError
    from image_finetune.data import ImageFolderDataModule
    from image_finetune.inference.evaluate import select_split

    images = make_image_folder(tmp_path / "few", per_class=4)
    dm = ImageFolderDataModule(images, image_size=16, num_workers=0, cache_dir=tmp_path / "cache", test_fraction=0)
    dm.setup("test")
    with pytest.raises(ConfigError, match=r"split=test: the checkpoint's data has no test split.*split=val"):
        select_split(dm, "test", data_from_command_line=False)
    assert select_split(dm, "val", data_from_command_line=False)[0] == "val"
