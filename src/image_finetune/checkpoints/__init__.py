"""Checkpoints in one place: reading them back here (one reader, safe by construction, one-line errors a user can act
on; no torch import until a file is read), writing them in ``io``.

A checkpoint is data, never code. Every read goes through ``torch.load(weights_only=True)`` (no pickled objects), and
the run config a checkpoint carries may only name the project's own classes (``check_stored_targets``): a file that
loads safely must not be able to choose what ``instantiate`` calls (``_target_: pathlib.Path.write_text`` would
otherwise write a file when ``eval.py`` rebuilds the data from it).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from image_finetune.core.errors import UserError
from image_finetune.core.moved import current

#: ``checkpoints/last.ckpt``: the state to resume from (``ckpt_path=last``), written by ``checkpoints.io.LastCheckpoint``.
LAST = "last.ckpt"
#: Only these may appear as ``_target_`` prefixes in a config read back from disk; each prefix has a type check too.
TRUSTED_PREFIXES = ("image_finetune.", "torchvision.transforms.v2.")


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | os.PathLike, key: str = "ckpt_path") -> str | None:
    """``last`` means this run dir's ``checkpoints/last.ckpt``; a missing or unreadable checkpoint is an error.

    The file is opened once here (memory-mapped, so cheap) so that a truncated or foreign file fails with one line
    before anything is built, never with a traceback from deep inside Lightning, and never as a fresh start.
    """
    if ckpt_path is None:
        return None
    path = Path(output_dir) / "checkpoints" / LAST if ckpt_path == "last" else Path(ckpt_path).expanduser()
    if not path.exists():
        hint = (
            " To resume a run, pass its dir too: hydra.run.dir=<run dir> ckpt_path=last." if ckpt_path == "last" else ""
        )
        raise UserError(f"{key}={ckpt_path!r}: no checkpoint at {path}.{hint}")
    read_checkpoint(path, key=key, mmap=True)
    return str(path)


def read_checkpoint(path: str | os.PathLike, *, key: str = "ckpt_path", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU, with a one-line ``UserError`` for every way it can fail."""
    import torch  # heavy: imported when a checkpoint is really read, so entry points start fast

    path = Path(path).expanduser()
    prefix = f"{key}={str(path)!r}"
    if path.is_dir():
        raise UserError(f"{prefix} is a folder; give a checkpoint file, e.g. <run dir>/checkpoints/last.ckpt")
    if not path.is_file():
        raise UserError(f"{prefix}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # a pickled class or function: data we refuse to execute
            raise UserError(
                f"{prefix} holds Python objects that a safe load refuses; only checkpoints holding plain data (as this "
                "project writes them) are loaded. Use a checkpoint written by train.py."
            ) from None
        raise UserError(
            f"{prefix} is not a PyTorch checkpoint (it does not unpickle); use a .ckpt written by train.py"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"{prefix} cannot be read: it is truncated or not a PyTorch checkpoint ({reason}). Use another checkpoint, "
            "e.g. <run dir>/checkpoints/last.ckpt"
        ) from None
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise UserError(f"{prefix} is not a Lightning checkpoint (no state_dict); use a .ckpt written by train.py")
    return dict(checkpoint)


def run_config(checkpoint: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config a checkpoint was trained with (``{}`` for checkpoints from elsewhere); untrusted data.
    A ``_target_`` that has moved since (``core.moved``) reads as where its code lives now."""
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint, mmap=True)
    stored = checkpoint.get("run_config") or {}
    return _moved(dict(stored)) if isinstance(stored, Mapping) else {}


def _moved(node: Any) -> Any:
    """``node`` with every ``_target_`` that moved renamed to where its code lives now."""
    if isinstance(node, Mapping):
        return {k: current(v) if k == "_target_" and isinstance(v, str) else _moved(v) for k, v in node.items()}
    return [_moved(v) for v in node] if isinstance(node, list) else node


def resume_epoch(checkpoint: str | os.PathLike | Mapping[str, Any]) -> int:
    """The epoch Lightning's fit loop resumes a checkpoint at (0-based), and so the fine-tuning phase it belongs to.

    Lightning sets ``current_epoch`` to the checkpoint's processed-epoch count on resume (``_FitLoop.on_run_start``):
    an end-of-epoch checkpoint resumes at the next epoch, a mid-epoch one re-enters its own epoch.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint, mmap=True)
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(checkpoint.get("epoch", 0))


def saved_mid_epoch(checkpoint: Mapping[str, Any]) -> bool:
    """Whether the checkpoint was saved during an epoch (a SIGTERM, Ctrl-C), not at its end: an epoch was started
    that is not yet processed."""
    try:
        progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]
        return int(progress["started"]) > int(progress["processed"])
    except (KeyError, TypeError):
        return False


def check_stored_targets(node: Mapping[str, Any], *, source: str, root_type: type | None = None) -> None:
    """Raise a ``UserError`` unless every ``_target_`` in ``node`` names one of the project's own classes.

    A ``_target_`` is accepted only if it starts with one of ``TRUSTED_PREFIXES`` (checked *before* anything is
    imported: importing a module runs its code) and resolves to a class of the project or a torchvision v2 transform,
    never a function: a function of our own, such as the atomic file writer, called with arguments from a file would
    still let the file act. ``root_type``: what ``node``'s own ``_target_`` must be (e.g. a data module).
    Interpolations (``${...}``) are refused too, since resolvers read the environment and the filesystem.
    """
    entries = _walk(node, source)
    for path, value in entries:
        if isinstance(value, str) and "${" in value:
            raise UserError(f"{path} holds an interpolation ({value!r}); a stored config must hold plain values only")
    root = f"{source}._target_"
    if root_type is not None and root not in dict(entries):
        raise UserError(
            f"{source} names no _target_: name the data on the command line (e.g. data=imagefolder data.root=DIR)"
        )
    for path, name in entries:
        if not path.endswith("._target_"):
            continue
        if not isinstance(name, str) or not name.startswith(TRUSTED_PREFIXES):
            raise UserError(
                f"{path}={name!r} is not one of this project's classes: a checkpoint may not choose code. "
                "Name the data on the command line instead (e.g. data=imagefolder data.root=DIR)."
            )
        obj = _locate(name, path)
        wanted = root_type if path == root else None
        if not _trusted_class(name, obj) or (wanted is not None and not issubclass(obj, wanted)):
            kind = wanted.__name__ if wanted is not None else "project class or torchvision v2 transform"
            raise UserError(f"{path}={name!r} is not a {kind}: a checkpoint may only name this project's classes")


def _walk(node: Any, path: str) -> list[tuple[str, Any]]:
    if isinstance(node, Mapping):
        return [item for k, v in node.items() for item in [(f"{path}.{k}", v), *_walk(v, f"{path}.{k}")]]
    if isinstance(node, (list, tuple)):
        return [item for i, v in enumerate(node) for item in [(f"{path}[{i}]", v), *_walk(v, f"{path}[{i}]")]]
    return []


def _locate(name: str, path: str) -> Any:
    from hydra.utils import get_object

    try:
        return get_object(name)
    except Exception:  # hydra raises ImportError or its own wrapper; either way the name does not exist
        raise UserError(f"{path}={name!r} does not exist in this version of the project") from None


def _trusted_class(name: str, obj: Any) -> bool:
    if not isinstance(obj, type):
        return False
    if name.startswith("image_finetune."):
        return obj.__module__.startswith("image_finetune.")
    from torchvision.transforms import v2

    return issubclass(obj, v2.Transform)
