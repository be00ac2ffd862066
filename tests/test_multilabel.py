"""Multi-label classification end to end: a ``data=csv`` table whose label cells hold several labels trains with
``loss=bce``, reports mAP and F1 at a decision threshold chosen on the validation split and stored in the checkpoint;
``eval.py`` reproduces train's test mAP and writes ``per_label.csv``; ``predict.py`` writes each label's probability and
the label set over the threshold; ``export.py`` writes ``task`` and the threshold beside an ONNX model that agrees with
the checkpoint; a Ctrl-C'd multi-label run resumes to the uninterrupted weights.

The data: pairs of sklearn digits (0-4) tiled side by side, labelled with both digits (a genuine multi-label task),
plus a missing file, a file that is not an image and an image without labels.
"""

from __future__ import annotations

import csv
import json
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from shared_runs import once_per_session
from support import LABELS, PAIRS, write_pairs
from test_entry_matrix import COMMON, run, script_env
from test_interrupts import IN_EPOCH_2, LINE, ctrl_c
from test_interrupts import run as run_in_session
from test_resume import assert_bitwise_equal, weights

from image_finetune.core.errors import ConfigError
from image_finetune.data import CsvDataModule
from image_finetune.data.csvfile import parse_label
from image_finetune.inference.classifier import Classifier
from image_finetune.models.classifier import ImageClassifier
from image_finetune.recipe.losses import bce, cross_entropy
from image_finetune.recipe.metrics import THRESHOLD_GRID, best_threshold


