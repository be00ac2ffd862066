"""k-fold cross-validation and class weights (issue 20, items 4 and 5): ``data.folds=K data.fold=i`` validates on a
stratified fold, ``-m data.fold='range(K)'`` ends with mean ± std over the folds and one out-of-fold prediction per
image, a resume with another fold is refused, and ``model.loss.weights=balanced`` reaches cross-entropy."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from support import FAST, make_image_folder

from image_finetune.checkpoints import read_checkpoint, run_config
from image_finetune.core.config_checks import check_config
from image_finetune.core.errors import ConfigError, DataError
from image_finetune.data import DigitsDataModule, ImageFolderDataModule
from image_finetune.data.folds import fold_split
from image_finetune.ops.multirun import SUMMARY_MD, summarize
from image_finetune.recipe.losses import balanced_weights, cross_entropy
from image_finetune.training.resume_guard import check_resume

REPO = Path(__file__).resolve().parents[1]
FOLDS = 3
PER_CLASS = 8
TINY = [
    *FAST,
    "data.batch_size=32",
    "finetune=full",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "model.backbone.weights=null",
    "logger=csv",
    "~callbacks.train_images",
    "~callbacks.misclassified",
    "~callbacks.confusion_matrix",
]


def train_py(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "train.py", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, digits_data_dir: Path) -> tuple[Path, str]:
    """``python train.py -m data.folds=3 data.fold='range(3)'`` on a small digits folder, 1 short epoch a fold (shared)."""
    root = tmp_path_factory.mktemp("kfold")
    for digit in sorted((digits_data_dir / "digits").iterdir()):  # a small digits folder: 8 scans of each digit
        (root / "data" / "digits" / digit.name).mkdir(parents=True)
        for image in sorted(digit.iterdir())[:PER_CLASS]:
            shutil.copy(image, root / "data" / "digits" / digit.name / image.name)
    result = train_py(
        "-m", f"data.folds={FOLDS}", f"data.fold=range({FOLDS})", "model.loss.weights=balanced",
        f"hydra.sweep.dir={root / 'sweep'}", f"paths.log_dir={root / 'logs'}", f"paths.data_dir={root / 'data'}",
        *TINY,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output[-4000:]
    return root / "sweep", output


def test_the_fold_multirun_ends_with_mean_and_std_over_the_folds(sweep):
    sweep_dir, output = sweep
    assert f"Across {FOLDS} jobs, mean ± std over data.fold ({sweep_dir / SUMMARY_MD}):" in output
    for metric in ("best/val/acc", "test/acc"):
        line = next(line for line in output.splitlines() if line.split("]")[-1].strip().startswith(metric + " "))
        mean, std = (float(x) for x in line.split(metric)[1].split("±"))
        values = [json.loads((sweep_dir / str(j) / "metrics.json").read_text()) for j in range(FOLDS)]
        flat = [v["best"]["val"]["acc"] if metric == "best/val/acc" else v["test"]["acc"] for v in values]
        assert mean == pytest.approx(sum(flat) / FOLDS, abs=1e-4)
        assert std == pytest.approx(torch.tensor(flat).std().item(), abs=1e-4)
    assert f"# {FOLDS} jobs in {sweep_dir} (repeats over data.fold)" in (sweep_dir / SUMMARY_MD).read_text()


def test_out_of_fold_predictions_cover_every_training_image_exactly_once(sweep):
    sweep_dir, _ = sweep
    manifests = [json.loads((sweep_dir / str(j) / "data_split.json").read_text()) for j in range(FOLDS)]
    assert [(m["folds"], m["fold"]) for m in manifests] == [(FOLDS, j) for j in range(FOLDS)]
    root = Path(manifests[0]["root"])
    pool = {str(root / p) for p in (rel for split in ("train", "val") for rel, _ in manifests[0]["splits"][split])}
    tests = [{rel for rel, _ in m["splits"]["test"]} for m in manifests]
    assert tests[0] == tests[1] == tests[2]  # the test split is untouched by the folds
    with open(sweep_dir / "oof_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["job", "path", "label", "predicted", *(f"prob_{c}" for c in manifests[0]["classes"])]
    counts = Counter(row["path"] for row in rows)
    assert set(counts) == pool and set(counts.values()) == {1}
    for job in range(FOLDS):  # each job predicted exactly the fold it held out, with its label
        held_out = {str(root / rel): str(label) for rel, label in manifests[job]["splits"]["val"]}
        mine = {row["path"]: row["label"] for row in rows if row["job"] == str(job)}
        assert mine == held_out
    probabilities = [float(v) for k, v in rows[0].items() if k.startswith("prob_")]
    assert sum(probabilities) == pytest.approx(1, abs=1e-4)
    assert rows[0]["predicted"] == manifests[0]["classes"][probabilities.index(max(probabilities))]


def test_a_resume_with_another_fold_is_refused_by_the_guard_and_by_the_split_file(sweep, tmp_path):
    """In-process: the guard on job 0's checkpoint with data.fold changed, then the data module on its split file."""
    sweep_dir, _ = sweep
    ckpt = sweep_dir / "0" / "checkpoints" / "last.ckpt"
    stored = run_config(read_checkpoint(ckpt))
    assert stored["model"]["loss"]["weights"] == "balanced"
    assert not [k for k in read_checkpoint(ckpt)["state_dict"] if "criterion" in k]  # the weights stay out
    cfg = OmegaConf.create(stored)
    cfg.data.fold = 1
    with pytest.raises(ConfigError) as refused:
        check_resume(cfg, str(ckpt))
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"ckpt_path={ckpt} was trained with data.fold=0; this command has data.fold=1.")
    # allowed anyway (+resume.allow_changes=[data.fold]): the run dir's split file still refuses to mix the folds
    data = DigitsDataModule(stored["data"]["root"], folds=FOLDS, fold=1, num_workers=0, cache=None,
                            manifest_path=sweep_dir / "0" / "data_split.json", cache_dir=tmp_path)  # fmt: skip
    with pytest.raises(
        DataError, match=r"holds the split of data.folds=3 data.fold=0, not of data.folds=3 data.fold=1"
    ):
        data.setup()


