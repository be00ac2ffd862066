"""Config values checked before anything heavy is imported or built, each with a one-line message that names the key
and says the fix (instead of a traceback from deep inside torch, Lightning or omegaconf minutes later).

Import-light on purpose (omegaconf and ``image_finetune.core.errors`` only), so an entry point can call ``check_config``
before it imports torch: a typo then costs a second, not the ~6 s of imports plus the data scan.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from image_finetune.core.errors import ConfigError

GPU_ACCELERATORS = ("gpu", "cuda")


def check_config(cfg: DictConfig, validates: bool = True) -> None:
    """Raise ``ConfigError`` for the first value that cannot work; return quietly otherwise.

    ``validates``: the run trains, so it needs a validation split (``lr_find.py`` alone does not).
    """
    data = cfg.get("data")
    if data is not None:
        _check_data(data)
        check_folds(data.get("folds"), data.get("fold"))
        if validates and data.get("folds") is None:  # with data.folds the held-out fold is the validation split
            _check_val_split(data)
    trainer = cfg.get("trainer")
    if trainer is not None:
        _check_trainer(trainer)


def _check_data(data: DictConfig) -> None:
    if OmegaConf.is_missing(data, "root"):  # (``"root" in data`` is False for a ``???`` value)
        raise ConfigError(
            "data.root is not set: point it at your images, e.g. data.root=~/pets (a folder of class folders, or of "
            "train/ val/ [test/] class folders)"
        )
    if OmegaConf.is_missing(data, "file"):  # data=csv
        raise ConfigError(
            "data.file is not set: point it at the CSV file that lists your images, e.g. data.file=~/pets/labels.csv "
            "(columns path,label; data.image_dir: the folder the paths are relative to)"
        )
    for key, example in (("batch_size", 64), ("image_size", 224)):
        value = data.get(key) if not OmegaConf.is_missing(data, key) else None
        if isinstance(value, bool) or (value is not None and not isinstance(value, int)):
            raise ConfigError(f"data.{key}={value!r} must be a whole number, e.g. data.{key}={example}")
        if value is not None and value <= 0:
            what = "images per batch (per device)" if key == "batch_size" else "pixels (the side of the square input)"
            raise ConfigError(f"data.{key}={value} must be a positive number of {what}, e.g. data.{key}={example}")


def check_folds(folds: object, fold: object) -> None:
    """``data.folds``/``data.fold`` (k-fold cross-validation): both null, or ``folds >= 2`` and ``0 <= fold < folds``.

    The data modules call it too, so a module built in Python is held to what the command line is."""
    if folds is None and fold is None:
        return
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        if folds is None:
            raise ConfigError(
                f"data.fold={fold!r} needs data.folds (how many folds): e.g. data.folds=5 data.fold={fold!r}, or "
                "drop data.fold"
            )
        raise ConfigError(
            f"data.folds={folds!r} must be a whole number >= 2 (how many folds the training data is cut into), "
            "e.g. data.folds=5; null for no k-fold"
        )
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        every = f"python train.py -m data.folds={folds} data.fold='range({folds})'"
        if fold is None:
            raise ConfigError(
                f"data.folds={folds} needs data.fold, the fold held out for validation (0-{folds - 1}); "
                f"to run every fold: {every}"
            )
        raise ConfigError(
            f"data.fold={fold!r} is not a fold of data.folds={folds}: use 0-{folds - 1} (every fold: {every})"
        )


def _check_val_split(data: DictConfig) -> None:
    """``data.val_fraction=0`` with no ``val/`` folder leaves training without the split that picks the best
    checkpoint (and that early stopping and plateau schedules watch): refused here, not a traceback at the first
    validation."""
    value = data.get("val_fraction") if not OmegaConf.is_missing(data, "val_fraction") else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != 0:
        return
    if data.get("split_column"):
        return  # data=csv: the split column may mark val rows; the data module says so if it marks none
    try:
        root = data.get("root")
    except Exception:  # an interpolation that only resolves later: the data module decides then
        return
    if root is not None and (Path(str(root)).expanduser() / "val").is_dir():
        return  # the val/ folder is the validation split; val_fraction is not used
    raise ConfigError(
        f"data.val_fraction={value} leaves no validation split, which training needs (it picks the best checkpoint): "
        "hold out a little, e.g. data.val_fraction=0.05, or give data.root a val/ folder of class folders"
    )


def _check_trainer(trainer: DictConfig) -> None:
    max_epochs = trainer.get("max_epochs") if not OmegaConf.is_missing(trainer, "max_epochs") else None
    if max_epochs is not None and (isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1):
        # 0 would test the random head and then fail on optimized_metric; -1 is Lightning's "forever", which the LR
        # schedule (its horizon is the whole run) cannot follow.
        raise ConfigError(
            f"trainer.max_epochs={max_epochs!r} must be a whole number of epochs >= 1, e.g. trainer.max_epochs=10 "
            "(to test a checkpoint without training, run eval.py ckpt_path=...)"
        )
    accelerator = trainer.get("accelerator")
    if isinstance(accelerator, str) and accelerator.lower() in GPU_ACCELERATORS and not gpu_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} (trainer=gpu/ddp) but this machine has no usable CUDA GPU: "
            "use trainer=cpu (or trainer=default, which picks what there is)"
        )


def gpu_available() -> bool:
    """Whether a CUDA GPU is usable: torch's answer when torch is already imported, else what the OS shows (the NVIDIA
    driver's device files), so the check stays cheap before the heavy imports."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if sys.platform != "linux":
        return True  # no cheap probe: let Lightning decide
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or any(Path("/dev").glob("nvidia[0-9]*"))
