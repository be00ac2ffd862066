"""``find_issues(cfg)``: wrong labels, near duplicates (leaks across splits) and outliers in a trained run's images.

What it does, in order:

1. Rebuilds the data module exactly as ``eval.py`` does (``wiring.data_config``: the checkpoint's own data and split,
   or ``data=... data.root=DIR`` from the command line), so files are read with the checkpoint's preprocessing.
2. One forward pass of the trained backbone gives every image's embedding (``ClassifierNet.features``), once as it
   is and once mirrored.
3. Out-of-sample predicted probabilities for every image. cleanlab needs probabilities from a model that did not see
   the image's label: the fine-tuned head was trained on the training images' labels, wrong ones included, so its
   own probabilities on those images mostly repeat the given label and hide exactly the mistakes we look for. So:
   a file of out-of-fold probabilities (``pred_probs=PATH``, or the ``oof_predictions.csv`` a k-fold sweep writes in
   the sweep dir above the checkpoint's run dir) is used when there is one; otherwise a K-fold (``folds``, stratified)
   logistic regression on the embeddings gives them (``sklearn.model_selection.cross_val_predict``, as cleanlab's
   docs recommend): each image's probabilities come from a classifier fitted on the other folds. The backbone itself
   was fine-tuned on the training labels, so a memorised wrong label can still pull its embedding towards the wrong
   class; out-of-fold probabilities from k-fold training do not have that bias.
   Multi-label data (several labels per image, ``loss=bce``): each image's given labels are its label set (the
   multi-hot target its ``all_images()`` item carries), the probabilities are per label (sigmoid; a stored file's
   are not renormalised), the cross-validation is one-vs-rest logistic regression with folds made by iterative
   stratification over every label (``data/multilabel_split.py``), and Datalab runs with ``task="multilabel"``.
4. ``cleanlab.Datalab(...).find_issues(pred_probs=..., features=...)`` finds label issues, outliers and near duplicates.
   The features it compares are the mean of the embeddings of an image and of its mirror image, so a horizontally
   flipped copy is found as a duplicate too. Its radius misses most resized or re-encoded copies, so a perceptual hash
   of each image and its mirror (``duplicates.py``, ``near_duplicate_bits``) adds the pairs it finds; both are merged
   into groups.

It writes ``label_issues.csv``, ``near_duplicates.csv``, ``outliers.csv``, ``label_issues.png`` and ``issues.json`` in
the run dir and prints one summary line. It never writes to the data folder.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from image_finetune.checkpoints import resolve_ckpt_path
from image_finetune.core.atomic import atomic_path
from image_finetune.core.cli import save_json, write_csv
from image_finetune.core.console import silence_lightning_noise
from image_finetune.core.errors import ConfigError, DataError, UserError
from image_finetune.core.plots import WRONG_COLOUR, image_grid
from image_finetune.data.multilabel_split import iterative_stratification
from image_finetune.inference.classifier import label_sets, resolve_device, to_float
from image_finetune.inference.duplicates import (
    BITS,
    connected_groups,
    near_duplicate_pairs,
    perceptual_hashes,
    sets_to_pairs,
)
from image_finetune.models.classifier import ClassifierNet
from image_finetune.ops.multirun import OOF_CSV
from image_finetune.training.wiring import build_model_and_data, data_config

log = logging.getLogger(__name__)

ISSUE_TYPES = ("label", "outlier", "near_duplicate")
#: Hash bits two near duplicates may differ in: measured on digits (benchmarks/README.md "Finding wrong labels and
#: leaks"), 2 finds most resized, mirrored and re-encoded copies with 2 false groups among 1,797 real scans; 4: 22.
DEFAULT_HASH_BITS = 2
INSTALL_HINT = "pip install 'image-finetune[issues]'"


@dataclass(frozen=True)
class Images:
    """Every image of the data: its path (``<split>/<index>`` for one without a file), split and given label (an
    index into ``class_names``; multi-label: a 0/1 row per image, one column per label)."""

    paths: list[str]
    splits: list[str]
    labels: np.ndarray
    class_names: list[str]
    files: list[bool] | None = None
    """Whether each of ``paths`` is a file; None: all are."""
    multilabel: bool = False
    threshold: float | list[float] = 0.5
    """Multi-label: the checkpoint's decision threshold (one, or one per label): the suggested label sets."""

    def is_file(self, i: int) -> bool:
        return self.files is None or self.files[i]

    def label_text(self, i: int) -> str:
        """Image ``i``'s given label as the reports write it: its class, or (multi-label) its labels joined by a
        space (empty: no labels)."""
        if self.multilabel:
            return " ".join(self.class_names[j] for j in np.flatnonzero(self.labels[i]))
        return self.class_names[self.labels[i]]


