"""Build an expensive test input (a trained run) once per test session, shared by every pytest-xdist worker.

A module- or session-scoped fixture is per worker: when ``--dist worksteal`` hands tests of one module to both workers,
each would train the same run. ``once_per_session`` builds it in the session's shared temporary folder under a file
lock: the first worker to ask builds it, a worker that asks meanwhile waits for it (no race, however loaded the
machine), and later ones reuse it. A failed build leaves no ``done`` mark, so the next one to ask builds it again
(and fails the same way, in its own test).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock


def session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder all workers of this session share: the controller's basetemp (each worker's is a child of it).

    pytest removes it at the end of a session whose tests all passed (``tmp_path_retention_policy``)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once_per_session(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``build(folder)`` once per session for ``name``; the folder it filled. Tests must only read it."""
    shared = session_root(tmp_path_factory) / "shared"
    shared.mkdir(exist_ok=True)
    folder, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            folder.mkdir()
            build(folder)
            done.touch()
    return folder
