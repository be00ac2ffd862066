"""The notebooks: stored without outputs, and they run top to bottom (headless, nbclient) on the digits data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from support import FAST

from image_finetune.data.digits import write_digits_folder
from image_finetune.training.train import train

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
KERNEL = "image-finetune-tests"


def test_both_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"explore_dataset.ipynb", "inspect_run.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name}: strip the outputs before committing"
            )


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernel spec that runs this interpreter (the venv's), whatever kernels the machine has installed."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def execute(path: Path, kernel: str) -> list[str]:
    """Run every cell from the repo root; returns each code cell's outputs as text (plus 'image/png' markers)."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name=kernel, timeout=120, resources={"metadata": {"path": str(REPO)}}).execute()
    texts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        parts = []
        for output in cell.outputs:
            parts.append(output.get("text", ""))
            parts.extend(data for data in output.get("data", {}) if data == "image/png")
            parts.append(output.get("data", {}).get("text/plain", ""))
        texts.append("".join(parts))
    return texts


@pytest.mark.usefixtures("pretrained")
def test_notebooks_run_on_the_digits_data_and_a_short_run(compose_cfg, kernel, tmp_path, monkeypatch):
    data_root = write_digits_folder(tmp_path / "data" / "digits")
    (data_root / "3" / "broken.png").write_bytes(b"not a png")  # things the scan must leave out, and say why
    (data_root / "notes.txt").write_text("not an image")
    cfg = compose_cfg("debug=limit", "finetune=full", "trainer.max_epochs=1", *FAST)
    assert Path(cfg.data.root) == data_root
    metrics = train(cfg)
    monkeypatch.setenv("DATA_ROOT", str(data_root))
    monkeypatch.setenv("SCAN_CACHE", str(tmp_path / "scan_cache"))
    monkeypatch.setenv("RUN_DIR", cfg.paths.output_dir)

    explore = execute(REPO / "notebooks" / "explore_dataset.ipynb", kernel)
    text = "\n".join(explore)
    assert "10 classes, 1,797 images" in text
    assert "3/broken.png  ->  not an image" in text and "notes.txt  ->  not in a class folder" in text
    assert "width 8-8 px, height 8-8 px" in text
    assert sum(out.count("image/png") for out in explore) >= 3  # class counts, sample grid, sizes

    inspect = execute(REPO / "notebooks" / "inspect_run.ipynb", kernel)
    text = "\n".join(inspect)
    assert f"checkpoint: {metrics['best_checkpoint']}" in text
    assert "resnet18, 10 classes, 32 px input" in text
    assert "test: 269 images, accuracy" in text
    assert sum(out.count("image/png") for out in inspect) >= 3  # confusion matrix, mistakes, new images
    assert inspect[-1].count("%") >= 8 * 3  # top-3 predictions for 8 images