def train_command(table: Path, run_dir: Path, *extra: str) -> list[str]:
    """``train.py`` on the multi-label table: 2 frozen epochs of 32 px, random init, on the CPU."""
    return [sys.executable, "train.py", "data=csv", f"data.file={table}", "data.image_size=32", "loss=bce",
            "data.test_fraction=0.2", "data.batch_size=16", *COMMON, "finetune=linear_probe", "trainer.max_epochs=2",
            f"hydra.run.dir={run_dir}", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The shared ``train.py data=csv loss=bce`` run every entry-script test reads (built once per session: tests of
    other files, ``test_find_issues_multilabel.py``, read it too)."""
    env = script_env()

    def build(root: Path) -> None:
        full = run_in_session(train_command(write_pairs(root), root / "train"), env)
        (root / "train.out").write_text(full.stdout + full.stderr)
        assert full.returncode == 0 and "Traceback" not in full.stderr, full.stderr[-3000:]

    root = once_per_session(tmp_path_factory, "multilabel", build)
    metrics = json.loads((root / "train" / "metrics.json").read_text())
    return {"root": root, "table": root / "labels.csv", "env": env, "output": (root / "train.out").read_text(),
            "metrics": metrics, "best": Path(metrics["test"]["checkpoint"])}  # fmt: skip


def test_train_infers_multilabel_and_reports_map_with_a_stored_threshold(trained):
    root, metrics, output = trained["root"], trained["metrics"], trained["output"]
    assert f"data.task=auto: multi-label ({trained['table']} row 2 holds 2 labels:" in output
    assert (
        f"{trained['table']}: left out 2 row(s) whose image is missing or unusable (row 7: images/gone.png: " in output
    )
    for scores in (metrics["best"]["val"], metrics["test"]):
        assert {"map", "f1_micro", "f1_macro", "acc", "loss"} <= set(scores), scores
    assert 0 < metrics["test"]["map"] <= 1
    hparams = torch.load(trained["best"], weights_only=True, map_location="cpu")["hyper_parameters"]
    assert hparams["task"] == "multilabel" and hparams["class_names"] == LABELS
    assert hparams["decision_threshold"] in THRESHOLD_GRID  # chosen on the validation split, not the 0.5 default
    split = json.loads((root / "train" / "data_split.json").read_text())
    assert sum(len(items) for items in split["splits"].values()) == PAIRS + 1  # every usable row, the unlabelled too
    logged = (root / "train" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert any(name.startswith("val/ap/") for name in logged), "per-label AP goes to the loggers"


def test_eval_reproduces_the_test_map_and_writes_per_label_metrics(trained, tmp_path):
    run("eval.py", f"ckpt_path={trained['best']}", f"hydra.run.dir={tmp_path}", "trainer=cpu", env=trained["env"])
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    assert evaluated["task"] == "multilabel" and evaluated["num_samples"] > 0
    assert abs(evaluated["test/map"] - trained["metrics"]["test"]["map"]) <= 1e-6
    with open(tmp_path / "per_label.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["label"] for row in rows] == LABELS
    assert set(rows[0]) == {"label", "precision", "recall", "f1", "ap", "support", "false_positives", "false_negatives"}
    assert sum(int(row["support"]) for row in rows) > 0
    with open(tmp_path / "predictions.csv", newline="") as f:  # false positives/negatives recounted per image
        images = [(set(row["target"].split()), set(row["predicted"].split())) for row in csv.DictReader(f)]
    for row in rows:
        name = row["label"]
        assert int(row["false_positives"]) == sum(name in p and name not in t for t, p in images)
        assert int(row["false_negatives"]) == sum(name in t and name not in p for t, p in images)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for row in rows:
        for kind in ("false_positives", "false_negatives"):
            (logged,) = events.Scalars(f"test/{kind}/{row['label']}")
            assert logged.value == int(row[kind])


def test_predict_writes_probabilities_and_the_label_set_over_the_threshold(trained, tmp_path):
    out = tmp_path / "predictions.csv"
    images = trained["table"].parent / "images"
    run("predict.py", f"ckpt_path={trained['best']}", f"input={images}", f"output={out}", "device=cpu",
        f"hydra.run.dir={tmp_path}", env=trained["env"])  # fmt: skip
    threshold = torch.load(trained["best"], weights_only=True, map_location="cpu")["hyper_parameters"][
        "decision_threshold"
    ]
    with open(out, newline="") as f:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(f)}
    assert rows["bad.png"]["reason"] == "not an image" and rows["bad.png"]["labels"] == ""
    assert len(rows) == PAIRS + 2  # the pairs, blank.png and bad.png
    for row in rows.values():
        if row["reason"]:
            continue
        probs = {name: float(row[f"probability_{name}"]) for name in LABELS}
        assert row["labels"].split() == [name for name in LABELS if probs[name] >= threshold]


def test_export_onnx_json_has_task_and_threshold_and_agrees_with_the_checkpoint(trained, tmp_path):
    out = tmp_path / "model.onnx"
    run("export.py", f"ckpt_path={trained['best']}", "format=onnx", f"output={out}", f"hydra.run.dir={tmp_path}",
        env=trained["env"])  # fmt: skip
    meta = json.loads((tmp_path / "model.onnx.json").read_text())
    classifier = Classifier.from_checkpoint(trained["best"], "cpu")
    assert meta["task"] == "multilabel" and meta["threshold"] == classifier.threshold
    import onnxruntime

    files = sorted((trained["table"].parent / "images").glob("p*.png"))[:8]
    batch = torch.stack([classifier.preprocess(str(p)) for p in files])
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = session.run([meta["output_name"]], {meta["input_name"]: batch.numpy()})[0]
    got = torch.from_numpy(logits).sigmoid()
    assert (got - classifier.probabilities(batch)).abs().max().item() <= 1e-4


def test_serve_answers_a_multilabel_checkpoint_with_its_label_set(trained):
    """serve.py's worker (in-process: the HTTP layer is test_serve.py's) answers top-k labels and the label set over
    the checkpoint's stored threshold, as ``Classifier`` (and predict.py) decide it."""
    import base64

    from image_finetune.inference.serving import PAYLOAD_FIELD, ClassifierAPI

    api = ClassifierAPI("torch", str(trained["best"]), {"top_k": 2}, max_batch_size=4, batch_timeout=0.01)
    api.setup("cpu")
    files = sorted((trained["table"].parent / "images").glob("p*.png"))[:4]
    requests = [{PAYLOAD_FIELD: base64.b64encode(p.read_bytes()).decode()} for p in files]
    answers = api.unbatch(api.predict(api.batch([api.decode_request(r) for r in requests])))
    expected = Classifier.from_checkpoint(trained["best"], "cpu").predict([str(p) for p in files], top_k=2)
    assert [a["label_set"] for a in answers] == [list(e.label_set) for e in expected]
    assert [a["labels"] for a in answers] == [list(e.labels) for e in expected]