def test_folds_are_disjoint_stratified_and_fixed_by_the_seed():
    samples = [(f"{c}/{i}.png", c) for c, n in enumerate((30, 9, 6)) for i in range(n)]
    parts = [fold_split(samples, FOLDS, fold, seed=7) for fold in range(FOLDS)]
    held_out = [set(val) for _, val in parts]
    assert all(not (held_out[a] & held_out[b]) for a in range(FOLDS) for b in range(a + 1, FOLDS))
    assert set().union(*held_out) == set(samples)
    for train, val in parts:
        assert set(train) | set(val) == set(samples) and not set(train) & set(val)
        assert Counter(label for _, label in val) == {0: 10, 1: 3, 2: 2}  # each class split evenly over the folds
    assert fold_split(list(reversed(samples)), FOLDS, 1, seed=7) == parts[1]  # whatever order the scan gives
    assert fold_split(samples, FOLDS, 1, seed=8) != parts[1]
    with pytest.raises(
        DataError, match=r"^class 'b' has 2 image\(s\) in the pool being folded: too few for data.folds=3"
    ):
        fold_split([*samples[:30], *samples[30:32]], FOLDS, 0, seed=7, class_names=["a", "b"])


def test_a_fold_outside_the_folds_is_one_line(tmp_path):
    result = train_py("data.folds=3", "data.fold=3", "trainer=cpu", f"paths.log_dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: data.fold=3 is not a fold of data.folds=3: use 0-2 (every fold: python train.py -m data.folds=3 "
        "data.fold='range(3)')"
    )


@pytest.mark.parametrize(
    ("folds", "fold", "message"),
    [
        (1, 0, "data.folds=1 must be a whole number >= 2 (how many folds the training data is cut into), e.g. "
               "data.folds=5; null for no k-fold"),
        (3, None, "data.folds=3 needs data.fold, the fold held out for validation (0-2); to run every fold: python "
                  "train.py -m data.folds=3 data.fold='range(3)'"),
        (None, 1, "data.fold=1 needs data.folds (how many folds): e.g. data.folds=5 data.fold=1, or drop data.fold"),
    ],
)  # fmt: skip
def test_other_fold_settings_that_cannot_work_are_one_line(folds, fold, message):
    """In-process: ``check_config`` (what train.py runs first, as above) on the composed keys."""
    with pytest.raises(ConfigError) as refused:
        check_config(OmegaConf.create({"data": {"root": "x", "folds": folds, "fold": fold}}))
    assert str(refused.value) == message


