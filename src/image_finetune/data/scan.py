"""Scan an image folder once, before training, so a bad file costs a line in a report instead of a crash mid-epoch.

torchvision's `ImageFolder` trusts file extensions: hidden folders become classes, `._x.jpg` AppleDouble files and
truncated JPEGs raise in a DataLoader worker hours into training, and an empty class folder raises with no hint. Here
every file is decoded once (JPEGs at 1/8 scale, which still reads every byte), files that would fail are left out
with a reason, and the results are cached per file so the next run only re-checks files that changed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import stat
import struct
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import PIL
from PIL import Image, UnidentifiedImageError

from image_finetune.core.atomic import atomic_write_text
from image_finetune.core.errors import DataError
from image_finetune.data.decode import to_rgb

log = logging.getLogger(__name__)

# Extensions (compared lower-case) of the formats we accept; anything else is left out without being opened.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif"}
)
# Pillow format names we accept, whatever the extension says. MPO is how Pillow names many phone JPEGs.
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF"})
# Folders some tools leave behind that are never classes even though their names do not start with '.'.
JUNK_FOLDERS = frozenset({"__MACOSX"})

# The reason vocabulary. A reason is one of these kinds, optionally followed by ": <detail>".
HIDDEN = "hidden"
NOT_IN_CLASS_FOLDER = "not in a class folder"
UNSUPPORTED_EXTENSION = "unsupported extension"
EMPTY_FILE = "empty file"
NOT_AN_IMAGE = "not an image"
UNSUPPORTED_FORMAT = "unsupported format"
TRUNCATED = "truncated"
TOO_LARGE = "too large (decompression bomb)"
UNREADABLE = "unreadable"
BROKEN_SYMLINK = "broken symlink"
DUPLICATE = "duplicate"
NO_USABLE_IMAGES = "no usable images"
REASON_KINDS = (
    HIDDEN, NOT_IN_CLASS_FOLDER, UNSUPPORTED_EXTENSION, EMPTY_FILE, NOT_AN_IMAGE, UNSUPPORTED_FORMAT,
    TRUNCATED, TOO_LARGE, UNREADABLE, BROKEN_SYMLINK, DUPLICATE, NO_USABLE_IMAGES,
)  # fmt: skip

MAX_HIDDEN_LISTED = 3  # hidden class folders named in the summary line; the report lists every one
_CACHE_FORMAT = 2  # 2: images over Pillow's pixel limit are left out


@dataclass(frozen=True)
class FolderScan:
    """What a scan kept and what it left out (with why); paths are absolute but not resolved, as the user sees them.

    ``rows``: for files listed in a labels file (``data=csv``), the row that names each path, so the report points at
    the line to fix; empty for a folder scan.
    """

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[tuple[str, str]]
    rows: Mapping[str, str] = field(default_factory=dict)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(label for _, label in self.samples)
        return {name: counts[i] for i, name in enumerate(self.classes)}


def reason_kind(reason: str) -> str:
    """The vocabulary entry of a reason string, e.g. 'unreadable' for 'unreadable: broken PNG file'."""
    return reason.split(": ", 1)[0]


def failure_reason(exc: BaseException) -> str:
    """Map a decode error to the reason vocabulary (also used for files that break after the scan)."""
    if isinstance(exc, Image.DecompressionBombError):
        return TOO_LARGE
    if isinstance(exc, UnidentifiedImageError):
        return NOT_AN_IMAGE
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():  # "image file is truncated", "Truncated File Read"
        return TRUNCATED
    detail = str(exc).strip() or type(exc).__name__
    return f"{UNREADABLE}: {' '.join(detail.split())}"


def check_image(path: str, data: bytes | None = None) -> str | None:
    """None when Pillow decodes `path` as training would (training's fast JPEG path falls back to Pillow), else the
    reason it cannot be used. ``data``: the image's bytes when they are held in memory (a row of a Hugging Face
    dataset); ``path`` then only names it.

    A full decode is the only reliable test: `Image.verify()` passes truncated JPEGs. JPEGs decode at 1/8 scale,
    which still entropy-decodes every byte (so truncation is caught) for a fraction of the cost.
    """
    if data is not None and not data:
        return EMPTY_FILE
    try:
        with io.BytesIO(data) if data is not None else open(path, "rb") as f:
            im = Image.open(f)
            if im.format not in ACCEPTED_FORMATS:
                return f"{UNSUPPORTED_FORMAT}: {im.format}"
            if (over := over_pixel_limit(im.size)) is not None:
                return over
            to_rgb(im, min_size=1)
    except Exception as e:  # any exception from a decoder means "cannot train on this file"
        reason = failure_reason(e)
        return TRUNCATED if reason.startswith(UNREADABLE) and data is None and _is_cut_webp(path) else reason
    return None


def over_pixel_limit(size: tuple[int, int]) -> str | None:
    """The reason an image of ``size`` is left out when it has more pixels than Pillow's limit, else None.

    Pillow only warns between ``Image.MAX_IMAGE_PIXELS`` (89.5 Mpx) and twice that, and decodes the image anyway:
    such a file would be decoded in full every epoch (a 100 Mpx PNG takes seconds and ~300 MB), so the scan leaves it
    out, from the header alone. Raise ``PIL.Image.MAX_IMAGE_PIXELS`` to train on such images on purpose.
    """
    limit = Image.MAX_IMAGE_PIXELS
    width, height = size
    if limit is None or width * height <= limit:
        return None
    return f"{TOO_LARGE}: {width}x{height} = {width * height:,} px, over PIL.Image.MAX_IMAGE_PIXELS = {limit:,}"


def _is_cut_webp(path: str) -> bool:
    """libwebp reports a truncated file only as 'could not create decoder object'; the RIFF header knows the size."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
            return False
        (riff_size,) = struct.unpack("<I", head[4:8])
        return os.path.getsize(path) < riff_size + 8
    except OSError:
        return False


