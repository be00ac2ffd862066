"""The scan keeps exactly the images training can decode and says why it left out everything else."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from messy_folder import MessyFolder, make_messy_folder, photo, save, truncated_jpeg
from PIL import Image

from image_finetune.core.errors import DataError, UserError
from image_finetune.data import scan as scan_mod
from image_finetune.data.scan import (
    REASON_KINDS,
    FolderScan,
    failure_reason,
    reason_kind,
    scan_image_folder,
    summarize,
    write_scan_report,
)


@pytest.fixture
def messy(tmp_path: Path) -> MessyFolder:
    return make_messy_folder(tmp_path)


def as_dicts(scan: FolderScan) -> tuple[dict[str, str], dict[str, str]]:
    kept = {path: scan.classes[label] for path, label in scan.samples}
    return kept, {path: reason_kind(reason) for path, reason in scan.skipped}


def small_folder(root: Path, per_class: int = 3) -> Path:
    for cls in ("a", "b"):
        for i in range(per_class):
            save(photo().resize((32 + i, 24)), root / cls / f"{i}.jpg", "JPEG")
    return root


@pytest.mark.parametrize("num_workers", [0, 4])
def test_messy_folder_keeps_exactly_the_good_images(messy: MessyFolder, num_workers: int) -> None:
    scan = scan_image_folder(messy.root, num_workers=num_workers)
    kept, skipped = as_dicts(scan)
    assert kept == messy.kept
    assert skipped == messy.skipped
    assert scan.classes == ["birds", "cats", "dogs"]
    assert scan.class_counts() == {"birds": 1, "cats": 15, "dogs": 2}
    assert [p for p, _ in scan.samples] == sorted(kept)
    assert [p for p, _ in scan.skipped] == sorted(skipped)
    assert all(os.path.isabs(p) for p, _ in scan.samples)
    assert len({os.path.realpath(p) for p, _ in scan.samples}) == len(scan.samples)  # each real file once
    reasons = dict(scan.skipped)
    original = messy.root / "dogs" / "flower.jpg"
    assert reasons[str(messy.root / "cats" / "flower-link.jpg")] == f"duplicate: same file as {original}"
    assert reasons[str(messy.root / "cats" / "icon.png")] == "unsupported format: ICO"
    assert reasons[str(messy.root / "cats" / "notes.txt")] == "unsupported extension: .txt"
    assert {reason_kind(r) for r in reasons.values()} <= set(REASON_KINDS)  # the documented vocabulary, nothing else


def test_every_kept_image_decodes_with_the_training_loader(messy: MessyFolder) -> None:
    from image_finetune.data.decode import load_rgb

    for path, _ in scan_image_folder(messy.root).samples:
        assert load_rgb(path, min_size=64).mode == "RGB"


def test_summary_and_report(messy: MessyFolder, tmp_path: Path) -> None:
    scan = scan_image_folder(messy.root)
    report = write_scan_report(scan, tmp_path / "reports" / "skipped.tsv")
    with open(report, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["path", "reason"]
    assert [tuple(r) for r in rows[1:]] == scan.skipped
    line = summarize(scan, report)
    assert line.startswith("kept 18 images in 3 classes; left out 15 (5 hidden, 2 truncated, 1 broken symlink,")
    assert "1 too large (decompression bomb)" in line
    assert line.endswith(f" - see {report}")

    both = write_scan_report({"train": scan, "val": scan}, tmp_path / "reports" / "all.csv")
    with open(both, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["split", "path", "reason"]
    assert len(rows) == 1 + 2 * len(scan.skipped) and rows[-1][0] == "val"
    assert sorted(os.listdir(tmp_path / "reports")) == ["all.csv", "skipped.tsv"]  # no temp files left behind


def test_summary_of_a_clean_folder(tmp_path: Path) -> None:
    assert summarize(scan_image_folder(small_folder(tmp_path / "d"))) == "kept 6 images in 2 classes; left out nothing"


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist") as e:
        scan_image_folder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


def test_relative_root_gives_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small_folder(tmp_path / "d")
    monkeypatch.chdir(tmp_path)
    scan = scan_image_folder("d")
    assert scan.root == tmp_path / "d"
    assert scan.samples[0] == (str(tmp_path / "d" / "a" / "0.jpg"), 0)
    with pytest.raises(DataError, match=f"relative paths are resolved against the working directory {tmp_path}"):
        scan_image_folder("typo")


def test_root_is_a_file(tmp_path: Path) -> None:
    save(photo(), tmp_path / "x.jpg")
    with pytest.raises(DataError, match=r"x\.jpg is a file, not a folder"):
        scan_image_folder(tmp_path / "x.jpg")


def test_root_without_class_folders_explains_the_layout(tmp_path: Path) -> None:
    for i in range(3):
        save(photo().resize((20, 20)), tmp_path / "flat" / f"{i}.jpg")
    with pytest.raises(DataError, match="has no class folders") as e:
        scan_image_folder(tmp_path / "flat")
    assert "3 files directly" in str(e.value) and "move them into a sub-folder" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        scan_image_folder(tmp_path / "empty")
    assert scan_image_folder(tmp_path / "flat", require_classes=False).samples == []


def test_class_folder_with_only_junk_names_folder_and_reasons(tmp_path: Path) -> None:
    root = small_folder(tmp_path / "d")
    (root / "junk").mkdir()
    (root / "junk" / "a.jpg").write_text("html error page")
    (root / "junk" / "b.jpg").write_bytes(b"\x00\x05\x16\x07")
    truncated_jpeg(root / "junk" / "c.jpg")
    (root / "void").mkdir()
    with pytest.raises(DataError) as e:
        scan_image_folder(root)
    msg = str(e.value)
    assert f"{root / 'junk'}: 3 files, all rejected: 2 not an image, 1 truncated" in msg
    assert f"{root / 'void'}: the folder is empty" in msg
    assert "2 class folders have no usable images" in msg

    scan = scan_image_folder(root, require_classes=False)
    assert scan.classes == ["a", "b"]
    reasons = dict(scan.skipped)
    assert reasons[str(root / "junk")] == "no usable images: 3 files, all rejected: 2 not an image, 1 truncated"
    assert reasons[str(root / "void")] == "no usable images: the folder is empty"


def test_symlink_loop_is_not_followed_forever(tmp_path: Path) -> None:
    root = small_folder(tmp_path / "d")
    os.symlink(root / "a", root / "a" / "again")
    scan = scan_image_folder(root)
    assert scan.class_counts() == {"a": 3, "b": 3}
    assert reason_kind(dict(scan.skipped)[str(root / "a" / "again")]) == "duplicate"


def test_decompression_bomb_limit_follows_pillow_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = small_folder(tmp_path / "d")
    save(photo().resize((200, 100)), root / "a" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # 200x100 = 20,000 > 2 x 5,000
    (reason,) = dict(scan_image_folder(root).skipped).values()
    assert reason_kind(reason) == "too large (decompression bomb)"


def test_an_image_over_pillows_pixel_limit_is_left_out_and_reported_not_decoded_every_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = small_folder(tmp_path / "d")
    save(photo().resize((200, 100)), root / "a" / "big.png")
    # 20,000 px is 1.3x the limit: Pillow itself only warns there (DecompressionBombWarning) and decodes it anyway
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15_000)
    decoded: list[object] = []
    monkeypatch.setattr(scan_mod, "to_rgb", lambda im, **kw: decoded.append(im))
    scan = scan_image_folder(root, num_workers=0)
    reason = dict(scan.skipped)[str(root / "a" / "big.png")]
    assert reason == "too large (decompression bomb): 200x100 = 20,000 px, over PIL.Image.MAX_IMAGE_PIXELS = 15,000"
    assert len(decoded) == 6 and scan.class_counts() == {"a": 3, "b": 3}  # decided from the header: never decoded
    report = tmp_path / "report.tsv"
    write_scan_report({"all": scan}, report)
    assert "big.png\ttoo large (decompression bomb)" in report.read_text()


class CountingCheck:
    def __init__(self) -> None:
        self.paths: list[str] = []
        self.real = scan_mod.check_image

    def __call__(self, path: str) -> str | None:
        self.paths.append(path)
        return self.real(path)


def test_cache_skips_unchanged_files_and_rechecks_changed_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = small_folder(tmp_path / "d")
    cache_dir = tmp_path / "cache"
    check = CountingCheck()
    monkeypatch.setattr(scan_mod, "check_image", check)

    first = scan_image_folder(root, cache_dir=cache_dir, num_workers=2)
    assert len(check.paths) == 6
    assert len(list(cache_dir.glob("scan-*.json"))) == 1

    check.paths.clear()
    assert scan_image_folder(root, cache_dir=cache_dir, num_workers=2) == first
    assert check.paths == []

    changed = root / "a" / "1.jpg"
    truncated_jpeg(changed)  # same name, new content: must not be served from the cache
    second = scan_image_folder(root, cache_dir=cache_dir, num_workers=2)
    assert check.paths == [str(changed)]
    assert dict(second.skipped) == {str(changed): "truncated"}

    check.paths.clear()
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched, same size
    scan_image_folder(root, cache_dir=cache_dir, num_workers=2)
    assert check.paths == [str(changed)]


def test_cache_is_dropped_when_pillow_limit_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = small_folder(tmp_path / "d")
    scan_image_folder(root, cache_dir=tmp_path / "cache")
    check = CountingCheck()
    monkeypatch.setattr(scan_mod, "check_image", check)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**9)
    scan_image_folder(root, cache_dir=tmp_path / "cache")
    assert len(check.paths) == 6


def test_corrupt_cache_file_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = small_folder(tmp_path / "d")
    scan_image_folder(root, cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").glob("scan-*.json")
    cache_file.write_text("{not json")
    assert len(scan_image_folder(root, cache_dir=tmp_path / "cache").samples) == 6
    assert "ignoring unreadable scan cache" in caplog.text
    assert len(json.loads(cache_file.read_text())["files"]) == 6  # rewritten whole


@pytest.mark.parametrize("message", ["image file is truncated (3 bytes not processed)", "Truncated File Read"])
def test_both_pillow_truncation_messages_are_reported_as_truncated(message: str) -> None:
    assert failure_reason(OSError(message)) == "truncated"
