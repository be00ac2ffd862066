"""The resume guard: a resumed run continues the run its checkpoint belongs to, or says in one line why it cannot.

``train`` calls ``check_resume`` once, before anything heavy is built, whenever ``ckpt_path`` names a checkpoint (given
by the user, ``last`` or a path, or the SLURM requeue default). It compares the composed config with the
``run_config`` every checkpoint carries (``callbacks.StoreRunConfig``):

* a change that cannot alter the result (``ALLOWED``: where files go, loggers, console, workers, a longer run, the
  same world size spread differently) is allowed and logged;
* any other change is refused in one ``ConfigError`` line naming each key with its old and new value, unless the user
  opts in with ``+resume.allow_changes=[key,...]``; such a run is recorded in ``<run dir>/resume_history.json`` and
  in ``metrics.json`` (``resume_changes``);
* a ``trainer.max_epochs`` at or below the epochs the checkpoint has trained is refused too (nothing would train).

The phase-boundary resumes inside ``finetune.fit`` continue the same process's run and never come here.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from image_finetune.checkpoints import read_checkpoint, resume_epoch, run_config, saved_mid_epoch
from image_finetune.core.atomic import atomic_write_text
from image_finetune.core.config_checks import gpu_available
from image_finetune.core.errors import ConfigError, UserError

log = logging.getLogger(__name__)

HISTORY = "resume_history.json"
#: ``+resume.allow_changes=[all]`` allows every change (and a checkpoint that holds no run config).
ALL = "all"
UNSET = "<unset>"

#: Keys (a key, its subtree, or an fnmatch pattern) a resumed run may change: none of them alters the weights, the
#: metrics or which checkpoint is best. Everything else that differs is refused unless ``resume.allow_changes`` names it.
ALLOWED: dict[str, str] = {
    "ckpt_path": "where this run resumes from",
    "resume": "the guard's own setting",
    "test": "whether the best checkpoint is tested after training; training is the same",
    "optimized_metric": "which metric a sweeper reads; training is the same",
    "task_name": "names the log folder only",
    "paths": "where files go",
    "logger": "where metrics are sent, not what they are",
    "data.num_workers": "loader processes: every sample is seeded by itself, not by its worker",
    "data.root": "the data may move: the run dir's data_split.json pins the files, by path relative to the root",
    "data.image_dir": "data=csv's images may move too: data_split.json pins them by path relative to it",
    "data.cache_dir": "where resized copies are kept, not what they hold",
    "data.manifest_path": "follows the run dir",
    "data.report_path": "follows the run dir",
    "trainer.default_root_dir": "follows the run dir",
    "trainer.log_every_n_steps": "how often metrics are logged",
    "trainer.enable_progress_bar": "console output",
    "trainer.enable_model_summary": "console output",
    "trainer.profiler": "timing reports only",
    "model.init_from": "read only by a fresh run: a resumed one takes its weights from the checkpoint",
    "trainer.max_epochs": "how long the run goes (checked against the checkpoint's epoch: check_epochs)",
    "callbacks.*.dirpath": "follows the run dir",
    "callbacks.progress_bar": "console output",
    "callbacks.model_summary": "console output",
    "callbacks.run_summary": "the summary printed at the end",
    "callbacks.lr_monitor": "logs learning rates, changes none",
    "callbacks.train_images": "logs image grids",
    "callbacks.confusion_matrix": "logs an image",
    "callbacks.misclassified": "logs an image",
    "callbacks.per_class_accuracy": "logs per-class metrics",
    "callbacks.finetune_phase": "logs the unfreeze marker",
    "callbacks.weights_in_sync": "a DDP consistency check that changes nothing",
}
#: Allowed only as a whole, when they give the same number of processes: ``world_size`` decides.
WORLD_SIZE_KEYS = ("trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy")
#: Change whenever the run dir does (a checkpoint resumed in another dir): listed last.
FOLLOW_THE_RUN_DIR = (
    "paths",
    "data.manifest_path",
    "data.report_path",
    "trainer.default_root_dir",
    "callbacks.*.dirpath",
    "logger.*.save_dir",
)
#: Always differs on a resume, or is said elsewhere: not worth a log line.
NOT_LOGGED = ("ckpt_path", "resume")
#: How many keys a message lists before "and N more".
SHOWN = 6


@dataclass
class ResumeCheck:
    """What a resume changes, by verdict: ``benign`` (``ALLOWED``), ``allowed`` (by the user), ``refused``."""

    ckpt_path: str
    epoch: int = 0  # 0-based epoch the run resumes at
    benign: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    allowed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    refused: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """One ``resume_history.json`` entry."""
        return {
            "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "ckpt_path": self.ckpt_path,
            "resumed_at_epoch": self.epoch + 1,  # counted from 1, as in metrics.json
            "allowed_changes": {key: {"old": old, "new": new} for key, (old, new) in self.allowed.items()},
            "other_changes": {
                key: {"old": old, "new": new}
                for key, (old, new) in self.benign.items()
                if not _matches(key, NOT_LOGGED)
            },
        }


def check_resume(cfg: DictConfig, ckpt_path: str) -> ResumeCheck:
    """Compare ``cfg`` with the config ``ckpt_path`` was trained with; raise ``ConfigError`` if the resume would not
    continue the same run (see the module docstring). Reads the checkpoint memory-mapped: cheap, before any build."""
    checkpoint = read_checkpoint(ckpt_path, mmap=True)
    allow = allow_changes(cfg)
    current = _task_config(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
    stored = _task_config(run_config(checkpoint))  # moved targets read as they are named now
    if not stored and ALL not in allow:
        raise ConfigError(
            f"ckpt_path={ckpt_path} holds no run config (it was not written by this project's train.py), so this "
            "command cannot be checked against the run it continues. Start a new run from its weights with "
            f"model.init_from={ckpt_path}, or resume it anyway with +resume.allow_changes=[{ALL}]"
        )
    result = ResumeCheck(ckpt_path, epoch=resume_epoch(checkpoint))
    if stored:
        result.benign, result.allowed, result.refused = compare(stored, current, allow)
    if result.refused:
        raise ConfigError(refusal(ckpt_path, result.refused))
    check_epochs(cfg, checkpoint, ckpt_path, stored)
    return result


def allow_changes(cfg: DictConfig) -> tuple[str, ...]:
    """``resume.allow_changes`` (``+resume.allow_changes=[data.batch_size,...]``) as a tuple of keys."""
    value = OmegaConf.select(cfg, "resume.allow_changes", default=None)
    if value is None:
        return ()
    items = list(value) if isinstance(value, (ListConfig, list, tuple)) else [value]
    if not all(isinstance(item, str) and item for item in items):
        raise ConfigError(
            f"resume.allow_changes={items!r} must list config keys, e.g. +resume.allow_changes=[data.batch_size]"
        )
    return tuple(items)


def compare(
    stored: Mapping[str, Any], current: Mapping[str, Any], allow: Iterable[str] = ()
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """``differences(stored, current)`` split into ``(benign, allowed by the user, refused)``."""
    changes = differences(stored, current)
    allow = tuple(allow)
    same_world = _same_world_size(stored, current)
    benign, allowed, refused = {}, {}, {}
    for key, change in changes.items():
        if _matches(key, ALLOWED) or (key in WORLD_SIZE_KEYS and same_world) or _added_and_off(change):
            benign[key] = change
        elif ALL in allow or _matches(key, allow):
            allowed[key] = change
        else:
            refused[key] = change
    return benign, allowed, refused


def _added_and_off(change: tuple[Any, Any]) -> bool:
    """A key this version added (absent from an older run's config) and left null: the feature is off, as it was
    then (``data.folds``, ``model.loss.weights``, ...), so a run from before the key existed still resumes."""
    return change[0] is UNSET and change[1] is None


def differences(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Every differing value by dotted key, in config order; a subtree only one side has is one change, with
    ``UNSET`` on the other side. Lists are compared as values."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        changes: dict[str, tuple[Any, Any]] = {}
        for key in [*old, *(k for k in new if k not in old)]:
            path = f"{prefix}.{key}" if prefix else str(key)
            changes.update(differences(old.get(key, UNSET), new.get(key, UNSET), path))
        return changes
    return {} if old == new and type(old) is type(new) else {prefix: (old, new)}


def refusal(ckpt_path: str, refused: Mapping[str, tuple[Any, Any]]) -> str:
    """The one line a refused resume prints."""
    keys = list(refused)
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    old = ", ".join(f"{k}={_show(refused[k][0])}" for k in keys[:SHOWN]) + more
    new = ", ".join(f"{k}={_show(refused[k][1])}" for k in keys[:SHOWN]) + more
    # Many keys (a different model, say): name their sections, so the suggestion stays short.
    named = keys if len(keys) <= SHOWN else sorted({k.split(".")[0] for k in keys})
    return (
        f"ckpt_path={ckpt_path} was trained with {old}; this command has {new}. A resume must continue the same run: "
        f"drop these overrides, or start a new run from these weights with model.init_from={ckpt_path} (in a new run "
        f"dir), or allow them with +resume.allow_changes=[{','.join(named)}]"
    )


def describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """``key old -> new, ...`` for a log line (capped)."""
    keys = [k for k in changes if not _matches(k, NOT_LOGGED)]
    keys.sort(key=lambda k: _matches(k, FOLLOW_THE_RUN_DIR))  # what a user chose first, then the run dir's paths
    shown = ", ".join(f"{k} {_show(changes[k][0])} -> {_show(changes[k][1])}" for k in keys[:SHOWN])
    return shown + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")


def check_epochs(cfg: DictConfig, checkpoint: Mapping[str, Any], ckpt_path: str, stored: Mapping[str, Any]) -> None:
    """Refuse a ``trainer.max_epochs`` that leaves nothing to train (Lightning would silently train nothing).

    A finished run resumed by the SLURM requeue default (``ckpt_path`` not given) is let through: a job requeued while
    it tested its best checkpoint must still finish that.
    """
    max_epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    if not isinstance(max_epochs, int) or isinstance(max_epochs, bool) or max_epochs < 1:
        return  # None (Lightning's default) or a value check_config refuses
    done = resume_epoch(checkpoint)
    if done < max_epochs:
        return
    mid = saved_mid_epoch(checkpoint)
    before = (stored.get("trainer") or {}).get("max_epochs")
    evaluate = f"to evaluate it as it is, run eval.py ckpt_path={ckpt_path}"
    if not mid and done == max_epochs == before:
        if OmegaConf.is_interpolation(cfg, "ckpt_path"):
            return
        raise ConfigError(
            f"ckpt_path={ckpt_path} is a finished run: it trained all trainer.max_epochs={max_epochs} epochs, so there "
            f"is nothing to resume. To train it longer, resume with a larger trainer.max_epochs (e.g. "
            f"trainer.max_epochs={max_epochs * 2}); {evaluate}"
        )
    where = f"stopped during epoch {done + 1}" if mid else f"ends after epoch {done}"
    raise ConfigError(
        f"trainer.max_epochs={max_epochs} but ckpt_path={ckpt_path} {where} (epochs counted from 1): nothing would "
        f"train. To continue it, give trainer.max_epochs={done + 1} or more; {evaluate}"
    )


def record_resume(output_dir: str | os.PathLike, check: ResumeCheck) -> Path:
    """Append ``check`` to ``<run dir>/resume_history.json`` (rank 0, holding the run dir's lock)."""
    path = Path(output_dir) / HISTORY
    atomic_write_text(path, json.dumps([*resume_history(output_dir), check.record()], indent=1, default=str))
    return path


def resume_history(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of ``<run dir>/resume_history.json`` (none if it does not exist)."""
    path = Path(output_dir) / HISTORY
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise UserError(
            f"{path} cannot be read ({err}); restore it or delete it (it only records past resumes)"
        ) from None
    if not isinstance(entries, list):
        raise UserError(f"{path} is not a list of resumes; restore it or delete it (it only records past resumes)")
    return entries


def resume_changes(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The resumes of this run dir that changed a setting by ``resume.allow_changes``: ``metrics.json``'s record."""
    return [
        {k: entry.get(k) for k in ("time", "ckpt_path", "resumed_at_epoch", "allowed_changes")}
        for entry in resume_history(output_dir)
        if isinstance(entry, dict) and entry.get("allowed_changes")
    ]


def _task_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "hydra"}


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or key.startswith(f"{p}.") or ("*" in p and fnmatch.fnmatchcase(key, p)) for p in patterns)


def world_size(trainer: Mapping[str, Any]) -> int | None:
    """Processes a trainer config starts (devices x nodes) on a device type, or None when the config alone does not
    say (``devices=auto`` or ``-1`` on a GPU: the machine decides)."""
    devices = trainer.get("devices", "auto")
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto" and _device_type(trainer) == "cpu":
            count = 1  # Lightning's CPU accelerator counts one device
        elif "," in text:
            count = len([part for part in text.split(",") if part.strip()])
        elif text.lstrip("-").isdigit():
            count = int(text)
        else:
            return None
    elif isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, int) and not isinstance(devices, bool):
        count = devices
    else:
        return None
    nodes = trainer.get("num_nodes", 1)
    if count < 1 or not isinstance(nodes, int) or nodes < 1:
        return None
    return count * nodes


def _device_type(trainer: Mapping[str, Any]) -> str:
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if accelerator == "auto":
        return "gpu" if gpu_available() else "cpu"
    return "gpu" if accelerator == "cuda" else accelerator


def _same_world_size(stored: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    old, new = stored.get("trainer") or {}, current.get("trainer") or {}
    size = world_size(old)
    return size is not None and size == world_size(new) and _device_type(old) == _device_type(new)


def _show(value: Any) -> str:
    """A value as a message shows it: strings (paths) whole, other values as short JSON."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    text = json.dumps(value, default=str, separators=(",", ":"))
    return text if len(text) <= 60 else text[:57] + "..."
