"""One exception type for every mistake a user can fix, so entry points print one line instead of a traceback."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


class UserError(Exception):
    """A problem with the user's data, config or files; the message names the culprit and says how to fix it."""


class DataError(UserError, ValueError):
    """The dataset on disk cannot be used as asked (missing root, empty class, mismatched splits...)."""


class ConfigError(UserError, ValueError):
    """A config value is wrong (unknown backbone or weights name, impossible option combination...)."""


@contextlib.contextmanager
def writing(path: str | os.PathLike, key: str) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` into one line naming the config key, the place and the fix.

    Disk full is said as such ("no space left on device"), since that is what a user must act on; writers are atomic
    (``atomic.atomic_path``), so what was there before stays intact.
    """
    try:
        yield
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise UserError(
                f"{key}: no space left on device while writing {path}; free space there or choose another {key}=PATH"
            ) from None
        reason = err.strerror or str(err)
        if isinstance(err, (FileExistsError, NotADirectoryError)) and err.filename:
            reason = f"{_file_in_the_way(err.filename)} is a file, not a folder"
        raise UserError(f"{key}={str(path)!r}: cannot write there ({reason}); choose a writable {key}=PATH") from None


def _file_in_the_way(path: str | os.PathLike) -> Path:
    """The shallowest existing non-folder on ``path``'s way (``mkdir a/b/c`` names ``a/b/c`` when ``a`` is a file)."""
    path = Path(path)
    return next((p for p in [*reversed(path.parents), path] if p.exists() and not p.is_dir()), path)


def check_output_file(path: str | os.PathLike, key: str, example_name: str) -> Path:
    """Refuse, before any work, an output file path that is a folder or a place that cannot be written.

    Found only when the result is written, the mistake would cost the whole run (a predict of thousands of images)
    and surface as ``IsADirectoryError`` from the final rename. The place is probed by creating (and removing) a file
    beside the target; missing parent folders are created, as the writer would create them.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{key}={str(path)!r} is a folder; give a file path, e.g. {key}={path / example_name}")
    with writing(path, key):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    return path


class RunInterrupted(Exception):  # noqa: N818 (not an error: the run was stopped from outside)
    """Training stopped on a signal (SIGTERM from a scheduler or ``kill``, SIGINT from Ctrl-C); the message says whether
    and how to resume.

    Entry points print the one-line message and exit with ``exit_code`` (128 + the signal number, as a shell reports
    a process the signal ended), so a scheduler never counts an interrupted run as a success.
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def is_keyboard_interrupt(err: BaseException) -> bool:
    """Ctrl-C: a ``KeyboardInterrupt``, or the ``exit(1)`` Lightning turns one into inside a ``Trainer`` call
    (``lightning/pytorch/trainer/call.py``, ``_call_and_handle_interrupt``: raised while handling the interrupt, so
    the interrupt is its ``__context__``)."""
    return isinstance(err, KeyboardInterrupt) or (
        isinstance(err, SystemExit) and isinstance(err.__context__, KeyboardInterrupt)
    )