def scan_image_folder(
    root: str | Path,
    *,
    cache_dir: str | Path | None = None,
    num_workers: int | None = None,
    require_classes: bool = True,
) -> FolderScan:
    """Find the usable images under `root`, one sub-folder per class (sub-folders of a class folder belong to it).

    num_workers: threads that decode (Pillow releases the GIL while decoding); None picks min(32, cpus + 4), 0 or 1
    decodes in the calling thread. cache_dir: where per-file results are cached between runs.
    require_classes=False returns an empty scan for a root without class folders and leaves class folders without
    usable images out of `classes` (listed in `skipped`) instead of raising; class indices then follow the classes
    that remain, so map them by name.
    """
    started = time.perf_counter()
    root_path = _check_root(root)
    skipped: list[tuple[str, str]] = []
    class_dirs: list[tuple[str, str]] = []  # (class name, absolute folder path)
    for entry in _sorted_entries(str(root_path)):
        kind, _ = path_kind(entry.path, is_symlink=entry.is_symlink())
        if is_hidden(entry.name):
            skipped.append((entry.path, hidden_folder_reason(entry.path) if kind == "dir" else HIDDEN))
        elif kind == "dir":
            class_dirs.append((entry.name, entry.path))
        elif kind == "file":
            skipped.append((entry.path, NOT_IN_CLASS_FOLDER))
        else:
            skipped.append((entry.path, kind))
    if not class_dirs:
        if require_classes:
            raise DataError(_no_class_folders_message(root_path, skipped))
        return FolderScan(root_path, [], [], sorted(skipped))

    candidates: list[tuple[Found, str]] = []  # files worth decoding, with their class name
    for name, folder in class_dirs:
        for found in walk_files(folder):
            reason = skip_reason(found.path, found.kind)
            if reason is None:
                candidates.append((found, name))
            else:
                skipped.append((found.path, reason))

    kept: dict[str, list[str]] = {name: [] for name, _ in class_dirs}
    for path, name in _decodable(candidates, skipped, cache_dir, num_workers, root_path):
        kept[name].append(path)
    empty = [(name, folder) for name, folder in class_dirs if not kept[name]]
    if empty and require_classes:
        raise DataError(_empty_classes_message(empty, skipped))
    skipped.extend((folder, f"{NO_USABLE_IMAGES}: {_rejection_summary(folder, skipped)}") for _, folder in empty)

    classes = sorted(name for name, paths in kept.items() if paths)
    index = {name: i for i, name in enumerate(classes)}
    samples = sorted((p, index[name]) for name in classes for p in kept[name])
    scan = FolderScan(root_path, classes, samples, sorted(skipped))
    log.debug("scanned %s in %.2f s", root_path, time.perf_counter() - started)
    return scan


