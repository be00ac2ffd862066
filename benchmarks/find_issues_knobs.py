"""The knobs of ``find_issues.py`` on a ``label_noise.py`` run: the hash threshold, cosine thresholds, the classifier.

    python benchmarks/label_noise.py --work /tmp/label_noise                 # once: builds, trains, find_issues
    python benchmarks/find_issues_knobs.py --work /tmp/label_noise           # the tables in benchmarks/README.md
    python benchmarks/find_issues_knobs.py --work /tmp/label_noise --all-digits /tmp/fi/label_noise

No training: it reads the work folder's ``images/`` and ``train/checkpoints/last.ckpt`` (one pass of the checkpoint's
backbone over the images, as ``find_issues.py`` makes it: embeddings, mirrored embeddings and perceptual hashes) and
prints three markdown tables (benchmarks/README.md "Finding wrong labels and leaks"):

1. ``near_duplicate_bits`` 0-8: planted copies found per kind, and false groups (two or more real scans in one group),
   on this folder and on an all-ten-digits folder (``--all-digits DIR``: the ``images/`` of a ``label_noise.py
   --backbone scratch`` work folder; built there, with no training, when it is missing). The hash needs no network:
   the all-ten-digits images are read through the same checkpoint's eval preprocessing (``data=imagefolder``).
2. Cosine similarity of the L2-normalised symmetric embeddings (what cleanlab compares) with a fixed threshold.
3. The cross-validated classifier behind the label check: features x scaling x C (CV seed 42, ``find_issues.py``'s),
   and the default against the best variant over CV seeds 42, 0, 1, 2.

What is planted is read from the files, not from a random generator: a copy is ``train/<class>/copy_<kind>_<stem>.*``
of ``test/<class>/<stem>.png``; a scan is mislabelled when its class folder is not the one it has in the digits folder
(``<work>/cache/digits/<digit>/<stem>.png``, ``data.digits.write_digits_folder``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from label_noise import KINDS, build_folder  # noqa: E402

from image_finetune.inference.data_issues import DEFAULT_HASH_BITS, embed, load_images, run_datalab  # noqa: E402
from image_finetune.inference.duplicates import (  # noqa: E402
    connected_groups,
    near_duplicate_pairs,
    perceptual_hashes,
)

HASH_BITS = (0, 2, 4, 6, 8)
COSINES = (0.95, 0.99, 0.995, 0.999)
SCALINGS = ("standardised", "L2-normalised", "none")
CS = (1.0, 0.1, 0.01)
CV_SEED = 42  # find_issues.py's seed
OTHER_SEEDS = (0, 1, 2)
BEST = ("symmetric", "standardised", 0.01)  # the variant compared with the default over CV seeds


def planted_pairs(paths: Sequence[str]) -> list[tuple[str, int, int]]:
    """``(kind, original index, copy index)`` of every planted copy among ``paths`` (label_noise.py's names)."""
    index = {p: i for i, p in enumerate(paths)}
    pairs = []
    for i, p in enumerate(paths):
        path = Path(p)
        if path.name.startswith("copy_"):
            _, kind, stem = path.stem.split("_", 2)
            original = path.parents[2] / "test" / path.parent.name / f"{stem}.png"
            pairs.append((kind, index[str(original)], i))
    return pairs


def is_real(paths: Sequence[str]) -> np.ndarray:
    """True for a scan, False for a planted copy."""
    return np.array([not Path(p).name.startswith("copy_") for p in paths])


def mislabelled(paths: Sequence[str], digits: Path) -> np.ndarray:
    """True where a scan's class folder is not its digit in the digits folder label_noise.py copied it from."""
    truth = {p.name: p.parent.name for p in digits.glob("*/*.png")}
    return np.array([Path(p).name in truth and truth[Path(p).name] != Path(p).parent.name for p in paths])


def group_scores(groups: list[list[int]], pairs: list[tuple[str, int, int]], real: np.ndarray) -> tuple[dict, int, int]:
    """Planted pairs found in one group, per kind; false groups (>= 2 real scans); the biggest group's size."""
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    found = {k: sum(group_of.get(a, -1) == group_of.get(b, -2) for kind, a, b in pairs if kind == k) for k in KINDS}
    false = sum(int(real[g].sum() >= 2) for g in groups)
    return found, false, max((len(g) for g in groups), default=0)


def hash_rows(hashes: np.ndarray, paths: Sequence[str]) -> dict[int, tuple[dict, int, int]]:
    pairs, real = planted_pairs(paths), is_real(paths)
    return {
        b: group_scores(connected_groups(len(paths), near_duplicate_pairs(hashes, b)), pairs, real) for b in HASH_BITS
    }


def cosine_rows(embeddings: np.ndarray, paths: Sequence[str]) -> dict[float, tuple[dict, int, int]]:
    pairs, real = planted_pairs(paths), is_real(paths)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = unit @ unit.T
    rows = {}
    for threshold in COSINES:
        i, j = np.nonzero(np.triu(similarity >= threshold, 1))
        rows[threshold] = group_scores(connected_groups(len(paths), zip(i, j)), pairs, real)
    return rows


def label_score(
    features: np.ndarray,
    symmetric: np.ndarray,
    labels: np.ndarray,
    wrong: np.ndarray,
    scaling: str,
    c: float,
    seed: int,
) -> tuple[int, int]:
    """Flagged images and how many of them are mislabelled: ``find_issues.py``'s label check (Datalab on the symmetric
    embeddings) with the cross-validated probabilities of one classifier variant."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    steps = {"standardised": [StandardScaler()], "L2-normalised": [Normalizer()], "none": []}[scaling]
    classifier = make_pipeline(*steps, LogisticRegression(max_iter=1000, C=c))
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    probs = cross_val_predict(classifier, features, labels, cv=cv, method="predict_proba")
    with contextlib.redirect_stdout(io.StringIO()):
        flagged = run_datalab(labels, probs, symmetric).get_issues("label")["is_label_issue"].to_numpy()
    return int(flagged.sum()), int((flagged & wrong).sum())


def read_folder(ckpt: Path, cache: Path, root: Path | None = None) -> tuple:
    """``load_images`` as ``find_issues.py`` calls it: the checkpoint's own data, or ``root`` (``data=imagefolder``)
    at the checkpoint's preprocessing."""
    overrides = [f"ckpt_path={ckpt}", f"paths.root_dir={REPO}", f"paths.data_dir={cache}"]
    if root is not None:
        overrides += ["data=imagefolder", f"data.root={root}", "data.image_size=32", "data.num_workers=0"]
    with tempfile.TemporaryDirectory() as out, initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("find_issues", overrides=[*overrides, f"paths.output_dir={out}", f"paths.log_dir={out}"])
        return load_images(cfg, str(ckpt))


def fmt_found(found: dict) -> str:
    return " / ".join(str(found[k]) for k in ("exact", "resized", "jpeg", "flipped"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/label_noise"), help="a label_noise.py work folder")
    parser.add_argument("--all-digits", type=Path, help="a label_noise.py --backbone scratch work folder (images/)")
    parser.add_argument("--skip-labels", action="store_true", help="only the hash and cosine tables")
    args = parser.parse_args()
    ckpt = args.work / "train" / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        sys.exit(f"{ckpt}: no checkpoint; run python benchmarks/label_noise.py --work {args.work} first")
    stamp = json.loads((args.work / "train" / "benchmark_args.json").read_text())
    print(f"read {args.work / 'images'} with {ckpt} ({stamp})")
    net, images, dataset = read_folder(ckpt, args.work / "cache")
    features, symmetric, hashes, _ = embed(net, dataset, 64, 0, torch.device("cpu"))
    paths = images.paths
    wrong = mislabelled(paths, args.work / "cache" / "digits")
    print(f"{len(paths)} files: {int(is_real(paths).sum())} scans ({int(wrong.sum())} mislabelled) + "
          f"{len(planted_pairs(paths))} planted copies")  # fmt: skip

    hash_tables = [hash_rows(hashes, paths)]
    titles = ["5-9" if stamp.get("backbone") == "pretrained" else "0-9"]
    if args.all_digits is not None:
        root = args.all_digits / "images"
        if not root.is_dir():
            print(f"{root} is missing: building it (all ten digits, {stamp}; no training)")
            build_folder(root, args.work / "cache", stamp["noise"], stamp["copies"], stamp["seed"], first_class=0)
        _, all_images, all_dataset = read_folder(ckpt, args.work / "cache", root)
        all_hashes = embed_hashes(all_dataset)
        print(f"read {root} ({len(all_images.paths)} files) at {ckpt}'s eval preprocessing, hashes only")
        hash_tables.insert(0, hash_rows(all_hashes, all_images.paths))
        titles.insert(0, "0-9")

    print("\n| `near_duplicate_bits` | " + " | ".join(f"{t}: exact / resized / JPEG / mirrored found | {t}: false groups "
          "(biggest group)" for t in titles) + " |")  # fmt: skip
    print("|---|" + "---|---|" * len(titles))
    for bits in HASH_BITS:
        cells = [f"{fmt_found(f)} | {false} ({big})" for f, false, big in (t[bits] for t in hash_tables)]
        name = f"**{bits} (default)**" if bits == DEFAULT_HASH_BITS else str(bits)
        print(f"| {name} | " + " | ".join(cells) + " |")

    print("\n| cosine >= | exact / resized / JPEG / mirrored found | false groups (biggest group) |\n|---|---|---|")
    for threshold, (found, false, big) in cosine_rows(symmetric, paths).items():
        print(f"| {threshold} | {fmt_found(found)} | {false} ({big}) |")
    plain_found = cosine_rows(features, paths)
    print(
        "plain embeddings, mirrored copies found: "
        + ", ".join(f"{t}: {r[0]['flipped']}" for t, r in plain_found.items())
    )
    if args.skip_labels:
        return

    n_wrong = int(wrong.sum())
    print("\n| features | scaling | C | flagged | precision | recall |\n|---|---|---|---|---|---|")
    for name, x in (("plain", features), ("symmetric", symmetric)):
        for scaling in SCALINGS:
            scores = [label_score(x, symmetric, images.labels, wrong, scaling, c, CV_SEED) for c in CS]
            default = name == "plain" and scaling == "standardised"  # find_issues.py's classifier, C=1.0 (CS[0])
            print(f"| {name}{' (**default**)' * default} | {scaling}{' (**default**)' * default} | "
                  f"{' / '.join(f'**{c}**' if default and c == 1.0 else str(c) for c in CS)} | "
                  f"{' / '.join(str(n) for n, _ in scores)} | "
                  f"{' / '.join(f'{h / max(1, n):.2f}' for n, h in scores)} | "
                  f"{' / '.join(f'{h / n_wrong:.2f}' for _, h in scores)} |", flush=True)  # fmt: skip
    for name, x, scaling, c in (("plain", features, "standardised", 1.0), (BEST[0], symmetric, BEST[1], BEST[2])):
        scores = [label_score(x, symmetric, images.labels, wrong, scaling, c, s) for s in (CV_SEED, *OTHER_SEEDS)]
        print(f"{name} + {scaling} + C={c} over CV seeds {CV_SEED}, {', '.join(map(str, OTHER_SEEDS))}: precision "
              f"{' / '.join(f'{h / max(1, n):.2f}' for n, h in scores)}, recall "
              f"{' / '.join(f'{h / n_wrong:.2f}' for _, h in scores)}", flush=True)  # fmt: skip


def embed_hashes(dataset: torch.utils.data.Dataset) -> np.ndarray:
    """Only the perceptual hashes of a dataset (no network), batch by batch as ``embed`` makes them."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=0)
    return torch.cat([perceptual_hashes(x) for x, _ in loader]).numpy()


if __name__ == "__main__":
    main()
