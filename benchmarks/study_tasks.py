"""Offline transfer tasks for benchmarks/finetune_study.py, built from real images that ship with installed packages.

Each task is a ``train/`` + ``val/`` folder of class folders plus a ResNet-18 state dict pretrained (by the plain loop
below) on *related but different* classes, so fine-tuning starts from features that transfer, as with ImageNet
weights, but in seconds on a CPU:

* ``digits-<k>shot``: a backbone pretrained on scikit-learn's handwritten digits 0-4, fine-tuned on digits 5-9 with
  ``k`` labelled images per class; ``digits-all``: all ten digits, every training image (~1,400): the "large data"
  check that the defaults chosen for few-shot tasks do not hurt.
* ``photos-<k>shot``: patches of real photographs (scikit-learn, matplotlib, scikit-image sample images), one class per
  photograph. The backbone is pretrained on patches of eleven other photographs; the fine-tuning classes are five
  photographs it never saw. Training patches come from the left 70 % of each photograph and validation patches from
  the right 30 %, so no validation pixel was ever trained on.
* ``photos-multilabel``: multi-label. Each image is a 2x2 mosaic of patches (each half the study's size): 1-3 of the
  five fine-tuning photographs (the labels, every one present at most once), the other tiles patches of the eleven
  pretraining photographs (distractors, never labels). Training tiles of the labelled photographs come from their left
  70 %, validation tiles from the right 30 %. Written as ``images/*.png`` plus ``labels.csv`` (``path,label,split``;
  labels space-separated; split ``train``/``val``), which the template's ``data=csv`` and fastai's ``DataBlock`` both
  read, so both validate on the same rows.

Images are written at the study's size (32 px) as RGB PNGs, so the template and the fastai peer read the same pixels.
Everything is seeded: the same arguments write the same folders and weights.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's file name for resnet18 IMAGENET1K_V1: fastai's pretrained=True finds the study's weights under it.
TORCHVISION_RESNET18_FILE = "resnet18-f37072fd.pth"

FINETUNE_PHOTOS = ("china", "flower", "grace_hopper", "chelsea", "coffee")
PRETRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "camera", "coins",
                   "grass", "gravel", "brick", "moon")  # fmt: skip
TRAIN_REGION = 0.7  # photographs: training patches from the left 70 %, validation patches from the rest
LABELS_CSV = "labels.csv"  # multi-label tasks: the table in the task folder (path,label,split)


@dataclass(frozen=True)
class Task:
    """One study task: where its folder and weights are, and its epoch budget (1 frozen + the rest unfrozen)."""

    name: str
    root: str
    weights: str
    torch_home: str  # a torch hub cache whose resnet18 ImageNet file holds ``weights`` (for the fastai peer)
    epochs: int
    size: int
    num_classes: int
    num_train: int
    num_val: int
    multilabel: bool = False  # a ``labels.csv`` task (``LABELS_CSV``): scored by macro mAP instead of accuracy

    @property
    def labels_csv(self) -> str:
        return str(Path(self.root) / LABELS_CSV)


# ---- real images ----------------------------------------------------------------------------------------------------
def digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 scans as ``size`` px RGB uint8 (bilinear upsampling), and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = (data.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = np.stack(
        [np.asarray(Image.fromarray(p, "L").resize((size, size), Image.BILINEAR).convert("RGB")) for p in pixels]
    )
    return images, data.target.astype(np.int64)


def photographs(names: Sequence[str]) -> dict[str, np.ndarray]:
    """The named sample photographs as RGB uint8 arrays (grey ones repeated to three channels)."""
    out = {}
    for name in names:
        if name in ("china", "flower"):
            from sklearn.datasets import load_sample_image

            image = load_sample_image(f"{name}.jpg")
        elif name == "grace_hopper":
            import matplotlib.cbook

            image = np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
        else:
            import skimage.data  # scikit-image: the `test` extra

            image = getattr(skimage.data, name)()
        image = np.asarray(image)
        out[name] = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    return out


def patches(
    photo: np.ndarray, n: int, size: int, rng: np.random.Generator, region: tuple[float, float] = (0.0, 1.0)
) -> np.ndarray:
    """``n`` square patches (12-25 % of the short side) from the horizontal ``region`` of ``photo``, resized to ``size``."""
    h, w = photo.shape[:2]
    x0, x1 = round(region[0] * w), round(region[1] * w)
    out = []
    for _ in range(n):
        side = int(rng.uniform(0.12, 0.25) * min(h, w))
        side = min(side, x1 - x0)
        x, y = rng.integers(x0, x1 - side + 1), rng.integers(0, h - side + 1)
        crop = Image.fromarray(np.ascontiguousarray(photo[y : y + side, x : x + side]))
        out.append(np.asarray(crop.resize((size, size), Image.BILINEAR)))
    return np.stack(out)


# ---- writing folders ------------------------------------------------------------------------------------------------
def write_folder(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: Sequence[str]) -> None:
    """``root/<split>/<class>/<i>.png``, written to a staging dir and renamed into place (never half a folder)."""
    staging = root.with_name(root.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for split, (images, labels) in splits.items():
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = staging / split / class_names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:05d}.png")
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)


def write_csv_task(root: Path, splits: dict[str, tuple[np.ndarray, list[list[str]]]]) -> None:
    """``root/images/<split>_<i>.png`` and ``root/labels.csv`` (``path,label,split``; labels space-separated), staged
    and renamed into place as ``write_folder`` does."""
    staging = root.with_name(root.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    lines = ["path,label,split"]
    for split, (images, label_sets) in splits.items():
        for i, (image, labels) in enumerate(zip(images, label_sets)):
            path = f"images/{split}_{i:05d}.png"
            Image.fromarray(image).save(staging / path)
            lines.append(f"{path},{' '.join(labels)},{split}")
    (staging / LABELS_CSV).write_text("\n".join(lines) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)


def mosaics(
    labelled: dict[str, np.ndarray],
    distractors: dict[str, np.ndarray],
    n: int,
    size: int,
    rng: np.random.Generator,
    region: tuple[float, float],
) -> tuple[np.ndarray, list[list[str]]]:
    """``n`` 2x2 mosaics of ``size`` px, each holding tiles of 1-3 of the ``labelled`` photographs (from their
    horizontal ``region``) and of random ``distractors`` elsewhere, and each mosaic's labels (in ``labelled``'s order).
    Mosaic ``i`` always holds photograph ``i mod len(labelled)``, so every label occurs once ``n >= len(labelled)``."""
    names, others = list(labelled), list(distractors)
    tile = size // 2
    images, label_sets = [], []
    for i in range(n):
        extra = rng.permutation([j for j in range(len(names)) if j != i % len(names)])[: rng.integers(0, 3)]
        chosen = sorted({i % len(names), *extra.tolist()})
        cells = [None] * 4
        for j, cell in zip(chosen, rng.permutation(4)):
            cells[cell] = patches(labelled[names[j]], 1, tile, rng, region)[0]
        for cell in range(4):
            if cells[cell] is None:
                cells[cell] = patches(distractors[others[rng.integers(len(others))]], 1, tile, rng)[0]
        mosaic = np.zeros((2 * tile, 2 * tile, 3), np.uint8)
        for cell, patch in enumerate(cells):
            y, x = divmod(cell, 2)
            mosaic[y * tile : (y + 1) * tile, x * tile : (x + 1) * tile] = patch
        images.append(mosaic)
        label_sets.append([names[j] for j in chosen])
    return np.stack(images), label_sets


def few_shot_split(
    labels: np.ndarray, shots: int | None, val_per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``shots`` training images per class (all that are left when None) and ``val_per_class`` held out."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        items = rng.permutation(np.flatnonzero(labels == label))
        val.extend(items[:val_per_class])
        train.extend(items[val_per_class:][:shots])
    return np.array(sorted(train)), np.array(sorted(val))


# ---- pretraining: a plain PyTorch loop ------------------------------------------------------------------------------
def pretrain(images: np.ndarray, labels: np.ndarray, num_classes: int, epochs: int, seed: int) -> tuple[dict, float]:
    """Train a torchvision ResNet-18 from scratch on ``images``; returns its state dict and final training accuracy.

    Inputs are normalised with ImageNet statistics, as both the template and fastai do for pretrained ResNets.
    """
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    y = torch.from_numpy(labels)
    batch, steps = 64, epochs * math.ceil(len(y) / 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    correct = seen = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y))
        correct = seen = 0
        for start in range(0, len(y), batch):
            idx = order[start : start + batch]
            if len(idx) < 2:
                continue
            inputs = F.pad(x[idx], (2, 2, 2, 2), mode="replicate")  # random 2 px shifts
            dy, dx = torch.randint(0, 5, (2,)).tolist()
            inputs = inputs[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]
            logits = model(inputs)
            loss = F.cross_entropy(logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            correct += int((logits.argmax(1) == y[idx]).sum())
            seen += len(idx)
    return model.state_dict(), correct / max(1, seen)


def save_weights(state: dict, weights: Path, torch_home: Path) -> None:
    """The state dict for the template (``model.backbone.weights=<file>``), and the same backbone as torchvision's
    resnet18 ImageNet file in a private hub cache, with a 1000-class ``fc`` (which fastai cuts off), for the peer."""
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, weights)
    hub = torch_home / "hub" / "checkpoints"
    hub.mkdir(parents=True, exist_ok=True)
    imagenet_shaped = {**state, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(imagenet_shaped, hub / TORCHVISION_RESNET18_FILE)


# ---- the tasks ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    """How big the tasks are: the study's, or a toy for the smoke test."""

    size: int = 32
    pretrain_epochs: int = 3
    pretrain_photo_patches: int = 60  # per pretraining photograph
    val_per_class: int = 20
    few_shot_epochs: int = 16  # 1 frozen + 15 unfrozen: issue 10's budget
    large_epochs: int = 2
    photo_pool: int = 200  # training patches per fine-tuning photograph to draw shots from
    pretrain_digits_per_class: int | None = None  # None: every scan of digits 0-4 (~900)
    mosaics_train: int = 100  # photos-multilabel: training and validation mosaics
    mosaics_val: int = 100