def require_cleanlab() -> None:
    """One line, not an ImportError, when the optional dependency is missing."""
    try:
        import cleanlab  # noqa: F401
        import sklearn  # noqa: F401  (cleanlab depends on it)
    except ImportError:
        raise UserError(f"find_issues.py needs cleanlab, which is not installed: {INSTALL_HINT}") from None


def load_images(cfg: DictConfig, ckpt_path: str) -> tuple[ClassifierNet, Images, Dataset]:
    """The checkpoint's network, the images with their splits and labels, and a dataset of them at the eval transform
    (the data module's ``all_images``, named by its ``image_names``). Multi-label: ``labels`` has no columns yet;
    the label sets come with the images themselves (``embed``, ``with_label_sets``), as ``all_images()`` items carry
    each image's multi-hot target where ``ImageName.label`` is only the image's stratum."""
    model, datamodule = build_model_and_data(data_config(cfg, ckpt_path), checkpoint=ckpt_path)
    datamodule.prepare_data()
    datamodule.setup("test")
    everything = datamodule.all_images()
    if everything is None:
        raise ConfigError(
            f"find_issues.py needs every image of the data, which {type(datamodule).__name__}.all_images() does not "
            "give (None): give the data module an eval_views() (data/base.py)"
        )
    names = datamodule.image_names()
    if model.multilabel != (datamodule.task == "multilabel"):
        raise ConfigError(
            f"the checkpoint {ckpt_path} is {model.hparams.get('task') or 'multiclass'} but {datamodule.source} is "
            f"{datamodule.task}: check its issues with data of its own task (leave data= out to use the checkpoint's)"
        )
    labels = np.array([name.label for name in names], dtype=np.int64)
    counts = np.bincount(labels, minlength=len(datamodule.class_names))
    if model.multilabel:  # every label's images are counted once the label sets are read
        labels = np.zeros((len(names), 0), dtype=np.int64)
    elif (counts < 2).any():
        few = [name for name, n in zip(datamodule.class_names, counts) if n < 2]
        raise DataError(
            f"{datamodule.source}: classes {few} have fewer than 2 images; cross-validation needs 2 or more"
        )
    assert model.net is not None  # a checkpoint always rebuilds the head
    images = Images(
        [name.id for name in names],
        [name.split for name in names],
        labels,
        list(datamodule.class_names),
        [name.is_file for name in names],
        multilabel=model.multilabel,
        threshold=model.decision_threshold if model.multilabel else 0.5,
    )
    log.info("%s: %d images in %s", datamodule.source, len(names), dict(Counter(images.splits)))
    return model.net, images, everything