def scan_image_files(
    root: str | Path,
    labelled: Iterable[tuple[str, str]],
    *,
    cache_dir: str | Path | None = None,
    num_workers: int | None = None,
) -> FolderScan:
    """The usable files of ``labelled`` ((path, class name) pairs whose labels come from elsewhere, e.g. a CSV under
    ``root``), checked exactly as ``scan_image_folder`` checks a class folder's files: same reasons, same per-file
    cache. Classes are the sorted names with at least one usable file; the caller decides whether one without is an
    error. A path the caller names is used even if it looks hidden: it was asked for by name."""
    root_path = _check_root(root)
    skipped: list[tuple[str, str]] = []
    candidates: list[tuple[Found, str]] = []
    for path, name in labelled:
        kind, st = path_kind(path)
        reason = skip_reason(path, kind)
        if reason is None:
            candidates.append((Found(path, kind, os.path.realpath(path), st), name))
        else:
            skipped.append((path, reason))
    kept = _decodable(candidates, skipped, cache_dir, num_workers, root_path)
    classes = sorted({name for _, name in kept})
    index = {name: i for i, name in enumerate(classes)}
    return FolderScan(root_path, classes, sorted((p, index[name]) for p, name in kept), sorted(skipped))


def _decodable(
    candidates: list[tuple[Found, str]],
    skipped: list[tuple[str, str]],
    cache_dir: str | Path | None,
    num_workers: int | None,
    root: Path,
) -> list[tuple[str, str]]:
    """The (path, class name) of the candidates that decode, one per real file; the rest go to ``skipped``."""
    files, duplicates = _dedupe(candidates)
    skipped.extend(duplicates)
    cache = _ScanCache(cache_dir, root) if cache_dir is not None else None
    reasons = _check_all(files, cache, num_workers, root)
    if cache is not None:
        cache.save()
        log.debug("%s: %d files checked, %d from cache", root, len(files), cache.hits)
    kept = []
    for f, reason in zip(files, reasons):
        if reason is None:
            kept.append((f.path, f.class_name))
        else:
            skipped.append((f.path, reason))
    return kept


def _check_root(root: str | Path) -> Path:
    given = Path(root).expanduser()
    path = Path(os.path.abspath(given))
    where = "" if given.is_absolute() else f" (relative paths are resolved against the working directory {os.getcwd()})"
    if not path.exists():
        hint = " It is a broken symlink." if path.is_symlink() else ""
        raise DataError(
            f"Image folder {path} does not exist{where}.{hint} Point the data root at a folder that holds one "
            "sub-folder of images per class."
        )
    if not path.is_dir():
        raise DataError(
            f"Image folder {path} is a file, not a folder. Point the data root at the folder that holds one "
            "sub-folder of images per class."
        )
    return path


def _sorted_entries(folder: str) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name)


def is_hidden(name: str) -> bool:
    """Dot files and folders (``.DS_Store``, ``._x.jpg``, ``.ipynb_checkpoints``) and macOS archive junk."""
    return name.startswith(".") or name in JUNK_FOLDERS


# A hidden folder where class folders are reads "hidden: class folder (12 images)": the summary names it, so a skipped
# class does not pass for one skipped file.
_HIDDEN_FOLDER = f"{HIDDEN}: class folder "


def hidden_folder_reason(folder: str) -> str:
    """The reason of a hidden folder beside the class folders, with the image files in it (counted, not decoded)."""
    n = sum(
        os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        for _, _, names in os.walk(folder)
        for name in names
        if not is_hidden(name)
    )
    return f"{_HIDDEN_FOLDER}({n:,} image{'s' if n != 1 else ''})"


