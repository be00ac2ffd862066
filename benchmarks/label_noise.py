"""How well ``find_issues.py`` finds planted wrong labels and cross-split copies, on real handwriting.

    python benchmarks/label_noise.py                       # the run in benchmarks/README.md
    python benchmarks/label_noise.py --epochs 3 --noise 0.1 --work /tmp/label_noise
    python benchmarks/label_noise.py --reuse-train --issues folds=10   # find_issues.py again on the same checkpoint

1. scikit-learn's 1,797 digit scans are written as PNGs (``data.digits.write_digits_folder``, what the offline demo
   reads) and split, stratified and seeded, into ``train/ val/ test/`` class folders (70/15/15). With
   ``--backbone pretrained`` (the default: what a user does) only digits 5-9 (~900 scans) are used, and fine-tuning
   starts from ``study_tasks.py``'s ResNet-18 pretrained on digits 0-4 (related classes, none of these images);
   ``--backbone scratch`` uses all ten digits and a randomly initialised ResNet-18 (the first published run).
2. ``--noise`` of the images (seeded) are moved to a different class folder of their split: their labels are wrong.
3. ``--copies`` test images per kind are copied into ``train/`` (same class): ``exact`` (the same bytes), ``resized``
   (12 px instead of 8, PNG), ``jpeg`` (re-encoded as JPEG, quality 75), ``flipped`` (mirrored): leaks.
4. ``train.py`` (a subprocess, CPU, 32 px, no download) trains briefly, then ``find_issues.py`` runs on its last
   checkpoint (``--issues KEY=VALUE ...`` adds overrides; ``--reuse-train`` keeps a checkpoint trained with the same
   arguments).
5. Precision and recall of the swapped files among the flagged ones, and per kind the fraction of planted pairs found
   in one near-duplicate group flagged ``leak``. Results also go to ``<work>/results.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
KINDS = ("exact", "resized", "jpeg", "flipped")


def build_folder(
    root: Path, cache: Path, noise: float, copies: int, seed: int, first_class: int = 0
) -> tuple[set[str], list[dict]]:
    """The split digits folder (digits ``first_class``-9) with wrong labels and copies planted; returns the swapped
    paths and the copy pairs."""
    sys.path.insert(0, str(REPO / "src"))
    from image_finetune.data.digits import write_digits_folder

    digits = write_digits_folder(cache / "digits")
    rng = random.Random(seed)
    shutil.rmtree(root, ignore_errors=True)
    classes = sorted(p.name for p in digits.iterdir() if p.is_dir() and int(p.name) >= first_class)
    files: dict[str, list[tuple[Path, str]]] = {"train": [], "val": [], "test": []}
    for name in classes:
        items = sorted((digits / name).glob("*.png"))
        rng.shuffle(items)
        n_val = n_test = round(0.15 * len(items))
        parts = {"val": items[:n_val], "test": items[n_val : n_val + n_test], "train": items[n_val + n_test :]}
        for split, chosen in parts.items():
            for src in chosen:
                dst = root / split / name / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, dst)
                files[split].append((dst, name))
    everything = [item for split in files.values() for item in split]
    swapped: set[str] = set()
    for path, name in rng.sample(everything, round(noise * len(everything))):
        target = path.parent.parent / rng.choice([c for c in classes if c != name]) / path.name
        path.rename(target)
        swapped.add(str(target))
    moved = {Path(p).name for p in swapped}
    sources = [(p, n) for p, n in files["test"] if p.name not in moved]
    pairs = []
    for kind, (src, name) in zip([k for k in KINDS for _ in range(copies)], rng.sample(sources, copies * len(KINDS))):
        dst = root / "train" / name / f"copy_{kind}_{src.stem}{'.jpg' if kind == 'jpeg' else '.png'}"
        image = Image.open(src)
        if kind == "exact":
            shutil.copy(src, dst)
        elif kind == "resized":
            image.resize((12, 12), Image.Resampling.BICUBIC).save(dst)
        elif kind == "jpeg":
            image.convert("RGB").save(dst, quality=75)
        else:
            ImageOps.mirror(image).save(dst)
        pairs.append({"kind": kind, "original": str(src), "copy": str(dst)})
    return swapped, pairs


def run(args: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{' '.join(args[:1])} failed: see {log}")
    return time.perf_counter() - start


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/label_noise"))
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--copies", type=int, default=10, help="planted copies per kind")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", choices=("pretrained", "scratch"), default="pretrained")
    parser.add_argument("--issues", nargs="*", default=[], help="extra find_issues.py overrides (KEY=VALUE)")
    parser.add_argument("--reuse-train", action="store_true", help="keep a checkpoint trained with these arguments")
    args = parser.parse_args()
    root = args.work / "images"
    first_class = 5 if args.backbone == "pretrained" else 0
    swapped, pairs = build_folder(root, args.work / "cache", args.noise, args.copies, args.seed, first_class)
    weights = "null"
    if args.backbone == "pretrained":
        sys.path.insert(0, str(REPO / "benchmarks"))
        import study_tasks

        weights = str(study_tasks._pretrained(args.work, "digits", study_tasks.Scale(), args.seed, print)[0])
    stamp = {k: v for k, v in vars(args).items() if k not in ("issues", "reuse_train", "work")}
    stamp_file = args.work / "train" / "benchmark_args.json"
    reuse = args.reuse_train and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp
    for name in ("issues",) if reuse else ("train", "issues"):
        shutil.rmtree(args.work / name, ignore_errors=True)
    train_s = 0.0
    if not reuse:
        train_s = run(
            ["train.py", "data=imagefolder", f"data.root={root}", "data.image_size=32", "data.hflip=false",
             "data.num_workers=0", "trainer=cpu", f"trainer.max_epochs={args.epochs}", f"model.backbone.weights={weights}",
             "logger=csv", f"seed={args.seed}", f"hydra.run.dir={args.work / 'train'}", f"paths.data_dir={args.work / 'cache'}"],
            args.work / "train.log",
        )  # fmt: skip
        stamp_file.write_text(json.dumps(stamp))
    issues_s = run(
        ["find_issues.py", f"ckpt_path={args.work / 'train' / 'checkpoints' / 'last.ckpt'}",
         f"hydra.run.dir={args.work / 'issues'}", f"paths.data_dir={args.work / 'cache'}", *args.issues],
        args.work / "find_issues.log",
    )  # fmt: skip
    flagged = {row["path"] for row in read_rows(args.work / "issues" / "label_issues.csv")}
    hits = len(flagged & swapped)
    groups: dict[str, tuple[str, str]] = {
        row["path"]: (row["group"], row["leak"]) for row in read_rows(args.work / "issues" / "near_duplicates.csv")
    }

    def found(pair: dict) -> bool:
        a, b = groups.get(pair["original"]), groups.get(pair["copy"])
        return a is not None and a == b and a[1] == "True"

    recall = {kind: sum(found(p) for p in pairs if p["kind"] == kind) / args.copies for kind in KINDS}
    test_acc = json.loads((args.work / "train" / "metrics.json").read_text())["test"]["acc"]
    results = {
        "images": sum(1 for p in root.rglob("*") if p.is_file()),
        "swapped": len(swapped),
        "flagged": len(flagged),
        "precision": hits / len(flagged) if flagged else 0.0,
        "recall": hits / len(swapped) if swapped else 0.0,
        "duplicate_recall": recall,
        "test_acc": test_acc,
        "backbone": args.backbone,
        "issues_overrides": args.issues,
        "train_s": round(train_s, 1),
        "find_issues_s": round(issues_s, 1),
        "summary": (args.work / "find_issues.log").read_text().strip().splitlines()[-1],
    }
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{results['images']} images, {len(swapped)} labels swapped ({args.noise:.0%}), {args.backbone} backbone, "
          f"{args.epochs} epochs (test acc {test_acc:.3f}, {'reused' if reuse else f'{train_s:.0f} s'}); "
          f"find_issues {issues_s:.0f} s {' '.join(args.issues)}")  # fmt: skip
    print(f"label issues: flagged {len(flagged)}, precision {results['precision']:.3f}, recall {results['recall']:.3f}")
    print("planted copies found as a leak: " + ", ".join(f"{k} {v:.0%}" for k, v in recall.items()))
    print(results["summary"])


if __name__ == "__main__":
    main()
