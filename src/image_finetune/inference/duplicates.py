"""Near duplicates by perceptual hash: copies that were resized, re-encoded or mirrored, which embeddings miss.

cleanlab's near-duplicate check compares embeddings within a radius (0.13 x the median nearest-neighbour distance):
byte copies are found, but a resized, re-compressed or mirrored copy lands further away than that in the embedding of
a small network (benchmarks/README.md "Finding wrong labels and leaks"). A perceptual hash compares the pictures
themselves: the image as grey levels at 32 x 32, its 2-D DCT, and one bit per low frequency (the top-left 8 x 8
coefficients above their median), so resizing and JPEG noise, which change high frequencies, flip few bits. The mirror
image is hashed too (also moved by one pixel, for the centre crop's rounding), so a flipped copy matches. Two images whose hashes differ in at most ``max_bits`` of 64 are near
duplicates. Written with torch (the decoded batches are tensors already) rather than the ``imagehash`` package, which
is not a dependency and hashes one PIL image at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

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
    """``(B, C, H, W)`` images (uint8 or float, 1 or 3 channels) -> ``(B, 4, 64)`` bool: the pHash of each image, of its
    mirror image, and of the mirror shifted one pixel left and right. The shifted ones are there because an eval
    transform's centre crop is off by one pixel when the margin is odd (``Resize(37)`` + ``CenterCrop(32)`` keeps 2
    pixels on the left and 3 on the right), so a mirrored file, once cropped, is the mirror image moved by one pixel."""
    x = images.float()
    grey = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2] if x.shape[1] == 3 else x.mean(dim=1)
    mirror = grey.flip(-1)
    padded = F.pad(mirror, (1, 1), mode="replicate")  # (B, H, W + 2)
    variants = torch.stack([grey, mirror, padded[..., :-2], padded[..., 2:]], dim=1)
    small = F.interpolate(variants, size=(SIDE, SIDE), mode="bilinear", antialias=True, align_corners=False)
    d = dct_matrix(SIDE).to(small.device)
    low = (d @ small @ d.T)[..., :LOW, :LOW].flatten(-2)
    return low > low.median(dim=-1, keepdim=True).values


def hamming(hashes: np.ndarray, block: int = 1024) -> Iterable[tuple[int, np.ndarray]]:
    """Blocks of the pairwise distance: the fewest bits in which image ``a``'s hash differs from any of ``b``'s (itself,
    its mirror, shifted mirrors), as ``(first row, rows x N)`` int arrays, so memory stays ``block x N``."""
    plain = torch.from_numpy(hashes[:, 0]).float()
    variants = [torch.from_numpy(hashes[:, v]).float() for v in range(hashes.shape[1])]
    for start in range(0, len(hashes), block):
        q = plain[start : start + block]
        same = torch.stack([q @ v.T + (1 - q) @ (1 - v).T for v in variants]).amax(dim=0)
        yield start, (BITS - same).round().int().numpy()


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
