"""The fine-tuning study: recipes x tasks x seeds, this template against fastai's ``fine_tune``, as one markdown table.

    nice -n 10 python benchmarks/finetune_study.py                    # the published study (benchmarks/README.md)
    python benchmarks/finetune_study.py --recipes defaults crop-0.5 --tasks digits-10shot --seeds 0 1 2

Tasks (built offline from real images by ``study_tasks.py``, cached under ``--work``): few-shot transfer from a
ResNet-18 pretrained on related classes, and one larger task. Every template run goes through ``train(cfg)``, the code
``train.py`` runs, with ``data=imagefolder`` and ``model.backbone.weights=<the task's .pth>``; the fastai peer runs
``benchmarks/fastai_peer.py`` in its own venv (``--fastai-python``) on the same folders, from the same weights, with the
same epoch budget and image size. Accuracy is the final epoch's on the task's held-out ``val/`` folder (no checkpoint
picked by it). The multi-label task (``photos-multilabel``) runs with ``data=csv loss=bce`` on its ``labels.csv`` (its
``split`` column: the same validation rows as the peer's) and is scored by the final epoch's macro mAP
(``last/val/map``) in the table's cell, with micro F1 at the threshold the run chose on the validation split kept in
each result's ``extra``. Finished runs are kept in ``<work>/results.jsonl`` and reused when the same recipe (the fully composed
config) runs again, so the study can be extended or resumed; ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import study_tasks
from study_tasks import Task

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FASTAI = Path("/work/venvs/fastai/bin/python")
TASKS = ("digits-10shot", "digits-50shot", "photos-20shot", "digits-all", "photos-multilabel")


@dataclass(frozen=True)
class Recipe:
    """A template recipe (Hydra overrides on top of the defaults) or the fastai peer (``fastai_batch_size`` set)."""

    name: str
    overrides: tuple[str, ...] = ()
    fastai_batch_size: int | None = None
    note: str = ""


# The template before the study (issue 10's finding), spelled out so that it keeps meaning "before" as defaults move.
BEFORE = ("data.batch_size=64", "data.crop_scale=[0.08,1.0]", "data.hflip=true", "data.min_steps_per_epoch=1",
          "augment=standard", "model.optimizer.lr=1e-3", "model.optimizer.weight_decay=0.05",
          "finetune.backbone_lr_ratio=0.1", "model.loss.label_smoothing=0.1", "model.dropout=0.2")  # fmt: skip

RECIPES = {r.name: r for r in [
    Recipe("defaults", note="this template's defaults (only data.root, image size and weights set)"),
    Recipe("before", BEFORE, note="the defaults before the study (batch 64, crop_scale [0.08, 1], hflip)"),
    Recipe("fastai", fastai_batch_size=64, note="fastai vision_learner + fine_tune, its default batch 64"),
    Recipe("fastai-bs32", fastai_batch_size=32, note="fastai, batch 32 (issue 10's best fastai setting)"),
    Recipe("fastai-bs16", fastai_batch_size=16, note="fastai, batch 16"),
    # ---- the grid the defaults were chosen from (each one change to the defaults) ----
    Recipe("before-bs32", (*BEFORE, "data.batch_size=32")),
    Recipe("steps-1", ("data.min_steps_per_epoch=1",)),
    Recipe("steps-4", ("data.min_steps_per_epoch=4",)),
    Recipe("steps-8", ("data.min_steps_per_epoch=8",)),
    Recipe("steps-16", ("data.min_steps_per_epoch=16",)),
    Recipe("crop-0.08", ("data.crop_scale=[0.08,1.0]",)),
    Recipe("crop-0.35", ("data.crop_scale=[0.35,1.0]",)),
    Recipe("crop-0.5", ("data.crop_scale=[0.5,1.0]",)),
    Recipe("crop-0.75", ("data.crop_scale=[0.75,1.0]",)),
    Recipe("crop-1", ("data.crop_scale=[1.0,1.0]",)),
    Recipe("hflip", ("data.hflip=true",)),
    Recipe("no-hflip", ("data.hflip=false",)),
    Recipe("lr-5e-4", ("model.optimizer.lr=5e-4",)),
    Recipe("lr-2e-3", ("model.optimizer.lr=2e-3",)),
    Recipe("lr-4e-3", ("model.optimizer.lr=4e-3",)),
    Recipe("ratio-0.03", ("finetune.backbone_lr_ratio=0.03",)),
    Recipe("ratio-0.3", ("finetune.backbone_lr_ratio=0.3",)),
    Recipe("ratio-1", ("finetune.backbone_lr_ratio=1.0",)),
    Recipe("wd-0.01", ("model.optimizer.weight_decay=0.01",)),
    Recipe("wd-0.1", ("model.optimizer.weight_decay=0.1",)),
    Recipe("ls-0", ("model.loss.label_smoothing=0.0",)),
    Recipe("dropout-0", ("model.dropout=0.0",)),
    Recipe("dropout-0.5", ("model.dropout=0.5",)),
    Recipe("freeze-0", ("finetune.freeze_epochs=0",)),
    Recipe("freeze-3", ("finetune.freeze_epochs=3",)),
    Recipe("warmup-0.1", ("model.scheduler.warmup_fraction=0.1",)),
    Recipe("geometric", ("finetune.lr_spread=geometric",)),
    Recipe("geometric-0.01", ("finetune.lr_spread=geometric", "finetune.backbone_lr_ratio=0.01"),
           note="fastai's slice(lr/100, lr) spread"),
    Recipe("ratio-0.01", ("finetune.backbone_lr_ratio=0.01",)),
    Recipe("lr-2.5e-4", ("model.optimizer.lr=2.5e-4",)),
    Recipe("bs32-steps4", ("data.batch_size=32", "data.min_steps_per_epoch=4")),
    Recipe("bs32-steps4-noflip", ("data.batch_size=32", "data.min_steps_per_epoch=4", "data.hflip=false")),
    Recipe("bs32-steps4-noaug", ("data.batch_size=32", "data.min_steps_per_epoch=4", "augment=none")),
    Recipe("bs32-steps4-noaug-lr2e-3", ("data.batch_size=32", "data.min_steps_per_epoch=4", "augment=none",
                                        "model.optimizer.lr=2e-3")),
    Recipe("bs32-steps4-noflip-crop0.75", ("data.batch_size=32", "data.min_steps_per_epoch=4", "data.hflip=false",
                                           "data.crop_scale=[0.75,1.0]")),
]}  # fmt: skip
PUBLISHED = ("defaults", "before", "fastai", "fastai-bs32")

# What a study run switches off: per-epoch images and files it does not read (accuracy and timing are unaffected).
QUIET = ("~logger", "++callbacks.model_checkpoint=null", "++callbacks.last_checkpoint=null", "++trainer.enable_checkpointing=false", "++callbacks.lr_monitor=null",
         "++callbacks.progress_bar=null", "++callbacks.model_summary=null", "++callbacks.train_images=null",
         "++callbacks.confusion_matrix=null", "++callbacks.misclassified=null", "++callbacks.per_class_accuracy=null",
         "++callbacks.run_summary=null", "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false",
         "++trainer.num_sanity_val_steps=0")  # fmt: skip


@dataclass
class Result:
    task: str
    recipe: str
    seed: int
    acc: float
    seconds: float
    key: str = ""
    extra: dict = field(default_factory=dict)


def quiet_logs() -> None:
    """Per-run INFO lines and warnings of Lightning and the template would bury the study's one line per run."""
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "image_finetune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("lightning", "image_finetune")):
            logging.getLogger(name).setLevel(logging.WARNING)


