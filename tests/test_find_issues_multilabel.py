"""`python find_issues.py` on a multi-label checkpoint: each image's given labels are its label set (not its one
stratum label), the out-of-sample probabilities are per label, and the reports write label sets. Uses
``test_multilabel.py``'s shared ``data=csv loss=bce`` run (pairs of digits labelled with both); the ranking itself is
checked in-process on a small synthetic set with one planted wrong label set.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from support import LABELS
from test_entry_matrix import script_env
from test_find_issues import SUMMARY, read_csv, run_find_issues
from test_multilabel import trained  # noqa: F401  (the shared multi-label run, built once per session)

from image_finetune.inference.data_issues import (
    Images,
    cross_validated_label_probabilities,
    run_datalab,
    stored_out_of_fold,
)


def label_sets_of(table: Path) -> dict[str, set[str]]:
    """``path -> its label set`` as the table writes it (paths relative to the table's folder)."""
    with table.open(newline="") as f:
        return {str(table.parent / row["path"]): set(row["label"].split()) for row in csv.DictReader(f)}


def test_find_issues_on_a_multilabel_run_writes_label_sets(trained, tmp_path):  # noqa: F811
    out = tmp_path / "issues"
    result = run_find_issues(
        f"ckpt_path={trained['best']}", f"hydra.run.dir={out}", f"paths.data_dir={tmp_path / 'data'}", "folds=3",
        env=script_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("label issues:")]
    assert len(lines) == 1 and SUMMARY.match(lines[0]), result.stdout

    truth = label_sets_of(trained["table"])
    columns, rows = read_csv(out / "label_issues.csv")
    assert columns == ["path", "split", "given_labels", "suggested_labels", "label_quality"]
    assert rows, "a 2-epoch random-init model on 110 images leaves some label sets in doubt"
    for row in rows:
        given, suggested = set(row["given_labels"].split()), set(row["suggested_labels"].split())
        assert given == truth[row["path"]]  # the whole set, not the row's one stratum label
        assert given | suggested <= set(LABELS)
    assert any(len(row["given_labels"].split()) > 1 for row in rows)  # sets, where a stratum is one label
    qualities = [float(row["label_quality"]) for row in rows]
    assert qualities == sorted(qualities)

    columns, duplicates = read_csv(out / "near_duplicates.csv")
    assert columns == ["group", "path", "split", "label", "leak", "identical"]
    assert all(set(row["label"].split()) == truth[row["path"]] for row in duplicates)
    _, outliers = read_csv(out / "outliers.csv")
    assert all(set(row["label"].split()) == truth[row["path"]] for row in outliers)
    saved = json.loads((out / "issues.json").read_text())
    assert saved["task"] == "multilabel" and saved["pred_probs"].startswith("3-fold one-vs-rest logistic regression")
    assert (out / "label_issues.png").stat().st_size > 0


def test_a_planted_wrong_label_set_is_ranked_first():
    """60 images with informative features; image 7's label set is replaced by its complement."""
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 4)) < 0.4).astype(np.int64)
    features = np.hstack([labels * 4.0, np.zeros((60, 4))]) + rng.normal(size=(60, 8))
    wrong = labels.copy()
    wrong[7] = 1 - wrong[7]
    probs = cross_validated_label_probabilities(features, wrong, folds=5, seed=0)
    assert probs.shape == (60, 4) and not np.allclose(probs.sum(1), 1)  # per-label probabilities, not a softmax
    issues = run_datalab(wrong, probs, features).get_issues("label")
    assert int(issues["label_score"].idxmin()) == 7
    assert bool(issues.at[7, "is_label_issue"])


def test_stored_multilabel_probabilities_are_not_renormalised(tmp_path):
    images = Images(["a.png", "b.png"], ["train", "val"], np.zeros((2, 2), np.int64), ["cat", "dog"], multilabel=True)
    oof = tmp_path / "oof_predictions.csv"
    oof.write_text("path,label,predicted,prob_cat,prob_dog\na.png,cat dog,cat dog,0.900000,0.800000\n")
    stored = stored_out_of_fold(oof, images)
    assert stored is not None
    np.testing.assert_allclose(stored[0], [0.9, 0.8])
    assert np.isnan(stored[1]).all()
