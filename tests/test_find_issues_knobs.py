"""benchmarks/find_issues_knobs.py reads what label_noise.py planted from the files alone (no seed replayed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import find_issues_knobs as knobs  # noqa: E402
from label_noise import build_folder  # noqa: E402

from image_finetune.inference.duplicates import perceptual_hashes  # noqa: E402


def test_planted_copies_and_wrong_labels_are_read_from_the_folder(tmp_path: Path) -> None:
    swapped, pairs = build_folder(tmp_path / "images", tmp_path / "cache", 0.05, 2, 0, first_class=8)
    paths = sorted(str(p) for p in (tmp_path / "images").rglob("*") if p.is_file())
    wrong = knobs.mislabelled(paths, tmp_path / "cache" / "digits")
    assert {p for p, w in zip(paths, wrong) if w} == swapped and swapped
    found = {(kind, paths[a], paths[b]) for kind, a, b in knobs.planted_pairs(paths)}
    assert found == {(p["kind"], p["original"], p["copy"]) for p in pairs}
    assert knobs.is_real(paths).sum() == len(paths) - len(pairs)
    grey = [np.asarray(Image.open(p).convert("L").resize((8, 8))) for p in paths]
    hashes = perceptual_hashes(torch.from_numpy(np.stack(grey))[:, None]).numpy()
    found_per_kind, _, biggest = knobs.hash_rows(hashes, paths)[0]
    assert found_per_kind["exact"] == 2 and biggest >= 2
