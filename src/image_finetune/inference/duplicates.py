"""Near duplicates by perceptual hash: copies that were resized, re-encoded or mirrored, which embeddings miss.

cleanlab's near-duplicate check compares embeddings within a radius (0.13 x the median nearest-neighbour distance):
byte copies are found, but a resized, re-compressed or mirrored copy lands further away than that in the embedding of
a small network (benchmarks/README.md "Finding wrong labels and leaks"). A perceptual hash compares the pictures
themselves: the image as grey levels at 32 x 32, its 2-D DCT, and one bit per low frequency (the top-left 8 x 8
coefficients above their median), so resizing and JPEG noise, which change high frequencies, flip few bits. The mirror
image is hashed too, so a flipped copy matches. Two images whose hashes differ in at most ``max_bits`` of 64 are near
duplicates. Written with torch (the decoded batches are tensors already) rather than the ``imagehash`` package, which
is not a dependency and hashes one PIL image at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

SIDE = 32  # the grey image the DCT is taken of
LOW = 8  # LOW x LOW low frequencies: 64 bits
BITS = LOW * LOW


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix: ``D @ x @ D.T`` is the 2-D DCT of an ``n x n`` ``x``."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(torch.pi * (2 * i + 1) * k / (2 * n)) * (2.0 / n) ** 0.5
    d[0] /= 2**0.5
    return d.float()


def perceptual_hashes(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` images (uint8 or float, 1 or 3 channels) -> ``(B, 2, 64)`` bool: the pHash of each image and of
    its mirror image."""
    x = images.float()
    if x.shape[1] == 3:
        grey = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    else:
        grey = x.mean(dim=1)
    grey = F.interpolate(grey[:, None], size=(SIDE, SIDE), mode="bilinear", antialias=True, align_corners=False)[:, 0]
    both = torch.stack([grey, grey.flip(-1)], dim=1)
    d = dct_matrix(SIDE).to(both.device)
    low = (d @ both @ d.T)[..., :LOW, :LOW].flatten(-2)
    return low > low.median(dim=-1, keepdim=True).values


def dataset_hashes(dataset: Dataset, batch_size: int = 64, num_workers: int = 0) -> np.ndarray:
    """``(N, 2, 64)`` hashes of a dataset of ``(image, label)`` pairs, as its transform delivers the images."""
    out = [
        perceptual_hashes(images) for images, _ in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, 2, BITS), dtype=bool)


def hamming(hashes: np.ndarray, block: int = 1024) -> Iterable[tuple[int, np.ndarray]]:
    """Blocks of the pairwise distance ``min(bits(a, b), bits(a, mirror b))``: ``(first row, rows x N)`` int arrays,
    so memory stays ``block x N`` however many images there are."""
    plain = torch.from_numpy(hashes[:, 0]).float()
    mirror = torch.from_numpy(hashes[:, 1]).float()
    for start in range(0, len(hashes), block):
        q = plain[start : start + block]
        same_plain = q @ plain.T + (1 - q) @ (1 - plain).T
        same_mirror = q @ mirror.T + (1 - q) @ (1 - mirror).T
        yield start, (BITS - torch.maximum(same_plain, same_mirror)).round().int().numpy()


def near_duplicate_pairs(hashes: np.ndarray, max_bits: int) -> list[tuple[int, int]]:
    """Every pair ``i < j`` whose hashes (either against the other's mirror) differ in at most ``max_bits`` bits."""
    pairs = []
    for start, distances in hamming(hashes):
        rows, cols = np.nonzero(distances <= max_bits)
        rows = rows + start
        keep = cols > rows
        pairs.extend(zip(rows[keep].tolist(), cols[keep].tolist()))
    return pairs


def connected_groups(n: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """The pairs merged into groups (connected components of more than one member), each sorted, by first member."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    linked = set()
    for i, j in pairs:
        parent[root(int(j))] = root(int(i))
        linked.update((int(i), int(j)))
    groups: dict[int, list[int]] = {}
    for i in sorted(linked):
        groups.setdefault(root(i), []).append(i)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def sets_to_pairs(near_duplicate_sets: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """cleanlab's per-image near-duplicate sets as pairs."""
    return [(i, int(j)) for i, others in enumerate(near_duplicate_sets) for j in others]
