"""The benchmark scripts the README quotes still run and print what it says they print (speed is not asserted here)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_data_pipeline_benchmark_prints_every_column(tmp_path: Path) -> None:
    out = run("benchmarks/data_pipeline.py", "--root", str(tmp_path), "--n", "192", "--batch-size", "32", "--batches", "2",
              "--warmup", "1", "--repeats", "1", "--workers", "0", "2", "--device-decode", "cpu")  # fmt: skip
    assert "camera: data.cache=auto keeps resized copies (median short side 1200 px)" in out
    assert "imagenet: data.cache=auto reads the originals (median short side 375 px)" in out
    first_table = out.split("data.decode=gpu on")[0]
    rows = [line for line in first_table.splitlines() if line.startswith(("| camera", "| imagenet"))]  # the final table
    assert [row.split(" | ")[1:3] for row in rows] == [[mode, w] for mode in ("train", "eval") for w in ("0", "2")] * 2
    for row in rows:
        ratios = re.findall(r"(\d+\.\d\d)x", row)
        assert len(ratios) == (3 if row.startswith("| camera") else 1) and all(float(r) > 0 for r in ratios)
    assert len(list((tmp_path / "camera").rglob("*.jpg"))) == 192
    # data.decode=gpu's own table (here the CPU decoder stands in for nvJPEG): training crops, per worker count
    assert "data.decode=gpu on cpu (the CPU decoder standing in for nvJPEG)" in out
    device_rows = re.findall(
        r"^\| (camera|imagenet) \S+ \| train \| (\d) \| [\d,]+ \| [\d,]+ \| (\d+\.\d\d)x \|$", out, re.M
    )
    assert [(size, workers) for size, workers, _ in device_rows[-4:]] == [
        (size, w) for size in ("camera", "imagenet") for w in ("0", "2")
    ]
    assert all(float(ratio) > 0 for _, _, ratio in device_rows)


@pytest.mark.slow
def test_train_throughput_benchmark_times_both_phases(tmp_path: Path) -> None:
    out = run("benchmarks/train_throughput.py", "--fake-weights", "--warmup", "2", "--json", str(tmp_path / "t.json"),
              "experiment=digits", f"paths.data_dir={tmp_path / 'data'}", "trainer.max_epochs=3",
              "trainer.limit_train_batches=5", "trainer.limit_val_batches=2")  # fmt: skip
    result = json.loads((tmp_path / "t.json").read_text())
    assert [phase["backbone_frozen"] for phase in result["phases"]] == [True, False]
    # 1 frozen epoch, then 2 unfrozen: the clock restarts after each validation, and only the warm-up is left out
    assert [phase["steps_timed"] for phase in result["phases"]] == [5 - 2, 2 * 5 - 2]
    assert all(
        0 < phase["seconds_timed"] < phase["fit_seconds"] and phase["images_per_s"] > 0 for phase in result["phases"]
    )
    assert '"images_per_s"' in out


@pytest.mark.slow
def test_train_throughput_baseline_prints_template_over_plain_per_phase(tmp_path: Path) -> None:
    """``--baseline`` times a plain PyTorch loop next to the template, in ABBA order over ``--repeats`` rounds, on the
    same steps, and prints the ratio per phase (not its value)."""
    out = run("benchmarks/train_throughput.py", "--baseline", "--repeats", "2", "--fake-weights", "--warmup", "1",
              "--json", str(tmp_path / "t.json"),
              "experiment=digits", f"paths.data_dir={tmp_path / 'data'}", "trainer=cpu", "trainer.max_epochs=2",
              "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "data.batch_size=8", "data.num_workers=0",
              "data.image_size=16", "~callbacks.model_summary", "~callbacks.progress_bar")  # fmt: skip
    rows = re.findall(
        r"^\| eager \| (frozen|unfrozen) \| ([\d,.]+) \| ([\d,.]+) \| ratio (\d+\.\d{3}) \| [\d.]+-[\d.]+ \| [\d,.]+ / [\d,.]+ \|$",
        out,
        re.MULTILINE,
    )
    assert [row[0] for row in rows] == ["frozen", "unfrozen"]
    result = json.loads((tmp_path / "t.json").read_text())
    assert [entry["order"] for entry in result["rounds"]] == ["template first", "plain first"]
    for entry in result["rounds"]:
        steps = [(p["backbone_frozen"], p["steps_timed"]) for p in entry["plain"]["phases"]]
        assert steps == [(True, 3 - 1), (False, 3 - 1)]  # as the template's
    plain = result["rounds"][0]["plain"]["phases"]
    for (_, template, plain_rate, ratio), _phase in zip(rows, plain):
        assert float(plain_rate.replace(",", "")) > 0 and float(ratio) > 0
        assert abs(float(template.replace(",", "")) / float(plain_rate.replace(",", "")) - float(ratio)) < 0.05 * float(
            ratio
        )