@torch.inference_mode()
def embed(
    net: ClassifierNet, dataset: Dataset, batch_size: int, num_workers: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each image's embedding, the mean of its embedding and its mirror image's (a flipped copy gets the same), its
    perceptual hashes (``duplicates.perceptual_hashes``) and its label as the dataset gives it (a class index, or
    multi-label: the multi-hot target), from one pass over the images."""
    net = net.to(device).eval()
    plain, symmetric, hashes, given = [], [], [], []
    for images, labels in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        x = to_float(images.to(device))
        features = net.features(x).float()
        plain.append(features.cpu())
        symmetric.append(((features + net.features(x.flip(-1)).float()) / 2).cpu())
        hashes.append(perceptual_hashes(images))
        given.append(torch.as_tensor(labels))
    return (
        torch.cat(plain).numpy(),
        torch.cat(symmetric).numpy(),
        torch.cat(hashes).numpy(),
        torch.cat(given).numpy(),
    )


def with_label_sets(images: Images, given: np.ndarray) -> Images:
    """Multi-label: ``images`` with each image's label set, its multi-hot target as ``all_images()`` gives it."""
    if given.ndim != 2 or given.shape != (len(images.paths), len(images.class_names)):
        raise ConfigError(
            f"the checkpoint is multi-label but the data's images carry labels of shape {tuple(given.shape)}, not one "
            f"multi-hot row of {len(images.class_names)} labels per image: give all_images() items their multi-hot "
            "target (data/csvfile.py does)"
        )
    return replace(images, labels=(given >= 0.5).astype(np.int64))


def stored_out_of_fold(csv_path: Path, images: Images) -> np.ndarray | None:
    """The out-of-fold probabilities in ``csv_path`` (``path`` + ``prob_<class>``), rows in ``images.paths`` order, NaN
    for an image the file does not cover (a k-fold sweep covers its train + val pool, not the test split); None when
    there is no such file. A file missing a class, or covering none of the images, is an error, never half used.
    Single-label rows are renormalised to sum 1; multi-label ones are per-label sigmoid probabilities, kept as they
    are."""
    if not csv_path.is_file():
        return None
    with csv_path.open(newline="") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    if not rows:
        raise DataError(f"{csv_path} is empty: it should hold out-of-fold probabilities (path + prob_<class> columns)")
    missing_classes = [name for name in images.class_names if f"prob_{name}" not in next(iter(rows.values()))]
    covered = [path in rows for path in images.paths]
    if missing_classes or not any(covered):
        raise DataError(
            f"{csv_path} does not match the data: missing class columns {[f'prob_{n}' for n in missing_classes]}, "
            f"{covered.count(True)} of {len(covered)} images with a row. Re-write it for this data, or move it away "
            "to cross-validate on embeddings instead"
        )
    nan = [float("nan")] * len(images.class_names)
    probs = np.array(
        [[float(rows[p][f"prob_{name}"]) for name in images.class_names] if p in rows else nan for p in images.paths]
    )
    return probs if images.multilabel else probs / probs.sum(axis=1, keepdims=True)


def cross_validated_probabilities(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Out-of-sample probabilities: a stratified ``folds``-fold logistic regression on the embeddings, each image
    predicted by the classifier fitted without it (``cross_val_predict``). Folds shrink to the smallest class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if folds < 2:
        raise ConfigError(f"folds={folds}: cross-validation needs at least 2 folds (default 5)")
    k = min(folds, int(np.bincount(labels).min()))
    if k < folds:
        log.warning("folds=%d: the smallest class has %d images, so %d folds are used", folds, k, k)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return cross_val_predict(classifier, features, labels, cv=cv, method="predict_proba")


def cross_validated_label_probabilities(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Multi-label out-of-sample probabilities, one column per label: one-vs-rest logistic regression on the
    embeddings, each image predicted by the classifiers fitted without it. sklearn's stratified K-fold takes one class
    per image, so the folds come from iterative stratification over every label (``data/multilabel_split.py``): each
    label held by ``folds`` or more images is in every fold. A label missing from a fold's training part gets a constant
    classifier there (sklearn's one-vs-rest warns)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import PredefinedSplit, cross_val_predict
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if folds < 2:
        raise ConfigError(f"folds={folds}: cross-validation needs at least 2 folds (default 5)")
    k = min(folds, len(labels))
    fold_of = iterative_stratification(
        {i: np.flatnonzero(row).tolist() for i, row in enumerate(labels)}, [1.0] * k, seed
    )
    cv = PredefinedSplit([fold_of[i] for i in range(len(labels))])
    classifier = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(max_iter=1000)))
    return cross_val_predict(classifier, features, labels, cv=cv, method="predict_proba")


def run_datalab(labels: np.ndarray, pred_probs: np.ndarray, features: np.ndarray) -> Any:
    """cleanlab's ``Datalab`` with label, outlier and near-duplicate checks; one that failed is an error (Datalab only
    prints it). ``labels``: class indices, or (multi-label) one 0/1 row per image, given to Datalab as each image's
    list of label indices (``task="multilabel"``)."""
    from cleanlab import Datalab

    if labels.ndim == 2:  # multi-label: pred_probs columns are the label indices
        given = [np.flatnonzero(row).tolist() for row in labels]
        lab = Datalab(data={"label": given}, label_name="label", task="multilabel", verbosity=0)
    else:  # Integer labels: Datalab orders pred_probs columns by the sorted label values, the class indices.
        lab = Datalab(data={"label": labels.tolist()}, label_name="label", verbosity=0)
    lab.find_issues(pred_probs=pred_probs, features=features, issue_types={name: {} for name in ISSUE_TYPES})
    found = set(lab.issue_summary["issue_type"])
    failed = [name for name in ISSUE_TYPES if name not in found]
    if failed:
        raise RuntimeError(f"cleanlab could not check {failed} (its message is printed above)")
    return lab


def near_duplicate_bits(cfg: DictConfig) -> int | None:
    """``near_duplicate_bits``: how many of the 64 perceptual-hash bits two near duplicates may differ in (null: the
    hash check is off and only cleanlab's embedding radius counts)."""
    bits = cfg.get("near_duplicate_bits", DEFAULT_HASH_BITS)
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= BITS:
        raise ConfigError(
            f"near_duplicate_bits={bits!r}: give a whole number of bits from 0 to {BITS} (default "
            f"{DEFAULT_HASH_BITS}), or null to compare embeddings only"
        )
    return bits


def file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def image_digest(images: Images, dataset: Dataset | None, i: int) -> str:
    """Image ``i``'s file bytes hashed; for one without a file, its pixels as the data module gives them."""
    if images.is_file(i) or dataset is None:
        return file_digest(images.paths[i])
    return hashlib.sha256(dataset[i][0].numpy().tobytes()).hexdigest()


def suggested_labels(images: Images, issues: Any, pred_probs: np.ndarray) -> list[str]:
    """Each image's suggested label: cleanlab's predicted class; multi-label: the labels whose out-of-sample
    probability reaches the checkpoint's decision threshold, joined by a space."""
    if images.multilabel:
        chosen = label_sets(torch.from_numpy(pred_probs), images.class_names, images.threshold)
        return [" ".join(labels) for labels in chosen]
    return [images.class_names[int(p)] for p in issues["predicted_label"]]


def write_label_issues(out_dir: Path, images: Images, issues: Any, suggested: list[str]) -> list[int]:
    """``label_issues.csv``: the flagged images, lowest label quality first; returns their indices in that order.
    Multi-label: ``given_labels`` and ``suggested_labels`` are label sets."""
    flagged = issues[issues["is_label_issue"]].sort_values("label_score", kind="stable")
    rows = [
        [images.paths[i], images.splits[i], images.label_text(i), suggested[i], f"{score:.6f}"]
        for i, score in zip(flagged.index, flagged["label_score"])
    ]
    header = ["given_labels", "suggested_labels"] if images.multilabel else ["given_label", "suggested_label"]
    write_csv(out_dir / "label_issues.csv", [["path", "split", *header, "label_quality"], *rows])
    return [int(i) for i in flagged.index]


def write_near_duplicates(
    out_dir: Path, images: Images, groups: list[list[int]], dataset: Dataset | None = None
) -> list[list[int]]:
    """``near_duplicates.csv``: one row per member; a group whose members lie in more than one split is a ``leak``
    (listed first). ``identical``: the file's bytes (an image without a file: its pixels, read from ``dataset``) equal
    another member's. Returns the leaking groups."""
    leaks = [g for g in groups if len({images.splits[i] for i in g}) > 1]
    ordered = leaks + [g for g in groups if g not in leaks]
    rows = []
    for number, group in enumerate(ordered, start=1):
        digest = {i: image_digest(images, dataset, i) for i in group}
        digests = Counter(digest.values())
        leak = group in leaks
        for i in group:
            path = images.paths[i]
            identical = digests[digest[i]] > 1
            rows.append([number, path, images.splits[i], images.label_text(i), leak, identical])
    write_csv(out_dir / "near_duplicates.csv", [["group", "path", "split", "label", "leak", "identical"], *rows])
    return leaks


def write_outliers(out_dir: Path, images: Images, issues: Any) -> int:
    """``outliers.csv``: the flagged images, most atypical (lowest score) first; returns how many."""
    flagged = issues[issues["is_outlier_issue"]].sort_values("outlier_score", kind="stable")
    rows = [
        [images.paths[i], images.splits[i], images.label_text(i), f"{score:.6f}"]
        for i, score in zip(flagged.index, flagged["outlier_score"])
    ]
    write_csv(out_dir / "outliers.csv", [["path", "split", "label", "outlier_score"], *rows])
    return len(rows)


def draw_suspects(
    path: Path, dataset: Dataset, images: Images, issues: Any, order: list[int], suggested: list[str]
) -> Path:
    """``label_issues.png``: the top suspects (as the network sees them), captioned ``given -> suggested`` (label
    sets for multi-label data, ``{}`` for none)."""
    pictures = torch.stack([dataset[i][0] for i in order]) if order else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    captions = [
        f"{images.label_text(i) or '{}'} -> {suggested[i] or '{}'}\nquality {issues.at[i, 'label_score']:.2f}"
        for i in order
    ]
    grid = image_grid(pictures, captions, columns=8, cell=128, caption_colours=[WRONG_COLOUR] * len(order))
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="png")
    return path


def summary_line(images: Images, label_order: list[int], groups: int, leaks: int, outliers: int, out_dir: Path) -> str:
    """``label issues: 23 of 1797 images (train 18, val 3, test 2); near-duplicate groups: 4 (2 cross splits: leak);
    outliers: 12 -> <run dir>``."""
    per_split = Counter(images.splits[i] for i in label_order)
    order = [s for s in ("train", "val", "test") if s in set(images.splits)] + sorted(
        set(images.splits) - {"train", "val", "test"}
    )
    splits = ", ".join(f"{s} {per_split[s]}" for s in order)
    return (
        f"label issues: {len(label_order)} of {len(images.paths)} images ({splits}); "
        f"near-duplicate groups: {groups} ({leaks} cross splits: leak); outliers: {outliers} -> {out_dir}"
    )


def find_issues(cfg: DictConfig) -> dict[str, Any]:
    """Find and rank the data's problems; write the reports in the run dir; print and return the summary."""
    require_cleanlab()
    bits = near_duplicate_bits(cfg)
    if not cfg.get("ckpt_path"):
        raise UserError(
            "ckpt_path is required: python find_issues.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt"
        )
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir)
    assert ckpt_path is not None
    silence_lightning_noise()
    out_dir = Path(cfg.paths.output_dir)
    net, images, dataset = load_images(cfg, ckpt_path)
    device = resolve_device(cfg.get("device") or "auto")
    batch_size, workers = int(cfg.get("batch_size") or 64), int(cfg.get("num_workers") or 0)
    features, symmetric, hashes, given = embed(net, dataset, batch_size, workers, device)
    if images.multilabel:
        images = with_label_sets(images, given)

    # Out-of-fold probabilities (a ``path`` column, ``prob_<class>`` per class): a k-fold sweep
    # (``python train.py -m data.folds=K data.fold='range(K)'``) writes them for every image into the sweep dir, the
    # parent of each fold's run dir; when they are there they replace the cross-validation.
    oof_file = Path(cfg.pred_probs).expanduser() if cfg.get("pred_probs") else Path(ckpt_path).parents[2] / OOF_CSV
    if cfg.get("pred_probs") and not oof_file.is_file():
        raise UserError(
            f"pred_probs={str(oof_file)!r}: no such file (a CSV: path + prob_<class> columns, as a k-fold sweep writes)"
        )
    stored = stored_out_of_fold(oof_file, images)
    folds = int(cfg.get("folds") or 5)
    seed = int(cfg.get("seed") or 0)
    if images.multilabel:
        method = (
            f"{folds}-fold one-vs-rest logistic regression on the checkpoint's embeddings (folds stratified by every "
            "label)"
        )
        cross_validate = cross_validated_label_probabilities
    else:
        method = f"{folds}-fold stratified logistic regression on the checkpoint's embeddings"
        cross_validate = cross_validated_probabilities
    if stored is None or np.isnan(stored).any():
        pred_probs = cross_validate(features, images.labels, folds, seed)
    if stored is not None:
        covered = ~np.isnan(stored).any(axis=1)
        if covered.all():
            pred_probs, method = stored, f"out-of-fold probabilities from {oof_file}"
        else:  # the images the file leaves out (a k-fold sweep's test split) keep the cross-validated ones
            pred_probs[covered] = stored[covered]
            method = (
                f"out-of-fold probabilities from {oof_file} for {int(covered.sum())} images; {method} for the other "
                f"{int((~covered).sum())}"
            )
    log.info("predicted probabilities: %s", method)

    lab = run_datalab(images.labels, pred_probs, symmetric)
    label_issues = lab.get_issues("label")
    suggested = suggested_labels(images, label_issues, pred_probs)
    label_order = write_label_issues(out_dir, images, label_issues, suggested)
    pairs = sets_to_pairs(lab.get_info("near_duplicate")["near_duplicate_sets"])
    if bits is not None:  # altered copies (resized, re-encoded, mirrored) by perceptual hash, with cleanlab's
        pairs += near_duplicate_pairs(hashes, bits)
    groups = connected_groups(len(images.paths), pairs)
    leaks = write_near_duplicates(out_dir, images, groups, dataset)
    outliers = write_outliers(out_dir, images, lab.get_issues("outlier"))
    shown = label_order[: int(cfg.get("show", 32))]
    draw_suspects(out_dir / "label_issues.png", dataset, images, label_issues, shown, suggested)
    summary = {
        "checkpoint": ckpt_path,
        "pred_probs": method,
        "images": len(images.paths),
        "splits": dict(Counter(images.splits)),
        "label_issues": len(label_order),
        "near_duplicate_groups": len(groups),
        "leaking_groups": len(leaks),
        "outliers": outliers,
    }
    if images.multilabel:
        summary |= {"task": "multilabel", "decision_threshold": images.threshold}
    save_json(summary, out_dir / "issues.json")
    print(summary_line(images, label_order, len(groups), len(leaks), outliers, out_dir), flush=True)
    return summary