# ---- running --------------------------------------------------------------------------------------------------------
def template_overrides(task: Task, recipe: Recipe, seed: int, work: Path) -> list[str]:
    # train/ and val/ are given (a CSV split column, or folders); data.test_fraction=0: no test images are held out of
    # train (test=false anyway), so the template trains on every training image, as the fastai peer does
    data = (["data=csv", f"data.file={task.labels_csv}", "data.split_column=split", "loss=bce"]
            if task.multilabel else ["data=imagefolder", f"data.root={task.root}"])  # fmt: skip
    data.append("data.test_fraction=0")
    return [
        *data, f"data.image_size={task.size}", "data.num_workers=0", "data.cache=null",
        f"paths.cache_dir={work / 'cache'}", "model.backbone.name=resnet18", f"model.backbone.weights={task.weights}",
        "trainer=cpu", f"trainer.max_epochs={task.epochs}", f"seed={seed}", "test=false", *QUIET, *recipe.overrides,
    ]  # fmt: skip


def run_template(
    task: Task, recipe: Recipe, seed: int, work: Path, done: dict[str, Result], run: bool = True
) -> Result | None:
    """One ``train(cfg)`` run, as ``train.py`` would do it; the final epoch's val accuracy (multi-label: macro mAP,
    with micro F1 and exact-set accuracy at the run's threshold in ``extra``) and the wall time."""
    from omegaconf import OmegaConf

    from image_finetune.core.cli import compose_config
    from image_finetune.training.train import train

    out = work / "runs" / f"{task.name}-{recipe.name}-{seed}"
    cfg = compose_config(REPO / "configs", "train", template_overrides(task, recipe, seed, work), out)
    shown = OmegaConf.to_container(cfg, resolve=False)
    shown.pop("hydra", None)
    shown.pop("paths", None)
    key = "template:" + hashlib.sha256(json.dumps(shown, sort_keys=True).encode()).hexdigest()[:16]
    if key in done or not run:  # the same composed config, perhaps run under another recipe's name: reuse it
        return dataclasses.replace(done[key], task=task.name, recipe=recipe.name, seed=seed) if key in done else None
    quiet_logs()
    start = time.perf_counter()
    metrics = train(cfg)
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    if task.multilabel:
        extra = {"f1_micro": float(metrics["last/val/f1_micro"]), "exact": float(metrics["last/val/acc"])}
        return Result(task.name, recipe.name, seed, float(metrics["last/val/map"]), seconds, key, extra)
    return Result(task.name, recipe.name, seed, float(metrics["last/val/acc"]), seconds, key)


