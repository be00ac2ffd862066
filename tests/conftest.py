"""Fixtures that let every test run offline on 2 CPU cores: fake pretrained weights, tiny image folders, fake CIFAR.

Each one exercises the real code path (torchvision's weight loading, CIFAR10(download=True), our image-folder module)
with files we make, as described in shared/GUIDE.md section 7.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from support import make_fake_cifar, make_image_folder, seed_hf_cache

from image_finetune.core.cli import compose_config

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers (pytest -n 2) on this 2-core machine: one compute thread each, for the workers and
    # the train.py subprocesses they start, instead of four threads fighting over two cores. Tiny 32 px models gain
    # little from a second thread; the second worker overlaps the imports and waits of the subprocess tests.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any download attempt fails at once, as it would offline: tests never touch the network."""

    def refuse(url: str, *args: object, **kwargs: object) -> None:
        raise URLError(f"tests are offline (refused {url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # for subprocesses
    try:
        from huggingface_hub import constants  # timm's hub client (the optional `timm` extra)
    except ImportError:
        return
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set the constant for this process.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face hub cache holding random weights of ``TIMM_MODEL`` under its real repo and file name."""
    pytest.importorskip("timm")
    return seed_hf_cache(tmp_path_factory.mktemp("hf_hub_cache"))


@pytest.fixture
def timm_pretrained(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make ``timm_backbone(TIMM_MODEL, weights="DEFAULT")`` find the seeded file, through timm's real loading code."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    return hf_cache


@pytest.fixture(scope="session")
def hub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torch hub cache holding randomly initialised ResNet-18/50 weights under their official file names."""
    root = tmp_path_factory.mktemp("torch_home")
    checkpoints = root / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name, weights in (("resnet18", "IMAGENET1K_V1"), ("resnet50", "IMAGENET1K_V2")):
        enum = torchvision.models.get_model_weights(name)[weights]
        torch.manual_seed(0)
        torch.save(torchvision.models.get_model(name).state_dict(), checkpoints / os.path.basename(enum.url))
    return root


@pytest.fixture
def pretrained(hub_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make ``weights=DEFAULT`` find the seeded files, through torchvision's real loading code."""
    monkeypatch.setenv("TORCH_HOME", str(hub_dir))
    return hub_dir


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache: pretrained weights cannot be had."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    return tmp_path / "empty_torch_home"


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Tiny CIFAR-10 batches in the real format; the integrity check passes so ``download=True`` uses them."""
    root = make_fake_cifar(tmp_path / "cifar")
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    return root


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """Compose ``configs/<name>.yaml`` with overrides, with every path the run writes under ``tmp_path``."""

    def _compose(*overrides: str, config_name: str = "train", output_dir: Path | None = None) -> DictConfig:
        paths = [f"paths.root_dir={REPO}", f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}"]
        return compose_config(CONFIGS, config_name, [*paths, *overrides], output_dir or tmp_path / "run")

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``paths.data_dir`` whose digits folder is written once per session (subprocess tests share it)."""
    from image_finetune.data.digits import write_digits_folder

    data_dir = tmp_path_factory.mktemp("data")
    write_digits_folder(data_dir / "digits")
    return data_dir