def path_kind(path: str, *, is_symlink: bool | None = None) -> tuple[str, os.stat_result | None]:
    """('dir' | 'file' | a skip reason, stat), following symlinks so symlinked class folders and files count.

    Anything but a regular file or a folder (a FIFO, a socket, a device) gets a reason: opening a FIFO would block
    forever waiting for a writer.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        broken = os.path.islink(path) if is_symlink is None else is_symlink
        return (BROKEN_SYMLINK if broken else f"{UNREADABLE}: no such file"), None
    except OSError as e:
        return f"{UNREADABLE}: {e.strerror or e}", None
    if stat.S_ISDIR(st.st_mode):
        return "dir", st
    if stat.S_ISREG(st.st_mode):
        return "file", st
    return f"{UNREADABLE}: not a regular file", st


def skip_reason(path: str, kind: str) -> str | None:
    """Why a listed path is not worth decoding (not a regular file, not an image extension), or None."""
    if kind != "file":
        return kind
    suffix = os.path.splitext(path)[1]
    return None if suffix.lower() in IMAGE_EXTENSIONS else f"{UNSUPPORTED_EXTENSION}: {suffix or '(none)'}"


class Found(NamedTuple):
    """One path under a scanned folder: ``kind`` is 'file' (a regular file) or the reason it is skipped."""

    path: str
    kind: str  # 'file' or a skip reason
    real: str = ""
    st: os.stat_result | None = None


def walk_files(folder: str) -> Iterable[Found]:
    """Everything under `folder`, following symlinks but never round a loop."""
    seen_dirs: set[str] = set()
    stack = [folder]
    while stack:
        current = stack.pop()
        real_dir = os.path.realpath(current)
        if real_dir in seen_dirs:
            yield Found(current, f"{DUPLICATE}: folder already scanned as {real_dir}")
            continue
        seen_dirs.add(real_dir)
        try:
            entries = _sorted_entries(current)
        except OSError as e:
            yield Found(current, f"{UNREADABLE}: {e.strerror or e}")
            continue
        for entry in entries:
            if is_hidden(entry.name):
                yield Found(entry.path, HIDDEN)
                continue
            kind, st = path_kind(entry.path, is_symlink=entry.is_symlink())
            if kind == "dir":
                stack.append(entry.path)
                continue
            # realpath costs an lstat per path component: resolve each folder once, and only symlinked files again.
            real = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real_dir, entry.name)
            yield Found(entry.path, kind, real, st)


@dataclass(frozen=True)
class _File:
    path: str
    class_name: str
    real: str
    size: int
    mtime_ns: int


def _dedupe(candidates: list[tuple[Found, str]]) -> tuple[list[_File], list[tuple[str, str]]]:
    """One entry per real file: the path not going through a symlink wins, then the first in sorted order."""
    by_inode: dict[tuple[int, int], list[tuple[Found, str]]] = {}
    for found, name in candidates:
        assert found.st is not None
        by_inode.setdefault((found.st.st_dev, found.st.st_ino), []).append((found, name))
    files: list[_File] = []
    duplicates: list[tuple[str, str]] = []
    for group in by_inode.values():
        group.sort(key=lambda g: (g[0].path != g[0].real, g[0].path))
        (found, name), others = group[0], group[1:]
        assert found.st is not None
        files.append(_File(found.path, name, found.real, found.st.st_size, found.st.st_mtime_ns))
        duplicates.extend((other.path, f"{DUPLICATE}: same file as {found.path}") for other, _ in others)
    files.sort(key=lambda f: f.path)
    return files, duplicates


def _check_all(files: list[_File], cache: _ScanCache | None, num_workers: int | None, root: Path) -> list[str | None]:
    reasons: list[str | None] = [None] * len(files)
    todo: list[int] = []
    for i, f in enumerate(files):
        if f.size == 0:
            reasons[i] = EMPTY_FILE
        elif cache is not None and (entry := cache.get(f)) is not None:
            reasons[i] = entry[2]
        else:
            todo.append(i)
    workers = min(32, (os.cpu_count() or 1) + 4) if num_workers is None else num_workers
    if len(todo) >= 1000:  # minutes for a big folder: say why the run is quiet
        later = "" if cache is not None else " (pass a cache dir to make the next scan near-instant)"
        log.info("decoding %d images in %s once to find unusable files%s", len(todo), root, later)
    paths = [files[i].path for i in todo]
    if workers <= 1 or len(todo) <= 1:
        results = [check_image(p) for p in paths]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-scan") as pool:
            results = list(pool.map(check_image, paths))
    for i, reason in zip(todo, results):
        reasons[i] = reason
        if cache is not None:
            cache.put(files[i], reason)
    return reasons


class _ScanCache:
    """Per-file results keyed by (real path, size, mtime_ns); dropped whole when Pillow or its pixel limit changes."""

    def __init__(self, cache_dir: str | Path, root: Path) -> None:
        digest = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:16]
        self.path = Path(cache_dir).expanduser() / f"scan-{digest}.json"
        self.meta = {"format": _CACHE_FORMAT, "pillow": PIL.__version__, "max_image_pixels": Image.MAX_IMAGE_PIXELS}
        self.old: dict[str, list] = self._read()
        self.new: dict[str, list] = {}
        self.hits = 0

    def _read(self) -> dict[str, list]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable scan cache %s (%s); every file will be checked again", self.path, e)
            return {}
        if not isinstance(data, dict) or data.get("meta") != self.meta or not isinstance(data.get("files"), dict):
            return {}
        return data["files"]

    def get(self, f: _File) -> list | None:
        """The cached [size, mtime_ns, reason] of an unchanged file, else None."""
        entry = self.old.get(f.real)
        if not isinstance(entry, list) or len(entry) != 3 or entry[:2] != [f.size, f.mtime_ns]:
            return None
        if entry[2] is not None and not isinstance(entry[2], str):  # a damaged entry is a miss: the file is re-checked
            return None
        self.hits += 1
        self.new[f.real] = entry
        return entry

    def put(self, f: _File, reason: str | None) -> None:
        self.new[f.real] = [f.size, f.mtime_ns, reason]

    def save(self) -> None:
        """Only files seen in this scan are kept, so deleted files do not accumulate."""
        if self.new == self.old:
            return
        try:
            atomic_write_text(self.path, json.dumps({"meta": self.meta, "files": self.new}))
        except OSError as e:
            log.warning("could not write scan cache %s (%s); the next scan will check every file again", self.path, e)


def _kind_counts(reasons: Iterable[str]) -> str:
    counts = Counter(reason_kind(r) for r in reasons)
    return ", ".join(f"{n:,} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _rejection_summary(folder: str, skipped: list[tuple[str, str]]) -> str:
    inside = [r for p, r in skipped if p.startswith(folder + os.sep)]
    if not inside:
        return "the folder is empty"
    return f"{len(inside):,} file{'s' if len(inside) != 1 else ''}, all rejected: {_kind_counts(inside)}"


def _no_class_folders_message(root: Path, skipped: list[tuple[str, str]]) -> str:
    loose = [p for p, r in skipped if r == NOT_IN_CLASS_FOLDER]
    msg = (
        f"Image folder {root} has no class folders: expected one sub-folder per class, e.g. {root / 'cat' / '001.jpg'}."
    )
    if loose:
        msg += (
            f" It holds {len(loose):,} files directly (e.g. {os.path.basename(loose[0])}): move them into a sub-folder "
            "named after their class, or point the data root one level up if this folder is itself a class."
        )
    elif skipped:
        msg += f" Everything in it was left out ({_kind_counts(r for _, r in skipped)})."
    return msg


def _empty_classes_message(empty: list[tuple[str, str]], skipped: list[tuple[str, str]]) -> str:
    lines = [f"{len(empty)} class folder{'s have' if len(empty) > 1 else ' has'} no usable images:"]
    for _, folder in empty:
        lines.append(f"  {folder}: {_rejection_summary(folder, skipped)}")
        examples = [(p, r) for p, r in skipped if p.startswith(folder + os.sep)][:3]
        lines.extend(f"    {p}: {r}" for p, r in examples)
    lines.append(
        "Replace or re-export the rejected files, or delete the folder if that class is not wanted "
        "(every class needs at least one image that decodes)."
    )
    return "\n".join(lines)


def write_scan_report(scans: Mapping[str, FolderScan] | FolderScan, path: str | Path) -> Path:
    """Write every left-out file with its reason (tab-separated; comma-separated when `path` ends in .csv).

    A mapping of split name -> scan adds a leading `split` column; files listed in a labels file (``FolderScan.rows``)
    add a trailing `row` column. Written atomically so a crash or a second process never leaves a half report behind.
    """
    out = Path(path)
    delimiter = "," if out.suffix.lower() == ".csv" else "\t"
    named = {"": scans} if isinstance(scans, FolderScan) else scans
    listed = any(scan.rows for scan in named.values())
    rows: list[list[str]] = [[*(["split"] if named is scans else []), "path", "reason", *(["row"] if listed else [])]]
    for split, scan in named.items():
        for p, r in scan.skipped:
            rows.append([*([split] if named is scans else []), p, r, *([scan.rows.get(p, "")] if listed else [])])
    buf = io.StringIO()
    csv.writer(buf, delimiter=delimiter, lineterminator="\n").writerows(rows)
    atomic_write_text(out, buf.getvalue(), newline="")
    return out


def summarize(scan: FolderScan, report: str | Path | None = None) -> str:
    """One log line: what was kept, what was left out by kind, and where the full list is."""
    n_classes = len(scan.classes)
    line = f"kept {len(scan.samples):,} images in {n_classes:,} class{'es' if n_classes != 1 else ''}"
    if not scan.skipped:
        return line + "; left out nothing"
    line += f"; left out {len(scan.skipped):,} ({_kind_counts(r for _, r in scan.skipped)})"
    hidden = [(os.path.basename(p), r[len(_HIDDEN_FOLDER) :]) for p, r in scan.skipped if r.startswith(_HIDDEN_FOLDER)]
    for name, images in hidden[:MAX_HIDDEN_LISTED]:
        line += f"; class folder `{name}` {images} skipped as hidden"
    if len(hidden) > MAX_HIDDEN_LISTED:
        line += f" (and {len(hidden) - MAX_HIDDEN_LISTED} more hidden folders)"
    return line + (f" - see {report}" if report is not None else "")