def run_fastai(
    task: Task, recipe: Recipe, seeds: Sequence[int], python: Path, done: dict[str, Result], run: bool = True
) -> list[Result]:
    """The peer in its own venv, one process for all seeds (its import time is not counted, as ours is not)."""
    import torch

    assert recipe.fastai_batch_size is not None
    base = f"fastai:{task.name}:{task.root}:{task.epochs}:{recipe.fastai_batch_size}"
    keys = {seed: hashlib.sha256(f"{base}:{seed}".encode()).hexdigest()[:16] for seed in seeds}
    todo = [seed for seed in seeds if keys[seed] not in done]
    results = [done[keys[seed]] for seed in seeds if seed not in todo]
    if todo and run:
        command = [str(python), str(REPO / "benchmarks" / "fastai_peer.py"), "--root", task.root, "--torch-home", task.torch_home,
                   "--size", str(task.size), "--epochs", str(task.epochs), "--batch-size", str(recipe.fastai_batch_size),
                   "--seeds", *map(str, todo), "--threads", str(torch.get_num_threads()),
                   *(["--multilabel"] if task.multilabel else [])]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        if proc.returncode != 0:
            raise RuntimeError(f"fastai peer failed on {task.name}: {proc.stderr[-2000:]}")
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                score = row["map"] if task.multilabel else row["acc"]
                extra = {
                    k: row[k]
                    for k in ("f1_micro", "f1_micro_at_0.5", "exact", "acc_multi", "threshold", "num_val")
                    if k in row
                }
                results.append(
                    Result(task.name, recipe.name, row["seed"], score, row["seconds"], keys[row["seed"]], extra)
                )
    return sorted(results, key=lambda r: r.seed)


# ---- the table ------------------------------------------------------------------------------------------------------
def cell(results: Sequence[Result]) -> str:
    if not results:
        return "-"
    accs = [r.acc for r in results]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    seeds = "" if len(accs) >= 3 else f", n={len(accs)}"
    return f"{statistics.mean(accs):.3f} ± {std:.3f} ({statistics.mean(r.seconds for r in results):.0f} s{seeds})"