@pytest.mark.slow
def test_a_multilabel_run_ctrl_cd_mid_epoch_resumes_to_the_uninterrupted_weights(trained, tmp_path):
    """The shared run again, Ctrl-C'd after epoch 2's second batch, then resumed with ``ckpt_path=last``."""
    root, table, env, run_dir = trained["root"], trained["table"], trained["env"], tmp_path / "stopped"
    stopped = run_in_session(ctrl_c(train_command(table, run_dir), IN_EPOCH_2), env)
    resumed = run_in_session(train_command(table, run_dir, "ckpt_path=last"), env)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert stopped.stderr.splitlines()[-1] == LINE.format(when="during training", run_dir=run_dir)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert "Reusing the data split in" in resumed.stdout + resumed.stderr
    assert_bitwise_equal(
        weights(run_dir / "checkpoints" / "last.ckpt"),
        weights(root / "train" / "checkpoints" / "last.ckpt"),
        "multi-label data=csv resumed after Ctrl-C",
    )
    thresholds = [
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["decision_threshold"]
        for run in (run_dir, root / "train")
    ]
    assert thresholds[0] == thresholds[1]


# ---- in-process: the pieces ------------------------------------------------------------------------------------------
def test_parse_label_splits_at_the_separator_once_per_label():
    assert parse_label(" cat dog  cat ", "t row 2", "label", " ") == ["cat", "dog"]
    assert parse_label("cat;dog", "t row 2", "label", ";") == ["cat", "dog"]
    assert parse_label("golden retriever", "t row 2", "label") == ["golden retriever"]  # data.task=multiclass
    assert parse_label("  ", "t row 2", "label", " ") == []


def test_a_single_label_table_stays_single_label_and_an_empty_cell_stays_an_error(tmp_path):
    table = write_pairs(tmp_path)
    data = CsvDataModule(table, image_size=32, num_workers=0, cache=None, cache_dir=tmp_path / "cache",
                         task="multiclass", test_fraction=0)  # fmt: skip
    with pytest.raises(Exception, match=r"row 114: the 'label' column is empty; write the image's class there"):
        data.setup()
    with pytest.raises(ConfigError, match=r"data.task='multi': use auto"):
        CsvDataModule(table, task="multi")


def test_multilabel_targets_are_multi_hot_and_an_empty_cell_has_no_labels(tmp_path):
    table = write_pairs(tmp_path)
    data = CsvDataModule(table, image_size=32, num_workers=0, cache=None, cache_dir=tmp_path / "cache",
                         test_fraction=0.2)  # fmt: skip
    data.setup()
    assert data.task == "multilabel" and data.class_names == LABELS
    blank = str(tmp_path / "images" / "blank.png")
    assert data.targets[blank].tolist() == [0.0] * 5
    for index, (path, _) in enumerate(data.splits["train"]):
        _, target = data.datasets["train"][index]
        assert target.dtype == torch.float32 and torch.equal(target, data.targets[path]) and target.sum() <= 2
    counts = data.class_counts()
    assert len(counts) == 5 and sum(counts) >= len(data.splits["train"])
    everything = [path for items in data.splits.values() for path, _ in items]
    assert len(everything) == len(set(everything)) == PAIRS + 1


def test_best_threshold_maximises_micro_f1_and_per_label_f1():
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.7], [0.3, 0.1], [0.8, 0.4]])
    target = torch.tensor([[1, 0], [1, 1], [0, 0], [1, 1]])
    assert best_threshold(probs, target) == 0.31  # every positive in, every negative out
    assert best_threshold(probs, target, per_label=True) == [0.31, 0.21]


def test_bce_balanced_pos_weight_is_negatives_over_positives():
    loss = bce([2, 8, 0], num_images=10, pos_weight="balanced")
    assert loss.pos_weight.tolist() == [4.0, 0.25, 1.0]
    assert "pos_weight" not in loss.state_dict()  # checkpoints hold only the network
    with pytest.raises(ConfigError, match=r"model.loss.pos_weight=\[1.0\] must be null, balanced, or a list of 3"):
        bce([2, 8, 0], num_images=10, pos_weight=[1.0])


def test_a_single_label_loss_on_multilabel_data_is_one_line():
    model = ImageClassifier({"name": "resnet18", "weights": None}, class_names=LABELS, task="multilabel")
    model.loss_factory = partial(cross_entropy, label_smoothing=0.1)
    with pytest.raises(
        ConfigError, match=r"^the data is multi-label \(several labels per image\): train with loss=bce$"
    ):
        model.make_loss([3] * 5, num_images=10)
    single = ImageClassifier({"name": "resnet18", "weights": None}, class_names=LABELS)
    single.loss_factory = bce
    with pytest.raises(ConfigError, match=r"^loss=bce is for multi-label data"):
        single.make_loss([3] * 5)
