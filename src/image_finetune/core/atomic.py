"""One way to write a file so that readers see the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# The names ``atomic_path`` gives its temporary files: ``.<target name>.<8 random chars from mkstemp>.tmp``. Only names
# of this form are ever removed by ``remove_orphans``.
_TMP_PREFIX, _TMP_SUFFIX = ".", ".tmp"
ORPHAN_PATTERN = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is renamed over ``path``, on failure removed.

    The temporary file lives in the target's directory, so the rename is atomic (a copy across filesystems would not
    be), and it gets a normal file's permissions (``mkstemp`` makes it 0600). ``fsync`` flushes it to disk first, for
    files a crash must not lose (checkpoints).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{_TMP_PREFIX}{path.name}.", suffix=_TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str, newline: str | None = None) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline=newline)
    return Path(path)


def remove_orphans(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Delete the temporary files ``atomic_path`` left in ``folder`` when its process was killed mid-write.

    Only names of ``atomic_path``'s own pattern (``.<name>.XXXXXXXX.tmp``) that are regular files are removed; the
    caller must know no live writer uses the folder (``train`` holds the run dir's lock). Returns what was removed.
    """
    folder = Path(folder)
    candidates = (
        folder.rglob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}") if recursive else folder.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}")
    )
    removed = []
    for path in candidates:
        if ORPHAN_PATTERN.match(path.name) and path.is_file() and not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    if removed:
        log.info(
            "Removed %d unfinished temporary file(s) left by an interrupted run in %s: %s",
            len(removed),
            folder,
            ", ".join(str(p.relative_to(folder)) for p in removed),
        )
    return removed