def test_folds_with_a_val_folder_are_one_line(tmp_path):
    """In-process (the data module's own check; the command line reaches it the same way)."""
    make_image_folder(tmp_path / "train", per_class=4)
    make_image_folder(tmp_path / "val", per_class=2)
    with pytest.raises(ConfigError) as refused:
        ImageFolderDataModule(tmp_path, folds=3, fold=0)
    assert str(refused.value) == (
        f"data.folds=3 cuts the training images into folds to validate on, but {tmp_path / 'val'} is the validation "
        "split: drop data.folds and data.fold to validate on it, or merge it into the training images to cross-validate"
    )


def test_cross_entropy_balanced_weights_are_n_over_k_count_and_reach_the_loss(compose_cfg):
    counts = [10, 30, 20]
    expected = torch.tensor([60 / (3 * 10), 60 / (3 * 30), 60 / (3 * 20)])
    torch.testing.assert_close(balanced_weights(counts), expected)
    cfg = compose_cfg("model.loss.weights=balanced", "model.loss.label_smoothing=0", "model.backbone.weights=null")
    model = instantiate(cfg.model)
    model.make_loss(counts)  # what setup('fit') does with the training split's counts
    torch.testing.assert_close(model.criterion.weight, expected)
    logits, targets = torch.randn(6, 3), torch.tensor([0, 1, 1, 2, 2, 1])
    weighted = model.criterion(logits, targets)
    torch.testing.assert_close(weighted, F.cross_entropy(logits, targets, weight=expected))
    assert not torch.allclose(weighted, F.cross_entropy(logits, targets))
    assert "weight" not in model.criterion.state_dict()  # checkpoints hold only the network
    torch.testing.assert_close(cross_entropy(counts, weights=[1, 2, 3]).weight, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ConfigError, match=r"model.loss.weights=\[1, 2\] must be null, balanced, or a list of 3"):
        cross_entropy(counts, weights=[1, 2])


def test_repeats_are_summarised_per_setting(tmp_path):
    """Jobs that differ only in seed (or fold) are repeats: a sweep over lr x seed gets mean ± std per lr."""
    for job, (lr, seed, acc) in enumerate([("0.1", 1, 0.5), ("0.1", 2, 0.7), ("0.2", 1, 0.8), ("0.2", 2, 0.9)]):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / "metrics.json").write_text(json.dumps({"test/acc": acc}))
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(f"- model.optimizer.lr={lr}\n- seed={seed}\n")
    stats = summarize(tmp_path)
    assert stats["test/acc"]["n"] == 4  # the return value stays the whole sweep's
    md = (tmp_path / SUMMARY_MD).read_text()
    assert md.startswith(f"# 4 jobs in {tmp_path} (repeats over seed)\n")
    first, second = md.split("## model.optimizer.lr=0.1")[1].split("## model.optimizer.lr=0.2")
    assert "| test/acc | 0.6000 | 0.1414 | 2 |" in first and "| test/acc | 0.8500 | 0.0707 | 2 |" in second


def test_find_issues_uses_the_sweeps_out_of_fold_predictions(sweep, compose_cfg, tmp_path):
    """``find_issues.py ckpt_path=<sweep dir>/0/...`` finds the sweep's oof_predictions.csv above the run dir: the train
    + val pool gets those probabilities, the test split (no fold predicted it) the cross-validated ones."""
    from image_finetune.inference.data_issues import find_issues

    sweep_dir, _ = sweep
    ckpt = sweep_dir / "0" / "checkpoints" / "last.ckpt"
    manifest = json.loads((sweep_dir / "0" / "data_split.json").read_text())
    pool = sum(len(manifest["splits"][split]) for split in ("train", "val"))
    cfg = compose_cfg(f"ckpt_path={ckpt}", "folds=2", config_name="find_issues", output_dir=tmp_path / "issues")
    saved = find_issues(cfg)
    assert saved["pred_probs"] == (
        f"out-of-fold probabilities from {sweep_dir / 'oof_predictions.csv'} for {pool} images; 2-fold stratified "
        f"logistic regression on the checkpoint's embeddings for the other {len(manifest['splits']['test'])}"
    )