TOY = Scale(size=32, pretrain_epochs=1, pretrain_photo_patches=6, val_per_class=4, few_shot_epochs=2, large_epochs=2,
            photo_pool=8, pretrain_digits_per_class=12, mosaics_train=10, mosaics_val=6)  # fmt: skip


def build_tasks(work: Path, names: Sequence[str], scale: Scale = Scale(), seed: int = 0, log=print) -> list[Task]:
    """Build (once; reused when ``work`` already holds them) the named tasks; see the module docstring for names."""
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        source, _, variant = name.partition("-")
        stamp = work / "tasks" / f"{name}.json"
        wanted = {"scale": asdict(scale), "seed": seed}
        if stamp.is_file() and json.loads(stamp.read_text()).get("built_with") == wanted:
            out.append(Task(**json.loads(stamp.read_text())["task"]))
            continue
        weights, torch_home = _pretrained(work, source, scale, seed, log)
        root = work / "tasks" / name
        if name == "photos-multilabel":
            rng = np.random.default_rng(seed + 2)
            labelled, distractors = photographs(FINETUNE_PHOTOS), photographs(PRETRAIN_PHOTOS)
            ml_splits = {
                "train": mosaics(labelled, distractors, scale.mosaics_train, scale.size, rng, (0.0, TRAIN_REGION)),
                "val": mosaics(labelled, distractors, scale.mosaics_val, scale.size, rng, (TRAIN_REGION, 1.0)),
            }
            write_csv_task(root, ml_splits)
            task = Task(name, str(root), str(weights), str(torch_home), scale.few_shot_epochs, scale.size,
                        len(FINETUNE_PHOTOS), scale.mosaics_train, scale.mosaics_val, multilabel=True)  # fmt: skip
            stamp.write_text(json.dumps({"built_with": wanted, "task": asdict(task)}, indent=1))
            labels = sum(len(labels) for _, label_sets in ml_splits.values() for labels in label_sets)
            log(f"built {name}: {task.num_train} training / {task.num_val} validation mosaics, {task.num_classes} "
                f"labels, {labels / (task.num_train + task.num_val):.1f} per image")  # fmt: skip
            out.append(task)
            continue
        if variant.endswith("shot"):
            shots: int | None = int(variant.removesuffix("shot"))
        elif variant == "all":
            shots = None
        else:
            raise ValueError(f"task {name!r}: use <source>-<k>shot, <source>-all or photos-multilabel")
        if source == "digits":
            images, labels = digits(scale.size)
            if shots is not None:  # few-shot: the classes the backbone never saw
                keep = labels >= 5
                images, labels = images[keep], labels[keep] - 5
            train, val = few_shot_split(labels, shots, scale.val_per_class, seed)
            class_names = [str(d) for d in (range(5, 10) if shots is not None else range(10))]
            splits = {"train": (images[train], labels[train]), "val": (images[val], labels[val])}
        elif source == "photos":
            rng = np.random.default_rng(seed + 1)
            photos = photographs(FINETUNE_PHOTOS)
            pool = {
                c: patches(photos[c], scale.photo_pool, scale.size, rng, (0.0, TRAIN_REGION)) for c in FINETUNE_PHOTOS
            }
            held = {
                c: patches(photos[c], scale.val_per_class, scale.size, rng, (TRAIN_REGION, 1.0))
                for c in FINETUNE_PHOTOS
            }
            n = scale.photo_pool if shots is None else shots
            splits = {
                "train": (np.concatenate([pool[c][:n] for c in FINETUNE_PHOTOS]), np.repeat(np.arange(5), n)),
                "val": (
                    np.concatenate([held[c] for c in FINETUNE_PHOTOS]),
                    np.repeat(np.arange(5), scale.val_per_class),
                ),
            }
            class_names = list(FINETUNE_PHOTOS)
        else:
            raise ValueError(f"task {name!r}: the sources are digits and photos")
        write_folder(root, splits, class_names)
        epochs = scale.few_shot_epochs if shots is not None else scale.large_epochs
        task = Task(name, str(root), str(weights), str(torch_home), epochs, scale.size, len(class_names),
                    len(splits["train"][1]), len(splits["val"][1]))  # fmt: skip
        stamp.write_text(json.dumps({"built_with": wanted, "task": asdict(task)}, indent=1))
        log(f"built {name}: {task.num_train} training / {task.num_val} validation images, {task.num_classes} classes")
        out.append(task)
    return out


