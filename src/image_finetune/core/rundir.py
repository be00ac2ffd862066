"""One run per run dir, and no leftovers from a run that was killed: the lock and the clean-up ``train`` starts with.

The lock is ``fcntl.flock`` on ``<run dir>/.train.lock``, held by the process for as long as it trains. The kernel
drops it when the process ends however it ends (``kill -9`` included), so there is never a stale lock to delete by
hand. Forked children (data loader workers) close their copy of the descriptor at once: a flock belongs to the open
file, so a worker outliving a killed trainer by the seconds its watchdog takes would otherwise keep the dir locked.
Under DDP only the launching process (global rank 0) takes it: the other ranks of the same run must not block
on it. The rank is read from the launchers' environment variables, because the lock is taken before any Trainer exists.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from image_finetune.checkpoints import LAST, read_checkpoint
from image_finetune.core.atomic import remove_orphans
from image_finetune.core.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"
# Set by torchrun (RANK, LOCAL_RANK, GROUP_RANK), Lightning's own DDP launcher (LOCAL_RANK, NODE_RANK), SLURM
# (SLURM_PROCID) and jsrun (JSM_NAMESPACE_RANK) before any Trainer exists.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


_held: set[int] = set()  # lock descriptors of this process, closed in every forked child


def _close_in_child() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def is_launcher() -> bool:
    """Whether this process is global rank 0 of its run (a plain run is): every rank variable set is 0."""
    return all(os.environ.get(name, "0").strip() in ("0", "") for name in _RANK_VARIABLES)


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike) -> Iterator[Path | None]:
    """Hold ``run_dir``'s lock while the block runs; a second run in the same dir stops at once with a UserError.

    Yields the lock file, or None on a non-zero rank (which takes no lock). The file holds the holder's pid, host and
    start time, for the error message; it is left in place (removing a lock file races with the next taker).
    """
    if not is_launcher():
        yield None
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    _held.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise UserError(
                f"run dir {run_dir} is in use by another training run ({holder}). Wait for it to finish, or give this "
                "run its own dir (hydra.run.dir=...)"
            ) from None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}".encode(), 0)
        yield path
    finally:
        _held.discard(fd)
        os.close(fd)  # releases the lock


def clean_run_dir(run_dir: str | os.PathLike) -> list[Path]:
    """Remove what a killed run of this dir left half-written: ``atomic_path``'s temporary files, nothing else.

    Call it only while holding the run dir's lock (no live writer can own those files then).
    """
    run_dir = Path(run_dir)
    return remove_orphans(run_dir) if run_dir.is_dir() else []


def drop_checkpoints_after_last(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Before resuming from ``last.ckpt``: remove checkpoints of this dir written after it that nothing tracks.

    A run killed between saving a new best checkpoint and saving ``last.ckpt`` leaves that file behind, and the resumed
    run, which starts from the earlier ``last.ckpt``, knows nothing of it: it would never be deleted when a better one
    comes, and the resumed run would write its own copy beside it as ``-v1``. The resumed run recomputes exactly that
    state (resume is exact), so such a file is removed. Only ``*.ckpt`` files directly in ``checkpoint_dir`` whose
    global step is later than ``last.ckpt``'s and that no callback state in ``last.ckpt`` names are touched.
    """
    folder = Path(checkpoint_dir)
    last = read_checkpoint(folder / LAST, mmap=True)
    step = int(last.get("global_step", 0))
    tracked = {os.path.realpath(p) for p in _tracked_paths(last.get("callbacks") or {})}
    removed = []
    for path in sorted(folder.glob("*.ckpt")):
        if path.name == LAST or os.path.realpath(path) in tracked or not path.is_file():
            continue
        try:
            later = int(read_checkpoint(path, mmap=True).get("global_step", -1)) > step
        except UserError:
            continue  # not ours to judge
        if later:
            path.unlink()
            removed.append(path)
    if removed:
        log.info(
            "Removed %d checkpoint(s) the interrupted run wrote after %s (the resumed run writes them again): %s",
            len(removed),
            LAST,
            ", ".join(p.name for p in removed),
        )
    return removed


def _tracked_paths(callback_states: dict) -> Iterator[str]:
    """Every file path a ``ModelCheckpoint`` state names (best, last, k-th best, all top-k)."""
    for state in callback_states.values():
        if not isinstance(state, dict):
            continue
        for key in ("best_model_path", "last_model_path", "kth_best_model_path"):
            if isinstance(state.get(key), str) and state[key]:
                yield state[key]
        yield from (p for p in (state.get("best_k_models") or {}) if isinstance(p, str))
