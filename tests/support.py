"""Shared test settings and data builders (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Fast settings for every composed run: tiny images, few batches, no worker processes.
FAST = [
    "trainer=cpu",
    "trainer.log_every_n_steps=1",
    "data.num_workers=0",
    "data.image_size=32",
    "data.batch_size=16",
    "++trainer.enable_model_summary=false",
    "++trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
]


def make_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 24, seed: int = 0) -> Path:
    """Small, learnable JPEG/PNG class folders: each class is a different colour with noise."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array([255 * (c == k % 3) for k in range(3)], dtype=np.float64) * 0.7 + 40 * (c // 3)
        for i in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(pixels).save(folder / f"img_{i:03d}{suffix}")
    return root


#: A tiny timm model (99k parameters, BatchNormAct2d norm layers) with real pretrained weights on the hub.
TIMM_MODEL = "test_efficientnet.r160_in1k"


def seed_hf_cache(cache: Path, model_name: str = TIMM_MODEL) -> Path:
    """Write randomly initialised weights of ``model_name`` where timm's hub loader finds them offline.

    The layout is huggingface_hub's cache (what ``hf_hub_download`` reads with ``HF_HUB_OFFLINE=1``):
    ``models--timm--<name>/refs/main`` holds a commit id, ``snapshots/<commit>/model.safetensors`` the weights
    (timm asks for ``model.safetensors`` first, see ``timm.models._hub.load_state_dict_from_hf``).
    """
    import timm
    from safetensors.torch import save_file

    repo = timm.create_model(model_name, pretrained=False).pretrained_cfg["hf_hub_id"]
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = timm.create_model(model_name, pretrained=False).state_dict()  # with its classifier, as published
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return cache
