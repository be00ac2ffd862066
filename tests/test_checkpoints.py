"""Every entry point reads checkpoints through one reader: a bad file is one line and exit code 2, never a traceback."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from image_finetune.checkpoints import read_checkpoint, resolve_ckpt_path
from image_finetune.core.errors import UserError
from image_finetune.models.classifier import ImageClassifier

pytest_plugins = ["trained"]  # the shared `trained` fixture

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bad_files(trained, tmp_path: Path) -> dict[str, Path]:
    good = trained.checkpoint.read_bytes()
    files = {
        "truncated": tmp_path / "truncated.ckpt",
        "random": tmp_path / "random.ckpt",
        "empty": tmp_path / "empty.ckpt",
        "folder": tmp_path / "folder.ckpt",
        "state_dict": tmp_path / "weights.pth",
        "pickled_code": tmp_path / "unsafe.ckpt",
    }
    files["truncated"].write_bytes(good[: len(good) // 2])
    files["random"].write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy().tobytes()
    )
    files["empty"].write_bytes(b"")
    files["folder"].mkdir()
    torch.save(torch.load(trained.checkpoint, weights_only=True)["state_dict"], files["state_dict"])
    unsafe = torch.load(trained.checkpoint, weights_only=True)
    unsafe["extra"] = ImageClassifier  # a class: fine for pickle, refused by weights_only=True
    torch.save(unsafe, files["pickled_code"])
    return files


EXPECTED = {
    "truncated": r"cannot be read: it is truncated or not a PyTorch checkpoint",
    "random": r"is not a PyTorch checkpoint \(it does not unpickle\)",
    "empty": r"cannot be read: it is truncated or not a PyTorch checkpoint",
    "folder": r"is a folder; give a checkpoint file",
    "state_dict": r"is not a Lightning checkpoint \(no state_dict\)",
    "pickled_code": r"holds Python objects that a safe load refuses",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_every_bad_checkpoint_file_is_one_clear_line(bad_files, kind):
    with pytest.raises(UserError, match=rf"^ckpt_path='.*{bad_files[kind].name}'.*{EXPECTED[kind]}") as info:
        read_checkpoint(bad_files[kind])
    assert "\n" not in str(info.value)


def test_resolving_last_without_a_checkpoint_is_an_error_never_a_fresh_start(tmp_path):
    with pytest.raises(
        UserError, match=r"ckpt_path='last': no checkpoint at .*checkpoints/last\.ckpt\. To resume a run"
    ):
        resolve_ckpt_path("last", tmp_path)


@pytest.mark.parametrize(
    ("script", "extra"),
    [("train.py", []), ("eval.py", []), ("predict.py", ["input=."]), ("export.py", ["format=onnx"])],
)
def test_entry_points_reject_a_truncated_checkpoint_with_one_line(
    bad_files, tmp_path, monkeypatch, capsys, script, extra
):
    """As a user runs them (in this process: a subprocess would spend seconds importing torch per script)."""
    argv = [script, f"ckpt_path={bad_files['truncated']}", *extra, f"hydra.run.dir={tmp_path / 'run'}"]
    monkeypatch.setattr(sys, "argv", argv)
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ckpt_path=") and "truncated or not a PyTorch checkpoint" in err[-1]
    assert not any("Traceback" in line for line in err)