def _pretrained(work: Path, source: str, scale: Scale, seed: int, log) -> tuple[Path, Path]:
    """The backbone for ``source`` (digits: pretrained on digits 0-4; photos: on eleven other photographs), cached."""
    weights = work / "pretrained" / f"{source}_resnet18.pth"
    torch_home = work / "pretrained" / f"torch_home_{source}"
    stamp = weights.with_suffix(".json")
    wanted = {"size": scale.size, "epochs": scale.pretrain_epochs, "patches": scale.pretrain_photo_patches,
              "digits": scale.pretrain_digits_per_class, "seed": seed}  # fmt: skip
    if weights.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("built_with") == wanted:
        return weights, torch_home
    start = time.perf_counter()
    if source == "digits":
        images, labels = digits(scale.size)
        keep = np.flatnonzero(labels < 5)
        if scale.pretrain_digits_per_class is not None:
            keep = np.concatenate([keep[labels[keep] == d][: scale.pretrain_digits_per_class] for d in range(5)])
        images, labels, classes = images[keep], labels[keep], 5
    elif source == "photos":
        rng = np.random.default_rng(seed)
        photos = photographs(PRETRAIN_PHOTOS)
        images = np.concatenate(
            [patches(photos[p], scale.pretrain_photo_patches, scale.size, rng) for p in PRETRAIN_PHOTOS]
        )
        labels = np.repeat(np.arange(len(PRETRAIN_PHOTOS)), scale.pretrain_photo_patches)
        classes = len(PRETRAIN_PHOTOS)
    else:
        raise ValueError(f"no pretraining source {source!r}: use digits or photos")
    state, accuracy = pretrain(images, labels, classes, scale.pretrain_epochs, seed)
    save_weights(state, weights, torch_home)
    stamp.write_text(json.dumps({"built_with": wanted, "train_acc": accuracy, "images": len(labels)}))
    log(f"pretrained {source} backbone on {len(labels)} images, {classes} classes: final-epoch training accuracy "
        f"{accuracy:.3f} ({time.perf_counter() - start:.0f} s)")  # fmt: skip
    return weights, torch_home
