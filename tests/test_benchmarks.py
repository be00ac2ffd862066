"""The benchmark scripts the README quotes still run and print what it says they print (speed is not asserted here)."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # train_throughput and gpu_check, imported by the unit tests below


def run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_data_pipeline_benchmark_prints_every_column(tmp_path: Path) -> None:
    out = run("benchmarks/data_pipeline.py", "--root", str(tmp_path), "--n", "96", "--batch-size", "16", "--batches", "2",
              "--warmup", "1", "--repeats", "1", "--workers", "0", "2", "--device-decode", "cpu")  # fmt: skip
    assert "camera: data.cache=auto keeps resized copies (median short side 1200 px)" in out
    assert "imagenet: data.cache=auto reads the originals (median short side 375 px)" in out
    first_table = out.split("data.decode=gpu on")[0]
    rows = [line for line in first_table.splitlines() if line.startswith(("| camera", "| imagenet"))]  # the final table
    assert [row.split(" | ")[1:3] for row in rows] == [[mode, w] for mode in ("train", "eval") for w in ("0", "2")] * 2
    for row in rows:
        ratios = re.findall(r"(\d+\.\d\d)x", row)
        assert len(ratios) == (3 if row.startswith("| camera") else 1) and all(float(r) > 0 for r in ratios)
    assert len(list((tmp_path / "camera").rglob("*.jpg"))) == 96
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
    for frozen, template, plain_rate, ratio in rows:
        assert float(template.replace(",", "")) > 0 and float(plain_rate.replace(",", "")) > 0
        # the printed ratio is the median of the rounds' own template/plain ratios (not the ratio of the medians,
        # which differs whenever the rounds' speeds differ, as they do on a loaded machine)
        per_round = [
            t["images_per_s"] / p["images_per_s"]
            for entry in result["rounds"]
            for t, p in zip(entry["template"]["phases"], entry["plain"]["phases"])
            if t["backbone_frozen"] == (frozen == "frozen")
        ]
        assert len(per_round) == 2
        assert float(ratio) == pytest.approx(statistics.median(per_round), abs=0.0005)


def test_steady_clock_leaves_out_a_span_in_which_torch_compile_compiled() -> None:
    """A recompile (a new batch shape) in the timed steps is a one-off cost, not throughput: its span is dropped."""
    import torch
    from train_throughput import SteadyClock

    double = torch.compile(lambda x: x * 2, backend="eager")  # dynamo traces each new shape: no inductor needed
    double(torch.ones(4))
    clock = SteadyClock()
    clock.start()
    for size in (4, 4, 3, 3):  # size 3 is new: dynamo traces again in the third step
        double(torch.ones(size))
        clock.step(size)
        if not clock.running:
            clock.start()
    clock.pause()
    figures = clock.figures()
    assert figures["compile_spans_dropped"] == 1
    assert figures["steps_timed"] == 1 and clock.images == 3  # the span of steps 1-3 went; step 4 counts
    assert figures["images_per_s"] > 0


@pytest.mark.slow
def test_gpu_check_dry_run_on_a_cpu_prints_one_row_per_measurement(tmp_path: Path) -> None:
    """The one-command GPU check runs end to end (toy sizes, CPU) and every part gives figures, not an error row:
    a lent GPU's few minutes must not be spent finding a broken script. (The compiled part is left out here: its
    inductor compile alone takes about a minute on 2 cores; its table goes through the same rendering, below.)"""
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--tiny", "--parts", "eager", "cifar", "decode"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OUT": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "gpu_check.md").read_text()
    assert result.stdout.rstrip().endswith(table.rstrip())  # what it prints is what it writes
    rows = table.splitlines()[2:]
    assert not [row for row in rows if "exit " in row or "timed out" in row or "Error" in row], table
    assert [r.split(" | ")[1] for r in rows if r.startswith("| throughput eager")][:2] == ["frozen", "unfrozen"]
    assert re.search(r"\| CIFAR-10 experiment \| 2 epochs, .* \| val/acc \d\.\d{3}, test/acc \d\.\d{3}, ", table)
    assert (
        len([r for r in rows if r.startswith("| JPEG decode")]) == 5
    )  # CPU and data.decode=gpu at 0/1 workers, ceiling
    assert (tmp_path / "eager.log").exists() and (tmp_path / "decode.log").exists()


def test_gpu_check_table_keeps_the_note_on_spans_left_out_for_compiling() -> None:
    import argparse

    from gpu_check import render

    table = [
        "| mode | phase | template img/s | plain img/s | template/plain | rounds' ratios | CPU ms/step, template / plain |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        "| compiled | unfrozen | 6,500.0 | 6,400.0 | ratio 1.016 | 1.016-1.016 | 20.0 / 19.0 |",
        "",
        "Spans of steps left out because torch.compile compiled in them: template 1, plain 1 (SteadyClock).",
    ]
    out = render({"compiled": {"table": table, "seconds": 100.0}}, argparse.Namespace(device="cpu", tiny=True))
    assert "| throughput compiled | unfrozen | template 6,500.0 img/s, plain 6,400.0 img/s" in out
    assert "| throughput compiled | | Spans of steps left out because torch.compile compiled in them" in out
    assert all(line.startswith("|") for line in out.splitlines())
