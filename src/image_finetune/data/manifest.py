"""The split manifest (``data_split.json`` in the run dir): which file went to which split, read back on resume.

A resumed run trusts this file for what it trains, validates and tests on, so it is checked as hard as user input:
a hand edit, a truncated write or a file copied from another run must stop the run in one line, never leak test
images into training, skip files without a word or crash in a DataLoader worker. Paths are stored relative to
``data.root``, so a data folder moved elsewhere (and named again with ``data.root``) resumes on the same files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from image_finetune.core.atomic import atomic_write_text
from image_finetune.core.errors import DataError

log = logging.getLogger(__name__)

Samples = list[tuple[str, int]]
SPLITS = ("train", "val", "test")
KEYS = ("root", "classes", "splits", "folds", "fold")
# Class names listed in full in a message up to this many; beyond, the first few and a count.
MAX_LISTED = 5


def write_manifest(
    path: str | os.PathLike,
    root: str | os.PathLike,
    classes: Sequence[str],
    splits: Mapping[str, Samples],
    folds: Mapping[str, int] | None = None,
) -> None:
    """Write the splits with paths relative to ``root`` (atomically: a killed run never leaves half a file).
    ``folds``: ``{"folds": K, "fold": i}`` of a k-fold run, recorded beside the splits it made."""
    manifest = {
        "root": str(root),
        "classes": list(classes),
        **(folds or {}),
        "splits": {split: [(os.path.relpath(p, root), label) for p, label in items] for split, items in splits.items()},
    }
    atomic_write_text(Path(path), json.dumps(manifest, indent=1))


def read_manifest(
    path: str | os.PathLike,
    root: str | os.PathLike,
    classes: Sequence[str],
    split_folders: bool,
    usable: Mapping[str, int],
    left_out: Mapping[str, str],
    class_folders: bool = True,
    folds: Mapping[str, int] | None = None,
) -> dict[str, Samples]:
    """The splits in ``path``, checked against the folder as scanned now; ``DataError`` (one line) when it is damaged.

    ``split_folders``: data.root has the ``train/ val/ [test/]`` layout (a file under ``val/`` or ``test/`` belongs
    to that split). ``usable``: absolute path -> label of every image the scan kept; ``left_out``: path -> reason of
    every file it left out. ``class_folders=False``: the labels come from a labels file (``data=csv``), so each entry's
    label is checked against ``usable`` instead of its folder. ``folds``: the run's ``{"folds": K, "fold": i}`` (None:
    no k-fold), which must be the one the file was written for. Listed files the scan no longer keeps (deleted, or no
    longer decoding) are left out of the splits with one warning; a split that loses every file is an error.
    """
    path = Path(path)
    manifest = _load(path)
    _check_schema(path, manifest)
    if manifest["classes"] != list(classes):
        raise DataError(
            f"{path} was written for other classes than {root} has now ({_class_difference(manifest['classes'], classes)}). "
            "Resume in a new run dir, or delete the file to split afresh."
        )
    written = {key: manifest.get(key) for key in ("folds", "fold")}
    if written != {key: (folds or {}).get(key) for key in ("folds", "fold")}:
        raise DataError(
            f"{path} holds the split of {_fold_text(written)}, not of {_fold_text(folds or {})} as this run asks: "
            "each fold is its own run, so train this fold in a new run dir (or resume with the fold's own setting)"
        )
    base = os.path.abspath(root)
    splits: dict[str, Samples] = {}
    bad: list[str] = []  # offending entries, in file order
    split_of: dict[str, str] = {}
    for split, items in manifest["splits"].items():
        splits[split] = []
        for rel, label in items:
            full = os.path.normpath(os.path.join(base, rel))
            problem = _entry_problem(rel, label, full, base, split, classes, split_folders, class_folders)
            if problem is None and not class_folders and usable.get(full, label) != label:
                problem = (
                    f"has label {label} ({classes[label]!r}) but the labels file now says {classes[usable[full]]!r}"
                )
            if problem is None and full in split_of:
                twice = split_of[full] == split
                problem = (
                    "is listed twice in that split" if twice else f"is also listed in the {split_of[full]!r} split"
                )
            if problem is not None:
                bad.append(f"{split!r} entry {json.dumps([rel, label])} {problem}")
                continue
            split_of[full] = split
            splits[split].append((full, label))
    if bad:
        raise _damaged(path, bad[0] + (f" ({len(bad)} bad entries in all)" if len(bad) > 1 else ""))
    return _drop_gone(path, splits, usable, left_out)


def _fold_text(record: Mapping[str, Any]) -> str:
    if record.get("folds") is None:
        return "no k-fold (data.folds=null)"
    return f"data.folds={record['folds']} data.fold={record.get('fold')}"


def _load(path: Path) -> Any:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise _damaged(path, f"cannot be read ({getattr(e, 'strerror', None) or e})") from None
    if not text.strip():
        raise _damaged(path, "is empty")
    try:
        return json.loads(text)
    except ValueError as e:
        detail = f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise _damaged(path, f"is not valid JSON ({detail}; cut short?)") from None


def _check_schema(path: Path, manifest: Any) -> None:
    if not isinstance(manifest, dict):
        raise _damaged(path, f"holds a JSON {type(manifest).__name__}, not an object with keys {list(KEYS)}")
    unknown = sorted(set(manifest) - set(KEYS))
    missing = [key for key in ("classes", "splits") if key not in manifest]
    if unknown or missing:
        raise _damaged(path, f"has keys {sorted(manifest)}, expected {list(KEYS)}")
    if "root" in manifest and not isinstance(manifest["root"], str):
        raise _damaged(path, f"'root' is {json.dumps(manifest['root'])}, not a path")
    classes = manifest["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise _damaged(path, "'classes' is not a list of class names")
    splits = manifest["splits"]
    if not isinstance(splits, dict) or not isinstance(splits.get("train"), list):
        raise _damaged(path, "'splits' is not an object with a 'train' list")
    for split, items in splits.items():
        if split not in SPLITS:
            raise _damaged(path, f"'splits' has a split named {split!r}; splits are {list(SPLITS)}")
        if not isinstance(items, list):
            raise _damaged(path, f"split {split!r} is not a list of [path, label] entries")
        bad = [item for item in items if not _is_entry(item)]
        if bad:
            more = f" ({len(bad)} entries like it)" if len(bad) > 1 else ""
            raise _damaged(path, f"{split!r} entry {json.dumps(bad[0])} is not a [path, label] pair{more}")


def _is_entry(item: Any) -> bool:
    return (
        isinstance(item, list)
        and len(item) == 2
        and isinstance(item[0], str)
        and bool(item[0])
        and isinstance(item[1], int)
        and not isinstance(item[1], bool)
    )


def _entry_problem(
    rel: str,
    label: int,
    full: str,
    base: str,
    split: str,
    classes: Sequence[str],
    split_folders: bool,
    class_folders: bool = True,
) -> str | None:
    """Why one entry cannot be right, or None. Paths are taken as the scan takes them: under data.root once ``..`` is
    resolved (a symlink inside data.root may point elsewhere, as the scan follows it)."""
    if not 0 <= label < len(classes):
        return f"has label {label}, not a class index (0-{len(classes) - 1})"
    if os.path.isabs(rel) or not full.startswith(base + os.sep):
        return f"is outside data.root {base}"
    parts = Path(os.path.relpath(full, base)).parts
    if split_folders:
        folder, parts = parts[0], parts[1:]
        allowed = {"train": ("train",), "val": ("train", "val"), "test": ("train", "test")}[split]
        if folder not in allowed:
            return f"is in the {folder}/ folder, which is not part of the {split!r} split"
    if class_folders and (len(parts) < 2 or parts[0] != classes[label]):
        return f"has label {label} ({classes[label]!r}) but is not in that class folder"
    return None


def _drop_gone(
    path: Path, splits: dict[str, Samples], usable: Mapping[str, int], left_out: Mapping[str, str]
) -> dict[str, Samples]:
    """Leave out listed files the scan no longer keeps, saying so in one warning; an emptied split is an error."""
    gone = [
        (p, left_out.get(p) or ("no such file" if not os.path.lexists(p) else "not found by the scan"))
        for items in splits.values()
        for p, _ in items
        if p not in usable
    ]
    if not gone:
        return splits
    kept = {split: [(p, label) for p, label in items if p in usable] for split, items in splits.items()}
    emptied = [split for split, items in kept.items() if splits[split] and not items]
    first = f"{gone[0][0]}: {gone[0][1]}"
    if emptied:
        raise DataError(
            f"none of the files {path} lists for the {emptied[0]!r} split is usable now (first: {first}): is data.root "
            "the folder this run was trained on? Point data.root at it, or delete the file to split afresh."
        )
    log.warning(
        "%s lists %d file(s) that data.root no longer has or that no longer decode (first: %s); the run goes on "
        "without them",
        path, len(gone), first,
    )  # fmt: skip
    return kept


def _damaged(path: Path, what: str) -> DataError:
    return DataError(
        f"{path} {what}. Delete it to split the data afresh (files added since may then enter the splits), or "
        "restore it from a backup."
    )


def _class_difference(old: Iterable[str], new: Iterable[str]) -> str:
    old, new = list(old), list(new)
    missing, extra = [c for c in old if c not in new], [c for c in new if c not in old]
    if not missing and not extra:
        return f"the same {len(new)} names in another order"
    return f"missing now: {_some(missing)}; new: {_some(extra)}"


def _some(names: Sequence[str]) -> str:
    if len(names) <= MAX_LISTED:
        return str(list(names))
    return f"{list(names[:MAX_LISTED])} and {len(names) - MAX_LISTED} more"