def table(results: Sequence[Result], tasks: Sequence[Task], recipes: Sequence[Recipe]) -> str:
    header = (
        "| recipe | "
        + " | ".join(
            f"{t.name} ({t.num_train} train / {t.num_val} val, {t.epochs} ep{', mAP' if t.multilabel else ''})"
            for t in tasks
        )
        + " |"
    )
    lines = [header, "|---|" + "---|" * len(tasks)]
    for recipe in recipes:
        cells = [cell([r for r in results if r.task == t.name and r.recipe == recipe.name]) for t in tasks]
        lines.append(f"| {recipe.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def f1_table(results: Sequence[Result], tasks: Sequence[Task], recipes: Sequence[Recipe]) -> str:
    """Multi-label tasks: micro F1 at the threshold chosen on the validation split (both sides: the best of 0.01 ..
    0.99, as the template's ``best_threshold``), mean ± std over seeds; empty when no task is multi-label."""
    multilabel = [t for t in tasks if t.multilabel]
    if not multilabel:
        return ""
    lines = ["| recipe | " + " | ".join(f"{t.name}: micro F1" for t in multilabel) + " |",
             "|---|" + "---|" * len(multilabel)]  # fmt: skip
    for recipe in recipes:
        cells = []
        for t in multilabel:
            f1 = [r.extra["f1_micro"] for r in results if r.task == t.name and r.recipe == recipe.name]
            std = statistics.stdev(f1) if len(f1) > 1 else 0.0
            cells.append(f"{statistics.mean(f1):.3f} ± {std:.3f}" if f1 else "-")
        lines.append(f"| {recipe.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fine-tuning study: recipes x tasks x seeds against fastai fine_tune.")
    parser.add_argument(
        "--work", type=Path, default=REPO / "data" / "finetune_study", help="tasks, weights and results"
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--recipes", nargs="+", default=list(PUBLISHED), choices=sorted(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fastai-python", type=Path, default=Path(os.environ.get("FASTAI_PYTHON", DEFAULT_FASTAI)))
    parser.add_argument("--out", type=Path, default=None, help="markdown file for the table (default <work>/study.md)")
    parser.add_argument("--toy", action="store_true", help="tiny tasks and 2 epochs: a smoke test of the script")
    parser.add_argument("--fresh", action="store_true", help="ignore the results of earlier runs")
    parser.add_argument("--table-only", action="store_true", help="only tabulate finished runs; run nothing")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for both sides (1: least waste on a shared CPU)"
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)

    quiet_logs()
    start = time.perf_counter()
    scale = study_tasks.TOY if args.toy else study_tasks.Scale()
    tasks = study_tasks.build_tasks(args.work, args.tasks, scale, log=lambda m: print(m, flush=True))
    recipes = [RECIPES[name] for name in args.recipes]
    results_file = args.work / "results.jsonl"
    if args.fresh:
        results_file.unlink(missing_ok=True)
    done = {}
    if results_file.is_file():
        done = {row["key"]: Result(**row) for row in map(json.loads, results_file.read_text().splitlines())}

    fastai_ok = args.fastai_python.is_file()
    if not fastai_ok and any(r.fastai_batch_size for r in recipes):
        print(
            f"note: no fastai venv at {args.fastai_python} (see benchmarks/fastai_peer.py): skipping the fastai rows",
            flush=True,
        )
    results: list[Result] = []
    fresh_keys: set[str] = set()

    def record(result: Result) -> None:
        results.append(result)
        if result.key not in done:
            fresh_keys.add(result.key)
            done[result.key] = result
            with results_file.open("a") as f:
                f.write(json.dumps(result.__dict__) + "\n")
        print(
            f"{result.task:>17} {result.recipe:>14} seed {result.seed}: "
            f"{'mAP' if 'f1_micro' in result.extra else 'acc'} {result.acc:.3f} ({result.seconds:.1f} s)",
            flush=True,
        )

    for task in tasks:
        for recipe in recipes:
            if recipe.fastai_batch_size is not None:
                if fastai_ok:
                    for result in run_fastai(task, recipe, args.seeds, args.fastai_python, done, not args.table_only):
                        record(result)
                continue
            for seed in args.seeds:
                result = run_template(task, recipe, seed, args.work, done, not args.table_only)
                if result is not None:
                    record(result)
    total = time.perf_counter() - start
    shown = [r for r in recipes if r.fastai_batch_size is None or fastai_ok]
    text = table(results, tasks, shown)
    text += (f"\n\nMean ± std of the final epoch's validation accuracy (mAP: macro average precision) over seeds {', '.join(map(str, args.seeds))} "
             "(fewer where a cell says n=...); "
             f"(s) = mean wall time per run. Study time {total / 60:.1f} min for {len(fresh_keys)} runs "
             f"({len(results) - len(fresh_keys)} more reused from earlier runs of the same recipe).")  # fmt: skip
    if f1 := f1_table(results, tasks, shown):
        text += "\n\n" + f1
    print("\n" + text)
    out = args.out or args.work / "study.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    main()
