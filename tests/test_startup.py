"""Starting is quick: ``--help``, ``--cfg job`` and a config error never import torch or Lightning (issue 13).

Not a timing test (the machine's load decides the seconds): it checks the cause of slowness, the heavy imports.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "torchvision", "torchmetrics")

# Runs an entry script as ``python <script> ARGS`` would, then reports which heavy modules got imported.
PROBE = """
import runpy, sys
script, sys.argv = sys.argv[1], sys.argv[1:]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exit:
    code = exit.code
print("HEAVY", ",".join(m for m in {heavy!r} if m in sys.modules), "EXIT", code)
"""


def probe(script: str, *args: str) -> tuple[list[str], str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), script, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    last = result.stdout.strip().splitlines()[-1].split()
    assert last[0] == "HEAVY", result.stdout[-2000:] + result.stderr[-2000:]
    heavy = last[1].split(",") if last[1] != "EXIT" else []
    return heavy, last[-1], result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "eval.py", "predict.py", "export.py"])
def test_entry_scripts_help_imports_neither_torch_nor_lightning(script):
    heavy, code, _ = probe(script, "--help")
    assert (heavy, code) == ([], "0")


@pytest.mark.slow
def test_train_cfg_job_and_a_config_error_import_neither_torch_nor_lightning(tmp_path):
    assert probe("train.py", "--cfg", "job")[:2] == ([], "0")
    # (Hydra makes the run dir and its train.log before the job runs: keep them out of the repo's logs/)
    heavy, code, stderr = probe("train.py", "data.batch_size=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert (heavy, code) == ([], "2")
    assert stderr.strip().splitlines() == [
        "error: data.batch_size=0 must be a positive number of images per batch (per device), e.g. data.batch_size=64"
    ]


def test_the_one_line_error_helper_is_import_light():
    code = (
        "import sys, image_finetune.core.cli, image_finetune.core.config_checks; "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.strip() == "[]"


def test_quick_help_lists_the_groups_and_options_hydra_finds_and_the_composed_config():
    """`--help` is ours (Hydra's lists options by composing every group, ~2 s here): the same groups and options."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    result = subprocess.run(
        [sys.executable, "train.py", "--help", "data=imagefolder"], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = result.stdout
    listed = dict(line.split(": ", 1) for line in text.split("== Config groups ==\n")[1].split("\n\n")[0].splitlines())
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(REPO / "configs")))
    for group, options in listed.items():
        if group.startswith("hydra/"):  # ours, beside the options Hydra's plugins bring
            ours = options.removesuffix(" (and Hydra's own, --hydra-help)").split(", ")
            assert set(ours) < set(loader.get_group_options(group)), group
        else:
            assert options.split(", ") == sorted(loader.get_group_options(group)), group
    assert {"model", "data", "augment", "finetune", "trainer", "hydra/launcher"} <= set(listed)
    assert "_target_: image_finetune.data.ImageFolderDataModule" in text.split("== Config ==")[1]  # the overrides apply
