"""The console prints each line once: with stdout piped to a file, Lightning's log lines appear in the run's format
only (not also through Lightning's own ``INFO: ...`` handler), and a short epoch draws no ``log_every_n_steps``
warning. Driven as a user runs the scripts: subprocesses, stdout and stderr into one file."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Fewer training batches (2) than trainer.log_every_n_steps (10, configs/trainer/default.yaml): the warning's case.
TINY = [
    "data=digits",
    "trainer=cpu",
    "model.backbone.weights=null",
    "data.image_size=32",
    "data.num_workers=0",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]
#: ``[2026-01-01 12:00:00,000][logger][INFO] - message``: Hydra's format, whose time stamp would hide a repeat.
HYDRA_PREFIX = re.compile(r"^\[[^\]]+\]\[[^\]]+\]\[[A-Z]+\] - ")
#: Messages that are said once per fit (train.py fits twice: frozen, then unfrozen).
ONCE_PER_FIT = ("`Trainer.fit` stopped",)


def run_logged(script: str, *args: str, log: Path) -> str:
    """``python script args > log 2>&1``; the log's text, after asserting the run succeeded."""
    with open(log, "w") as out:
        result = subprocess.run(
            [sys.executable, script, *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=600, env=os.environ
        )
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    assert "Traceback" not in text
    return text


def messages(text: str) -> list[str]:
    """The log's lines with the run's log prefix (time, logger, level) and Lightning's own ``INFO: `` prefix taken
    off, so the same record printed by two handlers reads as the same message."""
    lines = [re.sub(r"^(INFO|WARNING|ERROR): ", "", HYDRA_PREFIX.sub("", line)) for line in text.splitlines()]
    return [line for line in lines if line.strip()]


def repeated(text: str) -> dict[str, int]:
    """Messages printed more than once (``ONCE_PER_FIT`` ones aside)."""
    counts = Counter(m for m in messages(text) if not m.startswith(ONCE_PER_FIT))
    return {message: n for message, n in counts.items() if n > 1}


def printed_twice_in_a_row(text: str) -> list[str]:
    """Messages printed twice in a row: one record through two handlers (a script that builds several Trainers,
    as lr_find.py does, says "GPU available" once per Trainer, but never twice in a row)."""
    said = messages(text)
    return [line for line, after in itertools.pairwise(said) if line == after]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, digits_data_dir: Path) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("console") / "run"
    args = [*TINY, "trainer.max_epochs=1", f"paths.data_dir={digits_data_dir}", f"hydra.run.dir={run_dir}"]
    return run_dir, run_logged("train.py", *args, log=run_dir.parent / "train.txt")


def test_train_prints_each_line_once(trained):
    _, text = trained
    assert repeated(text) == {} and printed_twice_in_a_row(text) == []
    assert text.count("Seed set to") == 1
    assert not re.search(r"^INFO: ", text, re.MULTILINE), "Lightning's own handler printed"
    assert "log_every_n_steps" not in text
    assert "Run summary" in text  # the run did print (an empty log would pass the checks above)


def test_eval_prints_each_line_once(trained):
    run_dir, _ = trained
    args = [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "trainer=cpu", "trainer.limit_test_batches=2"]
    text = run_logged("eval.py", *args, f"hydra.run.dir={run_dir.parent / 'eval'}", log=run_dir.parent / "eval.txt")
    assert repeated(text) == {}
    assert not re.search(r"^INFO: ", text, re.MULTILINE), "Lightning's own handler printed"
    assert (run_dir.parent / "eval" / "metrics.json").is_file()


def test_lr_find_prints_each_line_once(trained, digits_data_dir):
    run_dir, _ = trained
    out = run_dir.parent / "lr_find"
    args = [*TINY, "trainer.max_epochs=2", "lr_find.num_steps=10", f"paths.data_dir={digits_data_dir}"]
    text = run_logged("lr_find.py", *args, f"hydra.run.dir={out}", log=run_dir.parent / "lr_find.txt")
    assert printed_twice_in_a_row(text) == []
    assert not re.search(r"^INFO: ", text, re.MULTILINE), "Lightning's own handler printed"
    assert "log_every_n_steps" not in text
    assert (out / "lr_find.json").is_file()
