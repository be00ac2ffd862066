"""One tiny model, trained once per test session and shared by the eval, predict and export tests.

Test modules use it with ``pytest_plugins = ["trained"]``: registered once, and trained by whichever pytest-xdist worker
asks first (``shared_runs.once_per_session``), so the model is trained once per session, not once per worker.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest
from omegaconf import DictConfig
from shared_runs import once_per_session
from support import FAST, make_image_folder

from image_finetune.inference.classifier import Classifier
from image_finetune.training.train import train


@dataclass(frozen=True)
class TrainedModel:
    checkpoint: Path
    images: Path  # the generated class folders it was trained on (a quarter of each class is its test split)
    metrics: dict

    @cached_property
    def classifier(self) -> Classifier:
        """Loaded once: building the network is most of the cost of a short test."""
        return Classifier.from_checkpoint(self.checkpoint, device="cpu")


_CACHE: list[TrainedModel] = []


@pytest.fixture
def trained(
    compose_cfg: Callable[..., DictConfig], pretrained: Path, tmp_path_factory: pytest.TempPathFactory
) -> TrainedModel:
    """ResNet-18 (seeded fake "pretrained" weights) fine-tuned for 2 short epochs on 3 colour classes, 32 px.

    Function-scoped because ``compose_cfg`` and ``pretrained`` are, but trained only on first use: a whole training
    run per test module would cost more than every test that uses it.
    """
    if not _CACHE:

        def build(root: Path) -> None:
            images = make_image_folder(root / "images", classes=3, per_class=16)
            cfg = compose_cfg(
                "data=imagefolder", f"data.root={images}", "data.test_fraction=0.25", "trainer.max_epochs=2",
                "logger=csv", *FAST, output_dir=root / "run",
            )  # fmt: skip
            (root / "train_metrics.json").write_text(json.dumps(train(cfg)))

        root = once_per_session(tmp_path_factory, "trained", build)
        metrics = json.loads((root / "train_metrics.json").read_text())
        _CACHE.append(TrainedModel(Path(metrics["best_checkpoint"]), root / "images", metrics))
    return _CACHE[0]
